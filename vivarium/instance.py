"""An instance on disk: its directory, its disks (overlays on an image's or a template's), its keys,
the settings it was made with (frozen), and stopping what runs for it."""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from vivarium import cgroup, record, ssh, state, values
from vivarium import config as cfg
from vivarium import template as template_mod
from vivarium.errors import InstanceError
from vivarium.image.build import Image
from vivarium.net import control as fence
from vivarium.net import netns
from vivarium.run import run
from vivarium.vm import machine

FROZEN_VERSION = 1


@dataclass(frozen=True)
class Status:
    name: str
    state: str  # running | stopped | crashed
    pid: int | None
    accel: str
    ports: list[dict[str, Any]]
    image: str
    uptime: float | None
    ssh_port: int | None
    user: str
    memory: str
    cpus: int
    path: str
    shares: list[dict[str, Any]]
    agents: dict[str, str]
    network: str  # the fence's mode, or "unfenced"
    gateway: int | None  # the egress gateway's pid while running
    disk_used: str  # what its directory takes on the host's disk (disks, snapshots, logs), not their virtual size
    cgroup: dict[str, Any]  # while running: its host processes' cgroup, their use and limits; or why there is none

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def status(d: state.InstanceDir, agents: Callable[[str], dict[str, str]]) -> Status:
    """What the instance is doing now, as `status` shows it."""
    rec = d.read()
    made, run = rec.instance, rec.run
    pid = d.qemu_pid()
    # Recorded as running but no QEMU of ours: it died under us.
    st = "running" if pid else ("crashed" if run and run.running else "stopped")
    return Status(
        name=d.name,
        state=st,
        pid=pid,
        accel=run.accel if run else "",
        ports=[asdict(p) for p in run.ports] if run else [],
        image=made.image,
        uptime=round(time.time() - run.started_at, 1) if pid and run else None,
        ssh_port=run.ssh_port if run else None,
        user=made.user,
        memory=values.format_size(run.memory) if run else "",
        cpus=run.cpus if run else 0,
        path=str(d.path),
        shares=[asdict(sh) for sh in run.shares] if pid and run else [],
        agents=agents(made.image),
        network=run.network if run else "",
        gateway=fence.pid(d.path) if pid else None,
        disk_used=values.format_size(_on_disk(d.path)),
        cgroup=_cgroup(d) if pid else {},
    )


def _cgroup(d: state.InstanceDir) -> dict[str, Any]:
    group = cgroup.of(d.name, d.path)
    return group.usage() if group is not None else {"none": cgroup.why_none(d.path) or "made by none of its starts"}


def _on_disk(path: Path) -> int:
    """Bytes the files under `path` take on the disk (sparse ones count what they hold)."""
    total = 0
    for p in path.rglob("*"):
        with contextlib.suppress(OSError):  # gone meanwhile
            total += p.lstat().st_blocks * 512
    return total


def frozen_config(d: state.InstanceDir) -> cfg.Config | None:
    """The settings the sandbox was made (or last reset) with, if it has any."""
    try:
        data = json.loads(d.frozen.read_text())
    except FileNotFoundError:
        return None
    except ValueError:
        raise InstanceError(f"the saved settings of sandbox {d.name!r} are damaged ({d.frozen})",
                            hint=f"`vivarium destroy {d.name}` and make it again") from None  # fmt: skip
    if not isinstance(data, dict) or data.get("version") != FROZEN_VERSION or not isinstance(data.get("settings"), dict):
        raise InstanceError(f"the saved settings of sandbox {d.name!r} are of another vivarium version",
                            hint=f"`vivarium destroy {d.name}` and make it again")  # fmt: skip
    source = Path(data["source"]) if data.get("source") else None
    return cfg.load_data(data["settings"], f"sandbox {d.name!r}'s saved settings", Path("/"), source=source)


def freeze(d: state.InstanceDir, c: cfg.Config) -> None:
    data = {"version": FROZEN_VERSION, "source": str(c.source) if c.source else None, "settings": cfg.to_dict(c)}
    state.write_atomic(d.frozen, json.dumps(data, indent=1) + "\n", 0o600)


def create(d: state.InstanceDir, c: cfg.Config, image: Image, tpl: template_mod.Template | None, *, cold: bool = False) -> None:
    """A new instance: overlay disks on the base (or on a template's), keys. Milliseconds."""
    d.path.mkdir(parents=True, exist_ok=True)
    os.chmod(d.path, 0o700)
    new_disks(d, image, c.vm.disk, c.vm.swap, tpl)
    ssh.make_keys(d.key, d.host_key, d.known_hosts, f"vivarium-{d.name}")
    freeze(d, c)
    made = record.Instance(
        name=d.name, created=time.time(), image=image.key, build_id=image.build_id, user=c.vm.user,
        template=tpl.path.name if tpl else None, pristine=True, cold=cold, disk=c.vm.disk, swap=c.vm.swap,
    )  # fmt: skip
    d.write(record.Record(made))


def new_disks(d: state.InstanceDir, image: Image, disk: int, swap: int, tpl: template_mod.Template | None = None) -> None:
    """Overlays on the image's disk (a fresh swap), or on a template's disks."""
    for path in (d.disk, d.swap):
        path.unlink(missing_ok=True)
    if tpl is not None:
        for ours, theirs in ((d.disk, tpl.disk), (d.swap, tpl.swap)):
            run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", theirs, ours])
        return
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", image.disk, d.disk, str(disk)])
    run(["qemu-img", "create", "-q", "-f", "qcow2", d.swap, str(swap)])


def stop(d: state.InstanceDir, timeout: float = 30.0) -> str:
    """Stop its QEMU (politely, then not), its gateway and its network namespace; how it went, in words."""
    with d.lock():
        rec = d.read()
        qemu = machine.Process.find(rec.run.pid, rec.run.qemu_started, d.name) if rec.run else None
        how = "was not running"
        if qemu is not None:
            with contextlib.closing(qemu):
                how = machine.stop(qemu, d.qmp, timeout)
        d.write(rec.stopped())
        fence.stop(d.path)
        netns.stop(d.path)
        if (group := cgroup.of(d.name, d.path)) is not None:
            cgroup.remove(group)  # once the helpers have followed QEMU out (a start makes it again if not)
        d.qmp.unlink(missing_ok=True)
        d.pidfile.unlink(missing_ok=True)
        return how
