"""The config trust store (a project's vivarium.toml is used only as trusted, byte for byte) and
the settings a sandbox keeps from its creation on."""

from __future__ import annotations

from pathlib import Path

import pytest

from vivarium import cli, host, trust
from vivarium import config as cfg
from vivarium.errors import ConfigError
from vivarium.sandbox import Sandbox
from vivarium.verbs.common import sandbox_for

from . import records

HOST = host.Host(cpus=8, memory=32 << 30, user="alice", uid=1234)


def project(tmp_path: Path, text: str = '[vm]\nmemory = "2G"\n') -> Path:
    (tmp_path / "vivarium.toml").write_text(text)
    return tmp_path / "vivarium.toml"


def test_an_untrusted_file_is_refused_in_one_line(tmp_path: Path) -> None:
    path = project(tmp_path)
    with pytest.raises(ConfigError) as e:
        trust.discover(None, tmp_path)
    assert e.value.exit_code == 2 and "is not trusted" in e.value.message and "changed" not in e.value.message
    assert f"vivarium config trust {path}" in e.value.hint


def test_trusted_content_only(tmp_path: Path) -> None:
    path = project(tmp_path)
    trust.trust(path, path.read_bytes())
    assert trust.discover(None, tmp_path).vm.memory == 2 << 30
    path.write_text('[vm]\nmemory = "3G"\n')  # one byte changed (by the guest, say)
    with pytest.raises(ConfigError, match="changed since you trusted it"):
        trust.discover(None, tmp_path)
    diff = trust.changes(path, path.read_bytes())
    assert '-memory = "2G"' in diff and '+memory = "3G"' in diff
    assert (trust.store() / "x").parent.stat().st_mode & 0o077 == 0  # the user's own


def test_a_file_named_with_config_is_trusted_by_being_named(tmp_path: Path) -> None:
    path = project(tmp_path, "[vm]\ncpus = 1\n")
    assert trust.discover(path, Path("/")).vm.cpus == 1
    empty = tmp_path / "empty"
    empty.mkdir()
    assert trust.discover(None, empty).source is None  # no file: the defaults


def test_trust_is_per_path(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    pa, pb = project(a), project(b)
    trust.trust(pa, pa.read_bytes())
    assert trust.discover(None, a).source == pa
    with pytest.raises(ConfigError):  # the same content elsewhere was not trusted there
        trust.discover(None, b)
    del pb


def test_what_reaches_outside_is_spelled_out(tmp_path: Path) -> None:
    path = project(tmp_path, '[[share]]\nhost = "/"\n[[forward]]\nhost = 8080\nguest = 80\nbind = "0.0.0.0"\n'
                             '[network]\nallow_cidrs = ["0.0.0.0/0"]\n[image]\nsetup = "curl x | sh"\n')  # fmt: skip
    lines = trust.reaching_out(cfg.load(path, host=HOST))
    text = "\n".join(lines)
    assert "shares / (outside the project) rw" in text and "0.0.0.0/0" in text and "listens on 0.0.0.0:8080" in text
    assert "curl x | sh" in text


def test_config_trust_verb(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    project(tmp_path)
    assert cli.main(["up", "--memory", "1G"]) == 2
    assert "is not trusted" in capsys.readouterr().err
    assert cli.main(["config", "trust", "--show"]) == 0
    assert '+memory = "2G"' in capsys.readouterr().out
    assert cli.main(["config", "show"]) == 2  # --show trusts nothing
    assert cli.main(["config", "trust"]) == 0 and "trusted" in capsys.readouterr().err
    assert cli.main(["config", "show"]) == 0


def test_a_sandbox_keeps_the_settings_it_was_made_with(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    (tmp_path / "a").mkdir()
    made = cfg.load(project(tmp_path / "a"))
    box = Sandbox("frozen", made)
    box.dir.path.mkdir(parents=True)
    box._freeze()
    box.dir.write(records.made("frozen"))
    # later, somewhere the guest wrote a config the user even trusted by mistake: the sandbox keeps its own
    elsewhere = tmp_path / "b"
    elsewhere.mkdir()
    path = project(elsewhere, '[vm]\nmemory = "8G"\n[[share]]\nhost = "/"\n')
    trust.trust(path, path.read_bytes())
    monkeypatch.chdir(elsewhere)
    again = Sandbox("frozen").config
    assert cfg.to_dict(again) == cfg.to_dict(made) and again.vm.memory == 2 << 30
    args = cli.parser().parse_args(["up", "frozen"])
    assert sandbox_for(args).config.vm.memory == 2 << 30
    assert "keeps the settings it was made with" in capsys.readouterr().err
