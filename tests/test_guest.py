"""The real-kernel substrate itself (services.harness.guest): the image's pure parts here, and one boot that checks
what every kernel test relies on (exit status, output, the accelerator and time scale, module autoloading
of IPVS and nf_tables, the host's files read-only under a writable overlay)."""

from __future__ import annotations

import gzip
import lzma
from pathlib import Path

import pytest

from services.harness.guest import image, vm

ELF = b"\x7fELF" + bytes(60)


@pytest.mark.parametrize("compress", [gzip.compress, lambda data: lzma.compress(data, format=lzma.FORMAT_XZ)])
def test_extract_vmlinux_finds_the_compressed_elf_after_decoys(compress) -> None:
    decoy = b"\x1f\x8b\x08" + b"not gzip" + b"\xfd7zXZ\x00" + b"not xz"
    assert image.extract_vmlinux(b"MZ" + bytes(500) + decoy + compress(ELF) + bytes(64)) == ELF


def test_extract_vmlinux_without_a_kernel_says_so() -> None:
    with pytest.raises(image.ImageError, match="no xz or gzip compressed ELF kernel"):
        image.extract_vmlinux(b"MZ" + gzip.compress(b"not an elf"))


def test_initramfs_modules_come_after_their_dependencies(tmp_path) -> None:
    (tmp_path / "modules.dep").write_text("kernel/fs/9p/9p.ko: kernel/net/9p/9pnet.ko kernel/fs/netfs/netfs.ko\n"
                                          "kernel/net/9p/9pnet.ko:\nkernel/fs/netfs/netfs.ko:\n")
    (tmp_path / "modules.builtin").write_text("kernel/fs/overlayfs/overlay.ko\n")
    assert image._with_dependencies(tmp_path, ("9p", "overlay")) == [
        "kernel/net/9p/9pnet.ko", "kernel/fs/netfs/netfs.ko", "kernel/fs/9p/9p.ko"]
    with pytest.raises(image.ImageError, match="no module ip_vs"):
        image._with_dependencies(tmp_path, ("ip_vs",))


@pytest.mark.guest
def test_the_guest_runs_a_command_in_a_real_kernel() -> None:
    reason = vm.unavailable_reason()
    assert reason is None, f"THE GUEST CANNOT RUN HERE: {reason}"
    run = vm.run_in_guest(
        "echo accel=$KIPVS_GUEST_ACCEL scale=$KIPVS_GUEST_TIME_SCALE; uname -r; "
        "ipvsadm -A -t 10.0.0.1:80 -s mh && ipvsadm -Sn; nft add table inet t && nft list tables; "
        "touch /usr/kipvs-overlay-write && echo overlay-writable; echo oops >&2; exit 7", timeout=120)
    assert run.status == 7, run.output
    assert f"accel={run.accelerator} scale={vm.TIME_SCALE[run.accelerator]}" in run.output
    assert image.ready_release() in run.output
    assert "-A -t 10.0.0.1:80 -s mh" in run.output, "ipvs and a scheduler module loaded on demand"
    assert "table inet t" in run.output, "nf_tables for inet"
    assert "overlay-writable" in run.output and "oops" in run.output
    from pathlib import Path

    assert not Path("/usr/kipvs-overlay-write").exists(), "the guest's writes never reach the host"


def test_a_damaged_image_is_not_ready(tmp_path) -> None:
    release = "6.1.0-test"
    modules = tmp_path / "root" / "lib" / "modules" / release
    for module in image.REQUIRED_MODULES:
        (modules / module).parent.mkdir(parents=True, exist_ok=True)
        (modules / module).write_bytes(b"ko")
    (modules / "modules.dep").write_text("")
    (tmp_path / "vmlinux").write_bytes(ELF)
    (tmp_path / "initramfs.gz").write_bytes(b"x" * 10)
    (tmp_path / "READY").write_text('{"release": "6.1.0-test", "sizes": {"vmlinux": 64, "initramfs.gz": 10}}')
    assert image.ready_release(tmp_path) == release
    (tmp_path / "initramfs.gz").write_bytes(b"x" * 5)  # truncated
    assert image.ready_release(tmp_path) is None
    (tmp_path / "initramfs.gz").write_bytes(b"x" * 10)
    (modules / image.REQUIRED_MODULES[0]).unlink()  # ip_vs gone
    assert image.ready_release(tmp_path) is None
    (tmp_path / "READY").write_text("6.1.0-test\n")  # an old or garbled manifest
    assert image.ready_release(tmp_path) is None


@pytest.mark.guest
def test_output_that_imitates_the_markers_or_lacks_a_newline_is_handed_back_whole() -> None:
    lines: list[str] = []
    run = vm.run_in_guest(f"echo before; echo '{vm.END} 0'; echo after; printf 'a\\rb'; exit 3", timeout=120,
                          on_line=lines.append)
    assert run.status == 3
    assert run.output.split("\n") == ["before", f"{vm.END} 0", "after", "a\rb"]
    assert lines[:4] == ["before", f"{vm.END} 0", "after", "a\rb"], "on_line sees every line, in order"


def test_the_image_folder_is_the_checkouts_else_the_users_cache(monkeypatch: pytest.MonkeyPatch,
                                                                tmp_path: Path) -> None:
    monkeypatch.delenv("KIPVS_GUEST_DIR", raising=False)
    assert image.cache_dir() == image.ROOT / ".cache" / "guest"  # running from this checkout
    site_packages = tmp_path / "site-packages"  # an installed package: no checkout, another's pyproject.toml
    site_packages.mkdir()
    (site_packages / "pyproject.toml").write_text('[project]\nname = "kubernetes_asyncio"\n')
    monkeypatch.setattr(image, "ROOT", site_packages)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert image.cache_dir() == tmp_path / "cache" / "kipvs" / "guest"
    monkeypatch.setenv("KIPVS_GUEST_DIR", "chosen")
    assert image.cache_dir() == Path("chosen").absolute()
