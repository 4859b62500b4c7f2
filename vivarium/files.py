"""The SDK's view of a sandbox's files and processes: `box.files.read/write/list/remove/copy_in/copy_out` and
`box.spawn([...])`, each over the sandbox's SSH connection as the agent user.

What the guest answers is its own to make up: a listing is parsed strictly (a malformed line is an error,
not a guess), names are kept as the guest gave them (print them through printable()), and archives it
sends are unpacked as transfer.py does.
"""

from __future__ import annotations

import contextlib
import subprocess
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from vivarium import ssh, transfer
from vivarium.errors import InstanceError
from vivarium.printable import last_words, printable

KINDS = {"f": "file", "d": "dir", "l": "link", "p": "fifo", "s": "socket", "c": "char", "b": "block"}


@dataclass(frozen=True)
class Entry:
    name: str
    kind: str  # file, dir, link, fifo, socket, char, block
    size: int
    mode: int


class Files:
    """A sandbox's files, as its agent user sees them (paths in the guest)."""

    def __init__(self, target: Callable[[], ssh.Target], sandbox: str) -> None:
        self._target, self.sandbox = target, sandbox

    def _run(self, command: Sequence[str], what: str, input: ssh.Input = None) -> bytes:
        out: list[bytes] = []
        r = ssh.execute(self._target(), command, input=input, tty=False, on_stdout=out.append, on_stderr=lambda _: None, capture=True)
        if r.returncode != 0:
            raise InstanceError(f"{what} in sandbox {self.sandbox!r}: {last_words(r.stderr, r.returncode)}")
        return b"".join(out)

    def read(self, path: str) -> bytes:
        return self._run(["cat", "--", path], f"cannot read {path}")

    def write(self, path: str, data: bytes | str, mode: int = 0o644) -> None:
        """Make or replace the file `path` with `data` (its mode `mode`)."""
        script = 'umask 077 && cat > "$1" && chmod "$2" "$1"'
        self._run(
            ["sh", "-c", script, "sh", path, f"{mode & 0o7777:o}"], f"cannot write {path}", input=data.encode() if isinstance(data, str) else data
        )

    def list(self, path: str) -> list[Entry]:
        raw = self._run(["find", path, "-mindepth", "1", "-maxdepth", "1", "-printf", r"%y %s %m %P\0"], f"cannot list {path}")
        entries = []
        for item in raw.split(b"\0")[:-1] if raw else []:
            kind, size, mode, name = [*item.split(b" ", 3), b"", b"", b""][:4]
            if kind.decode(errors="replace") not in KINDS or not size.isdigit() or not mode.isdigit() or not name or b"/" in name:
                raise InstanceError(
                    f"sandbox {self.sandbox!r} listed {path} in a form it should not have: {printable(item[:80].decode(errors='replace'))!r}"
                )
            entries.append(Entry(name.decode(errors="surrogateescape"), KINDS[kind.decode()], int(size), int(mode, 8)))
        return sorted(entries, key=lambda e: e.name)

    def remove(self, path: str) -> None:
        """Remove a file or a whole tree."""
        self._run(["rm", "-r", "--", path], f"cannot remove {path}")

    def copy_in(self, src: Path, dst: str) -> str:
        """Copy a host file or tree to `dst` in the guest (into it, if a directory); where it went."""
        return transfer.to_guest(self._target(), src, dst)

    def copy_out(self, src: str, dst: Path) -> Path:
        """Copy a guest file or tree to `dst` (into it, if a directory), checked entry by entry; where it went."""
        return transfer.from_guest(self._target(), self.sandbox, src, dst)


class Spawned:
    """A command running in the guest: its output streamed to callbacks as it comes; wait() for its exit
    code, kill() to end it (the command itself, in the guest, not only the SSH connection)."""

    def __init__(self, target: ssh.Target, command: Sequence[str], on_stdout: ssh.Output | None, on_stderr: ssh.Output | None,
                 cwd: str | None) -> None:  # fmt: skip
        self._target = target
        self._pid = threading.Event()
        self.guest_pid: int | None = None
        first = [True]

        def out(data: bytes) -> None:
            if first[0]:  # its first line is the guest's pid (written by the wrapper, before the command runs)
                head, _, data = data.partition(b"\n")
                first[0] = False
                with contextlib.suppress(ValueError):
                    self.guest_pid = int(head)
                self._pid.set()
            if data and on_stdout is not None:
                on_stdout(data)

        wrapped = ["sh", "-c", 'echo $$; exec "$@"', "sh", *command]
        self._result: subprocess.CompletedProcess[str] | None = None
        self._thread = threading.Thread(target=self._go, args=(wrapped, out, on_stderr, cwd), daemon=True)
        self._thread.start()

    def _go(self, command: list[str], out: ssh.Output, err: ssh.Output | None, cwd: str | None) -> None:
        try:
            self._result = ssh.execute(self._target, command, tty=False, on_stdout=out, on_stderr=err or (lambda _: None), cwd=cwd)
        finally:
            self._pid.set()

    def wait(self, timeout: float | None = None) -> int:
        """Its exit code, once it has exited."""
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError(f"the command still runs after {timeout}s")
        return self._result.returncode if self._result is not None else -1

    def kill(self) -> None:
        """End it (SIGKILL, in the guest)."""
        self._pid.wait(30)
        if self.guest_pid is not None and self._thread.is_alive():
            ssh.execute(self._target, ["kill", "-KILL", str(self.guest_pid)], tty=False, capture=True)
