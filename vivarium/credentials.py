"""Secrets on the host side: the `[[secret]]` settings (and the presets for the agents in the image), reading
a secret's real value where it lives (an environment variable, a file, a command such as a password
manager's), and each sandbox's placeholders, kept so that they stay the same across sessions.

The real value is read when a session asks for it and goes to the gateway only; the guest gets the
placeholder (net/inject.py shapes it and puts the real value back on the way out).
"""

from __future__ import annotations

import json
import os
import re
import secrets as random
import shlex
import string
import subprocess
from dataclasses import dataclass
from pathlib import Path

from vivarium import state
from vivarium.errors import ConfigError, UsageError
from vivarium.values import check_domain, parse_str, str_list, table_list

NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
ALPHABET = string.ascii_letters + string.digits
# At most this many leading segments ("sk-", "ant-", "api03-"), each short, make a value's visible prefix.
_SEGMENT = re.compile(r"[A-Za-z][A-Za-z0-9]{0,6}[-_]")
MAX_PREFIX_SEGMENTS = 3


def prefix_of(real: str) -> str:
    """The part of a credential a client may check: its leading short segments (`sk-ant-api03-`, `ghp_`)."""
    prefix, rest = "", real
    for _ in range(MAX_PREFIX_SEGMENTS):
        m = _SEGMENT.match(rest)
        if m is None or len(m.group()) >= len(rest):
            break
        prefix, rest = prefix + m.group(), rest[m.end() :]
    return prefix


def make_placeholder(real: str) -> str:
    """A stand-in for `real`: its prefix, then random letters and digits to the same length (at least 16 random)."""
    prefix = prefix_of(real)
    if len(real) - len(prefix) < 16:
        prefix = ""
    size = max(len(real) - len(prefix), 16)  # a value of 16 characters or more: exactly its length
    return prefix + "".join(random.choice(ALPHABET) for _ in range(size))


@dataclass(frozen=True)
class SecretSpec:
    name: str  # the variable the agent sees, holding the placeholder
    source: str  # env:VAR | file:PATH | cmd:COMMAND (run on the host)
    hosts: tuple[str, ...]  # where the real value may go; patterns as in network.allow
    header: str = ""  # only this request header; "" = any header whose value holds the placeholder


def _check_name(value: object, where: str) -> str:
    s = parse_str(value, where)
    if not NAME.fullmatch(s):
        raise ConfigError(f"{where}: {s!r} is not a variable name", hint="letters, digits and _, not starting with a digit")
    return s


def _check_source(value: object, where: str) -> str:
    s = parse_str(value, where)
    kind, sep, rest = s.partition(":")
    if not sep or kind not in ("env", "file", "cmd") or not rest.strip():
        raise ConfigError(f"{where}: {s!r} says nowhere to read the secret from", hint='"env:VAR", "file:PATH" or "cmd:COMMAND"')
    if kind == "env" and not NAME.fullmatch(rest):
        raise ConfigError(f"{where}: {rest!r} is not a variable name")
    return s


def _check_header(value: object, where: str) -> str:
    s = parse_str(value, where).lower()
    if s and not re.fullmatch(r"[a-z0-9!#$%&'*+.^_`|~-]+", s):
        raise ConfigError(f"{where}: {s!r} is not an HTTP header name")
    return s


def _spec(name: str, source: str, hosts: tuple[str, ...], header: str = "") -> SecretSpec:
    if not hosts:
        raise ConfigError(f"secret {name}: hosts is empty", hint="name the hosts the real value may be sent to")
    return SecretSpec(name, source, hosts, header)


parse_secrets = table_list(
    {"name": _check_name, "from": _check_source, "hosts": str_list(check_domain), "header": _check_header},
    ("name", "from", "hosts"),
    lambda name, hosts, header="", **rest: _spec(name, rest["from"], hosts, header),
)

# The agents in the image, and the hosts their keys are for: `vivarium run --secret NAME` needs no settings for these.
PRESETS = (
    SecretSpec("ANTHROPIC_API_KEY", "env:ANTHROPIC_API_KEY", ("api.anthropic.com",), "x-api-key"),
    SecretSpec("CLAUDE_CODE_OAUTH_TOKEN", "env:CLAUDE_CODE_OAUTH_TOKEN", ("api.anthropic.com",), "authorization"),
    SecretSpec("OPENAI_API_KEY", "env:OPENAI_API_KEY", ("api.openai.com",), "authorization"),
    SecretSpec("GITHUB_TOKEN", "env:GITHUB_TOKEN", ("github.com", "api.github.com")),
)


def find(configured: tuple[SecretSpec, ...], name: str) -> SecretSpec:
    """The secret `name`: as configured, else a preset."""
    for spec in (*configured, *PRESETS):
        if spec.name == name:
            return spec
    known = ", ".join(dict.fromkeys(s.name for s in (*configured, *PRESETS)))
    raise UsageError(f"--secret {name}: no such secret", hint=f"add a [[secret]] to vivarium.toml; known: {known}")


def read(spec: SecretSpec, timeout: float = 60.0) -> str:
    """The real value, read on the host now; one line saying why when it cannot be."""
    kind, _, where = spec.source.partition(":")
    what = f"secret {spec.name} ({spec.source})"
    if kind == "env":
        value = os.environ.get(where)
        if value is None:
            raise UsageError(f"{what}: {where} is not set here", hint=f"export {where}=… before `vivarium run`")
    elif kind == "file":
        try:
            value = Path(where).expanduser().read_text()
        except OSError as e:
            raise UsageError(f"{what}: cannot read it: {e.strerror}") from None
    else:
        try:
            r = subprocess.run(shlex.split(where), capture_output=True, text=True, timeout=timeout, check=False, stdin=subprocess.DEVNULL)
        except (OSError, ValueError, subprocess.TimeoutExpired) as e:
            raise UsageError(f"{what}: the command did not run: {e}") from None
        if r.returncode != 0:
            last = (r.stderr.strip().splitlines() or [f"exit code {r.returncode}"])[-1]
            raise UsageError(f"{what}: the command failed: {last[:200]}")
        value = r.stdout
    value = value.strip("\r\n")
    if not value or "\n" in value or "\r" in value:
        raise UsageError(f"{what}: {'empty' if not value else 'more than one line'}", hint="a secret is one line")
    return value


def placeholder(d: state.InstanceDir, name: str, real: str) -> str:
    """This sandbox's placeholder for secret `name`: made once (shaped like `real`), then the same in every
    session, so that one kept in an agent's history still works. Kept owner-only in the instance directory."""
    path = d.path / "placeholders.json"
    try:
        kept: dict[str, str] = json.loads(path.read_text())
    except (OSError, ValueError):
        kept = {}
    ph = kept.get(name)
    if not isinstance(ph, str) or len(ph) != max(len(real), 16):  # the length make_placeholder gives `real`
        ph = kept[name] = make_placeholder(real)
        state.write_atomic(path, json.dumps(kept, indent=1) + "\n", 0o600)
    return ph


def dump_secrets(specs: tuple[SecretSpec, ...]) -> list[dict[str, object]]:
    """As written in vivarium.toml (`config show`, the settings a sandbox keeps)."""
    return [{"name": s.name, "from": s.source, "hosts": list(s.hosts), **({"header": s.header} if s.header else {})} for s in specs]
