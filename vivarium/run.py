"""One way to run an external program: logged argv, clear errors.

Every program vivarium uses goes through `run()` or `spawn()`. The command is
logged as a copy-pasteable line; a missing program becomes MissingProgram
naming the Debian package that provides it; a failure becomes CommandFailed
carrying the command and its output.
"""

from __future__ import annotations

import logging
import os
import shlex
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from vivarium.errors import CommandFailed, MissingProgram

log = logging.getLogger("vivarium.run")

# The Debian package that provides each program vivarium runs.
PACKAGES: dict[str, str] = {
    "qemu-system-x86_64": "qemu-system-x86",
    "qemu-img": "qemu-utils",
    "mmdebstrap": "mmdebstrap",
    "mke2fs": "e2fsprogs",
    "debugfs": "e2fsprogs",
    "ssh": "openssh-client",
    "ssh-keygen": "openssh-client",
    "newuidmap": "uidmap",
    "tmux": "tmux",
    "nft": "nftables",
    "unshare": "util-linux",
    "docker": "docker.io",
}

SBIN = ("/usr/sbin", "/sbin")

Arg = str | os.PathLike[str]


def find_program(name: str) -> str:
    """The absolute path of `name`, or MissingProgram naming its package."""
    path = shutil.which(name) or shutil.which(name, path=os.pathsep.join(SBIN))
    if path is None:
        raise MissingProgram(name, PACKAGES.get(name, name))
    return path


def _argv(args: Sequence[Arg]) -> list[str]:
    argv = [os.fspath(a) for a in args]
    argv[0] = find_program(argv[0]) if "/" not in argv[0] else argv[0]
    return argv


def run(
    args: Sequence[Arg],
    *,
    check: bool = True,
    input: str | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float | None = None,
    cwd: Path | None = None,
    pass_fds: Sequence[int] = (),
) -> subprocess.CompletedProcess[str]:
    """Run a program to completion and capture its output (stderr merged in)."""
    argv = _argv(args)
    log.debug("run: %s", shlex.join(argv))
    proc = subprocess.run(
        argv,
        input=input,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=dict(env) if env is not None else None,
        timeout=timeout,
        cwd=cwd,
        check=False,
        pass_fds=tuple(pass_fds),
    )
    if check and proc.returncode != 0:
        log.debug("output of %s:\n%s", argv[0], proc.stdout)
        raise CommandFailed(argv, proc.returncode, proc.stdout)
    return proc


def spawn(
    args: Sequence[Arg],
    *,
    stdin: int | IO[Any] | None = subprocess.DEVNULL,
    stdout: int | IO[Any] | None = None,
    stderr: int | IO[Any] | None = None,
    env: Mapping[str, str] | None = None,
    text: bool = False,
    start_new_session: bool = False,
    pass_fds: Sequence[int] = (),
) -> subprocess.Popen[Any]:
    """Start a program and return it running; the caller owns reaping it."""
    argv = _argv(args)
    log.debug("spawn: %s", shlex.join(argv))
    return subprocess.Popen(
        argv,
        stdin=stdin,
        stdout=stdout,
        stderr=stderr,
        env=dict(env) if env is not None else None,
        text=text,
        start_new_session=start_new_session,
        pass_fds=tuple(pass_fds),
    )
