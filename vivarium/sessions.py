"""Agent sessions: commands kept running in the guest under tmux, started, listed and attached to."""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from vivarium import credentials, ssh, state
from vivarium.errors import InstanceError, UsageError
from vivarium.net import control
from vivarium.net.inject import Secret
from vivarium.record import Shared


class Exec(Protocol):
    def __call__(self, command: Sequence[str], *, capture: bool = ..., input: str | None = ...) -> subprocess.CompletedProcess[str]: ...


def guest_dir(shares: Sequence[Shared], host_dir: Path) -> str:
    """Where `host_dir` is in the guest, if a share holds it (at the same path unless the share says otherwise)."""
    here = host_dir.resolve()
    for share in shares:
        with contextlib.suppress(ValueError):
            return str(Path(share.guest) / here.relative_to(share.host))
    return workdir(shares)


def workdir(shares: Sequence[Shared]) -> str:
    """Where agents start: the guest path of the first share, else the agent's home."""
    return shares[0].guest if shares else "~"


def load_secrets(d: state.InstanceDir, configured: Sequence[credentials.SecretSpec], names: Sequence[str]) -> dict[str, str]:
    """Read each secret on the host, hand it to the sandbox's gateway; name → the placeholder the session gets."""
    held = {}
    for name in names:
        spec = credentials.find(tuple(configured), name)
        value = credentials.read(spec)
        placeholder = credentials.placeholder(d, name, value)
        control.give_secret(d.path, Secret(name, placeholder, value, spec.hosts, spec.header or None))
        held[name] = placeholder
    return held


def start(exec_: Exec, work: str, command: Sequence[str], *, session: str, env_names: Sequence[str] = (),
          placeholders: Mapping[str, str] | None = None) -> None:  # fmt: skip
    """`command` as the agent user in a detached tmux session, in `work`; the variables named in env_names go
    from this process's environment over ssh's stdin into that session only, and so do `placeholders`."""
    for name in env_names:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise UsageError(f"--env {name!r} is not a variable name")
        if name not in os.environ:
            raise UsageError(f"--env {name}: that variable is not set here")
    values = {name: os.environ[name] for name in env_names} | dict(placeholders or {})
    reads = "".join(f"IFS= read -r v{i}; " for i in range(len(values)))
    env = "".join(f'-e {name}="$v{i}" ' for i, name in enumerate(values))
    cd = 'cd "$HOME"' if work == "~" else f"cd {shlex.quote(work)}"
    script = f"{reads}{cd} && exec tmux new-session -d -s {shlex.quote(session)} {env}-- {shlex.join(command)}"
    stdin = "".join(value + "\n" for value in values.values())
    r = exec_(["sh", "-c", script], capture=True, input=stdin)
    if r.returncode != 0:
        raise InstanceError(f"could not start session {session!r}: {r.stderr.strip() or f'exit code {r.returncode}'}")


def attach_argv(target: ssh.Target, session: str | None = None) -> list[str]:
    return target.argv(["tmux", "attach-session", *(["-t", session] if session else [])], tty=True, batch=False)


def listing(exec_: Exec) -> list[dict[str, Any]]:
    fmt = "#{session_name}\t#{session_created}\t#{session_attached}\t#{pane_dead}\t#{pane_start_command}"
    r = exec_(["sh", "-c", f"tmux list-panes -a -F '{fmt}' 2>/dev/null || true"], capture=True)
    out = []
    for line in r.stdout.splitlines():
        name, created, attached, dead, command = (line.split("\t") + [""] * 5)[:5]
        out.append({
            "session": name, "created": int(created or 0), "attached": attached not in ("", "0"),
            "state": "exited" if dead == "1" else "running", "command": command,
        })  # fmt: skip
    return out
