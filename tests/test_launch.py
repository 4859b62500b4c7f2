"""A launch that fails part way leaves nothing behind: no namespace holder, no gateway, no socket, and the
instance marked stopped. Real processes: the namespace and the gateway start for real; QEMU is a stand-in
on PATH that fails the way a real one does (a message on stderr, exit 1), or dies once it has started."""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from vivarium import config as cfg
from vivarium import launch, ports, record, ssh, state
from vivarium.errors import VMError
from vivarium.image.build import Image
from vivarium.net import control, netns
from vivarium.share import virtiofs

from . import records


@pytest.fixture
def box(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[launch.Launch, record.Record]]:
    home = Path(tempfile.mkdtemp(prefix="vvl", dir="/tmp"))  # short: unix socket paths live in it
    monkeypatch.setenv("VIVARIUM_HOME", str(home))
    monkeypatch.setenv("VIVARIUM_ACCEL", "tcg")
    d = state.InstanceDir.of("failing")
    d.path.mkdir(parents=True)
    ssh.make_keys(d.key, d.host_key, d.known_hosts, "failing")
    image = Image("k", tmp_path / "image", {"agents": {}})
    image.path.mkdir()
    for f in (image.disk, image.kernel, image.initrd):
        f.write_bytes(b"")
    c = cfg.load_data({"share": [], "forward": [{"host": ports.free_port(), "guest": 22}]}, "test", tmp_path)
    rec = records.made("failing")
    d.write(rec)
    for disk in (d.disk, d.swap):
        disk.write_bytes(b"")  # what a fake QEMU is handed
    yield launch.Launch("failing", d, c, image, True, lambda phase, detail: None), rec
    control.stop(d.path)
    netns.stop(d.path)
    for line in processes_of(d):  # what a failing test left: ours, by pid
        os.kill(int(line.split(":")[0]), signal.SIGKILL)
    shutil.rmtree(home, ignore_errors=True)


def fake_qemu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, script: str) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    answers = ('case "$1" in --version) echo "QEMU emulator version 7.2.22"; exit 0;;\n'  # what caps.py asks
               '-machine) echo "q35  Standard PC (Q35 + ICH9, 2009) (alias of pc-q35-7.2)"; exit 0;;\n'
               '-sandbox) exit 1;; esac\n')  # a QEMU without its seccomp filter  # fmt: skip
    (bin_dir / "qemu-system-x86_64").write_text("#!/bin/sh\n" + answers + script)
    (bin_dir / "qemu-system-x86_64").chmod(0o755)
    (bin_dir / "qemu-img").symlink_to("/bin/true")
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")


def processes_of(d: state.InstanceDir) -> list[str]:
    """Every process on this host whose command line names the instance's directory."""
    out = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            text = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if str(d.path) in text:
            out.append(f"{cmdline.parent.name}: {text[:120]}")
    return out


def assert_nothing_left(how: launch.Launch) -> None:
    d = how.dir
    time.sleep(1)  # a helper that was left running would have written its pid file by now
    assert processes_of(d) == []
    assert netns.pid(d.path) is None and control.pid(d.path) is None and control.child_pid(d.path) is None
    left = sorted(p.name for p in d.path.iterdir() if p.is_socket())
    assert left == []
    run = how.dir.read().run
    assert run is None or run.running is False


