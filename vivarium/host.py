"""What vivarium needs to know about the machine it runs on: its CPUs and memory (settings are clamped to
them) and the user who runs it (whom the guest's agent user is named after and maps to)."""

from __future__ import annotations

import os
import pwd
from dataclasses import dataclass


@dataclass(frozen=True)
class Host:
    """What the config needs to know about the machine it runs on."""

    cpus: int
    memory: int
    user: str
    uid: int

    @classmethod
    def probe(cls) -> Host:
        uid = os.getuid()
        # Under sudo, "the host user" is the one who typed sudo.
        if uid == 0 and os.environ.get("SUDO_UID", "").isdigit() and os.environ.get("SUDO_USER"):
            uid = int(os.environ["SUDO_UID"])
        try:
            name = pwd.getpwuid(uid).pw_name
        except KeyError:
            name = "agent"
        return cls(cpus=os.cpu_count() or 1, memory=_mem_total(), user=name, uid=uid)


def _mem_total() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    return 1 << 30


def guest_uid(user: str, host: Host | None = None) -> int:
    host = host or Host.probe()
    return host.uid if host.uid != 0 and user == host.user else 1000


def sudo_user() -> pwd.struct_passwd | None:
    """The user who typed sudo, when we run under it as root for someone else."""
    uid = os.environ.get("SUDO_UID", "")
    if os.geteuid() != 0 or not uid.isdigit() or int(uid) == 0:
        return None
    try:
        return pwd.getpwuid(int(uid))
    except KeyError:
        return None


def become(pw: pwd.struct_passwd) -> None:
    """Become the user who typed sudo (sudo_user()), wholly (ids, groups, HOME), before anything else is done: no
    part of vivarium needs root, so `sudo vivarium` is `vivarium` run by that user, their sandboxes included."""
    os.initgroups(pw.pw_name, pw.pw_gid)
    os.setresgid(pw.pw_gid, pw.pw_gid, pw.pw_gid)
    os.setresuid(pw.pw_uid, pw.pw_uid, pw.pw_uid)
    os.environ.update(HOME=pw.pw_dir, USER=pw.pw_name, LOGNAME=pw.pw_name)
    for name in ("SUDO_UID", "SUDO_GID", "SUDO_USER", "SUDO_COMMAND"):
        os.environ.pop(name, None)
