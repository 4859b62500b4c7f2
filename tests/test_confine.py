"""The share server's confinement, for real (the tests run as root): read-only protected paths
that cannot be moved aside, and a seccomp filter that keeps setuid bits, device nodes and fifos off
the host. Any command stands in for virtiofsd: the limits are the process's, whatever it runs."""

from __future__ import annotations

import json
import os
import pwd
import resource
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from vivarium.share import confine, userns

from . import users

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


# ------------------------------------------------------------ as a normal user, in a user namespace of its own

UNPRIVILEGED = "vivarium-ut"


@pytest.fixture(scope="module")
def normal_user() -> Iterator[tuple[pwd.struct_passwd, Path]]:
    """A user of the test's own (subordinate ids as useradd gives them) and a directory it can reach."""
    pw = users.make(UNPRIVILEGED)
    base = Path(tempfile.mkdtemp(prefix="vivarium-confine-", dir="/var/tmp"))
    base.chmod(0o755)
    try:
        yield pw, base
    finally:
        users.remove(UNPRIVILEGED)
        shutil.rmtree(base, ignore_errors=True)


def test_keep_id_maps_the_guests_user_to_the_host_user() -> None:
    assert userns.keep_id(1000, 1001, 100000, 65536) == ((0, 100000, 1000), (1000, 1001, 1), (1001, 101000, 64536))
    assert userns.keep_id(0, 1001, 100000, 10) == ((0, 1001, 1), (1, 100000, 10))
    assert userns.keep_id(5000, 1001, 100000, 10) == ((0, 100000, 10), (5000, 1001, 1))
    m = userns.keep_id(1000, 1001, 100000, 65536)
    assert userns.parse_map(userns.format_map(m)) == m


def test_subordinate_ranges_are_found_by_name_or_uid(tmp_path: Path) -> None:
    f = tmp_path / "subuid"
    f.write_text("other:200000:65536\n1001:300000:0\nbad line\n1001:400000:65536\n")
    assert userns.subordinate(f, "me", 1001) == (400000, 65536)
    assert userns.subordinate(f, "other", 5) == (200000, 65536)
    assert userns.subordinate(f, "nobody", 7) is None
    assert userns.subordinate(tmp_path / "absent", "me", 1001) is None


def test_a_normal_users_server_meets_the_same_limits(normal_user: tuple[pwd.struct_passwd, Path]) -> None:
    """The protected paths and the filter hold for a share server a normal user runs (issue 16, 1): in a
    user namespace, where the kernel locks the flags of inherited mounts, and the ids are the user's."""
    pw, base = normal_user
    d = project(base)
    for p in [d, *d.rglob("*")]:
        os.lchown(p, pw.pw_uid, pw.pw_gid)
    ids = userns.maps(pw.pw_name, pw.pw_uid, pw.pw_gid, 1000, 1000)
    assert not isinstance(ids, str), ids
    protect = [x for rel in (".git/config", ".git/hooks", "vivarium.toml", ".envrc", ".vscode", ".idea") for x in ("--protect", rel)]
    script = "".join(f'if sh -c "$1" 2>/dev/null; then echo "did: {what}"; fi; shift\n' for what in [*TRIES, *ALLOWED])
    ns = ["--uid-map", userns.format_map(ids[0]), "--gid-map", userns.format_map(ids[1])]
    as_guest_user = "setpriv --reuid 1000 --regid 1000 --clear-groups"
    argv = [sys.executable, "-m", "vivarium.share.confine", "--root", str(d), *protect, *ns, "--", "sh", "-c",
            f"tr -s ' ' < /proc/self/uid_map >&2; id -u >&2; grep -E 'CapEff|Groups' /proc/self/status >&2\n"
            f"cd {d}\n{as_guest_user} touch agent.txt\ntouch root.txt\n{script}",
            "sh", *TRIES.values(), *ALLOWED.values()]  # fmt: skip
    r = subprocess.run(argv, capture_output=True, text=True, cwd=d, timeout=60, check=False, user=pw.pw_uid, group=pw.pw_gid, extra_groups=[])
    did = {line.removeprefix("did: ") for line in r.stdout.splitlines()}
    assert did == set(ALLOWED), (did, r.stderr)
    # root of a namespace where the guest's user (1000) is the user, with no groups of the user's
    lines = [line.split() for line in r.stderr.splitlines()]
    every = f"{(1 << (int(Path('/proc/sys/kernel/cap_last_cap').read_text()) + 1)) - 1:016x}"
    assert ["1000", str(pw.pw_uid), "1"] in lines and ["0"] in lines and ["Groups:"] in lines and ["CapEff:", every] in lines, r.stderr
    subuid = userns.subordinate(Path("/etc/subuid"), pw.pw_name, pw.pw_uid)
    assert subuid is not None
    assert (d / "agent.txt").stat().st_uid == pw.pw_uid  # what the guest's user makes is the user's
    for p in d.rglob("*"):
        st = p.lstat()
        assert st.st_uid in (pw.pw_uid, subuid[0]) and not st.st_mode & 0o6000, p  # root's: a subordinate uid
    assert (d / "root.txt").stat().st_uid == subuid[0]
    ro = subprocess.run([*argv[:5], "--ro", *ns, "--", "sh", "-c", f"echo x > {d}/new.txt"], capture_output=True, text=True,
                        timeout=60, check=False, user=pw.pw_uid, group=pw.pw_gid, extra_groups=[])  # fmt: skip
    assert ro.returncode != 0 and "Read-only file system" in ro.stderr, ro.stderr


