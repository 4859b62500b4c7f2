"""What a setting's value may be: parsers that check one value from a settings file or a flag and say, in
one line, where it is wrong and what it should be."""

from __future__ import annotations

import dataclasses
import ipaddress
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from vivarium.errors import ConfigError
from vivarium.net.policy import split_host_port

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*$", re.IGNORECASE)


_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(value: object, where: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    m = _SIZE.match(value) if isinstance(value, str) else None
    if m is None or float(m.group(1)) <= 0:
        raise ConfigError(f"{where}: {value!r} is not a size", hint='write it like "16G" or "512M"')
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def format_size(n: int) -> str:
    for unit in ("T", "G", "M", "K"):
        if n % _UNITS[unit] == 0:
            return f"{n // _UNITS[unit]}{unit}"
    return str(n)


def int_in(lo: int, hi: int, what: str) -> Callable[[object, str], int]:
    def parse(value: object, where: str) -> int:
        if isinstance(value, str) and value.strip().isdigit():
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
            raise ConfigError(f"{where}: {value!r} is not {what} ({lo}-{hi})")
        return value

    return parse


parse_port = int_in(1, 65535, "a port")


def parse_log_size(value: object, where: str) -> int:
    size: int = parse_size(value, where)
    if size < 64 << 10:
        raise ConfigError(f"{where}: {format_size(size)} is too small for a log", hint="64K or more, e.g. 10M")
    return size


def parse_size_or_auto(value: object, where: str) -> int:
    """A size, or "" for a default worked out elsewhere (0)."""
    return 0 if value == "" else parse_size(value, where)


def parse_str(value: object, where: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{where}: {value!r} is not a string")
    return value


def parse_bool(value: object, where: str) -> bool:
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    if not isinstance(value, bool):
        raise ConfigError(f"{where}: {value!r} is not true or false")
    return value


def choice(*choices: str) -> Callable[[object, str], str]:
    def parse(value: object, where: str) -> str:
        if value not in choices:
            raise ConfigError(f"{where}: {value!r} is not one of {' | '.join(choices)}")
        assert isinstance(value, str)
        return value

    return parse


def str_list(check: Callable[[str, str], None] | None = None) -> Callable[[object, str], tuple[str, ...]]:
    def parse(value: object, where: str) -> tuple[str, ...]:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{where}: {value!r} is not a list of strings")
        for v in value:
            if check:
                check(v, where)
        return tuple(value)

    return parse


def check_user(value: str, where: str) -> None:
    if value and not re.fullmatch(r"[a-z_][a-z0-9_-]{0,31}", value):
        raise ConfigError(f"{where}: {value!r} is not a valid user name")
    if value == "root":
        raise ConfigError(f"{where}: the agent user cannot be root", hint='leave it "" or pick a name')


def parse_user(value: object, where: str) -> str:
    name = parse_str(value, where)
    check_user(name, where)
    return name


def parse_upstream(value: object, where: str) -> str:
    text = parse_str(value, where)
    if text:
        try:
            split_host_port(text, 53)
        except ValueError as e:
            raise ConfigError(f"{where}: {e}", hint='write it as "HOST" or "HOST:PORT", e.g. "1.1.1.1" or "127.0.0.1:5353"') from None
    return text


def check_cidr(value: str, where: str) -> None:
    try:
        ipaddress.ip_network(value, strict=False)
    except ValueError:
        raise ConfigError(f"{where}: {value!r} is not an address range", hint='write it like "198.51.100.0/24"') from None


def check_package(value: str, where: str) -> None:
    if not re.fullmatch(r"[a-z0-9][a-z0-9+.\-]+(:[a-z0-9]+)?", value):
        raise ConfigError(f"{where}: {value!r} is not a Debian package name")


def check_domain(value: str, where: str) -> None:
    name, _, port = value.rpartition(":") if ":" in value else (value, "", "")
    if port:
        parse_port(port, where)
    if not re.fullmatch(r"(\*\.)?([a-z0-9-]+\.)*[a-z0-9-]+", name.lower()):
        raise ConfigError(f"{where}: {value!r} is not a domain", hint='write it like "*.github.com" or "pypi.org:443"')


def table_list(
    fields: Mapping[str, Callable[[object, str], object]],
    required: Sequence[str],
    make: Callable[..., Any],
) -> Callable[[object, str], tuple[Any, ...]]:
    """A parser for an array of tables ([[forward]] and friends)."""

    def parse(value: object, where: str) -> tuple[Any, ...]:
        if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
            raise ConfigError(f"{where}: expected a list of tables ([[{where}]])")
        out = []
        for i, entry in enumerate(value):
            here = f"{where}[{i}]"
            for key in entry:
                if key not in fields:
                    raise ConfigError(f"{here}: unknown key {key!r}", hint=f"known keys: {', '.join(fields)}")
            for key in required:
                if key not in entry:
                    raise ConfigError(f"{here}: {key!r} is required")
            out.append(make(**{k: fields[k](v, f"{here}.{k}") for k, v in entry.items()}))
        return tuple(out)

    return parse


def parse_bind(value: object, where: str) -> str:
    s = parse_str(value, where)
    try:
        ipaddress.ip_address(s)
    except ValueError:
        raise ConfigError(f"{where}: {s!r} is not an IP address", hint='use "127.0.0.1" or "0.0.0.0"') from None
    return s


def parse_sha256(value: object, where: str) -> str:
    s = parse_str(value, where).lower()
    if not re.fullmatch(r"[0-9a-f]{64}", s):
        raise ConfigError(f"{where}: {value!r} is not a sha256 (64 hex digits)")
    return s


def parse_abs(value: object, where: str) -> str:
    s = parse_str(value, where)
    if not s.startswith("/"):
        raise ConfigError(f"{where}: {s!r} is not an absolute path")
    return s


def check_protect(value: str, where: str) -> None:
    parts = value.strip("/").split("/")
    if value.startswith("/") or not value.strip("/") or any(p in ("", ".", "..") for p in parts) or "\0" in value:
        raise ConfigError(f"{where}: {value!r} is not a path inside the share", hint='write it relative to the share, like ".git/config"')


def dump_tables(v: tuple[Any, ...]) -> list[dict[str, object]]:
    return [{k: str(x) if isinstance(x, Path) else list(x) if isinstance(x, tuple) else x for k, x in dataclasses.asdict(e).items()}
            for e in v]  # fmt: skip


KNOWN_AGENTS = ("claude-code", "codex", "gemini", "opencode")


def check_agent(value: str, where: str) -> None:
    if value not in KNOWN_AGENTS:
        raise ConfigError(f"{where}: unknown agent {value!r}", hint=f"known agents: {', '.join(KNOWN_AGENTS)}")


def parse_share_flag(value: str) -> dict[str, str]:
    """`--share HOST[:GUEST][:MODE]` → a [[share]] table."""
    parts = value.split(":")
    entry = {"host": parts[0]}
    rest = parts[1:]
    if rest and rest[-1] in ("rw", "ro", "review"):
        entry["mode"] = rest.pop()
    if rest:
        entry["guest"] = rest[0]
    return entry
