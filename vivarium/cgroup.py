"""A sandbox's host processes in one cgroup of their own: QEMU, the gateway, the share servers, the network
namespace's holder and the console's keeper, with limits: `pids.max` (threads count too: whatever the guest
can make the host start stops at the sandbox's own limit, not the host's), `memory.max` (the guest's RAM is
charged here as QEMU touches it, with QEMU's own and its helpers' on top), an IO weight, and the CPU scheduler's
fair share of a group (the default weight: a sandbox busy on every core leaves each other sandbox its share).

Where it lives:

- cgroup v2 with the pids and memory controllers: `vivarium/<sandbox>` under the hierarchy's root, the
  controllers enabled on the way down (what Docker's cgroupfs driver does). Root only, for now.
- a hybrid host (pids and memory bound to v1 hierarchies, as on this project's build machines and older
  distributions): `vivarium/<sandbox>` in each of the pids, memory, blkio and cpu hierarchies.
- neither, or not writable by whoever runs vivarium (a normal user: systemd delegates its user a subtree,
  but a process in a login session cannot move into it; a transient scope is the way there, not done yet):
  no cgroup; the sandbox runs, and `status` says why it has none.

A launch joins the cgroup while it starts the sandbox's processes (each inherits it at fork; QEMU's seccomp
filter forbids it to start any of its own) and leaves it afterwards.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

BASE = "vivarium"
MOUNTS = Path("/proc/self/mounts")
V1 = ("pids", "memory", "blkio", "cpu")  # the v1 hierarchies a sandbox gets a directory in (pids and memory required)


class Unavailable(Exception):
    """No cgroup can be made here; str() says why, in a few words."""


@dataclass(frozen=True)
class Limits:
    pids: int  # processes and threads
    memory: int  # bytes
    io_weight: int  # 1-10000, cgroup v2's scale (100: the default share)


@dataclass(frozen=True)
class Layout:
    """The host's cgroup hierarchies: v2's mount point with the controllers it offers, or v1's per controller."""

    v2: Path | None
    v2_controllers: frozenset[str]
    v1: dict[str, Path]

    @classmethod
    def read(cls, mounts: Path = MOUNTS) -> Layout:
        v2, v1 = None, {}
        for line in mounts.read_text().splitlines():
            fields = line.split()
            if len(fields) < 4:
                continue
            where, kind, options = Path(fields[1].replace("\\040", " ")), fields[2], fields[3].split(",")
            if kind == "cgroup2" and v2 is None:
                v2 = where
            elif kind == "cgroup":
                v1.update({c: where for c in V1 if c in options and c not in v1})
        controllers: frozenset[str] = frozenset()
        if v2 is not None:
            with contextlib.suppress(OSError):
                controllers = frozenset((v2 / "cgroup.controllers").read_text().split())
        return cls(v2, controllers, v1)

    @property
    def version(self) -> int:
        """2 or 1, as a sandbox's cgroup is made here; Unavailable with the reason where neither will do."""
        if self.v2 is not None and {"pids", "memory"} <= self.v2_controllers:
            return 2
        if {"pids", "memory"} <= set(self.v1):
            return 1
        raise Unavailable("the host has no cgroup hierarchy with the pids and memory controllers")

    def dirs(self, leaf: str) -> tuple[Path, ...]:
        if self.version == 2:
            assert self.v2 is not None
            return (self.v2 / BASE / leaf,)
        return tuple(self.v1[c] / BASE / leaf for c in V1 if c in self.v1)


def memory_for(guest: int) -> int:
    """The default memory.max: the guest's RAM, and room for QEMU's own, its helpers' and their page cache."""
    return guest + (1 << 30) + guest // 8


def leaf_name(name: str, instance_dir: Path) -> str:
    """The cgroup's name: the sandbox's, and a digest of where it lives (two users' "default" are two sandboxes)."""
    return f"{name}-{hashlib.sha256(str(instance_dir).encode()).hexdigest()[:8]}"


