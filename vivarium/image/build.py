"""Build the guest image: mmdebstrap → ext4 → qcow2 base disk, kernel, initrd.

Images live in the cache under their recipe key. A build works in a temporary
directory beside the cache entry and renames it into place only when complete,
so an interrupted build leaves nothing half-made behind.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shlex
import shutil
import subprocess
import tarfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vivarium import state
from vivarium.config import Download
from vivarium.errors import BuildError, DownloadError, InstanceError
from vivarium.guest import EARLY, ROOTFS
from vivarium.image.initrd import make_initrd
from vivarium.image.mmdebstrap import mmdebstrap_argv, run_mmdebstrap
from vivarium.image.recipe import Recipe
from vivarium.progress import Progress, quiet
from vivarium.run import find_program, run

log = logging.getLogger("vivarium.build")


@dataclass(frozen=True)
class Image:
    key: str
    path: Path
    manifest: dict[str, Any]

    @property
    def disk(self) -> Path:
        return self.path / "base.qcow2"

    @property
    def kernel(self) -> Path:
        return self.path / "vmlinuz"

    @property
    def initrd(self) -> Path:
        return self.path / "initrd.img"

    @property
    def build_id(self) -> str:
        return str(self.manifest["build_id"])

    @property
    def left_out(self) -> list[str]:
        return list(self.manifest.get("left_out", []))


def find_image(key: str) -> Image | None:
    path = state.images_dir() / key
    try:
        manifest = json.loads((path / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    image = Image(key, path, manifest)
    if not all(p.is_file() for p in (image.disk, image.kernel, image.initrd)):
        return None
    return image


def rootless() -> bool:
    return os.geteuid() != 0


def as_image_root(*argv: str | Path) -> list[str | Path]:
    """argv run as the image's root: directly when we are root, else in mmdebstrap's user namespace.

    The program is looked up here (sbin included): inside the helper a user's PATH may lack it.
    """
    return [*userns_prefix(), find_program(str(argv[0])), *argv[1:]]


def userns_prefix() -> list[str]:
    """Run a command as root in a user namespace mapping our subordinate ids.

    A rootless mmdebstrap leaves files owned by subordinate uids; reading them
    back with their in-image owners needs its mapping, so ask mmdebstrap.
    """
    return ["mmdebstrap", "--unshare-helper"] if rootless() else []


def build_image(recipe: Recipe, *, force: bool = False, progress: Progress = quiet) -> tuple[Image, bool]:
    """The image for `recipe`, built unless cached. Returns (image, was_built)."""
    key = recipe.key()
    root = state.images_dir()
    root.mkdir(parents=True, exist_ok=True)
    # One build at a time per cache: two at once would only fight over the CPUs.
    with _build_lock(root / ".build.lock"):
        # Whoever holds the lock is the only builder: any work directory here is
        # left from a build that was killed outright.
        for stale in root.glob(".tmp-*"):
            _remove_tree(stale)
        cached = find_image(key)
        if cached and not force:
            return cached, False
        tmp = root / f".tmp-{key}-{os.getpid()}"
        tmp.mkdir()
        try:
            _build_into(tmp, recipe, progress)
            final = root / key
            if final.exists():
                # Running instances keep their open base; stopped ones see the
                # new build id and are told to reset.
                old = root / f".old-{key}-{os.getpid()}"
                final.rename(old)
                shutil.rmtree(old, ignore_errors=True)
            tmp.rename(final)
        except BaseException:
            _remove_tree(tmp)
            raise
        prune_images(keep={key})
    image = find_image(key)
    assert image is not None
    return image, True


KEEP_RECENT = 2


def prune_images(keep: set[str], recent: int = KEEP_RECENT) -> list[str]:
    """Remove cached images no sandbox uses, except the `recent` newest and `keep`.

    Every recipe change (a package, an image setting) makes a new ~2 GB image;
    without this the cache only grows.
    """
    used = set(keep)
    for inst in state.list_instances():
        try:
            used.add(inst.read().instance.image)
        except (OSError, InstanceError):
            continue
    images = [p for p in state.images_dir().iterdir() if (p / "manifest.json").is_file()]
    images.sort(key=lambda p: p.stat().st_mtime, reverse=True)
    removed = []
    for p in images[recent:]:
        if p.name not in used:
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p.name)
            log.info("removed unused cached image %s", p.name)
    return removed


@contextmanager
def _build_lock(path: Path) -> Iterator[None]:
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def mounts_under(path: Path) -> list[Path]:
    """Mount points at or below `path`, deepest first."""
    root = str(path.resolve())
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = line.split()[4].encode().decode("unicode_escape")
            if point == root or point.startswith(root + "/"):
                found.append(Path(point))
    return sorted(found, key=lambda p: len(p.parts), reverse=True)


def _remove_tree(path: Path) -> None:
    """Remove a build directory, never through a mount a killed mmdebstrap left behind."""
    for point in mounts_under(path):
        subprocess.run(["umount", "--lazy", str(point)], check=False, capture_output=True)
    if left := mounts_under(path):
        log.warning("not removing %s: %s is still mounted", path, left[0])
        return
    if rootless() and path.exists():
        subprocess.run([str(a) for a in as_image_root("rm", "-rf", path)], check=False)
    shutil.rmtree(path, ignore_errors=True)


def _build_into(tmp: Path, recipe: Recipe, progress: Progress) -> dict[str, Any]:
    started = time.monotonic()
    for prog in ("mmdebstrap", "mke2fs", "qemu-img", *(["newuidmap"] if rootless() else [])):
        find_program(prog)

    overlay = tmp / "overlay"
    overlay.mkdir()
    got, left_out = fetch_downloads(recipe.downloads, overlay, progress)

    rootdir = tmp / "root"
    early, files = tmp / "early.tar", tmp / "files.tar"
    pack_tree(early, [EARLY])
    pack_tree(files, [ROOTFS, overlay])
    argv = mmdebstrap_argv(recipe, rootdir, early, files, mode="unshare" if rootless() else "root")
    logfile = tmp / "build.log"
    run_mmdebstrap(argv, logfile, progress)

    agents = installed_agents(rootdir, recipe)
    progress("pack", "ext4 filesystem")
    raw = tmp / "base.raw"
    used = int(run(as_image_root("du", "-s", "--block-size=1", rootdir)).stdout.split()[0])
    size_mib = (used * 6 // 5) // (1 << 20) + 512
    # In the rootless namespace our own uid is unmapped: the image's root may
    # write into the file only as "other".
    raw.touch(mode=0o666 if rootless() else 0o644)
    raw.chmod(0o666 if rootless() else 0o644)
    run(as_image_root("mke2fs", "-F", "-q", "-t", "ext4", "-m", "0", "-i", "8192", "-L", "vivarium", "-d", rootdir, raw, f"{size_mib}M"))
    raw.chmod(0o644)
    kernel_version = _copy_boot(rootdir, tmp)
    _remove_tree(rootdir)
    progress("pack", "qcow2 base disk")
    run(["qemu-img", "convert", "-O", "qcow2", raw, tmp / "base.qcow2"])
    raw.unlink()
    shutil.rmtree(overlay)

    manifest = {
        "key": recipe.key(),
        "build_id": uuid.uuid4().hex[:12],
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "seconds": round(time.monotonic() - started, 1),
        "mode": "rootless" if rootless() else "root",
        "kernel": kernel_version,
        "downloads": got,
        "left_out": left_out,
        "agents": agents,
        "recipe": recipe.describe(),
    }
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def pack_tree(out: Path, trees: list[Path]) -> None:
    """A tarball of the files under `trees`, owned by root whoever owns the checkout.

    Only files and links: directories are made by tar as needed and existing
    ones in the image keep their own modes.
    """

    def as_root(info: tarfile.TarInfo) -> tarfile.TarInfo:
        info.uid = info.gid = 0
        info.uname = info.gname = "root"
        return info

    with tarfile.open(out, "w") as tar:
        for tree in trees:
            for path in sorted(tree.rglob("*")):
                if path.is_dir() and not path.is_symlink():
                    continue
                if "__pycache__" in path.parts:
                    continue
                tar.add(path, arcname=str(path.relative_to(tree)), recursive=False, filter=as_root)


def installed_agents(rootdir: Path, recipe: Recipe) -> dict[str, str]:
    """The version of each agent CLI npm installed into the image."""
    found = {}
    for agent, package in zip(recipe.agents, recipe.npm_packages(), strict=True):
        try:
            meta = json.loads((rootdir / "usr/local/lib/node_modules" / package / "package.json").read_text())
        except (OSError, ValueError) as e:
            raise BuildError(f"agent {agent} ({package}) is not in the image after npm install: {e}") from None
        found[agent] = str(meta.get("version", "?"))
    return found


def _copy_boot(rootdir: Path, dest: Path) -> str:
    """Copy the kernel and initrd out of the image; return the kernel version."""
    names = run(as_image_root("ls", rootdir / "boot")).stdout.split()
    kernels = sorted(n for n in names if n.startswith("vmlinuz-"))
    if not kernels:
        raise BuildError("the image has no kernel in /boot", hint="keep linux-image-cloud-amd64 in the package list")
    version = kernels[-1].removeprefix("vmlinuz-")
    for src, name in ((f"vmlinuz-{version}", "vmlinuz"), (f"initrd.img-{version}", "initrd.distro.img")):
        # Through a pipe, so the copy belongs to us even when the image's files do not.
        argv = [str(a) for a in as_image_root("cat", rootdir / "boot" / src)]
        log.debug("run: %s", shlex.join(argv))
        (dest / name).write_bytes(subprocess.run(argv, stdout=subprocess.PIPE, check=True).stdout)
    try:
        (dest / "initrd.img").write_bytes(make_initrd(rootdir, version))
    except (OSError, KeyError) as e:
        # Busybox or a module missing (a custom kernel, say): Debian's initrd still boots it, only slower.
        log.warning("using Debian's initrd: the minimal one cannot be made (%s)", e)
        shutil.copyfile(dest / "initrd.distro.img", dest / "initrd.img")
    return version


# ---------------------------------------------------------------- downloads

USER_AGENT = "vivarium (image build)"


def fetch_downloads(downloads: tuple[Download, ...], overlay: Path, progress: Progress) -> tuple[list[dict[str, str]], list[str]]:
    """Fetch and verify each download into `overlay` at its destination path.

    A wrong checksum or an HTTP error fails the build. A host that cannot be
    reached (no network) leaves the tool out, and says so.
    """
    got: list[dict[str, str]] = []
    left_out: list[str] = []
    cache = state.cache_dir() / "downloads"
    for d in downloads:
        progress("download", f"{d.name} from {d.url}")
        cached = cache / d.sha256
        if not cached.is_file():
            try:
                data = _fetch(d)
            except _Unreachable as e:
                log.warning("left out %s: %s is unreachable (%s)", d.name, d.url, e)
                left_out.append(d.name)
                continue
            cache.mkdir(parents=True, exist_ok=True)
            part = cache / f".{d.sha256}.part"
            part.write_bytes(data)
            part.rename(cached)
        target = overlay / d.dest.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(cached, target)
        target.chmod(0o755)
        got.append({"name": d.name, "url": d.url, "sha256": d.sha256, "dest": d.dest})
    return got, left_out


class _Unreachable(Exception):
    pass


def _fetch(d: Download, timeout: float = 30.0) -> bytes:
    req = urllib.request.Request(d.url, headers={"User-Agent": USER_AGENT})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            data: bytes = resp.read()
    except urllib.error.HTTPError as e:
        raise DownloadError(f"download {d.name}: {d.url} answered {e.code} {e.reason}", hint="fix the url in [[image.download]]") from None
    except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
        raise _Unreachable(getattr(e, "reason", e)) from None
    actual = hashlib.sha256(data).hexdigest()
    if actual != d.sha256:
        raise DownloadError(
            f"download {d.name}: {d.url} has sha256 {actual}, expected {d.sha256}",
            hint="the file changed or the sum is wrong; check it before trusting it",
        )
    return data
