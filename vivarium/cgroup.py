"""A sandbox's host processes in one cgroup of their own: QEMU, the gateway, the share servers, the network
namespace's holder and the console's keeper, with limits: `pids.max` (threads count too: whatever the guest
can make the host start stops at the sandbox's own limit, not the host's), `memory.max` (the guest's RAM is
charged here as QEMU touches it, with QEMU's own and its helpers' on top), an IO weight, and the CPU scheduler's
fair share of a group (the default weight: a sandbox busy on every core leaves each other sandbox its share).

Where it lives:

- cgroup v2 on a host that systemd runs: a transient scope (`vivarium-<sandbox>-….scope`, `Delegate=yes`)
  of systemd's (run by root: the cgroups there are systemd's to make) or of the user's own systemd (a
  normal user), asked for over the manager's private socket with this process in it (`systemd-run
  --scope` does the same for itself). A process of a login session cannot move itself into the subtree
  systemd delegates to its user (the kernel asks for write access to the common ancestor, `user-UID.slice`,
  root's): the user manager has PID 1 move it. In the scope, the launching process takes a leaf of its own
  (`vivarium`: a cgroup whose controllers are enabled for its children may hold no process) and the
  sandbox's processes `sandbox`, with the limits (root's goes back where it was once they are started);
  systemd removes the scope once both are empty.
- cgroup v2 without systemd (or whose systemd would not make the scope), run by root: `vivarium/<sandbox>`
  under the hierarchy's root, the controllers enabled on the way down (what Docker's cgroupfs driver does).
- a hybrid host (pids and memory bound to v1 hierarchies, as on this project's build machines and older
  distributions): `vivarium/<sandbox>` in each of the pids, memory, blkio and cpu hierarchies, run by root.
- neither (a normal user without a systemd user manager, or whose systemd delegates no pids and memory controllers):
  no cgroup; the sandbox runs, and `status` says why it has none.

A launch joins the cgroup while it starts the sandbox's processes (each inherits it at fork; QEMU's seccomp
filter forbids it to start any of its own) and leaves it afterwards. Where it is is kept in the instance's
directory (`remember`): a scope's place is systemd's to choose.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import os
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

BASE = "vivarium"
MOUNTS = Path("/proc/self/mounts")
V1 = ("pids", "memory", "blkio", "cpu")  # the v1 hierarchies a sandbox gets a directory in (pids and memory required)
RECORD = "cgroup"  # in the instance's directory: the cgroup's path, as /proc/PID/cgroup names it
SCOPE_LAUNCHER, SCOPE_SANDBOX = "vivarium", "sandbox"  # a scope's two leaves
SYSTEMD = Path("/run/systemd/system")  # there when systemd runs the host (sd_booted)


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

    def mounts(self) -> tuple[Path, ...]:
        """The hierarchies a sandbox's cgroup has a directory in: v2's, or v1's pids, memory, blkio and cpu."""
        if self.version == 2:
            assert self.v2 is not None
            return (self.v2,)
        return tuple(self.v1[c] for c in V1 if c in self.v1)

    def dirs(self, leaf: str) -> tuple[Path, ...]:
        return tuple(m / BASE / leaf for m in self.mounts())

    def group(self, path: str) -> Group:
        """The cgroup at `path` (as /proc/PID/cgroup names it) in each of the hierarchies."""
        mounts = self.mounts()
        parts = path.split("/")
        scope = parts[-2] if len(parts) > 2 and parts[-1] == SCOPE_SANDBOX and fnmatch.fnmatch(parts[-2], "vivarium-*.scope") else ""
        return Group(self.version, tuple(m / path.lstrip("/") for m in mounts), mounts, scope)


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
    mounts: tuple[Path, ...]  # each directory's hierarchy
    scope: str = ""  # the systemd scope it is the leaf `SCOPE_SANDBOX` of, if it is one
    home: str = ""  # where root's launching process was before systemd put it in the scope: it goes back there

    @property
    def path(self) -> str:
        """Where it is, as /proc/PID/cgroup names it (from a hierarchy's root)."""
        return "/" + str(self.dirs[0].relative_to(self.mounts[0]))

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
        """This process in the cgroup (what it starts meanwhile stays there), back where it was afterwards.
        A user scope's from outside it (a later `up` mending a running sandbox): moved there by the user's
        systemd, and afterwards into the scope's launcher leaf (its login session's cgroup is not the user's
        to move back into). Unavailable if it cannot be joined."""
        was = {"2": self.home} if self.home else _own_paths()
        try:
            for d in self.dirs:
                (d / "cgroup.procs").write_text(f"{os.getpid()}\n")
        except PermissionError:
            if not self.scope:
                raise Unavailable(f"no permission to move this process into {self.dirs[0]}") from None
            _call_manager("AttachProcessesToUnit", "ssau", (self.scope, "/" + SCOPE_SANDBOX, [os.getpid()]), "move this process into its scope")
            _moved_to(self.path)
            was = {"2": str(Path(self.path).parent / SCOPE_LAUNCHER)}
            (self.mounts[0] / was["2"].lstrip("/")).mkdir(mode=0o755, exist_ok=True)
        try:
            yield
        finally:
            for root in self.mounts:
                back = root / was.get(_key(self.version, root, was), "/").lstrip("/")
                with contextlib.suppress(OSError):
                    (back / "cgroup.procs").write_text(f"{os.getpid()}\n")


