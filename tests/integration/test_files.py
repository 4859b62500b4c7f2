"""The conventions users bring (issue 17): stdin through `exec`, `vivarium cp` both ways (and what a hostile
guest sends back refused), the SDK's files API and spawn, on the session's real sandbox."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vivarium import Sandbox
from vivarium.errors import InstanceError

from .conftest import small_vm, vv

pytestmark = pytest.mark.integration


def vv_bytes(*args: str, data: bytes, cwd: Path | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "vivarium", *args], input=data, capture_output=True, cwd=cwd, check=False, timeout=300)


def test_exec_passes_stdin_through_eof_included(box: Sandbox) -> None:
    data = os.urandom(5_000_000)
    r = vv_bytes("exec", "itest", "--", "sha256sum", data=data)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[0].decode() == hashlib.sha256(data).hexdigest()
    r = vv_bytes("exec", "itest", "--", "sh", "-c", 'read v; echo "got $v"; cat; echo end', data=b"x\nrest\n")
    assert r.stdout == b"got x\nrest\nend\n"  # the rest read to its EOF
    # a terminal only when asked for
    assert vv_bytes("exec", "itest", "-t", "--", "tty", data=b"").stdout.startswith(b"/dev/pts/")
    assert vv_bytes("exec", "itest", "-T", "--", "tty", data=b"").stdout.strip() == b"not a tty"
    r = vv_bytes("exec", "itest", "-t", "-T", "--", "true", data=b"")
    assert r.returncode == 2 and b"one or the other" in r.stderr
    # the SDK: bytes or a file in, output streamed to a callback as it comes
    chunks: list[bytes] = []
    done = box.exec(["sh", "-c", "cat; echo; echo second >&2"], input=b"from bytes", on_stdout=chunks.append, capture=True)
    assert b"".join(chunks) == b"from bytes\n" and done.stderr.strip() == "second"
    with open(__file__, "rb") as f:
        assert box.exec(["wc", "-c"], input=f, capture=True).stdout.strip() == str(Path(__file__).stat().st_size)


def test_cp_both_ways_keeps_modes_and_links_inside_the_tree(box: Sandbox, tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "run.sh").write_text("#!/bin/sh\necho hi\n")
    (tree / "run.sh").chmod(0o755)
    (tree / "sub" / "data.txt").write_text("data\n")
    (tree / "sub" / "data.txt").chmod(0o640)
    (tree / "link").symlink_to("sub/data.txt")
    box.exec(["rm", "-rf", "/tmp/cp-in"])
    box.exec(["mkdir", "/tmp/cp-in"])
    r = vv("cp", str(tree), "itest:/tmp/cp-in")
    assert "copied" in r.stderr
    listing = box.exec(["sh", "-c", "cd /tmp/cp-in/tree && stat -c '%n %a' run.sh sub/data.txt && readlink link && ./run.sh"], capture=True)
    assert listing.stdout.split("\n")[:4] == ["run.sh 755", "sub/data.txt 640", "sub/data.txt", "hi"], listing.stdout
    # and back, to a new name
    back = tmp_path / "back"
    vv("cp", "itest:/tmp/cp-in/tree", str(back))
    assert stat.S_IMODE((back / "run.sh").stat().st_mode) == 0o755 and stat.S_IMODE((back / "sub" / "data.txt").stat().st_mode) == 0o640
    assert os.readlink(back / "link") == "sub/data.txt" and (back / "link").read_text() == "data\n"
    # a single file into a host directory; a tree that exists there (the original, here) is not overwritten
    vv("cp", "itest:/tmp/cp-in/tree/run.sh", str(tmp_path))
    assert (tmp_path / "run.sh").read_text() == "#!/bin/sh\necho hi\n"
    r = vv("cp", "itest:/tmp/cp-in/tree", str(tmp_path), check=False)
    assert r.returncode == 2 and f"{tmp_path / 'tree'} exists" in r.stderr and "Traceback" not in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["back", "run.sh", "tree"]  # no leftover of the refused copy


# What root in the guest can put in the place of tar: any archive it likes, whatever the host asked for.
HOSTILE_TAR = r"""
import io, sys, tarfile
out = tarfile.open(fileobj=sys.stdout.buffer, mode="w|")
def add(name, data=b"", **kw):
    ti = tarfile.TarInfo(name)
    for k, v in kw.items():
        setattr(ti, k, v)
    ti.size = len(data) if ti.type == tarfile.REGTYPE else 0
    out.addfile(ti, io.BytesIO(data) if ti.type == tarfile.REGTYPE else None)
