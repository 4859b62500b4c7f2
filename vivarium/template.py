"""Ready templates: a guest booted once to a ready state (SSH up, Docker started) and saved.

A new sandbox of the same shape (image, memory, cpus, disk and swap sizes,
user, accelerator, QEMU version and machine type) restores from it instead of booting: its disks are qcow2
overlays on the template's, its RAM a copy of the template's (vm/memory.py),
QEMU loads the saved device state, the shares are plugged in, and the guest's
control agent makes it this instance (keys, machine-id, hostname, clock,
entropy) before `up` says it is ready: no login with a shared key.

Templates live in the image cache, next to the image they were made from.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import shutil
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from vivarium import config as cfg
from vivarium import state
from vivarium.errors import InstanceError, VMError
from vivarium.ports import free_port
from vivarium.run import run
from vivarium.vm import caps, channel
from vivarium.vm.qemu import LAYOUT

if TYPE_CHECKING:
    from vivarium.image.build import Image
    from vivarium.progress import Progress

# Bump when what a template holds changes shape (files, guest setup); the
# device layout (qemu.LAYOUT) is part of the key as well.
TEMPLATE_VERSION = 3  # 3: the RAM is a memory-backend-file also when the template boots (QEMU 10 kept it in the stream)


@dataclass(frozen=True)
class Template:
    path: Path

    @property
    def files(self) -> state.InstanceDir:
        """The saved disks, named as in the instance they were saved from."""
        return state.InstanceDir(self.path.name, self.path)

    @property
    def disk(self) -> Path:
        return self.files.disk

    @property
    def swap(self) -> Path:
        return self.files.swap


def key_of(image: Image, c: cfg.Config, accel: str, qemu: caps.Qemu) -> str:
    """A saved state loads only into the same shape, accelerator, QEMU version and machine type; and it has its
    agent user made, by name and uid."""
    blob = json.dumps([TEMPLATE_VERSION, LAYOUT, image.build_id, c.vm.memory, c.vm.cpus, c.vm.disk, c.vm.swap, c.vm.user, c.uid,
                       accel, qemu.version, qemu.machine])  # fmt: skip
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def templates_dir() -> Path:
    return state.cache_dir() / "templates"


def find(image: Image, c: cfg.Config, accel: str, qemu: caps.Qemu) -> Template | None:
    return get(key_of(image, c, accel, qemu))


def get(key: str) -> Template | None:
    """The finished template `key` (its meta.json is written last), or None."""
    t = Template(templates_dir() / key)
    return t if (t.path / "meta.json").exists() else None


def prune() -> list[str]:
    """Remove templates whose image is gone from the cache, or made by another TEMPLATE_VERSION,
    unless a sandbox's disks are still overlays on them. Returns their keys."""
    used = set()
    for inst in state.list_instances():
        try:
            used.add(inst.read().instance.template)
        except (OSError, InstanceError):
            continue
    live = set()
    if state.images_dir().is_dir():
        for m in state.images_dir().glob("*/manifest.json"):
            try:
                live.add(json.loads(m.read_text())["build_id"])
            except (OSError, ValueError, KeyError):
                continue
    gone = []
    for meta in templates_dir().glob("*/meta.json") if templates_dir().is_dir() else ():
        try:
            info = json.loads(meta.read_text())
            build_id, version = info["build_id"], info.get("version", 1)
        except (OSError, ValueError, KeyError):
            continue
        if meta.parent.name not in used and (build_id not in live or version != TEMPLATE_VERSION):
            shutil.rmtree(meta.parent, ignore_errors=True)
            gone.append(meta.parent.name)
    return gone


class Throwaway(Protocol):
    """A sandbox made only to become a template (the machinery the template feeds makes it)."""

    dir: state.InstanceDir

    def exists(self) -> bool: ...
    def up(self, *, progress: Progress, cold: bool) -> object: ...
    def exec(self, command: Sequence[str], *, capture: bool = ..., timeout: float | None = ...) -> subprocess.CompletedProcess[str]: ...
    def snapshot_save(self, tag: str) -> object: ...
    def destroy(self) -> None: ...


def make(image: Image, c: cfg.Config, accel: str, qemu: caps.Qemu, progress: Progress,
         sandbox: Callable[[str, cfg.Config], Throwaway]) -> Template:  # fmt: skip
    """Boot a throwaway sandbox of this shape to ready, save it, keep only the saved state."""
    key = key_of(image, c, accel, qemu)
    final = templates_dir() / key
    final.parent.mkdir(parents=True, exist_ok=True)
    with open(final.parent / f".{key}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two `up`s at once make one template
        if (final / "meta.json").exists():
            return Template(final)
        tc = replace(c, share=(), forward=(cfg.Forward(free_port(), 22),), network=replace(c.network, mode="offline"))  # it never needs out
        name = f"tpl-{key[:12]}"
        box = sandbox(name, tc)
        if box.exists():
            box.destroy()
        try:
            progress("template", "booting a template to a ready state (once per image and shape)")
            box.up(progress=progress, cold=True)
            progress("template", "starting Docker in the template")
            # and the modules a copy with shares needs, loaded once here instead of in every copy
            r = box.exec(["sudo", "sh", "-c", "systemctl start docker.service && modprobe -a virtiofs overlay && sync"], capture=True, timeout=600)
            if r.returncode != 0:
                raise VMError(f"the template could not start Docker: {(r.stderr or r.stdout).strip()[-300:]}",
                              hint=f"run with --debug; the template's console log is {box.dir.serial}")  # fmt: skip
            channel.request(box.dir.control, "ping", timeout=120)  # its agent listens: copies will be able to become themselves
            progress("template", "saving the template")
            box.snapshot_save("template")
            tmp = final.with_name(f".{key}.tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            move_tree(box.dir.path / "snapshots" / "template", tmp)  # from the state directory into the cache
            info = json.loads((tmp / "meta.json").read_text())
            info.update({"user": c.vm.user, "made": time.time(), "key": key, "version": TEMPLATE_VERSION})
            (tmp / "meta.json").write_text(json.dumps(info, indent=1))
            tmp.rename(final)
            prune()
        finally:
            if box.exists():
                box.destroy()
    return Template(final)


def move_tree(src: Path, dest: Path) -> None:
    """Rename; where `src` and `dest` are on different filesystems (state on tmpfs, the cache on disk), copy
    (sparse files kept sparse: a template's RAM is mostly holes) and remove."""
    try:
        src.rename(dest)
    except OSError as e:
        if e.errno != errno.EXDEV:
            raise
        try:
            run(["cp", "-a", "--reflink=auto", "--sparse=always", "--", src, dest])
        except BaseException:
            shutil.rmtree(dest, ignore_errors=True)
            raise
        shutil.rmtree(src)
