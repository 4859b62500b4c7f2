"""A running QEMU: start it in the background, find it, talk QMP, stop it.

QEMU runs on its own (vm/spawn.py starts it in a session of its own, then leaves it) so it outlives the
CLI, under its seccomp filter where it has one. It is found again by its pid and its start time (kept in
the instance's record) and then held by a pidfd, so that no signal reaches a process that reused its pid.
What it says on stdout and stderr goes to a log in the instance directory, from which a failure's reason
is shown. Saved states go to and come from files QEMU is handed open (SCM_RIGHTS), as it may start no
program (`exec:`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import signal
import sys
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from qemu.qmp import ConnectError, EventListener, ExecuteError, QMPClient, QMPError

from vivarium import state
from vivarium.errors import CommandFailed, VMError
from vivarium.printable import printable
from vivarium.run import run
from vivarium.vm import channel
from vivarium.vm.qemu import MachineSpec, qemu_argv

T = TypeVar("T")


class Process:
    """One QEMU, held by a pidfd: signals and waits reach that very process, never another that reused its pid.

    `start` is its start time (clock ticks since boot): with the pid, what the instance's record keeps to
    find it again from another vivarium command."""

    def __init__(self, pid: int, fd: int, start: int) -> None:
        self.pid, self.fd, self.start = pid, fd, start

    @classmethod
    def find(cls, pid: int, start: int | None, name: str) -> Process | None:
        """The process `pid` if it runs and is the one recorded: started at `start` (or, for a record
        written before start times were kept, a QEMU of this instance's name)."""
        try:
            fd = os.pidfd_open(pid)
        except OSError:
            return None
        now = state.started(pid)  # read after the pidfd was taken: if it matches, the pidfd is of that process
        if now is None or (now != start if start is not None else not state.named_qemu(pid, name)):
            os.close(fd)
            return None
        return cls(pid, fd, now)

    def running(self) -> bool:
        """Not yet exited (a zombie has)."""
        return not select.select([self.fd], [], [], 0)[0]

    def wait(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds for it to exit; has it?"""
        return bool(select.select([self.fd], [], [], max(timeout, 0))[0])

    def cpu_seconds(self) -> float | None:
        """CPU time it has used (user and system), or None once it is gone."""
        fields = state.stat_fields(self.pid)
        return None if fields is None else (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(self.fd, signal.SIGKILL)
        self.wait(5)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)


def start(spec: MachineSpec) -> Process:
    """Start QEMU in the background (vm/spawn.py); return it once it has started. Its messages go to spec.log."""
    spec.pidfile.unlink(missing_ok=True)
    spec.qmp.unlink(missing_ok=True)
    spec.log.unlink(missing_ok=True)
    if spec.control is not None:
        channel.make(spec.control)
    fds = tuple(fd for fd in (spec.ram_fd, spec.fence_tap, spec.serial_fd) if fd is not None)
    fds += tuple(fd for pair in spec.disk_fds or () for fd in pair)
    try:
        run([sys.executable, "-m", "vivarium.vm.spawn", str(spec.qmp), str(spec.log), ",".join(map(str, fds)), "--", *qemu_argv(spec)],
            timeout=90, pass_fds=fds)  # fmt: skip
    except CommandFailed as e:
        lines = [ln.removeprefix("qemu-system-x86_64: ") for ln in e.output.strip().splitlines() if ln.strip()]
        raise VMError(f"QEMU did not start: {printable(lines[-1]) if lines else f'exit code {e.returncode}'}",
                      hint="run with --debug to see the full command") from None  # fmt: skip
    try:
        pid = int(spec.pidfile.read_text().strip())
    except (OSError, ValueError):
        pid = 0
    proc = Process.find(pid, None, spec.name) if pid > 0 else None  # QEMU's own pid file, just written: by name
    if proc is None:
        raise VMError(f"QEMU started but exited at once{said(spec.log)}", hint=f"see {spec.log} and {spec.serial}")
    return proc


def last_words(log: Path) -> str | None:
    """The last line QEMU wrote to its log, made safe to print, without the program's name."""
    try:
        with log.open("rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 4096))
            tail = f.read().decode(errors="replace")
    except OSError:
        return None
    lines = [ln.removeprefix("qemu-system-x86_64: ").strip() for ln in tail.splitlines()]
    lines = [ln for ln in lines if ln]
    return printable(lines[-1]) if lines else None


def said(log: Path) -> str:
    """': QEMU said: <its last line>', or nothing when its log is empty."""
    words = last_words(log)
    return f"; QEMU said: {words}" if words else ""


def session(sock: Path, what: str, body: Callable[[QMPClient], Awaitable[T]], timeout: float = 10.0) -> T:
    """One QMP connection for a whole operation (`body`), within `timeout`. QEMU's own reason for a refusal
    is kept ("QEMU refused migrate-incoming: ..."); a QEMU that cannot be reached says so."""

    async def go() -> T:
        client = QMPClient("vivarium")
        await asyncio.wait_for(client.connect(str(sock)), min(timeout, 10.0))
        try:
            return await asyncio.wait_for(body(client), timeout)
        finally:
            # What went wrong in the connection's own tasks comes out here again (an EOF after `quit`):
            # the operation's outcome is already decided above.
            with contextlib.suppress(EOFError, OSError, QMPError):
                await client.disconnect()

    try:
        return asyncio.run(go())
    except ExecuteError as e:
        raise VMError(f"QEMU refused {e.sent.get('execute', what)}: {e.error.error.desc}") from None
    except TimeoutError:
        raise VMError(f"QEMU did not finish {what} within {timeout:.0f}s") from None
    except EOFError:
        raise VMError(f"QEMU closed its monitor during {what} (it exited?)") from None
    except (ConnectError, OSError) as e:
        raise VMError(f"cannot talk to QEMU over {sock}: {e}") from None
    except QMPError as e:
        raise VMError(f"QEMU's monitor failed during {what}: {e}") from None


def qmp(sock: Path, command: str, arguments: dict[str, Any] | None = None, timeout: float = 10.0) -> Any:
    """Run one QMP command and return its result."""
    return session(sock, command, lambda client: client.execute(command, arguments or {}), timeout)


def hmp(sock: Path, line: str) -> str:
    """A human-monitor command over QMP (for what QMP lacks, e.g. hostfwd_add)."""
    result = qmp(sock, "human-monitor-command", {"command-line": line})
    return str(result or "").strip()


MIGRATION_FD = "vivarium-migration"  # the name a saved state's file goes by in QEMU (getfd)


@contextlib.contextmanager
def _opened(path: Path, flags: int) -> Iterator[int]:
    fd = os.open(path, flags | os.O_CLOEXEC, 0o600)
    try:
        yield fd
    finally:
        os.close(fd)


async def _hand(client: QMPClient, fd: int, name: str) -> None:
    """Give QEMU an open file (SCM_RIGHTS over its monitor) under `name`, replacing one of that name."""
    with contextlib.suppress(ExecuteError):
        await client.execute("closefd", {"fdname": name})
    client.send_fd_scm(fd)
    await client.execute("getfd", {"fdname": name})


def hand(sock: Path, fd: int, name: str) -> None:
    """Give QEMU an open file or socket under `name` (getfd), for a command that names it next."""
    session(sock, "getfd", lambda client: _hand(client, fd, name))


async def _migration_capabilities(client: QMPClient, without_ram: bool) -> None:
    """`events`: QEMU says how a migration went (MIGRATION events) instead of being asked over and over;
    x-ignore-shared: the stream leaves out the guest's RAM (shared memory), only device state goes."""
    await client.execute("migrate-set-capabilities", {"capabilities": [
        {"capability": "events", "state": True}, {"capability": "x-ignore-shared", "state": without_ram}]})  # fmt: skip


def save_memory(sock: Path, path: Path, timeout: float = 600.0, *, without_ram: bool = False) -> None:
    """Migrate the running guest's state into a file. The guest is left paused (postmigrate).

    `without_ram`: device state only; the caller reads the RAM out of QEMU's memfd."""

    async def body(client: QMPClient) -> None:
        await _migration_capabilities(client, without_ram)
        events = EventListener(("MIGRATION", "SHUTDOWN"))
        with client.listen(events), _opened(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC) as fd:
            await _hand(client, fd, MIGRATION_FD)
            await client.execute("migrate", {"uri": f"fd:{MIGRATION_FD}"})
            status = await _migration_end(client, events)
        if status != "completed":
            info = await client.execute("query-migrate")
            reason = info.get("error-desc") if isinstance(info, dict) else None
            raise VMError(f"saving the guest's memory failed: {reason or status}")

    try:
        session(sock, "saving the guest's memory", body, timeout)
    except VMError:
        with contextlib.suppress(VMError):
            qmp(sock, "migrate_cancel")
        raise


async def _next(client: QMPClient, events: EventListener) -> Any:
    """The next event; each second without one, a query that fails at once if QEMU has gone away."""
    while True:
        try:
            return await asyncio.wait_for(events.get(), 1.0)
        except TimeoutError:
            await client.execute("query-status")


async def _migration_end(client: QMPClient, events: EventListener) -> str:
    """The status a migration ended in: completed, failed, cancelled (or shutdown: QEMU went away)."""
    while True:
        event = await _next(client, events)
        if event["event"] == "SHUTDOWN":
            return "shutdown"
        status = str(_data(event).get("status", ""))
        if status in ("completed", "failed", "cancelled"):
            return status


def _data(event: Any) -> dict[str, Any]:
    data = event.get("data")
    return data if isinstance(data, dict) else {}


def load(sock: Path, path: Path, *, without_ram: bool = False, timeout: float = 300.0) -> None:
    """Load a saved state into a QEMU started with `-incoming defer`; return once the guest runs.

    `without_ram`: the state holds device state only; the RAM is already in the memory backend's file."""

    async def body(client: QMPClient) -> None:
        await _migration_capabilities(client, without_ram)
        events = EventListener(("MIGRATION", "RESUME", "SHUTDOWN"))
        with client.listen(events), _opened(path, os.O_RDONLY) as fd:
            await _hand(client, fd, MIGRATION_FD)
            await client.execute("migrate-incoming", {"uri": f"fd:{MIGRATION_FD}"})
            while True:
                status = await client.execute("query-status")
                if isinstance(status, dict) and status.get("status") == "running":
                    return
                event = await _next(client, events)
                if event["event"] == "RESUME":
                    return
                said = str(_data(event).get("status", "")) if event["event"] == "MIGRATION" else "shutdown"
                if said in ("failed", "cancelled", "shutdown"):
                    info = await client.execute("query-migrate")
                    reason = info.get("error-desc") if isinstance(info, dict) else None
                    raise VMError(f"the saved state did not load: {reason or said}")

    session(sock, "loading the saved state", body, timeout)


def qemu_version(sock: Path) -> str:
    v = qmp(sock, "query-version")["qemu"]
    return f"{v['major']}.{v['minor']}.{v['micro']}"


def stop(proc: Process, sock: Path, timeout: float = 30.0) -> str:
    """Ask the guest to power off (ACPI); kill QEMU if it will not. Says how it ended."""
    with contextlib.suppress(VMError):
        qmp(sock, "system_powerdown", timeout=5)
        if proc.wait(timeout):
            return "powered off"
    with contextlib.suppress(VMError):
        qmp(sock, "quit", timeout=5)
        if proc.wait(5):
            return "quit"
    proc.kill()
    return "killed"