def _root_server_gets() -> int:
    """The open-file limit open_files leaves a server root starts with, from this process's hard limit: NOFILE (at
    most fs.nr_open) unless the hard one is already more, or the hard one where root may not raise it (without
    CAP_SYS_RESOURCE: a container's root, as on this project's build machines)."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    try_raise = f"import resource; resource.setrlimit(resource.RLIMIT_NOFILE, ({hard + 1}, {hard + 1}))"
    if subprocess.run([sys.executable, "-c", try_raise], capture_output=True, timeout=60, check=False).returncode != 0:
        return hard
    return max(hard, min(confine.NOFILE, int(Path("/proc/sys/fs/nr_open").read_text())))


def test_the_server_may_hold_a_descriptor_per_file_the_guest_knows(normal_user: tuple[pwd.struct_passwd, Path]) -> None:
    """Started from a login session (1024 open files), the server gets root's 1,000,000 (at most fs.nr_open) when
    root starts it, and the whole hard limit when a normal user does; both in their user namespace, where
    neither could raise it itself. On a9b15c2 both kept 1024 (the C daemon then failed the guest's 1007th file)."""
    pw, base = normal_user
    ids = userns.maps(pw.pw_name, pw.pw_uid, pw.pw_gid, 1000, 1000)
    assert not isinstance(ids, str), ids
    ns = ["--uid-map", userns.format_map(ids[0]), "--gid-map", userns.format_map(ids[1])]
    argv = [sys.executable, "-m", "vivarium.share.confine", "--root", str(base), *ns, "--", "sh", "-c", "ulimit -Sn; ulimit -Hn"]
    as_root: dict[str, Any] = {}
    as_user: dict[str, Any] = {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}
    for who, ids_of, expect in (("root", as_root, _root_server_gets()), ("user", as_user, resource.getrlimit(resource.RLIMIT_NOFILE)[1])):
        r = subprocess.run(argv, capture_output=True, text=True, cwd=base, timeout=60, check=False, preexec_fn=users.login_limits, **ids_of)
        assert r.returncode == 0, (who, r.stderr)
        assert r.stdout.split() == [str(expect)] * 2, (who, r.stdout, r.stderr)


def test_doctor_says_how_many_files_a_share_server_may_keep_open() -> None:
    """`vivarium doctor` reports what open_files gives a server started from its own limits: short of 65,536 (a hard
    limit of 4096 here), a warning with the fix; this machine's own limits as they are."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]

    def doctor(limit: int) -> dict[str, Any]:
        def lower() -> None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(1024, limit), limit))

        r = subprocess.run([sys.executable, "-m", "vivarium", "doctor", "--json"], capture_output=True, text=True, timeout=120,
                           check=False, preexec_fn=lower)  # fmt: skip
        found: list[dict[str, Any]] = [c for c in json.loads(r.stdout) if c["name"] == "share open files"]
        assert len(found) == 1, r.stdout
        return found[0]

    low = doctor(4096)
    assert not low["ok"] and "4,096 files" in low["detail"] and "Too many open files" in low["detail"] and "ulimit -Hn" in low["fix"], low
    mine = doctor(hard)
    most = _root_server_gets()
    assert f"{most:,} files" in mine["detail"] and mine["ok"] == (most >= 65536), mine