def test_qemu_refusing_to_start_unwinds_the_namespace_and_the_gateway(
    box: tuple[launch.Launch, record.Record], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    how, rec = box
    fake_qemu(tmp_path, monkeypatch, 'echo "qemu-system-x86_64: -netdev tap: no such device" >&2; exit 1\n')
    with pytest.raises(VMError, match="QEMU did not start: -netdev tap: no such device"):
        launch.start(how, rec, auto_ports=True, timeout=5)
    assert_nothing_left(how)


def test_a_missing_disk_is_one_line_and_unwinds_everything(
    box: tuple[launch.Launch, record.Record], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    how, rec = box
    fake_qemu(tmp_path, monkeypatch, "exit 1\n")
    how.dir.swap.unlink()
    with pytest.raises(VMError, match=r"sandbox 'failing': cannot open /.*/swap\.qcow2: No such file or directory") as e:
        launch.start(how, rec, auto_ports=True, timeout=5)
    assert e.value.hint and "vivarium reset failing" in e.value.hint
    assert_nothing_left(how)


def test_a_guest_that_never_gets_ready_unwinds_everything(
    box: tuple[launch.Launch, record.Record], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    how, rec = box
    # "starts", writes its pid file, then is gone: the launch sees QEMU exit while booting
    fake_qemu(tmp_path, monkeypatch, 'for a; do case "$prev" in -pidfile) echo $$ > "$a";; esac; prev=$a; done\nexit 0\n')
    with pytest.raises(VMError, match=r"QEMU did not start|QEMU started but exited at once|QEMU exited while"):
        launch.start(how, rec, auto_ports=True, timeout=5)
    assert_nothing_left(how)


def test_a_saved_state_that_does_not_load_unwinds_everything_and_says_why(
    box: tuple[launch.Launch, record.Record], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The load step: a real QEMU (without the test image's empty kernel) given a damaged saved state."""
    how, rec = box
    d = how.dir
    for disk in (d.disk, d.swap):
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", disk, "64M"], check=True)
    saved = tmp_path / "saved"
    saved.mkdir()
    with open(saved / "ram", "wb") as f:
        f.truncate(how.config.vm.memory)  # all holes: nothing to copy
    (saved / "state").write_bytes(b"not a migration stream" * 100)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    real = shutil.which("qemu-system-x86_64")
    (bin_dir / "qemu-system-x86_64").write_text(
        "#!/bin/sh\n# QEMU as launch runs it, without the (empty) kernel: a restore never boots one\n"
        'skip=0\nfor a; do shift; if [ $skip = 1 ]; then skip=0; continue; fi\n'
        'case "$a" in -kernel|-initrd|-append) skip=1; continue;; esac; set -- "$@" "$a"; done\n'
        f'exec {real} "$@"\n'
    )  # fmt: skip
    (bin_dir / "qemu-system-x86_64").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    with pytest.raises(VMError, match=r"^QEMU exited while starting sandbox 'failing': load of migration failed: ") as e:
        launch.start(how, rec, auto_ports=True, timeout=30, saved=saved)
    assert str(d.log) in e.value.hint
    assert_nothing_left(how)


def test_a_share_that_cannot_be_served_is_an_error_unless_no_share_says_so(
    box: tuple[launch.Launch, record.Record], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    how, rec = box
    project = tmp_path / "project"
    project.mkdir()
    shared = dataclasses.replace(how, config=cfg.load_data({"share": [{"host": str(project)}], "forward": []}, "test", tmp_path))
    # a host that cannot serve it (no virtiofsd, or not root: what `vivarium doctor` reports)
    monkeypatch.setattr(virtiofs, "supported", lambda *_: "user x has no subordinate uids")
    with pytest.raises(VMError, match=rf"^cannot share {project} with sandbox 'failing': user x has no subordinate uids$") as e:
        launch.start(shared, rec, auto_ports=True, timeout=5)
    assert "vivarium up --no-share failing" in e.value.hint
    assert_nothing_left(how)  # the namespace and the gateway it started first are gone
    # --no-share: the launch goes on to QEMU (here one that refuses to start), no share asked for
    fake_qemu(tmp_path, monkeypatch, 'echo "qemu-system-x86_64: stop here" >&2; exit 1\n')
    with pytest.raises(VMError, match="QEMU did not start: stop here"):
        launch.start(dataclasses.replace(shared, share=False), rec, auto_ports=True, timeout=5)
    assert_nothing_left(how)


LINGERING_QEMU = (  # starts: its pid file, a QMP greeting (vm/spawn.py waits for it), then it runs on
    'for a; do case "$prev" in -pidfile) pf=$a;; -qmp) q=${a#unix:}; q=${q%%,*};; esac; prev=$a; done\necho $$ > "$pf"\n'
    "exec python3 -c 'import socket, sys, time\n"
    "s = socket.socket(socket.AF_UNIX)\ns.bind(sys.argv[1])\ns.listen()\nc, _ = s.accept()\n"
    'c.sendall(b"{\\"QMP\\": {}}\\r\\n")\ntime.sleep(20)\' "$q" "$@"\n'
)


def test_a_gateway_that_fails_unwinds_qemu_and_the_namespace(
    box: tuple[launch.Launch, record.Record], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    how, rec = box
    fake_qemu(tmp_path, monkeypatch, LINGERING_QEMU)
    real = control.write_policy

    def damaged(directory: Path, *args: object) -> None:  # the gateway really starts, and really cannot read it
        real(directory, *args)  # type: ignore[arg-type]
        (directory / "policy.json").write_text("{not json")

    monkeypatch.setattr(control, "write_policy", damaged)
    with pytest.raises(VMError, match="the egress gateway did not start"):
        launch.start(how, rec, auto_ports=True, timeout=5)
    assert_nothing_left(how)


def test_a_share_server_that_fails_unwinds_what_started_before_it(
    box: tuple[launch.Launch, record.Record], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    how, rec = box
    if virtiofs.supported() is not None:
        pytest.fail(f"this test needs a host that serves shares: {virtiofs.supported()}")
    project = tmp_path / "project"
    project.mkdir()
    shared = dataclasses.replace(how, config=cfg.load_data({"share": [{"host": str(project)}], "forward": []}, "test", tmp_path))
    project.rmdir()  # gone between the settings and the start: the share server cannot serve it
    with pytest.raises(VMError, match=f"^cannot share {project}: .*No such file or directory"):
        launch.start(shared, rec, auto_ports=True, timeout=5)
    assert_nothing_left(how)
