"""A running QEMU: start it in the background, find it, talk QMP, stop it.

QEMU daemonizes so it outlives the CLI; the pid file and /proc tell whether it
still runs (and is still ours: the process name carries the instance name).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from qemu.qmp import ConnectError, EventListener, ExecuteError, QMPClient, QMPError

from vivarium.errors import CommandFailed, VMError
from vivarium.run import run
from vivarium.vm import channel
from vivarium.vm.qemu import MachineSpec, qemu_argv

T = TypeVar("T")


def start(spec: MachineSpec) -> int:
    """Start QEMU in the background; return its pid once it runs."""
    spec.pidfile.unlink(missing_ok=True)
    spec.qmp.unlink(missing_ok=True)
    if spec.control is not None:
        channel.make(spec.control)
    try:
        run(qemu_argv(spec), timeout=60, pass_fds=tuple(fd for fd in (spec.ram_fd, spec.fence_tap) if fd is not None))
    except CommandFailed as e:
        lines = [ln.removeprefix("qemu-system-x86_64: ") for ln in e.output.strip().splitlines() if ln.strip()]
        raise VMError(f"QEMU did not start: {lines[-1] if lines else f'exit code {e.returncode}'}",
                      hint="run with --debug to see the full command") from None  # fmt: skip
    pid = read_pid(spec.pidfile, spec.name)
    if pid is None:
        raise VMError("QEMU started but exited at once", hint=f"see {spec.serial}")
    return pid


def read_pid(pidfile: Path, name: str) -> int | None:
    """The pid of this instance's QEMU if it is alive, else None."""
    try:
        pid = int(pidfile.read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if is_ours(pid, name) else None


def is_ours(pid: int, name: str) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    zombie = stat.rsplit(")", 1)[-1].split()[0] == "Z"
    return not zombie and f"vivarium-{name},".encode() in cmdline


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
        with client.listen(events):
            await client.execute("migrate", {"uri": f"exec:cat > {shlex.quote(str(path))}"})
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
        with client.listen(events):
            await client.execute("migrate-incoming", {"uri": f"exec:cat {shlex.quote(str(path))}"})
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


def wait_exit(pid: int, name: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not is_ours(pid, name):
            return True
        time.sleep(0.1)
    return not is_ours(pid, name)


def stop(pid: int, name: str, sock: Path, timeout: float = 30.0) -> str:
    """Ask the guest to power off (ACPI); kill QEMU if it will not. Says how it ended."""
    with contextlib.suppress(VMError):
        qmp(sock, "system_powerdown", timeout=5)
        if wait_exit(pid, name, timeout):
            return "powered off"
    with contextlib.suppress(VMError):
        qmp(sock, "quit", timeout=5)
        if wait_exit(pid, name, 5):
            return "quit"
    kill(pid, name)
    return "killed"


def kill(pid: int, name: str) -> None:
    if is_ours(pid, name):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        wait_exit(pid, name, 5)
