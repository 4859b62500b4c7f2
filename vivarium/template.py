"""Ready templates: a guest booted once to a ready state (SSH up, Docker started) and saved.

A new sandbox of the same shape (image, memory, cpus, disk and swap sizes,
user, accelerator) restores from it instead of booting: its disks are qcow2
overlays on the template's, QEMU starts with `-incoming`, the shares are
plugged in, and `reidentify` inside makes the guest this instance (keys,
machine-id, hostname, clock, entropy) before `up` says it is ready.

Templates live in the image cache, next to the image they were made from.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vivarium import config as cfg
from vivarium import ssh, state

if TYPE_CHECKING:
    from vivarium.image.build import Image
    from vivarium.sandbox import Progress

# Bump when what a template holds changes shape (devices, guest setup).
TEMPLATE_VERSION = 1


@dataclass(frozen=True)
class Template:
    path: Path

    @property
    def memory(self) -> Path:
        return self.path / "memory"

    @property
    def files(self) -> state.InstanceDir:
        """The saved disks, key and pinned host key, named as in the instance they were saved from."""
        return state.InstanceDir(self.path.name, self.path)

    @property
    def disk(self) -> Path:
        return self.files.disk

    @property
    def swap(self) -> Path:
        return self.files.swap

    def meta(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads((self.path / "meta.json").read_text())
        return data

    def target(self, port: int) -> ssh.Target:
        """The template's own identity: how to reach a guest just restored from it."""
        m = self.meta()
        return ssh.Target(alias=m["alias"], user=m["user"], port=port, key=self.files.key, known_hosts=self.files.known_hosts)


def key_of(image: Image, c: cfg.Config, accel: str) -> str:
    blob = json.dumps([TEMPLATE_VERSION, image.build_id, c.vm.memory, c.vm.cpus, c.vm.disk, c.vm.swap, c.vm.user, accel])
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def templates_dir() -> Path:
    return state.cache_dir() / "templates"


def find(image: Image, c: cfg.Config, accel: str) -> Template | None:
    t = Template(templates_dir() / key_of(image, c, accel))
    return t if (t.path / "meta.json").exists() else None


def prune() -> list[str]:
    """Remove templates whose image is gone from the cache. Returns their keys."""
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
            build_id = json.loads(meta.read_text())["build_id"]
        except (OSError, ValueError, KeyError):
            continue
        if build_id not in live:
            shutil.rmtree(meta.parent, ignore_errors=True)
            gone.append(meta.parent.name)
    return gone


def make(image: Image, c: cfg.Config, accel: str, progress: Progress) -> Template:
    """Boot a throwaway sandbox of this shape to ready, save it, keep only the saved state."""
    from vivarium.sandbox import Sandbox, free_port  # the template is made by the machinery it feeds

    key = key_of(image, c, accel)
    final = templates_dir() / key
    final.parent.mkdir(parents=True, exist_ok=True)
    with open(final.parent / f".{key}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two `up`s at once make one template
        if (final / "meta.json").exists():
            return Template(final)
        tc = replace(c, share=(), forward=(cfg.Forward(free_port(), 22),), network=replace(c.network, mode="offline"))  # it never needs out
        name = f"tpl-{key[:12]}"
        box = Sandbox(name, tc)
        if box.exists():
            box.destroy()
        try:
            progress("template", "booting a template to a ready state (once per image and shape)")
            box.up(progress=progress, cold=True)
            progress("template", "starting Docker in the template")
            box.exec(["sudo", "systemctl", "start", "docker.service"], capture=True, timeout=600)
            box.exec(["sync"], capture=True)
            progress("template", "saving the template")
            box.snapshot_save("template")
            tmp = final.with_name(f".{key}.tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            (box.dir.path / "snapshots" / "template").rename(tmp)
            saved = state.InstanceDir(name, tmp)
            shutil.copy2(box.dir.key, saved.key)
            shutil.copy2(box.dir.known_hosts, saved.known_hosts)
            info = json.loads((tmp / "meta.json").read_text())
            info.update({"alias": f"vivarium-{name}", "user": box.meta()["user"], "made": time.time(), "key": key})
            (tmp / "meta.json").write_text(json.dumps(info, indent=1))
            tmp.rename(final)
            prune()
        finally:
            if box.exists():
                box.destroy()
    return Template(final)
