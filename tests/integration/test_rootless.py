"""A normal user's sandbox (issue 16, 1): `vivarium up` run by a user the test creates (subordinate ids as
useradd gives them, no sudo, no group kvm) builds nothing it need not, boots, shares a project in that user's
0700 home read-write and a second directory read-only, and fences the network; and nothing of it on the host
runs as root. Attacks from root in the guest on the shares: setuid, chown, the protected paths, the ro share.

The image is the session's (hard links into the user's cache: the recipe is the same, `vm.user = "agent"`);
the user's template and sandbox are its own. On a089cd3 (and 0e6701b) such a user's `up` with a share
stopped at once: "virtiofsd needs root"."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Container, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from vivarium.share import userns

from .. import users
from ..fakenet import FakeNet
from .conftest import fenced, small_vm

pytestmark = pytest.mark.integration
Completed = subprocess.CompletedProcess[str]

USER = "vivarium-it"
NAME = "rootless"
REPO = Path(__file__).resolve().parents[2]
PYTHON = os.path.realpath(sys.executable)  # the system's interpreter, not the checkout's venv (its parents may be closed)


@dataclass(frozen=True)
class User:
    pw: pwd.struct_passwd
    base: Path  # everything of the test's: the user's home, a copy of the code
    env: dict[str, str]

    @property
    def home(self) -> Path:
        return Path(self.pw.pw_dir)

    def run(
        self, *args: str, cwd: Path | None = None, check: bool = True, timeout: float = 900, sudo: bool = False
    ) -> subprocess.CompletedProcess[str]:
        """The real CLI, as this user (`sudo`: as root, in the environment sudo gives it when this user types it)."""
        if sudo:
            env = {**self.env, "HOME": "/root", "USER": "root", "LOGNAME": "root", "SUDO_USER": USER, "SUDO_UID": str(self.pw.pw_uid),
                   "SUDO_GID": str(self.pw.pw_gid), "SUDO_COMMAND": f"{PYTHON} -m vivarium {' '.join(args)}"}  # fmt: skip
            ids: dict[str, Any] = {}
        else:
            env, ids = self.env, {"user": self.pw.pw_uid, "group": self.pw.pw_gid, "extra_groups": []}
        proc = subprocess.run([PYTHON, "-m", "vivarium", *args], capture_output=True, text=True, cwd=cwd or self.home, env=env,
                              stdin=subprocess.DEVNULL, timeout=timeout, check=False, preexec_fn=users.login_limits, **ids)  # fmt: skip
        if check and proc.returncode != 0:
            raise AssertionError(f"vivarium {' '.join(args)} (as {USER}) exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
        return proc

    def exec(self, script: str) -> str:
        return self.run("exec", NAME, "--", "sh", "-c", script).stdout


class _Ids(Container[int]):
    """The user's uid and its subordinate ones (its share servers run as the first of those)."""

    def __init__(self, pw: pwd.struct_passwd) -> None:
        sub = userns.subordinate(Path("/etc/subuid"), pw.pw_name, pw.pw_uid)
        assert sub is not None
        self.uid, self.sub = pw.pw_uid, range(sub[0], sub[0] + sub[1])

    def __contains__(self, uid: object) -> bool:
        return uid == self.uid or uid in self.sub


