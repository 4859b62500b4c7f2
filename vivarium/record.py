"""What an instance is and what its latest start did, as typed records: the instance's `instance.json`.

`Instance` is what it was made as (image, template, disks, user) and changes only by `reset` and its
first start. `Run` is what its latest start did (QEMU's pid, ports, shares, accelerator); it stays
after a stop with `running` false, so that a sandbox recorded as running without its QEMU is known to
have crashed. The file is versioned JSON, written atomically; a file of the first (unversioned) layout
is read and migrated, one of a newer vivarium is refused in one line.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass
from typing import Any

VERSION = 2


@dataclass(frozen=True)
class Forward:
    """A host port forwarded to a guest port."""

    host: int
    guest: int
    bind: str = "127.0.0.1"


@dataclass(frozen=True)
class Shared:
    """A directory shared into the running guest."""

    host: str
    guest: str
    mode: str  # rw | ro | review
    via: str  # virtiofs
    tag: str  # the device's tag, also the name of its review state


@dataclass(frozen=True)
class Instance:
    """What the instance is: made from which image (and template), with which disks, for which user."""

    name: str
    created: float
    image: str  # the image's key in the cache
    build_id: str
    user: str
    template: str | None  # the template its disks are overlays on, if any
    pristine: bool  # made from the template and not yet started: its first start restores the template
    cold: bool  # made with --cold: a reset boots it cold again
    disk: int
    swap: int


@dataclass(frozen=True)
class Run:
    """What the instance's latest start did."""

    running: bool
    pid: int  # QEMU's
    qemu_started: int | None  # and its start time (clock ticks since boot): with the pid, who it is; None in a migrated record
    started_at: float
    accel: str
    accel_reason: str
    ssh_port: int
    memory: int
    cpus: int
    network: str  # the fence's mode, or "unfenced"
    ports: tuple[Forward, ...]
    shares: tuple[Shared, ...]


@dataclass(frozen=True)
class Record:
    instance: Instance
    run: Run | None = None  # None until its first start

    def stopped(self) -> Record:
        """The same record, marked as no longer running."""
        if self.run is None or not self.run.running:
            return self
        return dataclasses.replace(self, run=dataclasses.replace(self.run, running=False))

    def to_json(self) -> str:
        return json.dumps({"version": VERSION, **dataclasses.asdict(self)}, indent=2) + "\n"


class Damaged(ValueError):
    """The file is not a record this vivarium can read; the message says why."""


def from_json(text: str) -> Record:
    try:
        data = json.loads(text)
    except ValueError:
        raise Damaged("it is not JSON") from None
    if not isinstance(data, dict):
        raise Damaged("it is not a JSON object")
    version = data.get("version", 1)
    if version == 1:
        data = _migrate_v1(data)
    elif version != VERSION:
        raise Damaged(f"it is of layout {version!r}, made by another vivarium version (this one reads {VERSION})")
    data.pop("version", None)
    rec: Record = _load(Record, data, "")
    return rec


def _migrate_v1(flat: dict[str, Any]) -> dict[str, Any]:
    """The first layout: one flat object, without "version"."""
    run = None
    if "pid" in flat:
        run = {f.name: flat.get(f.name) for f in dataclasses.fields(Run)}
        run.update(running=bool(flat.get("running")), qemu_started=None, accel_reason=flat.get("accel_reason", ""),
                   ports=flat.get("ports", []), shares=flat.get("shares", []))  # fmt: skip
    made = {f.name: flat.get(f.name) for f in dataclasses.fields(Instance)}
    made.update(pristine=bool(flat.get("pristine")), cold=bool(flat.get("cold")))
    return {"instance": made, "run": run}


def _load(cls: type[Any], data: object, where: str) -> Any:
    if not isinstance(data, dict):
        raise Damaged(f"{where or 'the record'} is not an object")
    hints = typing.get_type_hints(cls)
    values = {}
    for f in dataclasses.fields(cls):
        here = f"{where}.{f.name}".lstrip(".")
        if f.name not in data:
            if f.default is dataclasses.MISSING:
                raise Damaged(f"{here} is missing")
            continue
        values[f.name] = _value(hints[f.name], data[f.name], here)
    return cls(**values)


def _value(t: Any, v: object, where: str) -> Any:
    origin, args = typing.get_origin(t), typing.get_args(t)
    if origin in (typing.Union, types.UnionType):
        if v is None and type(None) in args:
            return None
        (t,) = (a for a in args if a is not type(None))
        return _value(t, v, where)
    if origin is tuple:
        if not isinstance(v, list):
            raise Damaged(f"{where} is not a list")
        return tuple(_value(args[0], x, f"{where}[{i}]") for i, x in enumerate(v))
    if dataclasses.is_dataclass(t):
        return _load(typing.cast(type[Any], t), v, where)
    ok = {float: (int, float), int: (int,), bool: (bool,), str: (str,)}[t]
    if (isinstance(v, bool) and t is not bool) or not isinstance(v, ok):
        raise Damaged(f"{where} is not of type {t.__name__}")
    return float(v) if t is float else v
