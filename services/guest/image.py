"""The guest's files, prepared once into a cache folder from Debian's packages (``make guest`` runs this):

- the kernel that ``linux-image-amd64`` depends on (for example ``linux-image-6.1.0-57-amd64``), fetched with
  ``apt-get download`` and unpacked with ``dpkg-deb -x``, never installed on the host; ``depmod -b`` indexes
  its modules so the guest's own ``modprobe`` (the host's kmod, seen over 9p) loads them on demand;
- ``vmlinux``, the uncompressed ELF kernel taken out of the bzImage (what ``extract-vmlinux`` does): QEMU
  boots it through its PVH entry, which saves the ~3 s the kernel's own decompression costs under emulation;
- ``initramfs.gz``: ``busybox-static`` (also fetched, not installed), the modules needed to reach the host's
  root over virtio 9p and overlay it, and ``init`` (this package's ``init.sh``).

Layout of the cache (``KIPVS_GUEST_DIR``, default ``<checkout>/.cache/guest``)::

    <dir>/READY                      the kernel release, written last (its presence means complete)
    <dir>/root/lib/modules/<release>/ the unpacked modules, depmod'ed
    <dir>/vmlinux, <dir>/initramfs.gz

Preparing again is a no-op when READY names a complete image (about 0.1 s). Errors raise
:class:`ImageError` with one sentence (a missing tool, a download refused, an unexpected package).
"""

from __future__ import annotations

import argparse
import gzip
import lzma
import os
import shutil
import subprocess
import sys
import tempfile
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the checkout (an editable install)
META_PACKAGE = "linux-image-amd64"
INIT_SCRIPT = Path(__file__).with_name("init.sh")
# What init needs before the host's root is reachable: virtio PCI, 9p over virtio, overlayfs, and the NIC
# the demo's host link uses. Their dependencies are added from modules.dep.
EARLY_MODULES = ("virtio_pci", "9pnet_virtio", "9p", "overlay", "virtio_net")


class ImageError(Exception):
    """The guest image could not be prepared; the message says why in one sentence."""


def cache_dir() -> Path:
    return Path(os.environ.get("KIPVS_GUEST_DIR") or ROOT / ".cache" / "guest")


def ready_release(directory: Path | None = None) -> str | None:
    """The kernel release of a complete image in ``directory`` (default :func:`cache_dir`), else None."""
    directory = directory or cache_dir()
    try:
        release = (directory / "READY").read_text().strip()
    except OSError:
        return None
    complete = all((directory / name).is_file() for name in ("vmlinux", "initramfs.gz")) and \
        (directory / "root" / "lib" / "modules" / release / "modules.dep").is_file()
    return release if complete else None


def prepare(directory: Path | None = None, log=print) -> str:
    """Make the image in ``directory`` unless it is complete already; returns the kernel release."""
    directory = directory or cache_dir()
    release = ready_release(directory)
    if release:
        return release
    for tool in ("apt-get", "apt-cache", "dpkg-deb", "depmod"):
        if shutil.which(tool) is None:
            raise ImageError(f"{tool} not found: the guest image is made from Debian's packages on a Debian host")
    package = _kernel_package()
    release = package.removeprefix("linux-image-")
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "READY").unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(dir=directory, prefix="download-") as download:
        log(f"guest image: fetching {package} and busybox-static from Debian's archive")
        _run(["apt-get", "download", "-q", package, "busybox-static"], cwd=download)
        debs = {p.name.split("_")[0]: p for p in Path(download).glob("*.deb")}
        if package not in debs or "busybox-static" not in debs:
            raise ImageError(f"apt-get download gave {sorted(debs)}, not {package} and busybox-static")
        root = directory / "root"
        shutil.rmtree(root, ignore_errors=True)
        _run(["dpkg-deb", "-x", str(debs[package]), str(root)])
        busybox = Path(download) / "busybox"
        _run(["dpkg-deb", "-x", str(debs["busybox-static"]), str(busybox)])
        _run(["depmod", "-b", str(root), release])
        modules = root / "lib" / "modules" / release
        bzimage = root / "boot" / f"vmlinuz-{release}"
        (directory / "vmlinux").write_bytes(extract_vmlinux(bzimage.read_bytes()))
        _initramfs(directory / "initramfs.gz", busybox / "bin" / "busybox", modules)
    (directory / "READY").write_text(release + "\n")
    log(f"guest image: {release} ready in {directory}")
    return release