def make(name: str, limits: Limits, layout: Layout | None = None) -> Group:
    """The cgroup `name` with these limits; Unavailable if it cannot be made. Where systemd runs the host, a
    scope of its own (root) or of the user's systemd (a normal user), which this process is then in
    (`SCOPE_LAUNCHER`); otherwise made by root under each hierarchy's root (or found, its limits set again)."""
    layout = layout or Layout.read()
    if _systemd_scopes(layout):
        try:
            return _scoped(name, limits, layout)
        except Unavailable:
            if os.geteuid() != 0:
                raise
    return _made(name, limits, layout)  # root: a cgroup of its own making (no systemd, or it would not)


def _made(name: str, limits: Limits, layout: Layout) -> Group:
    """`vivarium/<name>` under each hierarchy's root, made by whoever may (root)."""
    version = layout.version
    dirs = layout.dirs(name)
    try:
        if version == 2:
            assert layout.v2 is not None
            for parent in (layout.v2, layout.v2 / BASE):
                parent.mkdir(mode=0o755, exist_ok=True)
                _enable(parent, layout.v2_controllers)
        for d in dirs:
            d.mkdir(mode=0o755, parents=True, exist_ok=True)
    except PermissionError:
        raise Unavailable(f"no permission to make a cgroup under {dirs[0].parent}") from None
    except OSError as e:
        raise Unavailable(f"cannot make a cgroup under {dirs[0].parent}: {e.strerror or e}") from None
    group = Group(version, dirs, layout.mounts())
    _set_limits(group, limits)
    return group


def _scoped(name: str, limits: Limits, layout: Layout) -> Group:
    """A scope of systemd's (root) or of the user's systemd with this process in it, its leaf `SCOPE_SANDBOX` limited."""
    assert layout.v2 is not None
    home = _own_paths().get("2", "") if os.geteuid() == 0 else ""  # a user's is not theirs to go back into
    scope = layout.v2 / _ask_for_scope(f"vivarium-{name}-{secrets.token_hex(4)}.scope").lstrip("/")
    try:
        launcher = scope / SCOPE_LAUNCHER
        launcher.mkdir(mode=0o755, exist_ok=True)  # the scope's own cgroup is then left without a process:
        (launcher / "cgroup.procs").write_text(f"{os.getpid()}\n")  # its children may have controllers
        delegated = frozenset((scope / "cgroup.controllers").read_text().split())
        if not {"pids", "memory"} <= delegated:
            only = " ".join(sorted(delegated)) or "none"
            raise Unavailable(f"{_manager()} delegates no pids and memory controllers to its scopes (only: {only})")
        _enable(scope, delegated)
        (scope / SCOPE_SANDBOX).mkdir(mode=0o755, exist_ok=True)
    except OSError as e:
        raise Unavailable(f"cannot make a cgroup in {scope}: {e.strerror or e}") from None
    group = Group(2, (scope / SCOPE_SANDBOX,), (layout.v2,), scope.name, home)
    _set_limits(group, limits)
    return group


