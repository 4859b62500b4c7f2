"""What a hostile guest can make the host keep: attacks from root in the guest (its firewall flushed) that
try to fill the host's disk through the files a sandbox writes there (issue 16: bounded host disk use), or to
starve the host and the other sandboxes on it (issue 16: one cgroup per sandbox).

The sandbox here has small caps (logs.*, limits.pids), so that an attack bounded in time still goes well past them."""

from __future__ import annotations

import io
import itertools
import json
import os
import tarfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from vivarium import Sandbox, cgroup, logfile
from vivarium.net import control, netns

from ..fakenet import PUBLIC, FakeNet
from ..test_cgroup import STORM as STORM_FORKS
from ..users import processes
from .conftest import fenced, small_vm, vv, write_config

pytestmark = pytest.mark.integration

CAP = 256 << 10  # each log's size before it rotates; one rotated file kept


@pytest.fixture(scope="module")
def capped(project: Path, built: object, net: FakeNet) -> Iterator[Sandbox]:
    assert net.dns is not None
    d = project.parent / "limits-project"
    d.mkdir(exist_ok=True)
    write_config(
        d,
        "share = []\n"
        + small_vm()
        + fenced(net)
        + """[logs]
console_size = "256K"
console_keep = 1
audit_size = "256K"
audit_keep = 1
[limits]
pids = 256
""",
    )
    vv("up", "limits", cwd=d)
    box = Sandbox("limits")
    yield box
    box.destroy()


@pytest.fixture(scope="module")
def neighbour(project: Path, built: object) -> Iterator[Sandbox]:
    """Another sandbox on the same host, of its own: quiet unless a test asks something of it (the session's
    shared one has run other modules' containers by then, and a guest busy on its own says nothing of a storm)."""
    d = project.parent / "neighbour-project"
    write_config(d, "share = []\n" + small_vm())
    vv("up", "neighbour", cwd=d)
    other = Sandbox("neighbour")
    yield other
    other.destroy()


def on_host(path: Path) -> int:
    """Bytes the log at `path` takes on the host, all its files."""
    return sum(p.stat().st_size for p in logfile.all_of(path))


@pytest.mark.same_everywhere  # the cap is the console's keeper's (vivarium's), whatever QEMU writes to it
def test_a_guest_printing_to_its_console_for_ever_stays_within_the_cap(capped: Sandbox) -> None:
    box = capped
    line = "the console, again and again " * 3
    r = box.exec(["sudo", "sh", "-c", f'nft flush ruleset; timeout 60 sh -c \'yes "{line}" > /dev/ttyS0\'; echo done'],
                 capture=True, timeout=180)  # fmt: skip
    assert "done" in r.stdout, r.stderr
    serial = box.dir.serial
    files = logfile.all_of(serial)
    assert [p.name for p in files] == ["serial.log.1", "serial.log"], files  # it wrote more than the cap: rotated
    assert on_host(serial) <= 2 * CAP
    assert line in logfile.read(serial).decode(errors="replace")
    # `vivarium logs` reads across the rotation, and the sandbox works on
    logs = vv("logs", "limits").stdout
    assert line in logs and len(logs) > CAP
    assert box.exec(["true"]).returncode == 0


FLOOD = r"""
import socket, struct, sys, time
count, limit = int(sys.argv[1]), float(sys.argv[2])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setblocking(False)
sent, answered, started = 0, 0, time.monotonic()
while sent < count and time.monotonic() - started < limit:
    name = b"".join(bytes([len(p)]) + p for p in (b"n%d" % sent, b"flood", b"test")) + b"\0"
    try:
        s.sendto(struct.pack("!HHHHHH", sent & 0xFFFF, 0x0100, 1, 0, 0, 0) + name + b"\0\1\0\1", ("192.0.2.53", 53))
        sent += 1
    except BlockingIOError:
        time.sleep(0.001)
    try:
        while s.recv(4096):
            answered += 1
    except BlockingIOError:
        pass
print(sent, answered)
"""