@pytest.fixture(scope="module")
def user(session_env: dict[str, str], built: object) -> Iterator[User]:
    base = Path(tempfile.mkdtemp(prefix="vivarium-rootless-", dir="/var/tmp"))
    base.chmod(0o755)
    pw = users.make(USER, base / "home")
    tun = os.stat("/dev/net/tun").st_mode & 0o777
    os.chmod("/dev/net/tun", 0o666)  # as udev makes it on a standard Debian (this machine has no udev: 0600)
    try:
        # The code and its libraries where the user can read them, whatever the checkout's parents allow.
        users.link_tree(REPO / "vivarium", base / "py" / "src" / "vivarium")
        users.link_tree(Path(sysconfig.get_paths()["purelib"]), base / "py" / "site")
        viv = base / "home" / "viv"
        users.give_images(Path(os.environ["XDG_CACHE_HOME"]) / "vivarium", viv / "cache", pw)
        os.lchown(viv, pw.pw_uid, pw.pw_gid)
        env = {"HOME": pw.pw_dir, "USER": USER, "LOGNAME": USER, "PATH": "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin",
               "VIVARIUM_HOME": str(viv), "PYTHONPATH": f"{base / 'py' / 'src'}:{base / 'py' / 'site'}", "LANG": "C.UTF-8"}  # fmt: skip
        if "VIVARIUM_ACCEL" in os.environ:
            env["VIVARIUM_ACCEL"] = os.environ["VIVARIUM_ACCEL"]
        yield User(pw, base, env)
    finally:
        u = User(pw, base, {})
        ids = _Ids(pw)
        for pid in users.processes(ids):  # only ever this test's: the user (and its subordinate ids) is the test's own
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 10
        while users.processes(ids) and time.monotonic() < deadline:
            time.sleep(0.1)
        users.remove(USER)
        shutil.rmtree(u.base, ignore_errors=True)
        os.chmod("/dev/net/tun", tun)


@pytest.fixture(scope="module")
def sandbox(user: User, net: FakeNet) -> Iterator[tuple[User, Path, Path]]:
    assert net.dns is not None
    project, docs = user.home / "project", user.home / "docs"
    for d in (project, docs, project / ".git"):
        d.mkdir()
    (project / ".git" / "config").write_text("[core]\n\tbare = false\n")
    (docs / "readme.txt").write_text("from the host\n")
    shares = '[[share]]\nhost = "."\n[[share]]\nhost = "../docs"\nguest = "/mnt/docs"\nmode = "ro"\n'
    (project / "vivarium.toml").write_text(small_vm(user="agent") + shares + fenced(net))
    for p in (user.home, project, docs, *project.rglob("*"), *docs.rglob("*")):
        os.lchown(p, user.pw.pw_uid, user.pw.pw_gid)
    user.home.chmod(0o700)  # what `mktemp -d` and most homes give: only the user gets in
    user.run("config", "trust", cwd=project)
    try:
        user.run("up", NAME, cwd=project)
        yield user, project.resolve(), docs.resolve()
    finally:
        user.run("destroy", NAME, check=False, timeout=120)


def test_nothing_of_the_sandbox_runs_as_root(sandbox: tuple[User, Path, Path]) -> None:
    user, project, _ = sandbox
    assert_nothing_runs_as_root(user, project)


def assert_nothing_runs_as_root(user: User, project: Path) -> None:
    ids = _Ids(user.pw)
    ours = users.processes(ids)
    for what, uid in (("qemu-system", user.pw.pw_uid), ("virtiofsd", ids.sub[0]), ("vivarium.net --dir", user.pw.pw_uid),
                      ("--serve", user.pw.pw_uid), ("vivarium.net netns", user.pw.pw_uid), ("vivarium.vm.console", user.pw.pw_uid)):  # fmt: skip
        found = [pid for pid, (_, cmd) in ours.items() if what in cmd]
        assert found, f"no {what} among the processes of {USER} and its subordinate ids: {sorted(c for _, c in ours.values())}"
        for pid in found:  # the share servers: root of the user's namespace, which is the user's first subordinate uid
            assert ours[pid][0] == [str(uid)] * 4, (what, ours[pid])
    # ... and nothing of the sandbox runs as anyone else, root least of all
    others = {pid: cmd for pid, (_, cmd) in users.processes(range(1 << 32)).items() if pid not in ours}
    assert [cmd for cmd in others.values() if str(user.base) in cmd or str(project) in cmd] == []


def test_the_agent_owns_its_project_and_its_files_are_the_users(sandbox: tuple[User, Path, Path]) -> None:
    user, project, _ = sandbox
    out = user.exec(f"id -u; stat -c %u {project}; echo hi > {project}/agent.txt && cat {project}/agent.txt; cat /mnt/docs/readme.txt")
    assert out.split() == ["1000", "1000", "hi", "from", "the", "host"]
    st = (project / "agent.txt").stat()
    assert (st.st_uid, st.st_gid) == (user.pw.pw_uid, user.pw.pw_gid)