def _enable(parent: Path, offered: frozenset[str]) -> None:
    """The controllers a sandbox's cgroup needs enabled for `parent`'s children (IO and CPU: where offered)."""
    enabled = set((parent / "cgroup.subtree_control").read_text().split())
    for c in (c for c in ("pids", "memory", "io", "cpu") if c in offered and c not in enabled):
        try:
            (parent / "cgroup.subtree_control").write_text(f"+{c}")
        except OSError:
            if c in ("pids", "memory"):  # IO and CPU weights are best effort; pids and memory are what it is for
                raise


def _set_limits(group: Group, limits: Limits) -> None:
    _write(group, "pids.max", "pids.max", str(limits.pids))
    _write(group, "memory.max", "memory.limit_in_bytes", str(limits.memory))
    weight = limits.io_weight if group.version == 2 else min(1000, max(10, limits.io_weight * 5))  # v1: 10-1000, 500 the default
    with contextlib.suppress(OSError):  # only with an IO scheduler that weighs (BFQ, io.cost): best effort
        _write(group, "io.weight", "blkio.weight", f"default {weight}" if group.version == 2 else str(weight))


def _systemd_scopes(layout: Layout) -> bool:
    """A sandbox's cgroup here is a systemd scope: systemd runs the host, on cgroup v2."""
    return layout.version == 2 and SYSTEMD.is_dir()


def _manager() -> str:
    return "systemd" if os.geteuid() == 0 else "the user's systemd"


def manager_socket() -> Path:
    """systemd's private socket (root's), or the user's systemd's (there whether or not a user bus is): what
    `systemctl` and `systemctl --user` use."""
    if os.geteuid() == 0:
        return Path("/run/systemd/private")
    runtime = Path(os.environ.get("XDG_RUNTIME_DIR") or "/nonexistent")
    with contextlib.suppress(OSError):
        if runtime.stat().st_uid == os.getuid():  # unset, or another user's, under `su` or `sudo -u`
            return runtime / "systemd" / "private"
    return Path(f"/run/user/{os.getuid()}/systemd/private")


def _ask_for_scope(unit: str) -> str:
    """Have systemd (the user's, for a normal user) make the transient scope `unit` with this process in it; its cgroup's path."""
    properties = [
        ("PIDs", ("au", [os.getpid()])),
        ("Delegate", ("b", True)),
        ("CollectMode", ("s", "inactive-or-failed")),  # gone once empty, whatever its end
        ("Description", ("s", "vivarium sandbox's host processes")),
    ]
    _call_manager("StartTransientUnit", "ssa(sv)a(sa(sv))", (unit, "fail", properties, []), "make a scope")
    return _moved_to(unit)  # by the job, once it runs


