"""The VM lifecycle on a real TCG guest: up, exec, resources, ports, reset, crashes, many sandboxes."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from vivarium import Sandbox
from vivarium import template as template_mod
from vivarium.ports import free_port

from .conftest import AGENT, vv, write_config

pytestmark = pytest.mark.integration


def test_exec_returns_exit_code_and_separate_streams(box: Sandbox, project: Path) -> None:
    r = vv("exec", "itest", "--", "sh", "-c", "echo to-out; echo to-err >&2; exit 7", check=False)
    assert r.returncode == 7
    assert r.stdout == "to-out\n" and r.stderr == "to-err\n"
    # where you are: the same path in the guest when a share holds it, else the first share
    (project / "sub").mkdir(exist_ok=True)
    assert vv("exec", "itest", "--", "pwd", cwd=project / "sub").stdout.strip() == str((project / "sub").resolve())
    assert vv("exec", "itest", "--", "pwd", cwd=Path("/")).stdout.strip() == str(project.resolve())
    # arguments keep their word boundaries
    r = vv("exec", "itest", "--", "printf", "%s|", "a b", "c")
    assert r.stdout == "a b|c|"


def test_up_on_a_running_sandbox_changes_nothing(box: Sandbox, project: Path) -> None:
    pid = box.pid()
    r = vv("up", "itest", cwd=project)
    assert "already running" in r.stderr and box.pid() == pid


def test_resources_match_the_settings(box: Sandbox) -> None:
    r = box.exec(
        ["sh", "-c", "nproc; grep MemTotal /proc/meminfo; df -B1 --output=size / | tail -1; /usr/sbin/swapon --show=NAME,SIZE --bytes --noheadings"],
        capture=True,
    )
    assert r.returncode == 0, r.stderr
    nproc, mem, disk, swap = r.stdout.strip().splitlines()
    assert int(nproc) == 2
    mem_kib = int(mem.split()[1])
    assert 0.8 * (1 << 20) < mem_kib <= 1 << 20
    assert 0.93 * (10 << 30) < int(disk) <= 10 << 30  # grown from the ~2G base on first boot
    name, size = swap.split()
    assert name == "/dev/vdb" and int(size) >= 0.99 * (256 << 20)


def test_status_and_ls(box: Sandbox) -> None:
    import json

    st = json.loads(vv("status", "itest", "--json").stdout)
    assert st["state"] == "running" and st["pid"] == box.pid() and st["accel"] in ("kvm", "tcg")
    assert {p["guest"] for p in st["ports"]} == {22, 3000}
    assert all(p["bind"] == "127.0.0.1" for p in st["ports"])
    names = [s["name"] for s in json.loads(vv("ls", "--json").stdout)]
    assert "itest" in names
    assert "Host vivarium-itest" in vv("ssh-config", "itest").stdout
    # the console log: a boot's, or the restore's word that it became this sandbox
    mark = "vivarium: restored from a template, now itest" if box.record().instance.template else "vivarium-phase: setup"
    assert mark in vv("logs", "itest").stdout


def _serve_in_guest(box: Sandbox, port: int) -> None:
    r = box.exec(
        ["sh", "-c", f"cd /tmp && echo hello-from-guest > index.html && (setsid python3 -m http.server {port} >/dev/null 2>&1 &)"], capture=True
    )
    assert r.returncode == 0, r.stderr
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if box.exec(["sh", "-c", f"curl -sf http://127.0.0.1:{port}/ >/dev/null"]).returncode == 0:
            return
        time.sleep(0.5)
    raise AssertionError("the guest web server never came up")


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return str(resp.read().decode())


def test_port_add_and_rm_at_runtime(box: Sandbox) -> None:
    _serve_in_guest(box, 8000)
    host = free_port()
    vv("port", "itest", "add", f"{host}:8000")
    assert _get(f"http://127.0.0.1:{host}/") == "hello-from-guest\n"
    assert any(p["host"] == host for p in box.status().ports)
    vv("port", "itest", "rm", str(host))
    with pytest.raises(OSError):
        _get(f"http://127.0.0.1:{host}/")


@pytest.fixture
def host_address() -> Iterator[str]:
    """A non-loopback address of this host that we add ourselves (TEST-NET-1, on lo).

    (A veth into a namespace would be nicer, but on these machines the root
    namespace does not answer ARP on veth; namespace-to-namespace works.)
    """
    addr = "192.0.2.10"
    subprocess.run(["ip", "addr", "add", f"{addr}/32", "dev", "lo"], check=True)
    try:
        yield addr
    finally:
        subprocess.run(["ip", "addr", "del", f"{addr}/32", "dev", "lo"], check=False)


@pytest.mark.needs_root  # adds an address to the host's loopback
def test_forwards_are_not_reachable_on_other_addresses(box: Sandbox, host_address: str) -> None:
    _serve_in_guest(box, 8000)
    loopback_only = free_port()
    box.port_add(loopback_only, 8000)  # the default bind, 127.0.0.1
    everywhere = free_port()
    box.port_add(everywhere, 8000, "0.0.0.0")
    try:
        assert _get(f"http://127.0.0.1:{loopback_only}/") == "hello-from-guest\n"
        for port in (loopback_only, box.status().ssh_port):
            assert port is not None
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection((host_address, port), timeout=5).close()
        # The control: a forward opened on purpose to all addresses is reachable
        # there, so the check above can fail.
        assert _get(f"http://{host_address}:{everywhere}/") == "hello-from-guest\n"
    finally:
        box.port_rm(loopback_only)
        box.port_rm(everywhere)


def test_busy_port_is_one_line_naming_it(box: Sandbox, tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        busy = s.getsockname()[1]
        write_config(tmp_path, f'[vm]\n{AGENT}memory = "1G"\ncpus = 1\n[[forward]]\nhost = {busy}\nguest = 22\n')
        templates = set(template_mod.templates_dir().iterdir())
        r = vv("up", "busyport", cwd=tmp_path, check=False)
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert any(f"host port {busy}" in ln and ln.startswith("error:") for ln in lines), r.stderr
    assert "Traceback" not in r.stderr
    # said before anything was made: no sandbox, no template of its shape (minutes under TCG, for nothing)
    assert not Sandbox("busyport").exists()
    assert set(template_mod.templates_dir().iterdir()) == templates


def test_guest_that_never_gets_ready_times_out_cleanly(box: Sandbox, project: Path) -> None:
    r = vv("up", "slowpoke", "--cold", "--timeout", "2", "--auto-ports", cwd=project, check=False)  # a boot that never ends
    assert r.returncode == 1
    assert "did not answer SSH within 2s" in r.stderr and "console log:" in r.stderr
    assert re.search(r"QEMU has used \d+ s of CPU, its monitor says 'running'", r.stderr), r.stderr  # busy, not stuck
    assert "Traceback" not in r.stderr
    assert Sandbox("slowpoke").pid() is None
    assert vv("status", "slowpoke", "--json").stdout.count('"stopped"') == 1
    vv("destroy", "slowpoke")


def test_missing_qemu_is_one_line_with_the_fix(box: Sandbox, project: Path, tmp_path: Path) -> None:
    env = dict(os.environ, PATH=str(tmp_path))  # nothing on PATH
    for prog in ("ssh-keygen", "qemu-img", "unshare"):  # what `up` needs before QEMU (nft and ip: found in sbin)
        real = subprocess.run(["which", prog], capture_output=True, text=True, check=True).stdout.strip()
        (tmp_path / prog).symlink_to(real)
    r = vv("up", "noqemu", "--auto-ports", cwd=project, check=False, env=env)
    assert r.returncode == 1
    assert "qemu-system-x86_64 is not installed" in r.stderr and "apt-get install qemu-system-x86" in r.stderr
    assert "Traceback" not in r.stderr
    vv("destroy", "noqemu", check=False)  # (a new sandbox's template failed first: nothing was made)


def test_reset_throws_the_guest_disk_away(box: Sandbox, project: Path) -> None:
    assert box.exec(["sh", "-c", "echo precious > ~/marker && sync"]).returncode == 0
    assert box.exec(["sh", "-c", "test -f ~/marker"]).returncode == 0
    r = vv("reset", "itest", cwd=project)  # the project's vivarium.toml: its forwards, not the defaults
    assert "reset to clean and started again" in r.stderr
    assert box.pid() is not None
    assert box.exec(["sh", "-c", "test -f ~/marker"]).returncode == 1
    # a fresh copy of the ready template, made this sandbox again: Docker runs, the share is back, its own name
    made = box.record().instance
    assert made.template is not None and not made.pristine
    r = box.exec(["sh", "-c", f"systemctl is-active docker; hostname; mount | grep -c ' {project.resolve()} type virtiofs'"], capture=True)
    assert r.stdout.split() == ["active", "itest", "1"], r.stdout


def test_sigkill_then_up_recovers(box: Sandbox, project: Path) -> None:
    pid = box.pid()
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while box.pid() is not None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert vv("status", "itest", "--json").stdout.count('"crashed"') == 1
    vv("up", "itest", cwd=project)
    assert box.exec(["true"]).returncode == 0


def test_two_sandboxes_at_once_and_one_qemu_per_name(box: Sandbox, project: Path) -> None:
    # Two `up` of the same new name at once: one boots it, the other waits and finds it running.
    procs = [
        subprocess.Popen([sys.executable, "-m", "vivarium", "up", "second", "--auto-ports"],
                         cwd=project, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]  # fmt: skip
    results = [p.communicate(timeout=900) for p in procs]
    assert all(p.returncode == 0 for p in procs), results
    qemus = subprocess.run(["pgrep", "-f", "process=vivarium-second"], capture_output=True, text=True).stdout.split()
    assert len(qemus) == 1
    second = Sandbox("second")
    try:
        a, b = box.status(), second.status()
        assert a.state == b.state == "running"
        assert a.ssh_port != b.ssh_port
        assert {p["host"] for p in a.ports}.isdisjoint({p["host"] for p in b.ports})
        assert box.exec(["hostname"], capture=True).stdout.strip() == "itest"
        assert second.exec(["hostname"], capture=True).stdout.strip() == "second"
    finally:
        vv("destroy", "second")


def test_stop_then_destroy(project: Path, box: Sandbox) -> None:
    vv("stop", "itest")
    assert box.pid() is None and box.status().state == "stopped"
    vv("up", "itest", cwd=project)
    assert box.exec(["true"]).returncode == 0


def test_interactive_ssh_gets_a_terminal(box: Sandbox, tmp_path: Path) -> None:
    """`vivarium ssh NAME` in a real terminal (tmux): a login shell on a pty."""
    session = f"vivarium-test-{os.getpid()}"
    out = tmp_path / "screen.txt"
    cmd = f"{sys.executable} -m vivarium ssh itest"
    subprocess.run(["tmux", "new-session", "-d", "-s", session, "-x", "120", "-y", "30", f"{cmd}; sleep 30"], check=True)
    try:
        deadline = time.monotonic() + 60
        screen = ""
        sent = False
        while time.monotonic() < deadline and "answer-42" not in screen:
            time.sleep(1)
            screen = subprocess.run(["tmux", "capture-pane", "-t", session, "-p"], capture_output=True, text=True).stdout
            if not sent and screen.rstrip().endswith("$"):  # the prompt (capture-pane trims its trailing space)
                subprocess.run(["tmux", "send-keys", "-t", session, "tty; echo answer-$((6*7)); exit", "Enter"], check=True)
                sent = True
        out.write_text(screen)
        assert "answer-42" in screen and "/dev/pts/" in screen, screen
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], check=False, capture_output=True)
