"""`vivarium cp`: files and directories into and out of a sandbox, as tar over its SSH connection.

Into the guest, the host's tar is trusted and the guest's tar unpacks it. Out of it, what comes back is
the guest's to write, hostile like everything from it: the host unpacks it entry by entry with tarfile's
`data` filter (nothing outside the destination, no absolute or escaping link, no device, no setuid or
setgid bit, no owner of the guest's choosing) into a fresh directory beside the destination, and moves
the result into place only once all of it passed. A refused archive leaves nothing, and says which
entry in one line.
"""

from __future__ import annotations

import copy
import os
import posixpath
import re
import shutil
import subprocess
import tarfile
import tempfile
import threading
from pathlib import Path

from vivarium import ssh
from vivarium.errors import InstanceError, UsageError
from vivarium.printable import last_words, printable

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def split(spec: str) -> tuple[str | None, str]:
    """`NAME:PATH` (a sandbox's path) or a host path; a host path with a colon is written ./a:b or /a:b."""
    name, sep, path = spec.partition(":")
    if sep and NAME.fullmatch(name) and not spec.startswith(("/", ".")):
        return name, path
    return None, spec


def guest_path(path: str, what: str) -> str:
    if not path.startswith("/"):
        raise UsageError(f"cp: {what} {path!r} in the sandbox is not an absolute path", hint="e.g. NAME:/home/agent/file")
    return posixpath.normpath(path)


def to_guest(target: ssh.Target, src: Path, dst: str) -> str:
    """Copy host `src` (a file or a tree) to `dst` in the guest; returns where it went."""
    if not src.exists() and not src.is_symlink():
        raise UsageError(f"cp: {src}: no such file or directory")
    dst = guest_path(dst, "destination")
    where = _ask(target, dst)
    if where == "dir":
        into, arcname = dst, src.name
    elif where in ("new", "file") and not (where == "file" and src.is_dir()):
        into, arcname = posixpath.dirname(dst) or "/", posixpath.basename(dst)
    elif where == "file":
        raise UsageError(f"cp: {dst} in the sandbox is a file, {src} a directory")
    else:
        raise UsageError(f"cp: {posixpath.dirname(dst)} does not exist in the sandbox")
    r, w = os.pipe()
    errors: list[BaseException] = []

    def pack() -> None:
        try:
            with os.fdopen(w, "wb") as out, tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:
                tar.add(src, arcname=arcname)
        except BaseException as e:  # noqa: BLE001  (said below)
            errors.append(e)

    worker = threading.Thread(target=pack, daemon=True)
    worker.start()
    try:
        with os.fdopen(r, "rb") as stream:
            done = ssh.execute(target, ["tar", "-x", "-p", "-f", "-", "-C", into], input=stream, capture=True, tty=False)
    finally:
        worker.join()
    if errors:
        raise UsageError(f"cp: cannot read {src}: {errors[0]}")
    if done.returncode != 0:
        raise InstanceError(f"cp: the sandbox's tar failed: {last_words(done.stderr, done.returncode)}")
    return posixpath.join(into, arcname)


def _ask(target: ssh.Target, dst: str) -> str:
    """What `dst` is in the guest: dir, file, new (its parent is a directory) or none. (The guest's answer only
    picks among our own choices.)"""
    probe = 'if [ -d "$1" ]; then echo dir; elif [ -e "$1" ]; then echo file; elif [ -d "$(dirname -- "$1")" ]; then echo new; else echo none; fi'
    r = ssh.execute(target, ["sh", "-c", probe, "sh", dst], capture=True, tty=False)
    answer = r.stdout.strip()
    return answer if answer in ("dir", "file", "new") else "none"


