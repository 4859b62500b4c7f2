"""Where things live on disk: the image cache, instances, locks, pid files.

VIVARIUM_HOME puts everything under one root (tests use it); otherwise the
XDG cache and state directories.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from vivarium import record
from vivarium.errors import InstanceError, UsageError

NAME_RE = re.compile(r"[a-z0-9][a-z0-9-]{0,30}")


def _xdg(var: str, fallback: str) -> Path:
    value = os.environ.get(var)
    return Path(value) if value and os.path.isabs(value) else Path.home() / fallback


def cache_dir() -> Path:
    home = os.environ.get("VIVARIUM_HOME")
    return Path(home) / "cache" if home else _xdg("XDG_CACHE_HOME", ".cache") / "vivarium"


def state_dir() -> Path:
    home = os.environ.get("VIVARIUM_HOME")
    return Path(home) / "state" if home else _xdg("XDG_STATE_HOME", ".local/state") / "vivarium"


def images_dir() -> Path:
    return cache_dir() / "images"


def instances_dir() -> Path:
    return state_dir() / "instances"


def check_name(name: str) -> str:
    if not NAME_RE.fullmatch(name):
        raise UsageError(
            f"{name!r} is not a valid sandbox name",
            hint="use lowercase letters, digits and '-', at most 31 characters",
        )
    return name


@dataclass(frozen=True)
class InstanceDir:
    """The files of one named instance."""

    name: str
    path: Path

    @classmethod
    def of(cls, name: str) -> InstanceDir:
        return cls(check_name(name), instances_dir() / name)

    @property
    def disk(self) -> Path:
        return self.path / "disk.qcow2"

    @property
    def swap(self) -> Path:
        return self.path / "swap.qcow2"

    @property
    def key(self) -> Path:
        return self.path / "id_ed25519"

    @property
    def host_key(self) -> Path:
        return self.path / "ssh_host_ed25519_key"

    @property
    def known_hosts(self) -> Path:
        return self.path / "known_hosts"

    @property
    def qmp(self) -> Path:
        return self.path / "qmp.sock"

    @property
    def pidfile(self) -> Path:
        return self.path / "qemu.pid"

    @property
    def log(self) -> Path:
        """QEMU's own messages (its stderr once it has daemonized)."""
        return self.path / "qemu.log"

    @property
    def serial(self) -> Path:
        """The console log, in a directory of its own: the console's keeper, started by root, writes there as
        a uid of the sandbox's (vm/console.py)."""
        return self.path / "console" / "serial.log"

    @property
    def frozen(self) -> Path:
        """The settings the sandbox was made with (Sandbox.config)."""
        return self.path / "config.json"

    @property
    def meta(self) -> Path:
        return self.path / "instance.json"

    @property
    def lockfile(self) -> Path:
        return self.path / "lock"

    @property
    def control(self) -> Path:
        """The base name of the control channel's FIFOs (control.in, control.out)."""
        return self.path / "control"

    @property
    def fwcfg(self) -> Path:
        return self.path / "fw_cfg"

    def exists(self) -> bool:
        return bool(self.meta.exists())

    def read(self) -> record.Record:
        """What the instance is and what its latest start did."""
        try:
            return record.from_json(self.meta.read_text())
        except FileNotFoundError:
            raise InstanceError(f"no sandbox named {self.name!r}", hint="see `vivarium ls`, or create it with `vivarium up`") from None
        except record.Damaged as e:
            raise InstanceError(f"the record of sandbox {self.name!r} ({self.meta}) cannot be read: {e}",
                                hint=f"`vivarium destroy {self.name}` and make it again") from None  # fmt: skip

    def qemu_pid(self) -> int | None:
        """The pid of this instance's QEMU while that very process runs: the pid and start time its latest start recorded.
        (A record migrated from before start times were kept: a live QEMU with this instance's name.)"""
        try:
            run = self.read().run
        except InstanceError:
            return None
        if run is None or run.pid <= 0:
            return None
        if run.qemu_started is not None:
            return run.pid if started(run.pid) == run.qemu_started else None
        return run.pid if named_qemu(run.pid, self.name) and started(run.pid) is not None else None

    def write(self, rec: record.Record) -> None:
        write_atomic(self.meta, rec.to_json())

    @contextmanager
    def lock(self, *, wait: bool = True) -> Iterator[None]:
        """Hold this instance's lock: one `up`, `stop` or `reset` at a time."""
        self.path.mkdir(parents=True, exist_ok=True)
        with open(self.lockfile, "a") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            except OSError as e:
                if e.errno in (errno.EAGAIN, errno.EACCES):
                    raise InstanceError(f"sandbox {self.name!r} is busy with another vivarium command") from None
                raise
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)


def list_instances() -> list[InstanceDir]:
    root = instances_dir()
    if not root.is_dir():
        return []
    return [InstanceDir(p.name, p) for p in sorted(root.iterdir()) if (p / "instance.json").exists()]


def write_atomic(path: Path, text: str, mode: int = 0o644) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def stat_fields(pid: int) -> list[str] | None:
    """/proc/PID/stat's fields after the command name (the first: its state), or None if there is no such process."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None


def started(pid: int) -> int | None:
    """When process `pid` started (clock ticks since boot), or None if it is not running (a zombie is not).
    With the pid, who a process is: a pid reused by another process has another start time."""
    fields = stat_fields(pid)
    if not fields or fields[0] in ("Z", "X"):
        return None
    return int(fields[19])  # field 22 of stat, counted after the command name's ")"


def named_qemu(pid: int, name: str) -> bool:
    """Is process `pid` a QEMU of instance `name` by its command line? Only for the moment QEMU's own pid file
    was just written, and for records from before start times were kept: otherwise a process is known by its start time."""
    try:
        return f"vivarium-{name},".encode() in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def alive(pid: int) -> int | None:
    """When process `pid` started, if it runs and is not on its way out: one that is exiting (its command line
    already gone) or a zombie is not. A QEMU killed with a large guest takes a while to die, and what watches
    for the next QEMU must not take it for that one."""
    try:
        if not Path(f"/proc/{pid}/cmdline").read_bytes():
            return None
    except OSError:
        return None
    return started(pid)


def named_by(pidfile: Path) -> tuple[int, int] | None:
    """The process a plain pid file names (QEMU's own), its pid and start time, if it is alive()."""
    try:
        pid = int(pidfile.read_text().strip())
    except (OSError, ValueError):
        return None
    start = alive(pid) if pid > 0 else None
    return (pid, start) if start is not None else None


def pid_running(pidfile: Path) -> bool:
    """Is the process a plain pid file names (QEMU's own) running, and not exiting (alive())?"""
    return named_by(pidfile) is not None


def write_pid(path: Path, pid: int | None = None) -> None:
    """A pid file naming the process by its pid and its start time."""
    pid = os.getpid() if pid is None else pid
    write_atomic(path, f"{pid} {started(pid)}\n")


def read_pid(path: Path) -> int | None:
    """The pid in a pid file written by write_pid, if that very process still runs."""
    try:
        pid, start = (int(x) for x in path.read_text().split())
    except (OSError, ValueError):
        return None
    return pid if started(pid) == start else None


def names_me(path: Path) -> bool:
    """Does this pid file name this process?"""
    return read_pid(path) == os.getpid()