@pytest.mark.same_everywhere
def test_a_guest_asking_for_unique_names_as_fast_as_it_can_stays_within_the_cap(capped: Sandbox) -> None:
    box = capped
    r = box.exec(["sudo", "sh", "-c", 'nft flush ruleset; exec python3 -c "$0" 200000 90', FLOOD], capture=True, timeout=300)
    assert r.returncode == 0, r.stderr
    sent, answered = map(int, r.stdout.split())
    audit = box.dir.path / "egress.log"
    assert [p.name for p in logfile.all_of(audit)] == ["egress.log.1", "egress.log"]  # more than the cap: rotated
    assert on_host(audit) <= 2 * CAP, on_host(audit)
    assert answered > 1000, (sent, answered)
    # the newest records are there, whole, read across the rotation; the fence still answers
    names = [json.loads(ln)["name"] for ln in logfile.lines(audit) if b'"kind":"dns"' in ln]
    assert names and all(n.endswith(".flood.test") for n in names[-100:])
    assert box.exec(["getent", "hosts", "public.test"]).returncode == 0


def proc_status(pid: int | None) -> dict[str, str]:
    assert pid is not None
    return {k: v.strip() for k, v in (ln.split(":\t", 1) for ln in Path(f"/proc/{pid}/status").read_text().splitlines() if ":\t" in ln)}


def test_qemu_started_by_root_holds_no_privilege(capped: Sandbox, neighbour: Sandbox) -> None:
    """Run by root itself (no sudo: CI, a container), QEMU, which emulates the hostile guest's code and parses its
    devices, still drops root before the guest runs (issue 16, 2): all four of its uids and gids an id of the
    sandbox's own, no other group, no capability; another sandbox's QEMU another uid (no signals across).
    On bd70cf8 QEMU ran as root: Uid and Gid 0 0 0 0."""
    assert os.geteuid() == 0 and "SUDO_UID" not in os.environ  # the suite runs as root
    status = proc_status(capped.pid())
    uids, gids = set(status["Uid"].split()), set(status["Gid"].split())
    assert len(uids) == 1 and len(gids) == 1 and "0" not in uids | gids, (status["Uid"], status["Gid"])
    assert status["Groups"] in ("", *gids) and int(status["CapEff"], 16) == 0 and int(status["CapPrm"], 16) == 0, status
    assert set(proc_status(neighbour.pid())["Uid"].split()) != uids  # each sandbox its own
    assert capped.exec(["true"]).returncode == 0


def test_the_gateway_started_by_root_serves_as_no_one(capped: Sandbox) -> None:
    """The gateway's serving process parses every byte the guest sends out: run by root itself, it takes what it
    needs from the host (the namespace's listeners, the CA, the policy) as root, then drops to a uid of the
    sandbox's own, not QEMU's, with no group, no capability and no way back, before the guest's first byte; its
    audit records and live policy changes go through its supervisor. On e4b23c5 it served as root: Uid 0 0 0 0."""
    served = proc_status(control.child_pid(capped.dir.path))
    uids, gids = set(served["Uid"].split()), set(served["Gid"].split())
    assert len(uids) == 1 and uids == gids and "0" not in uids, (served["Uid"], served["Gid"])
    assert served["Groups"] == "" and int(served["CapEff"], 16) == 0 and int(served["CapPrm"], 16) == 0, served
    assert served["NoNewPrivs"] == "1" and uids != set(proc_status(capped.pid())["Uid"].split())  # nor QEMU's
    # it still relays, and what it relays is logged; a rule changed live still reaches it (named in the Host header:
    # no DNS, whose fake upstream may still be answering the flood of the test before)
    curl = ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--resolve", f"public.test:80:{PUBLIC}", "http://public.test/"]
    assert capped.exec(curl, capture=True, timeout=60).stdout == "200"
    assert any(r.get("name") == "public.test" and r.get("decision") == "allow" for r in control.records(capped.dir.path))
    vv("egress", "deny", "limits", "public.test")
    time.sleep(0.5)  # the supervisor hands it on
    try:
        assert capped.exec(curl, capture=True, timeout=60).stdout == "403"
    finally:
        vv("egress", "allow", "limits", "public.test")
        time.sleep(0.5)
    assert capped.exec(curl, capture=True, timeout=60).stdout == "200"


