"""The instance record: typed, versioned, written atomically; an older file migrated, a newer or damaged one refused in one line."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from vivarium import cli, record, state
from vivarium.errors import InstanceError

from . import records

# instance.json as vivarium wrote it before records were typed (5a99885): one flat object, after a start and a stop
V1 = {
    "name": "old", "created": 1764660000.5, "image": "3f2a", "build_id": "b-1", "user": "agent", "template": "t-9",
    "cold": False, "disk": 17179869184, "swap": 2147483648, "running": False, "pid": 4242, "started_at": 1764660010.25,
    "accel": "tcg", "accel_reason": "no /dev/kvm", "ssh_port": 40022, "memory": 4294967296, "cpus": 2, "network": "lan-block",
    "ports": [{"host": 40022, "guest": 22, "bind": "127.0.0.1"}],
    "shares": [{"host": "/src/p", "guest": "/src/p", "mode": "review", "via": "virtiofs", "tag": "share0"}],
}  # fmt: skip


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("VIVARIUM_HOME", str(tmp_path))
    return tmp_path


def started(rec: record.Record) -> record.Record:
    run = record.Run(running=True, pid=7, qemu_started=1234, started_at=2.5, accel="kvm", accel_reason="/dev/kvm works", ssh_port=2222,
                     memory=1 << 30, cpus=2, network="allowlist", ports=(record.Forward(2222, 22),),
                     shares=(record.Shared("/h", "/g", "rw", "virtiofs", "share0"),))  # fmt: skip
    return replace(rec, run=run)


def test_a_record_reads_back_as_it_was_written(home: Path) -> None:
    d = state.InstanceDir.of("box")
    d.path.mkdir(parents=True)
    for rec in (records.made(), started(records.made(template="t-1", pristine=True))):
        d.write(rec)
        assert d.read() == rec
        assert json.loads(d.meta.read_text())["version"] == record.VERSION
    stopped = d.read().stopped()
    assert stopped.run is not None and stopped.run.running is False and stopped.instance == rec.instance


def test_a_first_layout_record_is_migrated() -> None:
    rec = record.from_json(json.dumps(V1))
    assert rec.instance == record.Instance("old", 1764660000.5, "3f2a", "b-1", "agent", "t-9", False, False, 17179869184, 2147483648)
    assert rec.run is not None and rec.run.running is False and rec.run.pid == 4242 and rec.run.network == "lan-block"
    assert rec.run.qemu_started is None  # not kept then: such a QEMU is known by its name
    assert rec.run.ports == (record.Forward(40022, 22, "127.0.0.1"),)
    assert rec.run.shares == (record.Shared("/src/p", "/src/p", "review", "virtiofs", "share0"),)
    never_started = {k: V1[k] for k in ("name", "created", "image", "build_id", "user", "template", "disk", "swap")}
    rec = record.from_json(json.dumps({**never_started, "pristine": True, "running": False}))
    assert rec.run is None and rec.instance.pristine is True
    assert record.from_json(rec.to_json()) == rec  # and it is written in the new layout from then on


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ('{"version": 3, "instance": {}}', "layout 3, made by another vivarium version"),
        ("{not json", "not JSON"),
        ("[1]", "not a JSON object"),
        ('{"version": 2, "instance": {"name": "x"}}', "instance.created is missing"),
        (json.dumps({**V1, "ssh_port": "40022"}), "run.ssh_port is not of type int"),
        (json.dumps({**V1, "cpus": True}), "run.cpus is not of type int"),
        (json.dumps({**V1, "ports": [{"host": 1}]}), r"run.ports\[0\].guest is missing"),
        (json.dumps({**V1, "shares": {}}), "run.shares is not a list"),
    ],
)
def test_a_record_of_another_version_or_damaged_is_refused_in_one_line(home: Path, capsys: pytest.CaptureFixture[str], text: str, why: str) -> None:
    with pytest.raises(record.Damaged, match=why):
        record.from_json(text)
    d = state.InstanceDir.of("odd")
    d.path.mkdir(parents=True)
    d.meta.write_text(text)
    with pytest.raises(InstanceError, match="the record of sandbox 'odd'"):
        d.read()
    assert cli.main(["status", "odd"]) != 0
    out = capsys.readouterr()
    assert "Traceback" not in out.err and len(out.err.strip().splitlines()) <= 2, out.err
    assert "cannot be read" in out.err and "vivarium destroy odd" in out.err
