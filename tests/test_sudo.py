"""`sudo vivarium` is vivarium run by the user who typed sudo (issue 16, 2): ids, groups and HOME all theirs
before anything is done, and the sudo variables gone (so nothing below mistakes the user for root's guest)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from . import users

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="becoming another user needs root (the test suite runs as root)")

NAME = "vivarium-sudo"
PROBE = (
    "import json, os; from vivarium import host; pw = host.sudo_user(); pw and host.become(pw); "
    "print(json.dumps([pw and pw.pw_name, os.getresuid(), os.getresgid(), os.getgroups(), os.environ['HOME'], "
    "sorted(k for k in os.environ if k.startswith('SUDO_'))]))"
)


def probe(env: dict[str, str]) -> list[object]:
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True).stdout
    return json.loads(out)  # type: ignore[no-any-return]


def test_sudo_becomes_the_user_who_typed_it() -> None:
    pw = users.make(NAME)
    try:
        base = {"PATH": os.environ["PATH"], "HOME": "/root", "PYTHONPATH": os.pathsep.join(sys.path)}
        sudo = {**base, "SUDO_UID": str(pw.pw_uid), "SUDO_GID": str(pw.pw_gid), "SUDO_USER": NAME, "SUDO_COMMAND": "/usr/bin/vivarium up"}
        me = [pw.pw_uid] * 3
        assert probe(sudo) == [NAME, me, [pw.pw_gid] * 3, [pw.pw_gid], pw.pw_dir, []]
        # root itself, and root's own sudo, stay root
        assert probe(base)[:2] == [None, [0, 0, 0]]
        assert probe({**base, "SUDO_UID": "0", "SUDO_USER": "root"})[:2] == [None, [0, 0, 0]]
    finally:
        users.remove(NAME)
