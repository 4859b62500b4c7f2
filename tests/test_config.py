from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from vivarium import cli, host, trust, values
from vivarium import config as cfg
from vivarium.errors import ConfigError

HOST = host.Host(cpus=32, memory=64 << 30, user="alice", uid=1234)
SMALL = host.Host(cpus=2, memory=4 << 30, user="alice", uid=1234)


def write(tmp_path: Path, text: str) -> Path:
    """A vivarium.toml its user trusts (`vivarium config trust`): the tests here are about its settings."""
    p = tmp_path / "vivarium.toml"
    p.write_text(text)
    trust.trust(p, p.read_bytes())
    return p


def test_defaults_are_the_origins(tmp_path: Path) -> None:
    c = cfg.load(None, cwd=tmp_path, host=HOST)
    assert (c.vm.memory, c.vm.cpus, c.vm.disk, c.vm.swap) == (16 << 30, 16, 320 << 30, 32 << 30)
    assert [(f.host, f.guest, f.bind) for f in c.forward] == [
        (2222, 22, "127.0.0.1"),
        (45631, 45631, "127.0.0.1"),
        (33000, 3000, "127.0.0.1"),
    ]
    assert c.share == (cfg.Share(tmp_path.resolve(), tmp_path.resolve(), "rw"),)
    assert c.network.mode == "lan-block"
    assert c.image.suite == "bookworm" and c.image.agents == ("claude-code",)
    assert c.vm.user == "alice" and c.uid == 1234
    assert c.notes == ()


def test_root_host_gets_the_agent_user(tmp_path: Path) -> None:
    root = host.Host(cpus=32, memory=64 << 30, user="root", uid=0)
    c = cfg.load(None, cwd=tmp_path, host=root)
    assert c.vm.user == "agent" and c.uid == 1000
    assert host.guest_uid("agent", root) == 1000
    assert host.guest_uid("alice", HOST) == 1234


