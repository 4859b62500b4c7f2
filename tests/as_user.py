"""Integration tests run by a normal user (issue 16: the share, fence and lifecycle tests pass with every sandbox
started by an unprivileged user), as root:

    .venv/bin/python -m tests.as_user [PYTEST ARGUMENTS]

makes a user of the run's own (subordinate ids as useradd gives them, no sudo, no group kvm), opens
/dev/net/tun to everyone as udev does on a standard Debian, makes the tests' made-up network (which only root
can) and keeps it while pytest runs as that user, with the images already built here given to it (hard links:
the recipe is the same; its templates and sandboxes are its own). Afterwards the user, its processes (only ever
this run's: the user and its subordinate ids are the run's own), the network and /dev/net/tun's mode are as
before. Exits with pytest's status.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests import users
from tests.fakenet import FakeNet
from vivarium.share import userns

USER = "vivarium-tester"
REPO = Path(__file__).resolve().parents[1]
TUN = "/dev/net/tun"


def main(argv: list[str]) -> int:
    if os.geteuid() != 0:
        print("tests.as_user: run it as root (it makes a user, and the network namespaces the tests need)", file=sys.stderr)
        return 2
    base = Path(tempfile.mkdtemp(prefix="vivarium-as-user-", dir="/var/tmp"))
    base.chmod(0o755)
    pw = users.make(USER, base / "home")
    tun = os.stat(TUN).st_mode & 0o777
    try:
        os.chmod(TUN, 0o666)
        # the user's cache: kept beside root's between runs where there is one (its templates are a cache hit
        # while the recipe and the user are the same), made the user's again each run (its uid may differ)
        given = os.environ.get("VIVARIUM_TEST_CACHE")
        cache = Path(given) / "as-user" if given else base / "home" / "cache"
        users.give_images(Path(given) / "vivarium" if given else cache / "none", cache / "vivarium", pw)
        os.lchown(cache, pw.pw_uid, pw.pw_gid)
        with FakeNet() as net:
            env = {"HOME": pw.pw_dir, "USER": USER, "LOGNAME": USER, "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1",
                   "PATH": "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin", "VIVARIUM_TEST_CACHE": str(cache),
                   "VIVARIUM_TEST_NET": net.describe()}  # fmt: skip
            if "VIVARIUM_ACCEL" in os.environ:
                env["VIVARIUM_ACCEL"] = os.environ["VIVARIUM_ACCEL"]
            print(f"tests.as_user: pytest as {USER} (uid {pw.pw_uid})", file=sys.stderr, flush=True)
            proc = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *argv], cwd=REPO, env=env,
                                  user=pw.pw_uid, group=pw.pw_gid, extra_groups=[], check=False)  # fmt: skip
            return proc.returncode
    finally:
        sub = userns.subordinate(Path("/etc/subuid"), USER, pw.pw_uid)
        ours = {pw.pw_uid, *(range(sub[0], sub[0] + sub[1]) if sub else ())}
        deadline = time.monotonic() + 10
        while (left := users.processes(ours)) and time.monotonic() < deadline:
            for pid in left:
                try:
                    os.kill(pid, 9)
                except ProcessLookupError:
                    pass
            time.sleep(0.2)
        users.remove(USER)
        shutil.rmtree(base, ignore_errors=True)
        os.chmod(TUN, tun)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
