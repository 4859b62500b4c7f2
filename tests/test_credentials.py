"""Secrets on the host side: the [[secret]] settings and presets, reading a real value, a sandbox's placeholders."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from vivarium import config as cfg
from vivarium import credentials, state
from vivarium.errors import ConfigError, UsageError

SETTINGS = """
[[secret]]
name = "API_TOKEN"
from = "env:MY_API_TOKEN"
hosts = ["api.example.org", "*.example.com"]
header = "X-Token"
"""


def test_secrets_are_settings_that_survive_a_round_trip(tmp_path: Path) -> None:
    (tmp_path / "vivarium.toml").write_text(SETTINGS)
    c = cfg.load(tmp_path / "vivarium.toml")
    assert c.secret == (credentials.SecretSpec("API_TOKEN", "env:MY_API_TOKEN", ("api.example.org", "*.example.com"), "x-token"),)
    again = cfg.load_data(cfg.to_dict(c), "kept", tmp_path)  # what a sandbox freezes and reads back
    assert again.secret == c.secret
    assert cfg.load_data({}, "none", tmp_path).secret == ()


@pytest.mark.parametrize(
    ("entry", "why"),
    [
        ('name = "A"\nfrom = "vault:x"\nhosts = ["a.org"]', "says nowhere to read the secret from"),
        ('name = "A"\nfrom = "env:not a var"\nhosts = ["a.org"]', "is not a variable name"),
        ('name = "1A"\nfrom = "env:A"\nhosts = ["a.org"]', "'1A' is not a variable name"),
        ('name = "A"\nfrom = "env:A"\nhosts = []', "hosts is empty"),
        ('name = "A"\nfrom = "env:A"\nhosts = ["not a host"]', "is not a domain"),
        ('name = "A"\nfrom = "env:A"\nhosts = ["a.org"]\nheader = "x y"', "is not an HTTP header name"),
        ('name = "A"\nfrom = "env:A"', "'hosts' is required"),
    ],
)
def test_a_bad_secret_setting_is_one_line(tmp_path: Path, entry: str, why: str) -> None:
    (tmp_path / "vivarium.toml").write_text(f"[[secret]]\n{entry}\n")
    with pytest.raises(ConfigError, match=why):
        cfg.load(tmp_path / "vivarium.toml")


def test_presets_need_no_settings() -> None:
    spec = credentials.find((), "ANTHROPIC_API_KEY")
    assert spec.hosts == ("api.anthropic.com",) and spec.source == "env:ANTHROPIC_API_KEY"
    mine = credentials.SecretSpec("ANTHROPIC_API_KEY", "file:/k", ("proxy.example.org",))
    assert credentials.find((mine,), "ANTHROPIC_API_KEY") == mine  # the settings win over a preset
    with pytest.raises(UsageError, match="--secret NOPE: no such secret"):
        credentials.find((), "NOPE")


def test_a_real_value_is_read_where_it_lives(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("V_TOKEN", "tok-123")
    assert credentials.read(credentials.SecretSpec("T", "env:V_TOKEN", ("a.org",))) == "tok-123"
    (tmp_path / "key").write_text("from-a-file\n")
    assert credentials.read(credentials.SecretSpec("T", f"file:{tmp_path / 'key'}", ("a.org",))) == "from-a-file"
    assert credentials.read(credentials.SecretSpec("T", "cmd:printf from-a-command", ("a.org",))) == "from-a-command"
    for source, why in (("env:V_UNSET", "V_UNSET is not set here"), (f"file:{tmp_path / 'nope'}", "cannot read it"),
                        ("cmd:false", "the command failed"), ("cmd:/nonexistent/op read", "the command did not run"),
                        ("cmd:printf 'a\\nb'", "more than one line")):  # fmt: skip
        monkeypatch.delenv("V_UNSET", raising=False)
        with pytest.raises(UsageError, match=why):
            credentials.read(credentials.SecretSpec("T", source, ("a.org",)))


def test_a_sandbox_keeps_its_placeholder_across_sessions(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VIVARIUM_HOME", str(tmp_path))
    d = state.InstanceDir.of("box")
    d.path.mkdir(parents=True)
    real = "sk-ant-api03-" + "x" * 80
    ph = credentials.placeholder(d, "ANTHROPIC_API_KEY", real)
    assert ph.startswith("sk-ant-api03-") and len(ph) == len(real) and real not in ph
    assert credentials.placeholder(d, "ANTHROPIC_API_KEY", real) == ph
    assert credentials.placeholder(d, "OTHER", real) != ph  # one per secret
    assert os.stat(d.path / "placeholders.json").st_mode & 0o777 == 0o600
    assert real not in (d.path / "placeholders.json").read_text()