def _moved_to(ending: str, timeout: float = 10.0) -> str:
    """This process's cgroup once its path ends with `ending` (systemd moves it)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        path = _own_paths().get("2", "")
        if path.endswith("/" + ending.lstrip("/")):
            return path
        time.sleep(0.02)
    raise Unavailable(f"{_manager()} did not move this process into {ending} within {timeout:.0f} s")


def _call_manager(method: str, signature: str, body: tuple[object, ...], what: str, timeout: float = 10.0) -> None:
    """Call `method` of systemd (the user's, for a normal user) over its private socket; Unavailable, with its reason, if it fails."""
    from jeepney import DBusAddress, MessageType, new_method_call  # only here: a launch on a systemd host
    from jeepney.io.blocking import prep_socket
    from jeepney.low_level import HeaderFields, Parser

    where = manager_socket()
    if not where.is_socket():
        raise Unavailable(f"no systemd {'' if os.geteuid() == 0 else 'user manager '}to {what} ({where} is not there)")
    manager = DBusAddress("/org/freedesktop/systemd1", bus_name="org.freedesktop.systemd1", interface="org.freedesktop.systemd1.Manager")
    call = new_method_call(manager, method, signature, body)
    deadline = time.monotonic() + timeout
    try:  # a peer-to-peer connection (EXTERNAL auth: the kernel's word on our uid), so no Hello
        with contextlib.closing(prep_socket(str(where), timeout=timeout)) as sock:
            sock.settimeout(timeout)
            sock.sendall(call.serialise(serial=1))
            parser, seen = Parser(), 0
            while (reply := parser.get_next_message()) is None or reply.header.fields.get(HeaderFields.reply_serial) != 1:
                data = sock.recv(65536)  # signals (UnitNew, JobNew) may come first
                seen += len(data)
                if not data or seen > 1 << 20 or time.monotonic() > deadline:
                    raise Unavailable(f"{_manager()} did not answer when asked to {what}")
                parser.add_data(data)
    except (OSError, ValueError) as e:  # jeepney's AuthenticationError is a ValueError
        raise Unavailable(f"cannot reach {_manager()} at {where}: {getattr(e, 'strerror', None) or e}") from None
    if reply.header.message_type != MessageType.method_return:
        said = reply.body[0] if reply.body and isinstance(reply.body[0], str) else reply.header.fields.get(HeaderFields.error_name, "")
        raise Unavailable(f"{_manager()} would not {what}: {said}")


def remember(directory: Path, group: Group | None, why: str = "") -> None:
    """Keep where the sandbox living in `directory` has its cgroup (a user scope's path is systemd's choice),
    or why its start could make none."""
    (directory / RECORD).write_text((group.path if group is not None else f"none: {why}") + "\n")


def of(name: str, directory: Path, layout: Layout | None = None) -> Group | None:
    """The cgroup of sandbox `name` (living in `directory`), if it has one now: where its last start made it."""
    try:
        path = (directory / RECORD).read_text().strip()
    except OSError:
        path = f"/{BASE}/{leaf_name(name, directory)}"  # started before where was kept
    parts = path.split("/")
    if not path.startswith("/") or any(p in ("", ".", "..") for p in parts[1:]) or "\0" in path:
        return None
    return _existing(path, layout)


def _existing(path: str, layout: Layout | None = None) -> Group | None:
    try:
        group = (layout or Layout.read()).group(path)
        return group if all(d.is_dir() for d in group.dirs) else None
    except (Unavailable, OSError):
        return None


def why_none(directory: Path | None = None) -> str:
    """Why a sandbox here has no cgroup ("" where one is made): what the last start of the one living in
    `directory` found, or the reason make() would give."""
    with contextlib.suppress(OSError):
        if directory is not None and (said := (directory / RECORD).read_text().strip()).startswith("none: "):
            return said.removeprefix("none: ")
    try:
        layout = Layout.read()
        if _systemd_scopes(layout) and os.geteuid() != 0:  # a scope of the user's systemd
            manager = manager_socket()
            return "" if manager.is_socket() else f"no systemd user manager runs for this user ({manager} is not there)"
        base = layout.dirs("x")[0].parent
        while not base.exists():
            base = base.parent
        return "" if os.access(base, os.W_OK) else f"no permission to make a cgroup under {base}"
    except (Unavailable, OSError) as e:
        return str(e)


def where() -> str:
    """Where a sandbox's cgroup is made here, in a few words (why_none() is "")."""
    layout = Layout.read()
    if _systemd_scopes(layout):
        return "a transient scope of systemd's, cgroup v2" if os.geteuid() == 0 else "a transient scope of the user's systemd, cgroup v2"
    return f"cgroup v{layout.version}, under {layout.mounts()[0] / BASE}"


def remove(group: Group, wait: float = 2.0) -> bool:
    """Its directories removed once its processes are gone (they end as QEMU does); False if some stay.
    (A scope's: the scope itself systemd removes once the launching process has left its leaf too.)"""
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
