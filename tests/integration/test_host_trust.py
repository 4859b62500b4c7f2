"""What the host does with what the guest wrote. Every attack runs as root in a running
(warm-started) sandbox: a guest-written vivarium.toml, writes to the paths in a share that
run on the host, setuid files and device nodes in a share, a review scan that lies, files
swapped between `diff` and `apply`, a kubeconfig with a command in it, the user's SSH agent,
and names that would drive the user's terminal. Each one worked against main at abd3cbb.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from vivarium import Sandbox
from vivarium.ports import free_port

from ..fakenet import LAN
from .conftest import PROTECTED, vv

pytestmark = pytest.mark.integration


def as_root(box: Sandbox, script: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return box.exec(["sudo", "sh", "-c", script], capture=True, timeout=timeout)


# ------------------------------------------------------------- the project's config


HOSTILE = {
    "a share of the host's /": '[[share]]\nhost = "/"\n',
    "the whole internet and LAN opened": '[network]\nallow_cidrs = ["0.0.0.0/0"]\n',
    "a forward bound to every address": '[[forward]]\nhost = {port}\nguest = 22\nbind = "0.0.0.0"\n',
    "a setup script run by the build": '[image]\nsetup = "echo pwned > /etc/pwned-by-the-guest"\n',
}


@pytest.fixture
def untrusted(box: Sandbox, project: Path) -> Iterator[Path]:
    """A directory of the project, where the guest is about to write a vivarium.toml."""
    d = project / "untrusted"
    assert as_root(box, f"mkdir -p {d} && chown $SUDO_USER {d}").returncode == 0
    yield d
    for name in ("hostile", "hostile2"):
        if Sandbox(name).exists():
            Sandbox(name).destroy()


@pytest.mark.parametrize("what", list(HOSTILE))
def test_a_config_the_guest_wrote_is_refused_at_up(box: Sandbox, untrusted: Path, what: str) -> None:
    text = HOSTILE[what].format(port=free_port())
    assert as_root(box, f"cat > {untrusted}/vivarium.toml <<'EOF'\n{text}EOF").returncode == 0
    assert (untrusted / "vivarium.toml").read_text() == text  # the guest did write it
    r = vv("up", "hostile", cwd=untrusted, check=False)
    assert r.returncode == 2, f"the guest's config was used ({what}):\n{r.stderr}"
    assert "is not trusted" in r.stderr and "vivarium config trust" in r.stderr and "Traceback" not in r.stderr
    assert not Sandbox("hostile").exists()
    # the user looks, and decides: `--show` prints what reaches outside the sandbox
    shown = vv("config", "trust", "--show", cwd=untrusted, check=False)
    assert shown.returncode == 0 and "+" in shown.stdout, shown.stdout + shown.stderr


def test_build_and_reset_ignore_a_config_the_guest_wrote(box: Sandbox, untrusted: Path, project: Path) -> None:
    text = "".join(HOSTILE.values()).format(port=free_port())
    assert as_root(box, f"cat > {untrusted}/vivarium.toml <<'EOF'\n{text}EOF").returncode == 0
    r = vv("build", cwd=untrusted, check=False)
    assert r.returncode == 2 and "is not trusted" in r.stderr, r.stderr
    assert "built image" not in r.stderr
    # an existing sandbox keeps the settings it was made with, wherever `reset` is typed
    r = vv("reset", "itest", cwd=untrusted)
    assert "reset to clean and started again" in r.stderr
    st = box.status()
    assert [s["host"] for s in st.shares] == [str(project.resolve())]
    assert all(p["bind"] == "127.0.0.1" for p in st.ports), st.ports
    policy = json.loads((box.dir.path / "policy.json").read_text())
    assert "0.0.0.0/0" not in json.dumps(policy)


# ------------------------------------------------------------- protected paths


TRIES = [
    "echo pwned >> vivarium.toml",
    "printf '[core]\\n\\tfsmonitor = touch /tmp/pwned\\n' >> .git/config",
    "echo pwned > .git/hooks/post-checkout",
    "rm -f .git/hooks/pre-commit.sample",
    "echo pwned >> .envrc",
    "echo pwned > .vscode/tasks.json",
    "rm -rf .vscode",
    "echo pwned > .idea/x.xml",
    "mv .git .git-away",
    "mv vivarium.toml moved.toml",
    "mv .idea .idea-away",
    "ln -f .envrc hard-link",
]


def test_paths_that_run_on_the_host_are_read_only_even_to_root(box: Sandbox, project: Path) -> None:
    before = {rel: (project / rel).read_bytes() for rel in PROTECTED}
    tries = "".join(f"if sh -c {json.dumps(t)} 2>/dev/null; then echo 'WROTE: {t}'; fi\n" for t in TRIES)
    r = as_root(box, f"mount -o remount,rw {project} 2>/dev/null; cd {project} && {{\n{tries}}}; echo ordinary > ordinary.txt && echo DONE")
    assert "DONE" in r.stdout, r.stderr  # the share itself is writable
    assert "WROTE" not in r.stdout, r.stdout
    assert {rel: (project / rel).read_bytes() for rel in PROTECTED} == before
    assert not (project / ".git" / "hooks" / "post-checkout").exists() and not (project / ".vscode" / "tasks.json").exists()
    assert (project / "ordinary.txt").read_text() == "ordinary\n"


def test_no_setuid_file_device_node_or_fifo_reaches_the_host(box: Sandbox, project: Path) -> None:
    d = project / "special"
    script = (
        f"mkdir -p {d} && cd {d} && "
        "echo x > s1; chmod 4755 s1; echo x > s2; chmod 6755 s2; cp /bin/true s3; chmod u+s,g+s s3; "
        "install -m 4755 /bin/true s4; mkdir sg; chmod 2775 sg; "
        "python3 -c \"import os; os.close(os.open('s5', os.O_CREAT | os.O_WRONLY, 0o4755))\"; "
        "mknod blk b 8 0; mknod chr c 1 3; mkfifo fifo; true"
    )
    as_root(box, script)
    assert (d / "s1").exists()  # the guest made its files; only their bits and kinds are the question
    bad = []
    for p in [d, *d.rglob("*")]:
        st = p.lstat()
        if st.st_mode & 0o6000 or not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode) or stat.S_ISLNK(st.st_mode)):
            bad.append(f"{p.name} {stat.filemode(st.st_mode)} uid {st.st_uid}")
    assert not bad, bad


# ------------------------------------------------------------- review apply


@pytest.fixture
def attack(shared: tuple[Sandbox, Path, Path]) -> tuple[Sandbox, Path]:
    box, rw, _ = shared
    return box, rw.parent / "attack"


def upper(box: Sandbox, share: Path) -> str:
    (tag,) = [s["tag"] for s in box.status().shares if s["host"] == str(share)]
    return f"/var/lib/vivarium/review/{tag}/upper"


def outside(share: Path) -> set[str]:
    """Everything next to the share (the share itself excluded): nothing may appear there."""
    return {str(p) for p in share.parent.rglob("*") if share not in (p, *p.parents)}


def test_apply_never_writes_through_a_host_symlink(attack: tuple[Sandbox, Path]) -> None:
    box, share = attack
    before = outside(share)
    # the user's symlink out of the share, replaced in the guest by a directory with a file in it
    assert box.exec(["sh", "-c", f"cd {share} && rm hostlink && mkdir hostlink && echo x > hostlink/f"]).returncode == 0
    vv("diff", "sharebox")
    vv("apply", "sharebox", str(share / "hostlink"), check=False)
    assert not (share.parent / "victim" / "f").exists()
    assert (share.parent / "victim" / "precious.txt").read_text() == "outside the share\n"
    # a symlink the guest makes, applied; then a directory in its place, with a file in it
    assert box.exec(["sh", "-c", f"cd {share} && ln -s {share.parent}/victim esc"]).returncode == 0
    vv("diff", "sharebox")
    vv("apply", "sharebox", str(share / "esc"), check=False)
    assert box.exec(["sh", "-c", f"cd {share} && rm esc && mkdir esc && echo x > esc/f2"]).returncode == 0
    vv("diff", "sharebox")
    vv("apply", "sharebox", str(share / "esc"), check=False)
    assert not (share.parent / "victim" / "f2").exists()
    assert outside(share) == before


def test_apply_confines_a_lying_scan_to_the_share(attack: tuple[Sandbox, Path], tmp_path: Path) -> None:
    box, share = attack
    up = upper(box, share)
    content = b"pwned\n"
    sha = hashlib.sha256(content).hexdigest()
    absolute = tmp_path / "abs-escape"
    lies = [{"path": p, "type": "file", "mode": 0o644, "sha256": sha, "size": len(content)}
            for p in ("../x-escape", str(absolute), "src/../../x-src")]  # fmt: skip
    # root in the guest answers the host's scan itself: sudo finds /usr/local/bin first
    fake = f'#!/bin/sh\nif [ "$1" = "-c" ] && [ "$3" = "{up}" ]; then cat /root/lies.json; exit 0; fi\nexec /usr/bin/python3 "$@"\n'
    setup = (
        f"cat > /root/lies.json <<'EOF'\n{json.dumps(lies)}\nEOF\n"
        f"cat > /usr/local/bin/python3 <<'EOF'\n{fake}EOF\nchmod 755 /usr/local/bin/python3\n"
        f"mkdir -p {up}/src {up}{absolute.parent} && for f in {up}/../x-escape {up}{absolute} {up}/../x-src; do echo pwned > $f; done"
    )
    before = outside(share)
    try:
        assert as_root(box, setup).returncode == 0
        shown = vv("diff", "sharebox", check=False)
        vv("apply", "sharebox", str(share / "src"), check=False)
        vv("apply", "sharebox", check=False)
    finally:
        as_root(box, "rm -f /usr/local/bin/python3 /root/lies.json")
    assert not absolute.exists()
    assert outside(share) == before
    assert not (share.parent / "x-escape").exists() and not (share.parent / "x-src").exists()
    assert "Traceback" not in shown.stderr


def test_apply_keeps_only_permission_bits_and_skips_fifos_aloud(attack: tuple[Sandbox, Path]) -> None:
    box, share = attack
    script = f"cd {share} && echo s > suid.sh && chmod 6755 suid.sh && mkdir sticky && chmod 1777 sticky && mkfifo pipe"
    assert box.exec(["sh", "-c", script]).returncode == 0
    shown = vv("diff", "sharebox")
    assert "pipe" in shown.stdout and "fifo" in shown.stdout, shown.stdout  # listed, with its type
    r = vv("apply", "sharebox", str(share / "suid.sh"), str(share / "sticky"), str(share / "pipe"), check=False)
    assert "pipe" in r.stderr and "fifo" in r.stderr, r.stderr
    assert (share / "suid.sh").read_text() == "s\n"
    assert stat.S_IMODE((share / "suid.sh").stat().st_mode) == 0o755
    assert stat.S_IMODE((share / "sticky").stat().st_mode) == 0o777
    assert not (share / "pipe").exists()


def test_apply_refuses_a_file_swapped_after_diff(attack: tuple[Sandbox, Path]) -> None:
    box, share = attack
    assert box.exec(["sh", "-c", f"echo reviewed > {share}/swap.txt"]).returncode == 0
    assert "swap.txt" in vv("diff", "sharebox").stdout
    assert box.exec(["sh", "-c", f"echo swapped-after-review > {share}/swap.txt"]).returncode == 0
    r = vv("apply", "sharebox", str(share / "swap.txt"), check=False)
    assert r.returncode != 0 and "swap.txt" in r.stderr, r.stderr
    assert (share / "swap.txt").read_text() == "orig\n"


def test_a_host_edit_with_its_mtime_restored_is_not_overwritten(attack: tuple[Sandbox, Path]) -> None:
    box, share = attack
    assert box.exec(["sh", "-c", f"echo gggg > {share}/same.txt"]).returncode == 0
    path = share / "same.txt"
    st = path.stat()
    time.sleep(0.05)
    path.write_text("hhhh\n")  # the same size, and the mtime put back, as cp -p or rsync -a would
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    vv("diff", "sharebox")
    r = vv("apply", "sharebox", str(path), check=False)
    assert path.read_text() == "hhhh\n", r.stderr
    assert r.returncode == 1 and "same.txt" in r.stderr


def test_names_are_shown_escaped_one_change_per_line(attack: tuple[Sandbox, Path]) -> None:
    box, share = attack
    script = f"cd {share} && touch \"$(printf 'x\\nD harmless')\" \"$(printf 'bell\\a')\" \"$(printf 'latin\\377.txt')\""
    assert box.exec(["bash", "-c", script]).returncode == 0
    env = dict(os.environ, LC_ALL="C.UTF-8", PYTHONIOENCODING="utf-8:strict")
    r = vv("diff", "sharebox", env=env, check=False)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    lines = r.stdout.splitlines()
    assert not any(ln.startswith("D harmless") for ln in lines), lines
    assert any(ln.endswith("x\\nD harmless") for ln in lines), lines
    assert "\a" not in r.stdout and any("bell\\x07" in ln for ln in lines)
    assert any("latin\\xff.txt" in ln for ln in lines), lines


# ------------------------------------------------------------- kubeconfig, ssh, the terminal


def test_a_kubeconfig_with_a_command_in_it_is_refused(box: Sandbox, tmp_path: Path) -> None:
    port = free_port()
    vv("port", "itest", "add", f"{port}:45631")
    hostile = {
        "apiVersion": "v1", "kind": "Config",
        "clusters": [{"name": "kind-kind", "cluster": {"server": "https://0.0.0.0:45631"}}],
        "users": [{"name": "kind-kind", "user": {"exec": {"apiVersion": "client.authentication.k8s.io/v1", "command": "/bin/sh",
                                                          "args": ["-c", "touch /tmp/pwned-by-kubeconfig"]}}}],
    }  # fmt: skip
    mine = tmp_path / "kubeconfig"
    mine.write_text("apiVersion: v1\nkind: Config\nclusters: []\nusers: []\ncontexts: []\n")
    before = mine.read_bytes()
    try:
        assert box.exec(["sh", "-c", "mkdir -p ~/.kube && cat > ~/.kube/config"], input=yaml.safe_dump(hostile)).returncode == 0
        r = vv("kubeconfig", "itest", "--merge", env=dict(os.environ, KUBECONFIG=str(mine)), check=False)
        assert r.returncode != 0 and "exec" in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert mine.read_bytes() == before
        r = vv("kubeconfig", "itest", check=False)
        assert r.returncode != 0 and "/bin/sh" not in r.stdout
    finally:
        vv("port", "itest", "rm", str(port))
        box.exec(["rm", "-rf", ".kube"])


def test_the_ssh_config_block_forwards_no_agent(box: Sandbox, tmp_path: Path) -> None:
    sock = tmp_path / "agent.sock"
    agent = subprocess.Popen(["ssh-agent", "-D", "-a", str(sock)], stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while not sock.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "the-users-key", "-f", tmp_path / "key"], check=True)
        env = dict(os.environ, SSH_AUTH_SOCK=str(sock))
        subprocess.run(["ssh-add", "-q", tmp_path / "key"], env=env, check=True)
        config = tmp_path / "ssh_config"
        # the README's block, then the common catch-all later in the user's file
        config.write_text(vv("ssh-config", "itest").stdout + "\nHost *\n  ForwardAgent yes\n  ForwardX11 yes\n")
        r = subprocess.run(["ssh", "-F", config, "-o", "BatchMode=yes", "vivarium-itest", "ssh-add -l; echo SSH_AUTH_SOCK=$SSH_AUTH_SOCK"],
                           env=env, capture_output=True, text=True, timeout=60)  # fmt: skip
        assert "SSH_AUTH_SOCK=" in r.stdout, r.stderr  # the login itself worked
        assert "the-users-key" not in r.stdout and "SSH_AUTH_SOCK=\n" in r.stdout, r.stdout
    finally:
        agent.kill()
        agent.wait()


def test_a_name_from_the_guest_cannot_drive_the_terminal(box: Sandbox) -> None:
    hello = r"""