def test_the_console_keeper_started_by_root_copies_as_no_one(capped: Sandbox) -> None:
    """The console's keeper copies what the guest prints, every byte the guest's choice: run by root itself, it
    drops to a uid of the sandbox's own (neither QEMU's nor the gateway's), no group, no capability, no way
    back, before the first byte, and writes the log in a directory only that uid may write. On af3af03 it
    copied as root: Uid 0 0 0 0."""
    keepers = [pid for pid, (_, cmd) in processes(range(1 << 32)).items() if "vivarium.vm.console" in cmd and str(capped.dir.serial) in cmd]
    assert len(keepers) == 1, keepers
    status = proc_status(keepers[0])
    uids, gids = set(status["Uid"].split()), set(status["Gid"].split())
    assert len(uids) == 1 and len(gids) == 1 and "0" not in uids | gids, (status["Uid"], status["Gid"])
    assert status["Groups"] in ("", *gids) and int(status["CapEff"], 16) == 0 and int(status["CapPrm"], 16) == 0, status
    assert status["NoNewPrivs"] == "1"
    others = {proc_status(capped.pid())["Uid"].split()[0], proc_status(control.child_pid(capped.dir.path))["Uid"].split()[0]}
    assert not uids & others, (uids, others)  # QEMU's and the gateway's are others
    log = capped.dir.serial
    assert log.parent.stat().st_uid == int(next(iter(uids))) and log.parent.stat().st_mode & 0o777 == 0o700
    assert capped.exec(["sudo", "sh", "-c", "echo keeper-was-here > /dev/ttyS0"]).returncode == 0
    deadline = time.monotonic() + 30
    while b"keeper-was-here" not in logfile.read(log) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert b"keeper-was-here" in logfile.read(log) and log.stat().st_uid == int(next(iter(uids)))


def test_the_namespace_holder_started_by_root_holds_as_no_one(capped: Sandbox) -> None:
    """The holder of the fence's namespace made its devices, rules and listeners as root: once QEMU runs, it
    holds and hands them out as a uid of the sandbox's own (no other process's), no group, no capability, no way
    back; the fence still works, and a gateway started again still gets its listeners from it (test_fence).
    On 20d4cda it held as root: Uid 0 0 0 0."""
    holder = netns.pid(capped.dir.path)
    assert holder is not None
    status = proc_status(holder)
    uids, gids = set(status["Uid"].split()), set(status["Gid"].split())
    assert len(uids) == 1 and len(gids) == 1 and "0" not in uids | gids, (status["Uid"], status["Gid"])
    assert status["Groups"] in ("", *gids) and int(status["CapEff"], 16) == 0 and status["NoNewPrivs"] == "1", status
    control_pid = control.child_pid(capped.dir.path)
    others = {proc_status(p)["Uid"].split()[0] for p in (capped.pid(), control_pid)}
    assert not uids & others, (uids, others)
    fds = netns.take(capped.dir.path, "listen")  # it hands them out still (to root)
    for fd in fds:
        os.close(fd)
    assert len(fds) == 3
    curl = ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "http://public.test/"]
    assert capped.exec(curl, capture=True, timeout=60).stdout == "200"


STORM = r"""
import asyncio, json, resource, sys
N = int(sys.argv[2])
resource.setrlimit(resource.RLIMIT_NOFILE, (65536, 65536))

async def main():
    held, failed = [], {}
    async def one():
        try:
            _, w = await asyncio.wait_for(asyncio.open_connection(sys.argv[1], 9999), 180)
            held.append(w)
        except (OSError, asyncio.TimeoutError) as e:
            failed[type(e).__name__] = failed.get(type(e).__name__, 0) + 1
    await asyncio.gather(*(one() for _ in range(N)))
    print(json.dumps({"held": len(held), "failed": failed}), flush=True)
    await asyncio.sleep(5)
    for w in held:
        w.close()

asyncio.run(main())
"""


