"""Host ports a sandbox forwards into its guest: which are free, who holds one, adding and removing them live."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Sequence
from dataclasses import replace

from vivarium import config as cfg
from vivarium import record, state
from vivarium.errors import InstanceError, UsageError, VMError
from vivarium.vm import machine
from vivarium.vm.qemu import PortForward

SSH_PORT = 22


def port_free(bind: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in bind else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((bind, port))
        except OSError:
            return False
    return True


def free_port(bind: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((bind, 0))
        port: int = s.getsockname()[1]
        return port


def port_holder(port: int, exclude: str = "") -> str | None:
    """Which of our running sandboxes holds host `port`, if any."""
    for d in state.list_instances():
        if d.name == exclude:
            continue
        with contextlib.suppress(Exception):
            run = d.read().run
            if run and d.qemu_pid() is not None and any(p.host == port for p in run.ports):
                return d.name
    return None


def choose(forwards: Sequence[cfg.Forward], name: str, *, auto_ports: bool) -> list[PortForward]:
    """The configured forwards (and SSH's, always), with a free port swapped in for busy ones if asked."""
    wanted = [PortForward(f.host, f.guest, f.bind) for f in forwards]
    if not any(f.guest == SSH_PORT for f in wanted):
        wanted.append(PortForward(free_port(), SSH_PORT))
    out = []
    for f in wanted:
        if not port_free(f.bind, f.host):
            if not auto_ports:
                holder = port_holder(f.host, exclude=name)
                who = f" by sandbox {holder!r}" if holder else ""
                raise VMError(
                    f"host port {f.host} (forward to guest port {f.guest}) is in use{who}",
                    hint="pass --auto-ports to pick free ports, or change [[forward]] in vivarium.toml",
                )
            f = PortForward(free_port(f.bind), f.guest, f.bind)
        out.append(f)
    return out


def add(d: state.InstanceDir, host: int, guest: int, bind: str = "127.0.0.1") -> None:
    """Forward host `bind:host` to guest port `guest` in the running sandbox, now."""
    with d.lock():
        rec = d.read()
        if rec.run is None or d.qemu_pid() is None:
            raise InstanceError(f"sandbox {d.name!r} is not running")
        if not port_free(bind, host):
            holder = port_holder(host)
            raise VMError(f"host port {host} is in use{f' by sandbox {holder!r}' if holder else ''}")
        reply = machine.hmp(d.qmp, f"hostfwd_add net0 tcp:{bind}:{host}-:{guest}")
        if reply:
            raise VMError(f"QEMU refused the forward: {reply}")
        d.write(replace(rec, run=replace(rec.run, ports=(*rec.run.ports, record.Forward(host, guest, bind)))))


def remove(d: state.InstanceDir, host: int) -> None:
    with d.lock():
        rec = d.read()
        run = rec.run
        match = [p for p in run.ports if p.host == host] if run else []
        if run is None or not match:
            raise UsageError(f"sandbox {d.name!r} forwards no host port {host}", hint=f"see `vivarium port {d.name} ls`")
        if match[0].guest == SSH_PORT and match[0].host == run.ssh_port:
            raise UsageError(f"port {host} carries vivarium's own SSH connection; it stays")
        reply = machine.hmp(d.qmp, f"hostfwd_remove net0 tcp:{match[0].bind}:{host}")
        if reply and "removed" not in reply:
            raise VMError(f"QEMU refused to remove the forward: {reply}")
        d.write(replace(rec, run=replace(run, ports=tuple(p for p in run.ports if p.host != host))))
