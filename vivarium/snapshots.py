"""Snapshots of a running sandbox: its memory and disks saved together, of one instant.

A snapshot keeps the RAM as a sparse file and only the device state as a migration
stream (`x-ignore-shared`), like a template. What a restore needs that is not here
(booting QEMU on it) is the launcher's.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path
from typing import Any

from vivarium import config as cfg
from vivarium import record, state, values
from vivarium.errors import InstanceError, UsageError
from vivarium.run import run
from vivarium.share import virtiofs
from vivarium.vm import caps, machine, memory
from vivarium.vm.qemu import LAYOUT


def directory(d: state.InstanceDir, tag: str) -> Path:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", tag):
        raise UsageError(f"{tag!r} is not a snapshot name", hint="letters, digits, '.', '_' and '-', at most 64")
    return d.path / "snapshots" / tag


def info(path: Path) -> dict[str, Any]:
    """A snapshot's meta.json, with its size on disk."""
    data: dict[str, Any] = json.loads((path / "meta.json").read_text())
    data["size"] = sum(f.stat().st_blocks * 512 for f in path.iterdir())  # on disk: the RAM file is sparse
    return data


def listing(d: state.InstanceDir) -> list[dict[str, Any]]:
    if not d.exists():
        raise InstanceError(f"no sandbox named {d.name!r}", hint="see `vivarium ls`")
    return [info(m.parent) for m in sorted((d.path / "snapshots").glob("*/meta.json"))]


def save(d: state.InstanceDir, tag: str) -> dict[str, Any]:
    """Memory and disks of the running sandbox, saved together; it keeps running."""
    path = directory(d, tag)
    with d.lock():
        pid = d.qemu_pid()
        if pid is None:
            raise InstanceError(f"sandbox {d.name!r} is not running", hint="a snapshot saves a running sandbox's memory")
        rec = d.read()
        if rec.run is not None and rec.run.shares and not shares_migrate(caps.probe()):
            raise UsageError(
                f"sandbox {d.name!r} has shared directories, and this host's virtiofs device cannot be saved",
                hint="QEMU 8.2 or later with the Rust virtiofsd saves them (Debian 13); "
                     "or snapshot a sandbox without shares (share = [] in vivarium.toml)",
            )  # fmt: skip
        if path.exists():
            raise UsageError(f"snapshot {tag!r} exists", hint=f"vivarium snapshot {d.name} rm {tag}")
        tmp = path.with_name(f".{tag}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            data = {"tag": tag, **save_state(d, tmp, pid, rec)}
            (tmp / "meta.json").write_text(json.dumps(data, indent=1))
            tmp.rename(path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return info(path)


def save_state(d: state.InstanceDir, dest: Path, pid: int, rec: record.Record) -> dict[str, Any]:
    """The running guest's device state, RAM and disks into `dest`, all of one instant; it runs on after."""
    now = rec.run
    if now is None:
        raise InstanceError(f"sandbox {d.name!r} has no record of its start", hint=f"`vivarium stop {d.name}` and `vivarium up {d.name}`")
    started = time.monotonic()
    machine.save_memory(d.qmp, dest / "state", without_ram=True)
    try:  # paused, its disks flushed: RAM and disks as they are now
        ram = memory.save_sparse(memory.qemu_ram_fd(pid, now.memory >> 20 << 20), dest / "ram")
        for disk in (d.disk, d.swap):
            run(["cp", "--reflink=auto", "--sparse=always", disk, dest / disk.name])
    finally:
        machine.qmp(d.qmp, "cont")
    return {
        "created": time.time(), "seconds": round(time.monotonic() - started, 2), "ram_data": ram,
        "memory": now.memory, "cpus": now.cpus, "accel": now.accel, "build_id": rec.instance.build_id,
        "qemu": machine.qemu_version(d.qmp), "layout": LAYOUT,
        "shares": [{"host": sh.host, "guest": sh.guest, "mode": sh.mode} for sh in now.shares],
    }  # fmt: skip


def existing(d: state.InstanceDir, tag: str) -> Path:
    path = directory(d, tag)
    if not (path / "meta.json").exists():
        raise UsageError(f"sandbox {d.name!r} has no snapshot {tag!r}", hint=f"vivarium snapshot {d.name} ls")
    return path


def check_fits(d: state.InstanceDir, path: Path, c: cfg.Config, accel: str, build_id: str, qemu: caps.Qemu) -> None:
    """Does the snapshot at `path` still fit the sandbox as configured now? If not, why not, in one line."""
    tag = path.name
    data = json.loads((path / "meta.json").read_text())
    mismatch = [f"{what} {was} now {now}" for what, was, now in (
        ("memory", values.format_size(data["memory"]), values.format_size(c.vm.memory)), ("cpus", data["cpus"], c.vm.cpus),
        ("accelerator", data["accel"], accel), ("image", data["build_id"], build_id), ("QEMU", data.get("qemu"), qemu.version),
        ("device layout", data.get("layout", 1), LAYOUT),
    ) if was != now]  # fmt: skip
    configured = [{"host": str(s.host), "guest": str(s.guest), "mode": s.mode} for s in c.share]
    saved = data.get("shares", [])
    if configured != saved:
        mismatch.append(f"shared directories {_shares(saved)} now {_shares(configured)}")
    elif saved and not shares_migrate(qemu):
        mismatch.append("it holds shared directories, and this host's virtiofs device cannot load them")
    if mismatch:
        raise UsageError(f"snapshot {tag!r} no longer fits sandbox {d.name!r}: {'; '.join(mismatch)}",
                         hint="restore with the settings it was saved with, or save a new one")  # fmt: skip


def shares_migrate(qemu: caps.Qemu) -> bool:
    """Can a snapshot keep the shares here? QEMU 8.2 and later migrate a vhost-user-fs device whose server
    can hand over its state (the guest's open files, by path); the shares' contents are the host's, never saved."""
    return qemu.at_least(8, 2) and virtiofs.migrates()


def _shares(shares: list[dict[str, str]]) -> str:
    return ", ".join(f"{s['host']} ({s['mode']})" for s in shares) or "none"


def put_back_disks(d: state.InstanceDir, path: Path) -> None:
    for disk in (d.disk, d.swap):
        run(["cp", "--reflink=auto", "--sparse=always", path / disk.name, disk])


def remove(d: state.InstanceDir, tag: str) -> None:
    path = directory(d, tag)
    if not path.exists():
        raise UsageError(f"sandbox {d.name!r} has no snapshot {tag!r}", hint=f"vivarium snapshot {d.name} ls")
    shutil.rmtree(path)