@dataclass(frozen=True)
class Group:
    """One sandbox's cgroup: one directory (v2) or one per hierarchy (v1)."""

    version: int
    dirs: tuple[Path, ...]

    @property
    def path(self) -> str:
        """Where it is, as /proc/PID/cgroup names it (from a hierarchy's root)."""
        return "/" + str(self.dirs[0].relative_to(self.dirs[0].parent.parent))

    def _find(self, filename: str) -> Path | None:
        return next((d / filename for d in self.dirs if (d / filename).exists()), None)

    def read(self, v2_name: str, v1_name: str) -> str:
        f = self._find(v2_name if self.version == 2 else v1_name)
        if f is None:
            return ""
        try:
            return f.read_text().strip()
        except OSError:
            return ""

    def usage(self) -> dict[str, int | str]:
        """What its processes use now, and their limits ("max": none)."""
        return {
            "path": self.path,
            "pids": _int(self.read("pids.current", "pids.current")),
            "pids_max": _limit(self.read("pids.max", "pids.max")),
            "memory": _int(self.read("memory.current", "memory.usage_in_bytes")),
            "memory_max": _limit(self.read("memory.max", "memory.limit_in_bytes")),
        }

    def pids(self) -> list[int]:
        """Its processes (thread group leaders), as the kernel lists them."""
        with contextlib.suppress(OSError):
            return [int(x) for x in (self.dirs[0] / "cgroup.procs").read_text().split()]
        return []

    @contextlib.contextmanager
    def joined(self) -> Iterator[None]:
        """This process in the cgroup (what it starts meanwhile stays there), back where it was afterwards."""
        was = _own_paths()
        for d in self.dirs:
            (d / "cgroup.procs").write_text(f"{os.getpid()}\n")
        try:
            yield
        finally:
            for d in self.dirs:
                root = d.parent.parent
                back = root / was.get(_key(self.version, root, was), "/").lstrip("/")
                with contextlib.suppress(OSError):
                    (back / "cgroup.procs").write_text(f"{os.getpid()}\n")


def make(name: str, limits: Limits, layout: Layout | None = None) -> Group:
    """The cgroup `name` with these limits, made (or found, its limits set again); Unavailable if it cannot be."""
    layout = layout or Layout.read()
    version = layout.version
    dirs = layout.dirs(name)
    try:
        if version == 2:
            assert layout.v2 is not None
            wanted = [c for c in ("pids", "memory", "io", "cpu") if c in layout.v2_controllers]
            for parent in (layout.v2, layout.v2 / BASE):
                parent.mkdir(mode=0o755, exist_ok=True)
                enabled = set((parent / "cgroup.subtree_control").read_text().split())
                for c in (c for c in wanted if c not in enabled):
                    try:
                        (parent / "cgroup.subtree_control").write_text(f"+{c}")
                    except OSError:
                        if c in ("pids", "memory"):  # IO and CPU weights are best effort; pids and memory are what it is for
                            raise
        for d in dirs:
            d.mkdir(mode=0o755, parents=True, exist_ok=True)
    except PermissionError:
        raise Unavailable(f"no permission to make a cgroup under {dirs[0].parent}") from None
    except OSError as e:
        raise Unavailable(f"cannot make a cgroup under {dirs[0].parent}: {e.strerror or e}") from None
    group = Group(version, dirs)
    _write(group, "pids.max", "pids.max", str(limits.pids))
    _write(group, "memory.max", "memory.limit_in_bytes", str(limits.memory))
    weight = limits.io_weight if version == 2 else min(1000, max(10, limits.io_weight * 5))  # v1: 10-1000, 500 the default
    with contextlib.suppress(OSError):  # only with an IO scheduler that weighs (BFQ, io.cost): best effort
        _write(group, "io.weight", "blkio.weight", f"default {weight}" if version == 2 else str(weight))
    return group


def find(name: str, layout: Layout | None = None) -> Group | None:
    """The cgroup `name` if it exists."""
    try:
        layout = layout or Layout.read()
        dirs = layout.dirs(name)
        return Group(layout.version, dirs) if all(d.is_dir() for d in dirs) else None
    except (Unavailable, OSError):
        return None


def of(name: str, directory: Path) -> Group | None:
    """The cgroup of sandbox `name` (living in `directory`), if it has one now."""
    return find(leaf_name(name, directory))


def why_none() -> str:
    """Why a sandbox here has no cgroup: the reason make() would give."""
    try:
        layout = Layout.read()
        base = layout.dirs("x")[0].parent
        while not base.exists():
            base = base.parent
        return "" if os.access(base, os.W_OK) else f"no permission to make a cgroup under {base}"
    except (Unavailable, OSError) as e:
        return str(e)


def remove(group: Group, wait: float = 2.0) -> bool:
    """Its directories removed once its processes are gone (they end as QEMU does); False if some stay."""
    deadline = time.monotonic() + wait
    while True:
        try:
            for d in group.dirs:
                if d.is_dir():
                    d.rmdir()
            return True
        except OSError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)


def _write(group: Group, v2_name: str, v1_name: str, value: str) -> None:
    filename = v2_name if group.version == 2 else v1_name
    for d in group.dirs:
        if (d / filename).exists():
            (d / filename).write_text(value)


def _own_paths() -> dict[str, str]:
    """This process's cgroups: "2" or a v1 controller list → its path."""
    out = {}
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        out["2" if not controllers else controllers] = path
    return out


def _key(version: int, root: Path, own: dict[str, str]) -> str:
    """The key in `own` (this process's /proc/self/cgroup, read once) of a hierarchy mounted at `root`."""
    if version == 2:
        return "2"
    return next((c for c in own if root.name in c.split(",")), root.name)


def _int(text: str) -> int:
    return int(text) if text.isdigit() else 0


def _limit(text: str) -> int | str:
    return int(text) if text.isdigit() else "max"