import socket, struct, sys
name = b"\x1b]0;pwned\x07"
sni = struct.pack("!HBH", len(name) + 3, 0, len(name)) + name
ext = struct.pack("!HH", 0, len(sni)) + sni
body = b"\x03\x03" + b"\x00" * 32 + b"\x00" + b"\x00\x02\x13\x01" + b"\x01\x00" + struct.pack("!H", len(ext)) + ext
hs = b"\x01" + len(body).to_bytes(3, "big") + body
s = socket.create_connection((sys.argv[1], 443), timeout=10)
s.sendall(b"\x16\x03\x01" + struct.pack("!H", len(hs)) + hs)
try:
    s.recv(100)
except OSError:
    pass
s.close()
"""
    since = len(list(box.egress_log()))
    box.exec(["python3", "-c", hello, LAN[0]], capture=True, timeout=60)  # denied: the gateway reads the hello, logs it, closes
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not [r for r in list(box.egress_log())[since:] if r.get("name") and "pwned" in r["name"]]:
        time.sleep(0.3)
    records: list[dict[str, Any]] = [r for r in list(box.egress_log())[since:] if r.get("name") and "pwned" in r["name"]]
    assert records, "the gateway logged no such name"
    text = vv("egress", "log", "itest").stdout
    assert "\x1b" not in text and "\x07" not in text
    assert "\\x1b]0;pwned\\x07" in text
