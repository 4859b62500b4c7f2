"""A sandbox's cgroup, on this host's real hierarchies: its limits hold against a fork storm, the launching
process goes back where it was, the host's layout is read as the kernel mounts it."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from vivarium import cgroup
from vivarium.cgroup import Layout, Limits

STORM = textwrap.dedent("""
    import os, sys, time
    made = failed = 0
    for _ in range(int(sys.argv[1])):
        try:
            if os.fork() == 0:
                time.sleep(30)
                os._exit(0)
            made += 1
        except BlockingIOError:
            failed += 1
    print(made, failed, flush=True)
    time.sleep(30)
""")


@pytest.fixture
def group() -> Iterator[tuple[cgroup.Group, str]]:
    """A sandbox's cgroup as a launch makes it here (a systemd scope where systemd runs the host), and where
    this process was before."""
    if why := cgroup.why_none():
        pytest.skip(f"no cgroup can be made here: {why}")
    home = Path("/proc/self/cgroup").read_text()
    g = cgroup.make(f"test-{os.getpid()}", Limits(pids=8, memory=256 << 20, io_weight=100))
    yield g, home
    for pid in g.pids():
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, 9)
    assert cgroup.remove(g, wait=10.0)


def test_a_fork_storm_stops_at_the_sandboxs_own_limit(group: tuple[cgroup.Group, str], tmp_path: Path) -> None:
    made_in, home = group
    with made_in.joined():
        storm = subprocess.Popen([sys.executable, "-c", STORM, "50"], stdout=subprocess.PIPE, text=True)
    now = Path("/proc/self/cgroup").read_text()
    if made_in.scope and os.geteuid() != 0:  # a normal user's stays in its scope's own leaf
        assert now.strip().endswith(f"/{made_in.scope}/{cgroup.SCOPE_LAUNCHER}"), now
    else:
        assert now == home  # the launcher is back where it was (root's out of a systemd scope too); its child is not
    try:
        assert storm.stdout is not None
        made, failed = map(int, storm.stdout.readline().split())
        assert failed > 0 and made < 8, (made, failed)  # the kernel said no at the limit: EAGAIN
        used = made_in.usage()
        assert used["pids_max"] == 8 and 1 < int(used["pids"]) <= 8
        assert storm.pid in made_in.pids() and used["memory_max"] == 256 << 20
        cgroup.remember(tmp_path, made_in)
        found = cgroup.of("test", tmp_path)
        assert found is not None and found.dirs == made_in.dirs and found.path == made_in.path
    finally:
        storm.kill()
        storm.wait()


def test_the_hosts_layout_is_read_from_its_mounts(tmp_path: Path) -> None:
    def layout(mounts: str, controllers: str = "") -> Layout:
        (tmp_path / "mounts").write_text(textwrap.dedent(mounts))
        (tmp_path / "v2").mkdir(exist_ok=True)
        (tmp_path / "v2" / "cgroup.controllers").write_text(controllers)
        return Layout.read(tmp_path / "mounts")

    unified = f"cgroup2 {tmp_path}/v2 cgroup2 rw,nosuid,nodev,noexec,relatime,nsdelegate 0 0\n"
    v2 = layout(unified, "cpuset cpu io memory hugetlb pids rdma misc\n")
    assert v2.version == 2 and v2.dirs("box-1") == (tmp_path / "v2" / "vivarium" / "box-1",)
    hybrid = layout(
        """\
        tmpfs /sys/fs/cgroup tmpfs rw,relatime,mode=755 0 0
        cgroup /sys/fs/cgroup/memory cgroup rw,relatime,memory 0 0
        cgroup /sys/fs/cgroup/pids cgroup rw,relatime,pids 0 0
        cgroup /sys/fs/cgroup/blkio cgroup rw,relatime,blkio 0 0
        cgroup /sys/fs/cgroup/cpu,cpuacct cgroup rw,relatime,cpu,cpuacct 0 0
    """
        + unified,
        "hugetlb\n",
    )  # the v2 mount of a hybrid host offers neither controller
    assert hybrid.version == 1
    assert hybrid.dirs("b") == tuple(Path(f"/sys/fs/cgroup/{c}/vivarium/b") for c in ("pids", "memory", "blkio", "cpu,cpuacct"))
    with pytest.raises(cgroup.Unavailable, match="pids and memory"):
        _ = layout("cgroup /sys/fs/cgroup/pids cgroup rw,pids 0 0\n" + unified, "").version


def test_where_a_start_made_the_cgroup_is_read_back_and_checked(tmp_path: Path) -> None:
    """The instance's record names the cgroup (a user scope's path is systemd's to choose) or why there is none;
    a record that climbs out of the hierarchy is no cgroup."""
    v2 = tmp_path / "v2"
    scope = "/user.slice/user-1000.slice/user@1000.service/app.slice/vivarium-box-0123abcd-00ff00ff.scope"
    (v2 / scope.lstrip("/") / "sandbox").mkdir(parents=True)
    (v2 / "cgroup.controllers").write_text("cpu io memory pids\n")
    (tmp_path / "mounts").write_text(f"cgroup2 {v2} cgroup2 rw,nosuid,nodev,noexec,relatime 0 0\n")
    layout = Layout.read(tmp_path / "mounts")
    instance = tmp_path / "instance"
    instance.mkdir()
    cgroup.remember(instance, layout.group(f"{scope}/sandbox"))
    group = cgroup.of("box", instance, layout)
    assert group is not None and group.path == f"{scope}/sandbox" and group.scope == scope.rsplit("/", 1)[1]
    assert group.dirs == (v2 / scope.lstrip("/") / "sandbox",)
    for bad in (f"{scope}/../../../../../etc", "relative/sandbox", f"{scope}//sandbox", f"{scope}/missing"):
        (instance / cgroup.RECORD).write_text(bad + "\n")
        assert cgroup.of("box", instance, layout) is None, bad
    cgroup.remember(instance, None, "the user's systemd would not make a scope: Access denied")
    assert cgroup.of("box", instance, layout) is None
    assert cgroup.why_none(instance) == "the user's systemd would not make a scope: Access denied"


def test_without_a_user_manager_no_scope_is_asked_for(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A normal user with no systemd user manager running: one line saying so, the socket named (its
    runtime directory's, which is theirs)."""
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    monkeypatch.setattr(os, "getuid", lambda: tmp_path.stat().st_uid)  # as a normal user would own it
    monkeypatch.setattr(os, "geteuid", lambda: 4242)
    assert cgroup.manager_socket() == tmp_path / "systemd" / "private"
    with pytest.raises(cgroup.Unavailable, match=f"no systemd user manager to make a scope \\({tmp_path}/systemd/private is not there\\)"):
        cgroup._ask_for_scope("vivarium-box-0123abcd-00ff00ff.scope")
