"""The share server's confinement, for real (the tests run as root): read-only protected paths
that cannot be moved aside, and a seccomp filter that keeps setuid bits, device nodes and fifos off
the host. Any command stands in for virtiofsd: the limits are the process's, whatever it runs."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from vivarium.share import confine

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mount namespaces need root (the test suite runs as root)")

TRIES = {
    "write a protected file": "echo x >> vivarium.toml",
    "write under a protected directory": "echo x > .git/hooks/post-checkout",
    "append to .git/config": "echo x >> .git/config",
    "move .git aside": "mv .git .git-away",
    "remove a protected directory": "rm -rf .vscode",
    "hard-link a protected file": "ln .envrc hard",
    "chmod u+s": "touch s && chmod u+s s",
    "chmod g+s": "touch g && chmod 2755 g",
    "create with setuid": "python3 -c \"import os; os.open('c', os.O_CREAT | os.O_WRONLY, 0o4755)\"",
    "mknod a block device": "mknod blk b 8 0",
    "mkfifo": "mkfifo fifo",
}
ALLOWED = {
    "write an ordinary file": "echo x > ordinary.txt",
    "write inside .git": "echo x > .git/index",
    "chmod 755": "touch e && chmod 755 e",
    "create executable": "python3 -c \"import os; os.open('x', os.O_CREAT | os.O_WRONLY, 0o755)\"",
    "a sticky directory": "mkdir t && chmod 1777 t",
}


def project(tmp_path: Path) -> Path:
    d = tmp_path / "p"
    for rel, text in (("vivarium.toml", "x"), (".git/config", "[core]"), (".git/hooks/pre-commit.sample", ""), (".envrc", "e"),
                      (".vscode/settings.json", "{}")):  # fmt: skip
        (d / rel).parent.mkdir(parents=True, exist_ok=True)
        (d / rel).write_text(text)
    return d


def confined(d: Path, script: str, *limits: str, args: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "vivarium.share.confine", "--root", str(d), *limits, "--", "sh", "-c", script, "sh", *args]
    return subprocess.run(argv, capture_output=True, text=True, cwd=d, timeout=60, check=False)


def test_protected_paths_and_the_filter(tmp_path: Path) -> None:
    d = project(tmp_path)
    protect = [x for rel in (".git/config", ".git/hooks", "vivarium.toml", ".envrc", ".vscode", ".idea") for x in ("--protect", rel)]
    script = "".join(f'if sh -c "$1" 2>/dev/null; then echo "did: {what}"; fi; shift\n' for what in [*TRIES, *ALLOWED])
    r = confined(d, f"cd {d}\n{script}", *protect, args=(*TRIES.values(), *ALLOWED.values()))
    did = {line.removeprefix("did: ") for line in r.stdout.splitlines()}
    assert did == set(ALLOWED), (did, r.stderr)
    assert ".idea: absent" in r.stderr and ".git/config: read-only" in r.stderr
    assert (d / ".git" / "config").read_text() == "[core]" and not (d / ".git-away").exists() and (d / ".vscode").is_dir()
    for p in d.rglob("*"):
        st = p.lstat()
        assert not st.st_mode & 0o6000 and stat.S_IFMT(st.st_mode) in (stat.S_IFREG, stat.S_IFDIR), p
    # nothing of it shows outside: the mounts were the confined process's own
    assert str(d) not in Path("/proc/self/mountinfo").read_text()


def test_read_only_root(tmp_path: Path) -> None:
    d = project(tmp_path)
    r = confined(d, f"echo x > {d}/new.txt", "--ro")
    assert r.returncode != 0 and "Read-only file system" in r.stderr
    assert not (d / "new.txt").exists()


def test_a_symlinked_protected_path_is_not_followed(tmp_path: Path) -> None:
    d = project(tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    (d / ".idea").symlink_to(outside)
    r = confined(d, "true", "--protect", ".idea/x", "--protect", ".idea")
    assert r.returncode == 0 and ".idea: a symlink, left as it is" in r.stderr and ".idea/x: a symlink" in r.stderr


def test_the_filter_is_one_program_per_architecture() -> None:
    for arch in confine.ARCHES:
        prog = confine.seccomp_program(arch)
        assert len(prog) % 8 == 0 and len(prog) // 8 < 256  # jumps are 8-bit: every block stays short