mode = sys.argv[1]
add("loot", type=tarfile.DIRTYPE, mode=0o755)
add("loot/fine.txt", b"fine\n")
if mode == "escape":
    add("loot/../../escape", b"outside\n")
elif mode == "abslink":
    add("loot/passwd", type=tarfile.SYMTYPE, linkname="/etc/passwd")
elif mode == "setuid":
    add("loot/sh", b"#!/bin/sh\n", mode=0o4755)
out.close()
"""


@pytest.mark.parametrize("attack", ["escape", "abslink", "other-top"])
def test_a_hostile_archive_from_the_guest_is_refused_with_nothing_written(box: Sandbox, tmp_path: Path, attack: str) -> None:
    """Root in the guest answers `tar -c` with an archive of its own making: an entry that climbs out, a link
    to an absolute path, an entry not under what was asked for. Each is refused in one line naming it, and
    nothing is left on the host, inside the destination or out of it."""
    fake = {"escape": f"python3 -c '{HOSTILE_TAR}' escape", "abslink": f"python3 -c '{HOSTILE_TAR}' abslink",
            "other-top": "cd /tmp && mkdir -p elsewhere && exec /bin/tar -c -f - elsewhere"}[attack]  # fmt: skip
    box.exec(["sudo", "sh", "-c", "printf '#!/bin/sh\\n%s\\n' \"$1\" > /usr/local/bin/tar && chmod 755 /usr/local/bin/tar", "sh", fake])
    try:
        box.exec(["mkdir", "-p", "/tmp/loot"])
        dest = tmp_path / "inbox"
        dest.mkdir()
        r = vv("cp", "itest:/tmp/loot", str(dest), check=False)
        assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
        said = {"escape": "escape", "abslink": "loot/passwd", "other-top": "elsewhere"}[attack]
        assert "refused what sandbox 'itest' sent" in r.stderr and said in r.stderr, r.stderr
        assert list(dest.iterdir()) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["inbox"]  # nothing kept, nothing outside
    finally:
        box.exec(["sudo", "rm", "-f", "/usr/local/bin/tar"])
    # the same copy with the guest's own tar: what a setuid bit comes back as (dropped)
    box.exec(["sh", "-c", "printf '#!/bin/sh\\n' > /tmp/loot/sh && chmod 4755 /tmp/loot/sh"])
    vv("cp", "itest:/tmp/loot", str(tmp_path / "inbox"))
    assert stat.S_IMODE((tmp_path / "inbox" / "loot" / "sh").stat().st_mode) == 0o755


def test_the_files_api_and_spawn(box: Sandbox) -> None:
    files = box.files
    box.exec(["rm", "-rf", "/tmp/api"])
    box.exec(["mkdir", "/tmp/api"])
    files.write("/tmp/api/a.bin", b"\x00binary\xff", mode=0o600)
    files.write("/tmp/api/b.txt", "text\n")
    assert files.read("/tmp/api/a.bin") == b"\x00binary\xff"
    assert [(e.name, e.kind, e.size, e.mode) for e in files.list("/tmp/api")] == [("a.bin", "file", 8, 0o600), ("b.txt", "file", 5, 0o644)]
    files.remove("/tmp/api/a.bin")
    assert [e.name for e in files.list("/tmp/api")] == ["b.txt"]
    with pytest.raises(InstanceError, match=r"cannot read /tmp/api/a\.bin in sandbox 'itest'"):
        files.read("/tmp/api/a.bin")
    # spawn: output as it comes, then its exit code; and one killed in the guest
    seen: list[bytes] = []
    job = box.spawn(["sh", "-c", "echo one; sleep 1; echo two; exit 3"], on_stdout=seen.append)
    assert job.wait(60) == 3 and b"".join(seen) == b"one\ntwo\n"
    long = box.spawn(["sleep", "600"])
    time.sleep(1)
    started = time.monotonic()
    long.kill()
    assert long.wait(30) != 0 and time.monotonic() - started < 30
    assert long.guest_pid is not None and box.exec(["kill", "-0", str(long.guest_pid)]).returncode != 0  # gone in the guest


def test_the_mcp_server_serves_the_sandbox_to_the_sdks_own_client(box: Sandbox) -> None:
    """What `claude mcp add vivarium -- vivarium mcp --sandbox itest` gives an agent: the official SDK's stdio
    client lists the tools and calls exec and read_file against the running sandbox."""
    import anyio
    from mcp import Client, StdioServerParameters
    from mcp_types import TextContent

    params = StdioServerParameters(command=sys.executable, args=["-m", "vivarium", "mcp", "--sandbox", "itest"], env=dict(os.environ))
    box.exec(["sh", "-c", "echo 'from the sandbox' > /tmp/mcp.txt"])

    async def go() -> None:
        async with Client(params) as client:
            names = {t.name for t in (await client.list_tools()).tools}
            assert {"up", "exec", "read_file", "write_file", "list_dir", "diff", "egress_log", "reset"} <= names
            ran = await client.call_tool("exec", {"command": ["sh", "-c", "echo out; echo err >&2; exit 4"]})
            assert not ran.is_error and ran.structured_content == {"stdout": "out\n", "stderr": "err\n", "exit_code": 4}, ran
            read = await client.call_tool("read_file", {"path": "/tmp/mcp.txt"})
            assert not read.is_error and "".join(c.text for c in read.content if isinstance(c, TextContent)) == "from the sandbox\n"

    anyio.run(go)


def test_apply_branch_commits_the_reviewed_changes_without_touching_the_work_tree(project: Path, built: object) -> None:
    """A review share that is a git repository: `apply --branch` makes a branch on the commit checked out when
    the sandbox started, holding exactly what `diff` showed; the working tree, the index and HEAD stay."""

    from .conftest import write_config

    d = project.parent / "branch-project"
    repo = d / "repo"
    (repo / "src").mkdir(parents=True, exist_ok=True)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.org", "-c", "safe.directory=*", "-C", str(repo)]  # (it is uid 1000's)
    subprocess.run([*git, "init", "-q", "-b", "main"], check=True)
    (repo / "edit.txt").write_text("one\n")
    (repo / "src" / "gone.txt").write_text("bye\n")
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "start"], check=True)
    for p in [repo, *repo.rglob("*")]:
        os.lchown(p, 1000, 1000)  # the project is the agent's, as it would be yours
    start = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    write_config(d, small_vm() + '[[share]]\nhost = "repo"\nmode = "review"\n')
    vv("up", "branchbox", cwd=d)
    box = Sandbox("branchbox")
    try:
        g = str(repo.resolve())
        box.exec(["sh", "-c", f"cd {g} && echo two > edit.txt && rm src/gone.txt && mkdir new && printf 'x\\n' > new/run.sh && chmod 755 new/run.sh"])
        subprocess.run([*git, "commit", "-q", "--allow-empty", "-m", "the user's own, meanwhile"], check=True)  # HEAD moves on
        (repo / "edit.txt").write_text("the user's, uncommitted\n")
        status = subprocess.run([*git, "status", "--porcelain"], capture_output=True, text=True, check=True).stdout
        shown = json.loads(vv("diff", "branchbox", "--json").stdout)[0]["changes"]
        r = vv("apply", "branchbox", "--branch", "from-sandbox")
        assert "as branch from-sandbox" in r.stderr, r.stderr
        # the branch: on the commit of the sandbox's start, holding exactly the reviewed changes, the guest's bytes
        assert subprocess.run([*git, "rev-parse", "from-sandbox^"], capture_output=True, text=True, check=True).stdout.strip() == start
        names = subprocess.run([*git, "diff", "--name-status", start, "from-sandbox"], capture_output=True, text=True, check=True).stdout.splitlines()
        kinds = {"added": "A", "modified": "M", "deleted": "D"}
        assert sorted(names) == sorted(f"{kinds[c['kind']]}\t{c['path']}" for c in shown if c["what"] == "file"), (names, shown)
        assert subprocess.run([*git, "show", "from-sandbox:edit.txt"], capture_output=True, text=True, check=True).stdout == "two\n"
        # the working tree and the index are as the user left them
        assert subprocess.run([*git, "status", "--porcelain"], capture_output=True, text=True, check=True).stdout == status
        assert (repo / "edit.txt").read_text() == "the user's, uncommitted\n" and (repo / "src" / "gone.txt").exists()
    finally:
        box.destroy()