@pytest.mark.same_everywhere
def test_a_storm_of_connections_stays_within_the_sandboxs_own_limits(capped: Sandbox, neighbour: Sandbox) -> None:
    """5,000 connections opened as fast as root in the guest can: the sandbox's host processes stay in its cgroup,
    under its pids.max, another sandbox keeps answering within 2 s throughout, and this one works afterwards."""
    group = cgroup.of(capped.name, capped.dir.path)
    assert group is not None, capped.status().cgroup
    # what runs for it (not the CLI's own ssh into it, which a command starts and which is the user's)
    named = {pid: cmd for pid, (_, cmd) in processes(range(1 << 32)).items() if str(capped.dir.path) in cmd and not cmd.startswith("ssh")}
    mine = set(named)
    assert {capped.pid(), control.pid(capped.dir.path), control.child_pid(capped.dir.path)} <= mine  # QEMU, the gateway's two
    assert len(mine) >= 5 and mine <= set(group.pids()), {
        p: named[p] for p in mine - set(group.pids())
    }  # and the namespace's holder, the console's keeper
    assert not set(group.pids()) & {neighbour.pid(), control.pid(neighbour.dir.path)}  # the other sandbox is in a cgroup of its own
    assert group.usage()["pids_max"] == 256
    result: dict[str, Any] = {}
    most, began = 0, time.monotonic()

    def storm() -> None:
        script = 'nft flush ruleset; exec python3 -c "$0" "$1" 5000'
        result["r"] = capped.exec(["sudo", "sh", "-c", script, STORM, PUBLIC], capture=True, timeout=600)

    def answers(until: Callable[[list[tuple[float, float]]], bool]) -> list[tuple[float, float]]:
        """(when, how long) of the neighbour's answers to `exec true`, one every 0.2 s until `until(so far)`."""
        nonlocal most
        out: list[tuple[float, float]] = []
        while not until(out):
            most = max(most, int(group.usage()["pids"]))
            started = time.monotonic()
            assert neighbour.exec(["true"], timeout=30).returncode == 0
            out.append((started - began, time.monotonic() - started))
            time.sleep(0.2)
        return out

    def summary(answered: list[tuple[float, float]]) -> str:
        times = sorted(t for _, t in answered)
        slow = ", ".join(f"{t:.2f} s at {at:.0f} s" for at, t in answered if t > 1.0)
        return f"{len(times)} answers, 95% within {times[int(len(times) * 0.95)]:.2f} s, the slowest {times[-1]:.2f} s" + (
            f" (over 1 s: {slow})" if slow else ""
        )

    stalls: list[tuple[float, float]] = []  # (when, how late) a host thread woke from a 10 ms sleep, if 0.3 s late or more
    watching = threading.Event()

    def watch() -> None:
        while not watching.is_set():
            t = time.monotonic()
            time.sleep(0.01)
            if (late := time.monotonic() - t - 0.01) >= 0.3:
                stalls.append((t - began, late))

    before = answers(lambda so_far: len(so_far) >= 20)  # its own pace, the same host, before any storm
    worker, watcher = threading.Thread(target=storm), threading.Thread(target=watch)
    began = time.monotonic()
    worker.start()
    watcher.start()
    try:
        during = answers(lambda _: not worker.is_alive() or time.monotonic() - began > 600)
    finally:
        watching.set()
        watcher.join()
    worker.join(timeout=60)
    r = result["r"]
    assert r.returncode == 0, r.stderr
    stormed = json.loads(r.stdout.strip().splitlines()[-1])
    times = sorted(t for _, t in during)
    print(f"storm of 5000: {stormed}; the sandbox's processes and threads at most {most} (pids.max 256); the other sandbox "
          f"before it: {summary(before)}; during it (seconds from its start): {summary(during)}; this process's own "
          f"stalls of 0.3 s or more: {', '.join(f'{late:.2f} s at {at:.0f} s' for at, late in stalls) or 'none'}")  # fmt: skip
    assert stormed["held"] + sum(stormed["failed"].values()) == 5000 and stormed["held"] >= 1000, stormed
    assert 0 < most <= 256
    # The goal, 2 s, held throughout: 95% of answers within it, and none over it twice in a row (it kept answering).
    # One answer in 100 may be slower, never past 5 s: on 2 cores running three TCG guests and a flood, CI saw one in
    # ~200 take 2.08-2.18 s, and once one 3.28 s (the others before and after it within 0.5 s).
    late = [t > 2.0 for _, t in during]
    assert len(times) >= 3 and times[int(len(times) * 0.95)] < 2.0 and times[-1] < 5.0
    assert sum(late) <= max(1, len(late) // 100) and not any(a and b for a, b in itertools.pairwise(late)), summary(during)
    assert group.read("pids.events", "pids.events") in ("", "max 0")  # nothing of it even tried to pass the limit
    assert capped.exec(["curl", "-sf", "-o", "/dev/null", "http://public.test/"], timeout=120).returncode == 0  # works again


def test_qemu_runs_under_its_seccomp_filter(capped: Sandbox) -> None:
    """What QEMU may do once a guest has taken it over (issue 16, 3.): no program started, no uid changed.
    The filter's mode (2: a filter) is the kernel's word; snapshots still work without `exec:` migration."""
    pid = capped.pid()
    assert pid is not None
    status = dict(line.split(":\t", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":\t" in line)
    assert status["Seccomp"].strip() == "2", status.get("Seccomp")
    vv("snapshot", "limits", "save", "s1")
    assert capped.exec(["sh", "-c", "echo after > /tmp/mark"]).returncode == 0
    vv("snapshot", "limits", "restore", "s1")
    assert capped.exec(["test", "-e", "/tmp/mark"]).returncode == 1  # back to before the mark


def test_a_restored_sandbox_reaches_out_at_once(capped: Sandbox) -> None:
    """A snapshot saved just after the guest went out, restored: the guest's next connections out, by name and
    by address, go through at once. The restored guest remembers the namespace's side of its link as it was
    (its ARP entry fresh, trusted for 15-45 s): on 0d4da5d each start gave that side a new random MAC, and the
    guest's packets went to the old one, dropped, for as long as the entry stayed fresh (DNS failed, exit 6)."""
    out = "curl -sS -o /dev/null -m 20 http://public.test/ && curl -sS -o /dev/null -m 20 http://198.51.100.7/"
    assert capped.exec(["sh", "-c", out], timeout=120).returncode == 0  # the ARP entry fresh in what is saved
    vv("snapshot", "limits", "save", "s2")
    vv("snapshot", "limits", "restore", "s2")
    started = time.monotonic()
    r = capped.exec(["sh", "-c", out], capture=True, timeout=120)
    took = time.monotonic() - started
    print(f"restored, then out by name and by address: exit {r.returncode} in {took:.1f} s")
    assert r.returncode == 0 and took < 15, (r.returncode, r.stderr, took)


# Run by the guest's agent (and by root) as a stand-in for vivarium on a systemd host: vivarium's own cgroup
# module makes a sandbox's cgroup as a launch does and starts a long-lived process and a fork storm in it, as
# a launch starts the sandbox's processes; the storm is killed, the long-lived process left as the
# sandbox's. A later run (as a later `up` mending the sandbox would) joins the cgroup from outside and
# starts one more.
STAND_IN = """
import json, os, subprocess, sys
from pathlib import Path
sys.path.insert(0, "/tmp/vv")
import cgroup
out = {"why_none": cgroup.why_none()}
here = Path("/tmp/vv")
def own(pid="self"):
    return Path(f"/proc/{pid}/cgroup").read_text().strip()
def detached(argv):  # nothing of it holds the SSH session open
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, text=True, start_new_session=True)
if sys.argv[2] == "make":
    try:
        group = cgroup.make("stand-in-0123abcd", cgroup.Limits(pids=16, memory=256 << 20, io_weight=100))
    except cgroup.Unavailable as e:
        print(json.dumps(dict(out, unavailable=str(e))))
        sys.exit()
    cgroup.remember(here, group)
    with group.joined():
        kept = detached(["sleep", "600"])  # the sandbox's, while nothing else is (root's launcher goes back home)
        storm = detached([sys.executable, "-c", sys.argv[1], "50"])
    made, failed = map(int, storm.stdout.readline().split())
    out.update(made=made, failed=failed, usage=group.usage(), launcher=own(), storm=own(storm.pid), where=cgroup.where())
    for pid in set(group.pids()) - {kept.pid}:  # the storm and what it forked
        os.kill(pid, 9)
    storm.wait()
else:
    group = cgroup.of("stand-in", here)
    out.update(found=group is not None and group.path)
    with group.joined():
        late = detached(["sleep", "600"])
    out.update(late=own(late.pid), mender=own(), pids=len(group.pids()))
    for pid in group.pids():
        os.kill(pid, 9)
    late.wait()
    out["removed"] = cgroup.remove(group, wait=10.0)
print(json.dumps(out))
"""


@pytest.mark.same_everywhere
def test_a_normal_users_sandbox_gets_a_scope_of_its_systemd(neighbour: Sandbox) -> None:
    """vivarium run by a normal user on a systemd host (cgroup v2): the guest stands in for the host, its agent
    for the user, a process of a system service (sshd's) for one of a login session: neither may move itself
    into the subtree systemd delegates to the user. Without the user's systemd there is no cgroup, and why is
    said; with it (lingering), the sandbox's cgroup is a transient scope's leaf, its pids.max holds against a
    fork storm, the launching process is in the scope's other leaf; a later process (a later `up` restarting
    the sandbox's gateway) joins it from outside through systemd, and the scope is gone once both are empty.
    Run by root there, the scope is systemd's own. On 4d7720c a normal user's sandbox had no cgroup at all
    (no permission under /sys/fs/cgroup), and root's was one of vivarium's making beside systemd's."""
    import jeepney

    payload = io.BytesIO()
    with tarfile.open(fileobj=payload, mode="w") as tar:
        tar.add(cgroup.__file__, arcname="cgroup.py")
        tar.add(Path(jeepney.__file__).parent, arcname="jeepney", filter=lambda t: None if "__pycache__" in t.name else t)
    assert neighbour.exec(["sh", "-c", "rm -rf /tmp/vv && mkdir /tmp/vv && tar -C /tmp/vv -x"], input=payload.getvalue()).returncode == 0

    def stand_in(phase: str, *, root: bool = False) -> dict[str, Any]:
        r = neighbour.exec([*(["sudo"] if root else []), "python3", "-c", STAND_IN, STORM_FORKS, phase], capture=True, timeout=120)
        assert r.returncode == 0, r.stderr
        result: dict[str, Any] = json.loads(r.stdout.strip().splitlines()[-1])
        return result

    alone = stand_in("make")  # no user manager runs for the agent yet
    assert "no systemd user manager" in alone["why_none"] and "no systemd user manager" in alone["unavailable"], alone
    # What a host's login does: pam_systemd (not in the guest's image) gives the user manager its runtime
    # directory; lingering starts it without a session.
    setup = (
        "mkdir -p /etc/systemd/system/user@.service.d && printf '[Service]\\nEnvironment=XDG_RUNTIME_DIR=/run/user/%%i\\n' "
        "> /etc/systemd/system/user@.service.d/runtime-dir.conf && systemctl daemon-reload && loginctl enable-linger agent "
        "&& timeout 60 sh -c 'until test -S /run/user/1000/systemd/private; do sleep 0.2; done'"
    )
    assert neighbour.exec(["sudo", "sh", "-c", setup], timeout=120).returncode == 0
    made = stand_in("make")
    print(f"a normal user's sandbox cgroup: {made}")
    user = "/user.slice/user-1000.slice/user@1000.service/"
    scope = made["usage"]["path"].removesuffix("/sandbox")
    assert made["why_none"] == "" and made["where"].startswith("a transient scope"), made
    assert scope.startswith(user) and scope.rsplit("/", 1)[1].startswith("vivarium-stand-in-0123abcd-"), made
    assert made["storm"] == f"0::{scope}/sandbox" and made["launcher"] == f"0::{scope}/vivarium", made
    assert made["failed"] > 0 and made["made"] < 16, made  # the kernel said no at the sandbox's own limit
    assert made["usage"]["pids_max"] == 16 and made["usage"]["memory_max"] == 256 << 20, made
    mended = stand_in("mend")  # from outside the scope, where it is kept (systemd named it)
    print(f"joined later from outside: {mended}")
    assert mended["found"] == f"{scope}/sandbox" and mended["late"] == f"0::{scope}/sandbox", mended
    assert mended["mender"] == f"0::{scope}/vivarium" and mended["pids"] == 2 and mended["removed"], mended
    gone = "timeout 20 sh -c 'while test -e /sys/fs/cgroup$0; do sleep 0.2; done'"
    assert neighbour.exec(["sh", "-c", gone, scope], timeout=60).returncode == 0  # the scope, emptied, is systemd's to remove
    # Run by root on a systemd host: a scope of systemd's own (the cgroups there are systemd's to make).
    rooted = stand_in("make", root=True)
    print(f"root's: {rooted}")
    scope = rooted["usage"]["path"].removesuffix("/sandbox")
    assert scope.startswith("/system.slice/vivarium-stand-in-0123abcd-") and rooted["where"] == "a transient scope of systemd's, cgroup v2", rooted
    assert rooted["storm"] == f"0::{scope}/sandbox" and rooted["failed"] > 0 and rooted["made"] < 16, rooted
    assert scope not in rooted["launcher"], rooted  # root went back where it was
    mended = stand_in("mend", root=True)
    assert mended["late"] == f"0::{scope}/sandbox" and mended["removed"], mended
    assert neighbour.exec(["sh", "-c", gone, scope], timeout=60).returncode == 0