def test_file_overrides_defaults(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    p = write(
        tmp_path,
        """
[vm]
memory = "4G"
cpus = 3

[[forward]]
host = 8080
guest = 80

[[share]]
host = "src"
guest = "/work"
mode = "review"

[network]
mode = "allowlist"
allow = ["*.github.com", "pypi.org:443"]
""",
    )
    c = cfg.load(p, cwd=Path("/"), host=HOST)
    assert c.vm.memory == 4 << 30 and c.vm.cpus == 3
    assert c.forward == (cfg.Forward(8080, 80, "127.0.0.1"),)
    assert c.share == (cfg.Share((tmp_path / "src").resolve(), Path("/work"), "review"),)
    assert c.network.allow == ("*.github.com", "pypi.org:443")


def test_cli_overrides_file(tmp_path: Path) -> None:
    p = write(tmp_path, '[vm]\nmemory = "4G"\n')
    c = cfg.load(p, {"vm.memory": "2G", "vm.cpus": "2", "image.packages": ["htop"]}, host=HOST)
    assert c.vm.memory == 2 << 30 and c.vm.cpus == 2 and c.image.packages == ("htop",)


def test_clamps_to_the_host_with_a_note(tmp_path: Path) -> None:
    c = cfg.load(None, cwd=tmp_path, host=SMALL)
    assert c.vm.cpus == 2
    assert c.vm.memory == 3 << 30
    assert len(c.notes) == 2 and "vm.cpus 16" in c.notes[0] and "vm.memory 16G" in c.notes[1]


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ('[vm]\nmemroy = "4G"\n', "unknown key vm.memroy"),
        ('[vm]\nmemory = "lots"\n', "vm.memory: 'lots' is not a size"),
        ("[[forward]]\nhost = 70000\nguest = 22\n", "forward[0].host: 70000 is not a port"),
        ('[[share]]\nhost = "does-not-exist"\n', "share[0].host"),
        ('[network]\nmode = "open"\n', "network.mode: 'open' is not one of"),
        ('[image]\nagents = ["clippy"]\n', "unknown agent 'clippy'"),
        ('[[image.download]]\nname = "x"\nurl = "http://x"\nsha256 = "abc"\ndest = "/x"\n', "is not a sha256"),
        ("[[forward]]\nhost = 1\nguest = 2\n[[forward]]\nhost = 1\nguest = 3\n", "forwarded twice"),
        ('[network]\ndns_upstream = "127.0.0.1:dns"\n', "network.dns_upstream: bad port in '127.0.0.1:dns'"),
        ("[telemetry]\n", "unknown section or key 'telemetry'"),
        ("vm = [", "not valid TOML"),
    ],
)
def test_bad_values_name_the_key(tmp_path: Path, text: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as e:
        cfg.load(write(tmp_path, text), host=HOST)
    assert fragment in str(e.value)
    assert e.value.exit_code == 2


def test_sizes_round_trip() -> None:
    assert values.parse_size("16G", "x") == 16 << 30
    assert values.parse_size("512MiB", "x") == 512 << 20
    assert values.format_size(values.parse_size("320G", "x")) == "320G"
    assert values.format_size(1536 << 20) == "1536M"


def test_share_flag() -> None:
    assert values.parse_share_flag(".") == {"host": "."}
    assert values.parse_share_flag("src:/w:ro") == {"host": "src", "guest": "/w", "mode": "ro"}
    assert values.parse_share_flag("src:review") == {"host": "src", "mode": "review"}


def test_every_section_field_is_in_the_table() -> None:
    for name, cls in cfg.SECTIONS.items():
        fields = {f.name for f in dataclasses.fields(cls)}
        declared = {s.key for s in cfg.SETTINGS if s.section == name}
        assert fields == declared, name


def test_config_show_json(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    assert cli.main(["config", "show", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["vm"]["disk"] == "320G" and data["vm"]["swap"] == "32G"
    assert [f["host"] for f in data["forward"]] == [2222, 45631, 33000]
    assert data["share"][0]["mode"] == "rw" and data["network"]["mode"] == "lan-block"

    write(tmp_path, '[vm]\nmemory = "2G"\n[network]\nmode = "offline"\n')
    assert cli.main(["config", "show", "--json", "--cpus", "1"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert (data["vm"]["memory"], data["vm"]["cpus"], data["network"]["mode"]) == ("2G", 1, "offline")


def test_bad_config_is_one_line_exit_2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    write(tmp_path, '[vm]\nmemory = "lots"\n')
    assert cli.main(["config", "show"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert lines[0].startswith("error:") and "vm.memory" in lines[0]
    assert "Traceback" not in captured.err
    assert not any(tmp_path.glob("*.tmp"))


def test_a_full_disk_is_one_line_with_a_hint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import errno

    monkeypatch.chdir(tmp_path)

    def full(*args: object, **kwargs: object) -> object:
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "disk.qcow2"))

    monkeypatch.setattr(trust, "discover", full)  # a verb's first step meets a full disk
    assert cli.main(["config", "show"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: No space left on device: ") and "disk.qcow2" in err
    assert "hint: free some disk space" in err and "Traceback" not in err


def test_log_caps_default_and_refuse_a_size_too_small(tmp_path: Path) -> None:
    c = cfg.load(None, cwd=tmp_path, host=HOST)
    assert c.logs == cfg.LogSettings(console_size=10 << 20, console_keep=3, audit_size=100 << 20, audit_keep=5)
    c = cfg.load(write(tmp_path, '[logs]\nconsole_size = "1M"\naudit_keep = 0\n'), host=HOST)
    assert (c.logs.console_size, c.logs.audit_keep) == (1 << 20, 0)
    with pytest.raises(ConfigError, match=r"logs\.audit_size: 1K is too small for a log"):
        cfg.load(write(tmp_path, '[logs]\naudit_size = "1K"\n'), host=HOST)


def test_doctor_shows_its_details_as_they_are(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """A check's detail and fix are text, not markup: `[limits]` (a settings table's name) stays in the line."""
    from vivarium import doctor

    monkeypatch.setattr(doctor, "checks", lambda: [doctor.Check("limits", True, "[limits] hold", "[bold]x[/]", required=False)])
    assert cli.main(["doctor"]) == 0
    shown = capsys.readouterr().out
    assert "[limits] hold" in shown and "[bold]x[/]" in shown, shown
