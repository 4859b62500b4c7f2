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
from pathlib import Path
from typing import Any

from qemu.qmp import QMPClient

from vivarium.errors import CommandFailed, VMError
from vivarium.run import run
from vivarium.vm import channel
from vivarium.vm.qemu import MachineSpec, qemu_argv


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


def qmp(sock: Path, command: str, arguments: dict[str, Any] | None = None, timeout: float = 10.0) -> Any:
    """Run one QMP command and return its result."""

    async def go() -> Any:
        client = QMPClient("vivarium")
        await asyncio.wait_for(client.connect(str(sock)), timeout)
        try:
            return await asyncio.wait_for(client.execute(command, arguments or {}), timeout)
        finally:
            await client.disconnect()

    try:
        return asyncio.run(go())
    except (TimeoutError, OSError) as e:
        raise VMError(f"cannot talk to QEMU over {sock}: {e}") from None
    except Exception as e:  # noqa: BLE001 - qemu.qmp raises its own tree; report it as one line
        raise VMError(f"QEMU refused {command}: {e}") from None


def hmp(sock: Path, line: str) -> str:
    """A human-monitor command over QMP (for what QMP lacks, e.g. hostfwd_add)."""
    result = qmp(sock, "human-monitor-command", {"command-line": line})
    return str(result or "").strip()


def _ignore_shared(sock: Path, on: bool) -> None:
    """x-ignore-shared: the migration stream leaves out the guest's RAM (shared memory), only device state goes."""
    qmp(sock, "migrate-set-capabilities", {"capabilities": [{"capability": "x-ignore-shared", "state": on}]})


def save_memory(sock: Path, path: Path, timeout: float = 600.0, *, without_ram: bool = False) -> None:
    """Migrate the running guest's state into a file. The guest is left paused (postmigrate).

    `without_ram`: device state only; the caller reads the RAM out of QEMU's memfd."""
    _ignore_shared(sock, without_ram)
    qmp(sock, "migrate", {"uri": f"exec:cat > {shlex.quote(str(path))}"})
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = qmp(sock, "query-migrate")
        status = info.get("status")
        if status == "completed":
            return
        if status in ("failed", "cancelled"):
            raise VMError(f"saving the guest's memory failed: {info.get('error-desc', status)}")
        time.sleep(0.05)
    with contextlib.suppress(VMError):
        qmp(sock, "migrate_cancel")
    raise VMError(f"saving the guest's memory took more than {timeout:.0f}s")


def load(sock: Path, path: Path, *, without_ram: bool = False, timeout: float = 300.0) -> None:
    """Load a saved state into a QEMU started with `-incoming defer`; return once the guest runs.

    `without_ram`: the state holds device state only; the RAM is already in the memory backend's file."""
    _ignore_shared(sock, without_ram)
    qmp(sock, "migrate-incoming", {"uri": f"exec:cat {shlex.quote(str(path))}"})
    wait_running(sock, timeout)


def wait_running(sock: Path, timeout: float = 300.0) -> None:
    """Until an incoming migration (a restore) has finished and the guest runs."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = qmp(sock, "query-status").get("status")
        if status == "running":
            return
        if status not in ("inmigrate", "prelaunch", "restore-vm", "paused"):
            raise VMError(f"the saved state did not load (QEMU says {status})")
        time.sleep(0.05)
    raise VMError(f"loading the saved state took more than {timeout:.0f}s")


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