def test_root_in_the_guest_gets_no_more_than_the_user(sandbox: tuple[User, Path, Path]) -> None:
    user, project, docs = sandbox
    (project / "victim.txt").write_text("mine\n")
    os.chown(project / "victim.txt", user.pw.pw_uid, user.pw.pw_gid)
    config = (project / ".git" / "config").read_bytes()
    out = user.exec(
        f"cd {project} && sudo sh -c '"
        "echo r > root.txt; cp /bin/sh suid-sh; chmod 4755 suid-sh || echo refused-suid; chmod u+s victim.txt || echo refused-victim;"
        "chown 0:0 agent.txt || echo refused-chown; echo x >> .git/config || echo refused-git; echo y > /mnt/docs/new || echo refused-ro'"
    )
    assert {"refused-suid", "refused-victim", "refused-git", "refused-ro"} <= set(out.split()), out
    victim = (project / "victim.txt").stat()
    assert (victim.st_uid, victim.st_mode & 0o6000) == (user.pw.pw_uid, 0)
    for name in ("root.txt", "suid-sh", "agent.txt"):
        st = (project / name).stat()
        assert st.st_uid != 0 and st.st_gid != 0, (name, st.st_uid, st.st_gid)
        assert st.st_mode & 0o6000 == 0, (name, oct(st.st_mode))
    assert (project / ".git" / "config").read_bytes() == config
    assert not (docs / "new").exists()


MANY = 3000  # files the guest creates in its share, and so inodes of it the share server holds open


def test_the_share_serves_more_files_than_a_login_sessions_limit(sandbox: tuple[User, Path, Path]) -> None:
    """Started from a login session (1024 open files), the share still serves a tree of thousands of files: its
    server holds a descriptor for each file the guest has looked up. On a9b15c2 the guest's 1007th new file failed
    with 'Too many open files' (the C daemon stayed at the session's 1024; under sudo too)."""
    user, project, _ = sandbox
    out = user.exec(f"mkdir {project}/many && cd {project}/many && seq -f f%g {MANY} | xargs touch && ls | wc -l && cat * | wc -c")
    assert out.split() == [str(MANY), "0"], out[-500:]
    assert len(os.listdir(project / "many")) == MANY


def test_the_fence_holds(sandbox: tuple[User, Path, Path]) -> None:
    user, _, _ = sandbox
    out = user.exec(
        "curl -s -m 20 -o /dev/null -w '%{http_code}\\n' http://lan.test/; curl -s -m 20 -o /dev/null -w '%{http_code}\\n' http://public.test/"
    )
    assert out.split() == ["403", "200"]


def test_under_sudo_it_is_the_user_who_ran_sudo(sandbox: tuple[User, Path, Path]) -> None:
    """`sudo vivarium` (issue 16, 2) is vivarium run by the user who typed sudo: the same sandboxes (root's own
    state would have none), and nothing of a sandbox it starts runs as root. On 0e6701b `sudo vivarium up` ran
    QEMU, the gateway and the share servers as root."""
    user, project, _ = sandbox
    listed = user.run("ls", "--json", sudo=True).stdout
    assert NAME in listed, listed
    (project / "before-sudo.txt").write_text("the user's\n")  # the share, served again, still shows the user's files
    os.chown(project / "before-sudo.txt", user.pw.pw_uid, user.pw.pw_gid)
    user.run("stop", NAME, sudo=True)
    user.run("up", NAME, cwd=project, sudo=True)
    assert user.exec(f"cat {project}/before-sudo.txt").strip() == "the user's"
    # its share server, started by root for the user, serves more files than the session's open-file limit too
    out = user.exec(f"mkdir {project}/many-sudo && cd {project}/many-sudo && seq -f f%g {MANY} | xargs touch && ls | wc -l")
    assert out.split() == [str(MANY)], out[-500:]
    assert_nothing_runs_as_root(user, project)
    assert user.run("exec", NAME, "--", "id", "-u", sudo=True).stdout.strip() == "1000"
