"""The guest's files, prepared once into a cache folder from Debian's packages (``make guest`` runs this):

- the kernel that ``linux-image-amd64`` depends on (for example ``linux-image-6.1.0-57-amd64``), fetched with
  ``apt-get download`` and unpacked with ``dpkg-deb -x``, never installed on the host; ``depmod -b`` indexes
  its modules so the guest's own ``modprobe`` (the host's kmod, seen over 9p) loads them on demand;
- ``vmlinux``, the uncompressed ELF kernel taken out of the bzImage (what ``extract-vmlinux`` does): QEMU
  boots it through its PVH entry, which saves the ~3 s the kernel's own decompression costs under emulation;
- ``initramfs.gz``: ``busybox-static`` (also fetched, not installed), the modules needed to reach the host's
  root over virtio 9p and overlay it, and ``init`` (this package's ``init.sh``).

Layout of the cache (``KIPVS_GUEST_DIR``; default ``<checkout>/.cache/guest``, or ``~/.cache/kipvs/guest``
for an installed package)::

    <dir>/READY                      {"release": ..., "sizes": {file: bytes}}, written last; checked on use
    <dir>/root/lib/modules/<release>/ the unpacked modules, depmod'ed
    <dir>/vmlinux, <dir>/initramfs.gz

Preparing again is a no-op when READY names a complete image (about 0.1 s): the files it lists, with
their sizes, and the modules the guest cannot do without. A damaged image (a truncated file, a deleted
module) is made again. Concurrent preparations of one folder wait for each other (a lock file). Errors
raise :class:`ImageError` with one sentence (a missing tool, a download refused, an unexpected package).
"""

from __future__ import annotations

import argparse
import fcntl
import gzip
import json
import lzma
import os
import shutil
import subprocess
import sys
import tempfile
import tomllib
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]  # the checkout, when kipvs runs from one (an editable install)
META_PACKAGE = "linux-image-amd64"
INIT_SCRIPT = Path(__file__).with_name("init.sh")
# What init needs before the host's root is reachable: virtio PCI, 9p over virtio, overlayfs, and the NIC
# the demo's host link uses. Their dependencies are added from modules.dep.
EARLY_MODULES = ("virtio_pci", "9pnet_virtio", "9p", "overlay", "virtio_net")
# Modules whose absence makes the guest useless for kipvs (checked with the image).
REQUIRED_MODULES = ("kernel/net/netfilter/ipvs/ip_vs.ko", "kernel/net/netfilter/nf_tables.ko",
                    "kernel/drivers/net/dummy.ko", "kernel/net/netfilter/ipset/ip_set.ko")
SBIN = ("/usr/sbin", "/sbin")  # depmod lives there, outside a normal user's PATH


class ImageError(Exception):
    """The guest image could not be prepared; the message says why in one sentence."""


def _is_checkout(folder: Path) -> bool:
    """Whether ``folder`` is kipvs's checkout: its pyproject.toml names kipvs (site-packages may hold another
    distribution's pyproject.toml: kubernetes_asyncio installs one there)."""
    try:
        return tomllib.loads((folder / "pyproject.toml").read_text()).get("project", {}).get("name") == "kipvs"
    except (OSError, ValueError):
        return False


def cache_dir() -> Path:
    """The image folder, absolute: $KIPVS_GUEST_DIR, else <checkout>/.cache/guest when kipvs runs from its
    checkout (where ``make`` puts it), else $XDG_CACHE_HOME/kipvs/guest (``~/.cache/kipvs/guest``) for an
    installed package, whose files sit in site-packages and have no checkout around them."""
    chosen = os.environ.get("KIPVS_GUEST_DIR")
    if chosen:
        return Path(chosen).absolute()
    if _is_checkout(ROOT):
        return (ROOT / ".cache" / "guest").absolute()
    user_cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return (Path(user_cache) / "kipvs" / "guest").absolute()


def ready_release(directory: Path | None = None) -> str | None:
    """The kernel release of a complete, undamaged image in ``directory`` (default :func:`cache_dir`),
    else None."""
    directory = (directory or cache_dir()).absolute()
    try:
        manifest = json.loads((directory / "READY").read_text())
        release, sizes = str(manifest["release"]), dict(manifest["sizes"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    modules = directory / "root" / "lib" / "modules" / release
    try:
        intact = all((directory / name).stat().st_size == size for name, size in sizes.items()) and \
            {"vmlinux", "initramfs.gz"} <= set(sizes) and (modules / "modules.dep").is_file() and \
            all((modules / module).is_file() for module in REQUIRED_MODULES)
    except OSError:
        return None
    return release if intact else None


def _tool(name: str) -> str | None:
    return shutil.which(name, path=os.pathsep.join([os.environ.get("PATH", ""), *SBIN]))


def prepare(directory: Path | None = None, log=print, rebuild: bool = False) -> str:
    """Make the image in ``directory`` unless it is complete already (or ``rebuild``); returns the kernel
    release. Holds a lock on the folder while it works."""
    directory = (directory or cache_dir()).absolute()
    directory.mkdir(parents=True, exist_ok=True)
    with (directory / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another preparation of this folder finishes first
        release = None if rebuild else ready_release(directory)
        return release or _prepare(directory, log)


def _prepare(directory: Path, log) -> str:
    for tool in ("apt-get", "apt-cache", "dpkg-deb", "depmod"):
        if _tool(tool) is None:
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
        _run([_tool("depmod") or "depmod", "-b", str(root), release])
        modules = root / "lib" / "modules" / release
        bzimage = root / "boot" / f"vmlinuz-{release}"
        (directory / "vmlinux").write_bytes(extract_vmlinux(bzimage.read_bytes()))
        _initramfs(directory / "initramfs.gz", busybox / "bin" / "busybox", modules)
    missing = [m for m in REQUIRED_MODULES if not (modules / m).is_file()]
    if missing:
        raise ImageError(f"{package} lacks {', '.join(missing)}: not a kernel kipvs can use")
    sizes = {name: (directory / name).stat().st_size for name in ("vmlinux", "initramfs.gz")}
    (directory / "READY").write_text(json.dumps({"release": release, "sizes": sizes}) + "\n")
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
        last = ((done.stderr or done.stdout).strip().splitlines() or ["no output"])[-1]
        raise ImageError(f"{' '.join(argv)} failed: {last}")
    return done.stdout


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.harness.guest.image",
                                     description="Prepare the QEMU guest's kernel and initramfs (idempotent).")
    parser.add_argument("--dir", type=Path, default=None, help="cache folder (default: $KIPVS_GUEST_DIR, else "
                                                                f"{cache_dir()})")
    parser.add_argument("--rebuild", action="store_true", help="make the image again even if it looks complete")
    args = parser.parse_args(argv)
    try:
        prepare(args.dir, rebuild=args.rebuild)
    except ImageError as exc:
        print(f"guest image: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("guest image: interrupted; the next run starts over", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