def extract_vmlinux(bzimage: bytes) -> bytes:
    """The ELF kernel inside a bzImage: the first xz or gzip stream that decompresses to an ELF file
    (the logic of the kernel's scripts/extract-vmlinux). Raises ImageError when there is none."""
    for magic, decompress in ((b"\xfd7zXZ\x00", _unxz), (b"\x1f\x8b\x08", _gunzip)):
        start = bzimage.find(magic)
        while start != -1:
            try:
                data = decompress(bzimage[start:])
            except (lzma.LZMAError, zlib.error, EOFError, OSError):
                data = b""
            if data.startswith(b"\x7fELF"):
                return data
            start = bzimage.find(magic, start + 1)
    raise ImageError("no xz or gzip compressed ELF kernel found in the bzImage")


def _unxz(data: bytes) -> bytes:
    return lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(data)


def _gunzip(data: bytes) -> bytes:
    return zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(data)


def _kernel_package() -> str:
    """The versioned kernel package the meta-package depends on, from the host's apt lists."""
    shown = _run(["apt-cache", "depends", META_PACKAGE])
    if f"{META_PACKAGE}" not in shown:
        _run(["apt-get", "update", "-q"])
        shown = _run(["apt-cache", "depends", META_PACKAGE])
    for line in shown.splitlines():
        name = line.strip().removeprefix("Depends:").strip()
        if line.strip().startswith("Depends:") and name.startswith("linux-image-") and name != META_PACKAGE:
            return name
    raise ImageError(f"apt-cache depends {META_PACKAGE} names no kernel package (run apt-get update)")


def _initramfs(target: Path, busybox: Path, modules: Path) -> None:
    """A newc cpio archive (made by busybox's own cpio), gzip-compressed: busybox, init, the early modules."""
    order = _with_dependencies(modules, EARLY_MODULES)
    with tempfile.TemporaryDirectory() as staging:
        stage = Path(staging)
        for folder in ("bin", "sbin", "proc", "sys", "dev", "newroot", "host", "upper", "modules"):
            (stage / folder).mkdir()
        shutil.copy2(busybox, stage / "bin" / "busybox")
        (stage / "bin" / "sh").symlink_to("busybox")
        shutil.copy2(INIT_SCRIPT, stage / "init")
        (stage / "init").chmod(0o755)
        for index, relative in enumerate(order):
            shutil.copy2(modules / relative, stage / "modules" / f"{index:02d}-{Path(relative).name}")
        names = subprocess.run(["find", "."], cwd=stage, capture_output=True, check=True).stdout
        archive = subprocess.run([str(busybox), "cpio", "-o", "-H", "newc"], cwd=stage, input=names,
                                 capture_output=True, check=True).stdout
    target.write_bytes(gzip.compress(archive, compresslevel=6))


def _with_dependencies(modules: Path, wanted: tuple[str, ...]) -> list[str]:
    """Module paths (relative to ``modules``) in load order: each one after what it depends on."""
    deps: dict[str, list[str]] = {}
    by_name: dict[str, str] = {}
    for line in (modules / "modules.dep").read_text().splitlines():
        path, _, rest = line.partition(":")
        deps[path] = rest.split()
        by_name[Path(path).name.split(".ko")[0].replace("-", "_")] = path
    order: list[str] = []

    def visit(path: str) -> None:
        if path in order:
            return
        for dependency in deps.get(path, []):
            visit(dependency)
        order.append(path)

    for name in wanted:
        if name not in by_name:
            builtin = (modules / "modules.builtin").read_text()
            if f"/{name}.ko" in builtin:
                continue
            raise ImageError(f"the kernel has no module {name}")
        visit(by_name[name])
    if any(path.endswith((".xz", ".zst", ".gz")) for path in order):
        raise ImageError("the kernel's modules are compressed; busybox insmod in the initramfs needs plain .ko files")
    return order


def _run(argv: list[str], cwd: str | None = None) -> str:
    try:
        done = subprocess.run(argv, cwd=cwd, capture_output=True, text=True)
    except OSError as exc:
        raise ImageError(f"{argv[0]}: {exc}") from None
    if done.returncode != 0:
        raise ImageError(f"{' '.join(argv)} failed: {(done.stderr or done.stdout).strip().splitlines()[-1:]}")
    return done.stdout


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kipvs.guest.image",
                                     description="Prepare the QEMU guest's kernel and initramfs (idempotent).")
    parser.add_argument("--dir", type=Path, default=None, help="cache folder (default: $KIPVS_GUEST_DIR or "
                                                                "<checkout>/.cache/guest)")
    args = parser.parse_args(argv)
    try:
        prepare(args.dir)
    except ImageError as exc:
        print(f"guest image: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