def from_guest(target: ssh.Target, sandbox: str, src: str, dst: Path) -> Path:
    """Copy guest `src` to host `dst` (into it, if it is a directory); returns where it went."""
    src = guest_path(src, "source")
    if src == "/":
        raise UsageError("cp: copy a directory of the sandbox, not all of it")
    name = posixpath.basename(src)
    final = dst / name if dst.is_dir() else dst
    if not final.parent.is_dir():
        raise UsageError(f"cp: {final.parent} does not exist")
    if final.is_dir() and not final.is_symlink():
        raise UsageError(f"cp: {final} exists", hint="remove it first, or copy to another name")
    argv = target.argv(["tar", "-c", "-f", "-", "-C", posixpath.dirname(src), "--", name], tty=False)
    tmp = Path(tempfile.mkdtemp(prefix=".vivarium-cp-", dir=final.parent))
    try:
        with subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as proc:
            assert proc.stdout is not None and proc.stderr is not None
            try:
                _unpack(proc.stdout, tmp, name, sandbox)
            finally:
                proc.stdout.close()
                err = proc.stderr.read().decode(errors="replace").strip()
                code = proc.wait()
        if code != 0:
            raise InstanceError(f"cp: {sandbox}:{src}: {last_words(err, code)}")
        got = tmp / name
        if not got.exists() and not got.is_symlink():
            raise InstanceError(f"cp: sandbox {sandbox!r} sent no {name!r}")
        if final.exists() or final.is_symlink():
            if final.is_dir() and not final.is_symlink():
                raise UsageError(f"cp: {final} exists", hint="remove it first, or copy to another name")
            if got.is_dir():
                raise UsageError(f"cp: {final} is a file, {sandbox}:{src} a directory")
        os.replace(got, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _unpack(stream: object, into: Path, name: str, sandbox: str, *, stdlib: bool | None = None) -> None:
    """The guest's archive into `into`, entry by entry through the data filter; one line on the first refusal.
    `stdlib`: tarfile's own filter (Python 3.11.4+, 3.12+) or, where the host's Python has none (Debian 12's
    3.11.2), the same checks made here (the default: tarfile's where it has one)."""
    own = not (hasattr(tarfile, "data_filter") if stdlib is None else stdlib)
    try:
        with tarfile.open(fileobj=stream, mode="r|") as tar:  # type: ignore[call-overload]
            for member in tar:
                top = member.name.split("/", 1)[0]
                if top != name:
                    raise UsageError(f"cp: refused what sandbox {sandbox!r} sent: {printable(member.name)!r} is not under {name!r}")
                try:
                    if own:
                        checked = data_filter(member, str(into))
                        tar.extract(checked, into, **({"filter": "fully_trusted"} if hasattr(tarfile, "data_filter") else {}))
                    else:
                        tar.extract(member, into, filter="data")
                except FILTER_ERRORS as e:
                    raise UsageError(f"cp: refused what sandbox {sandbox!r} sent: {printable(str(e))}", hint="nothing of it was kept") from None
    except tarfile.TarError as e:
        raise InstanceError(f"cp: what sandbox {sandbox!r} sent is not a tar archive: {printable(str(e))}") from None


class Refused(Exception):
    """An entry the data filter does not let through."""


FILTER_ERRORS: tuple[type[Exception], ...] = (Refused, getattr(tarfile, "FilterError", Refused))


def data_filter(member: tarfile.TarInfo, dest: str) -> tarfile.TarInfo:
    """What tarfile's `data` filter (PEP 706) checks, for a Python without it: no absolute name, nothing that lands
    outside `dest`, no link to an absolute path or out of it, no device or FIFO; no setuid, setgid or sticky bit,
    no group or other write; owned by whoever unpacks it. Returns the entry to extract."""
    dest = os.path.realpath(dest)
    name = member.name
    if name.startswith("/"):
        raise Refused(f"{name!r} is an absolute path")
    target = os.path.realpath(os.path.join(dest, name))
    if os.path.commonpath([target, dest]) != dest:
        raise Refused(f"{name!r} would be extracted to {target!r}, which is outside the destination")
    if not (member.isreg() or member.islnk() or member.isdir() or member.issym()):
        raise Refused(f"{name!r} is a special file")
    if member.islnk() or member.issym():
        if os.path.isabs(member.linkname):
            raise Refused(f"{name!r} is a link to an absolute path")
        base = os.path.dirname(name) if member.issym() else ""
        linked = os.path.realpath(os.path.join(dest, base, member.linkname))
        if os.path.commonpath([linked, dest]) != dest:
            raise Refused(f"{name!r} would link to {linked!r}, which is outside the destination")
    out = copy.copy(member)
    out.mode = (member.mode & 0o755) | (0o600 if member.isreg() or member.islnk() else 0o700)
    out.uid, out.gid, out.uname, out.gname = os.getuid(), os.getgid(), "", ""  # no owner of the guest's choosing
    return out
