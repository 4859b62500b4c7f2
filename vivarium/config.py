"""Settings, declared once.

SETTINGS is the one table: each entry names its TOML section and key, its
default, the parser that validates it, its help and its CLI flag. The TOML
loader, the argparse options, `config show` and its JSON all come from it.
The result is a frozen Config; nothing downstream reads the file.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import pwd
import re
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vivarium.errors import ConfigError
from vivarium.net.policy import split_host_port

CONFIG_NAME = "vivarium.toml"

# ---------------------------------------------------------------- the result


@dataclass(frozen=True)
class Forward:
    host: int
    guest: int
    bind: str = "127.0.0.1"


# Paths in an rw share that run on the host (git, direnv, editors, vivarium itself):
# read-only to the guest, enforced by the share server's mounts on the host.
DEFAULT_PROTECT = ("vivarium.toml", ".git/config", ".git/hooks", ".envrc", ".vscode", ".idea")


@dataclass(frozen=True)
class Share:
    host: Path
    guest: Path
    mode: str = "rw"
    protect: tuple[str, ...] = DEFAULT_PROTECT


@dataclass(frozen=True)
class Download:
    name: str
    url: str
    sha256: str
    dest: str


@dataclass(frozen=True)
class VMSettings:
    memory: int
    cpus: int
    disk: int
    swap: int
    user: str


@dataclass(frozen=True)
class NetworkSettings:
    mode: str
    allow: tuple[str, ...]
    allow_cidrs: tuple[str, ...]
    deny_cidrs: tuple[str, ...]
    dns_upstream: str


@dataclass(frozen=True)
class ImageSettings:
    suite: str
    mirror: str
    packages: tuple[str, ...]
    agents: tuple[str, ...]
    setup: str
    download: tuple[Download, ...]


@dataclass(frozen=True)
class KubeSettings:
    link_into_share: bool


@dataclass(frozen=True)
class Config:
    vm: VMSettings
    forward: tuple[Forward, ...]
    share: tuple[Share, ...]
    network: NetworkSettings
    image: ImageSettings
    kube: KubeSettings
    uid: int = 1000  # the agent user's uid in the guest: the host user's, unless that is root
    source: Path | None = None  # the file it came from, if any
    notes: tuple[str, ...] = ()  # clamps and other things the user should hear


# ------------------------------------------------------------------- parsers

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


def _int(lo: int, hi: int, what: str) -> Callable[[object, str], int]:
    def parse(value: object, where: str) -> int:
        if isinstance(value, str) and value.strip().isdigit():
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
            raise ConfigError(f"{where}: {value!r} is not {what} ({lo}-{hi})")
        return value

    return parse


parse_cpus = _int(1, 1024, "a CPU count")
parse_port = _int(1, 65535, "a port")


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


def _choice(*choices: str) -> Callable[[object, str], str]:
    def parse(value: object, where: str) -> str:
        if value not in choices:
            raise ConfigError(f"{where}: {value!r} is not one of {' | '.join(choices)}")
        assert isinstance(value, str)
        return value

    return parse


def _str_list(check: Callable[[str, str], None] | None = None) -> Callable[[object, str], tuple[str, ...]]:
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


def _check_user(value: str, where: str) -> None:
    if value and not re.fullmatch(r"[a-z_][a-z0-9_-]{0,31}", value):
        raise ConfigError(f"{where}: {value!r} is not a valid user name")
    if value == "root":
        raise ConfigError(f"{where}: the agent user cannot be root", hint='leave it "" or pick a name')


def parse_user(value: object, where: str) -> str:
    name = parse_str(value, where)
    _check_user(name, where)
    return name


def _parse_upstream(value: object, where: str) -> str:
    text = parse_str(value, where)
    if text:
        try:
            split_host_port(text, 53)
        except ValueError as e:
            raise ConfigError(f"{where}: {e}", hint='write it as "HOST" or "HOST:PORT", e.g. "1.1.1.1" or "127.0.0.1:5353"') from None
    return text


def _check_cidr(value: str, where: str) -> None:
    try:
        ipaddress.ip_network(value, strict=False)
    except ValueError:
        raise ConfigError(f"{where}: {value!r} is not an address range", hint='write it like "198.51.100.0/24"') from None


def _check_package(value: str, where: str) -> None:
    if not re.fullmatch(r"[a-z0-9][a-z0-9+.\-]+(:[a-z0-9]+)?", value):
        raise ConfigError(f"{where}: {value!r} is not a Debian package name")


def check_domain(value: str, where: str) -> None:
    name, _, port = value.rpartition(":") if ":" in value else (value, "", "")
    if port:
        parse_port(port, where)
    if not re.fullmatch(r"(\*\.)?([a-z0-9-]+\.)*[a-z0-9-]+", name.lower()):
        raise ConfigError(f"{where}: {value!r} is not a domain", hint='write it like "*.github.com" or "pypi.org:443"')


KNOWN_AGENTS = ("claude-code", "codex", "gemini", "opencode")


def _check_agent(value: str, where: str) -> None:
    if value not in KNOWN_AGENTS:
        raise ConfigError(f"{where}: unknown agent {value!r}", hint=f"known agents: {', '.join(KNOWN_AGENTS)}")


def _table_list(
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


def _parse_bind(value: object, where: str) -> str:
    s = parse_str(value, where)
    try:
        ipaddress.ip_address(s)
    except ValueError:
        raise ConfigError(f"{where}: {s!r} is not an IP address", hint='use "127.0.0.1" or "0.0.0.0"') from None
    return s


def _parse_sha256(value: object, where: str) -> str:
    s = parse_str(value, where).lower()
    if not re.fullmatch(r"[0-9a-f]{64}", s):
        raise ConfigError(f"{where}: {value!r} is not a sha256 (64 hex digits)")
    return s


def _parse_abs(value: object, where: str) -> str:
    s = parse_str(value, where)
    if not s.startswith("/"):
        raise ConfigError(f"{where}: {s!r} is not an absolute path")
    return s


parse_forwards = _table_list({"host": parse_port, "guest": parse_port, "bind": _parse_bind}, ("host", "guest"), Forward)
parse_downloads = _table_list(
    {"name": parse_str, "url": parse_str, "sha256": _parse_sha256, "dest": _parse_abs},
    ("name", "url", "sha256", "dest"),
    Download,
)


def _check_protect(value: str, where: str) -> None:
    parts = value.strip("/").split("/")
    if value.startswith("/") or not value.strip("/") or any(p in ("", ".", "..") for p in parts) or "\0" in value:
        raise ConfigError(f"{where}: {value!r} is not a path inside the share", hint='write it relative to the share, like ".git/config"')


RawShare = tuple[str, str, str, tuple[str, ...]]


def _raw_share(host: str, guest: str = "", mode: str = "rw", protect: tuple[str, ...] = DEFAULT_PROTECT) -> RawShare:
    return (host, guest, mode, tuple(p.strip("/") for p in protect))


_parse_raw_shares = _table_list(
    {
        "host": parse_str,
        "guest": lambda v, w: v if v == "" else _parse_abs(v, w),
        "mode": _choice("rw", "ro", "review"),
        "protect": _str_list(_check_protect),
    },
    ("host",),
    _raw_share,
)


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


# ------------------------------------------------------------ the one table


@dataclass(frozen=True)
class Setting:
    section: str  # "" for top-level arrays of tables
    key: str
    default: object
    parse: Callable[[object, str], Any]
    help: str
    flag: str | None = None
    metavar: str = "VALUE"
    repeat: bool = False  # the flag may be given many times; together they replace the list
    dump: Callable[[Any], object] = lambda v: v

    @property
    def name(self) -> str:
        return f"{self.section}.{self.key}" if self.section else self.key


def _dump_tables(v: tuple[Any, ...]) -> list[dict[str, object]]:
    return [{k: str(x) if isinstance(x, Path) else list(x) if isinstance(x, tuple) else x for k, x in dataclasses.asdict(e).items()}
            for e in v]  # fmt: skip


ORIGIN_FORWARDS = [
    {"host": 2222, "guest": 22},  # SSH
    {"host": 45631, "guest": 45631},  # Kind API server
    {"host": 33000, "guest": 3000},  # general (the origin's Grafana)
]

# Official release binaries, pinned (kind v0.26.0 runs Kubernetes 1.32 nodes;
# kubectl matches). Fetched at build time and verified.
DEFAULT_DOWNLOADS = [
    {
        "name": "kind",
        "url": "https://github.com/kubernetes-sigs/kind/releases/download/v0.26.0/kind-linux-amd64",
        "sha256": "d445b44c28297bc23fd67e51cc24bb294ae7b977712be2d4d312883d0835829b",
        "dest": "/usr/local/bin/kind",
    },
    {
        "name": "kubectl",
        "url": "https://dl.k8s.io/release/v1.32.1/bin/linux/amd64/kubectl",
        "sha256": "e16c80f1a9f94db31063477eb9e61a2e24c1a4eee09ba776b029048f5369db0c",
        "dest": "/usr/local/bin/kubectl",
    },
]

SETTINGS: tuple[Setting, ...] = (
    Setting("vm", "memory", "16G", parse_size, "guest memory (clamped to the host)", "--memory", "SIZE", dump=format_size),
    Setting("vm", "cpus", 16, parse_cpus, "virtual CPUs (clamped to the host)", "--cpus", "N"),
    Setting("vm", "disk", "320G", parse_size, "root disk size (sparse)", "--disk", "SIZE", dump=format_size),
    Setting("vm", "swap", "32G", parse_size, "swap disk size (sparse)", "--swap", "SIZE", dump=format_size),
    Setting("vm", "user", "", parse_user, 'agent user in the guest ("" = the host user, or agent)', "--user", "NAME"),
    Setting("", "forward", ORIGIN_FORWARDS, parse_forwards, "host → guest TCP port forwards", dump=_dump_tables),
    Setting(
        "",
        "share",
        [{"host": "."}],
        _parse_raw_shares,
        "host directories shared into the guest",
        "--share",
        "HOST[:GUEST][:MODE]",
        repeat=True,
        dump=_dump_tables,
    ),
    Setting("network", "mode", "lan-block", _choice("lan-block", "allowlist", "offline"), "egress policy", "--network", "MODE"),
    Setting("network", "allow", [], _str_list(check_domain), "domains allowed in allowlist mode", "--allow", "DOMAIN", repeat=True),
    Setting("network", "allow_cidrs", [], _str_list(_check_cidr), "address ranges opened on purpose"),
    Setting("network", "deny_cidrs", [], _str_list(_check_cidr), "address ranges denied on top"),
    Setting("network", "dns_upstream", "", _parse_upstream, 'DNS server the gateway asks ("" = the host\'s)'),
    Setting("image", "suite", "bookworm", parse_str, "Debian suite", "--suite", "SUITE"),
    Setting("image", "mirror", "", parse_str, 'Debian mirror ("" = the host\'s apt mirror)', "--mirror", "URL"),
    Setting("image", "packages", [], _str_list(_check_package), "extra apt packages", "--package", "PKG", repeat=True),
    Setting("image", "agents", ["claude-code"], _str_list(_check_agent), "agent CLIs from npm", "--agent", "AGENT", repeat=True),
    Setting("image", "setup", "", parse_str, "script run inside the image at build time"),
    Setting("image", "download", DEFAULT_DOWNLOADS, parse_downloads, "binaries fetched at build time", dump=_dump_tables),
    Setting("kube", "link_into_share", False, parse_bool, "symlink ~/.kube/config into the share"),
)

SECTIONS = {"vm": VMSettings, "network": NetworkSettings, "image": ImageSettings, "kube": KubeSettings}


# ------------------------------------------------------------------ loading


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


def find_config(explicit: Path | None, cwd: Path) -> Path | None:
    if explicit is not None:
        if not explicit.is_file():
            raise ConfigError(f"{explicit}: no such config file")
        return explicit
    candidate = cwd / CONFIG_NAME
    return candidate if candidate.is_file() else None


def read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None


def parse_toml(raw: bytes, path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(raw.decode())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None


def read_toml(path: Path) -> dict[str, Any]:
    return parse_toml(read_bytes(path), path)


def load(
    path: Path | None = None,
    overrides: Mapping[str, object] | None = None,
    *,
    cwd: Path | None = None,
    host: Host | None = None,
) -> Config:
    """Defaults ← the TOML file ← CLI overrides, validated and clamped to the host.

    `overrides` maps setting names ("vm.memory") to raw values as the CLI saw them.
    """
    cwd = cwd or Path.cwd()
    data = read_toml(path) if path else {}
    where = str(path) if path else "defaults"
    base = path.parent.resolve() if path else cwd
    return load_data(data, where, base, overrides, host=host, source=path)


def load_data(
    data: Mapping[str, Any],
    where: str,
    base: Path,
    overrides: Mapping[str, object] | None = None,
    *,
    host: Host | None = None,
    source: Path | None = None,
) -> Config:
    """load() on settings already read: a TOML file's tables, or a sandbox's frozen settings (to_dict)."""
    host = host or Host.probe()
    _reject_unknown(data, where)

    values: dict[str, object] = {}
    for s in SETTINGS:
        raw: object = s.default
        origin = "default"
        table = data if not s.section else data.get(s.section, {})
        if s.key in table:
            raw, origin = table[s.key], where
        if overrides and s.name in overrides:
            raw, origin = overrides[s.name], "command line"
        values[s.name] = s.parse(raw, f"{origin}: {s.name}" if origin != where else f"{where}: {s.name}")

    notes: list[str] = []
    vm = values
    if vm["vm.cpus"] > host.cpus:  # type: ignore[operator]
        notes.append(f"vm.cpus {vm['vm.cpus']} is more than this host has; using {host.cpus}")
        vm["vm.cpus"] = host.cpus
    limit = host.memory * 3 // 4 // (1 << 20) * (1 << 20)
    if vm["vm.memory"] > limit:  # type: ignore[operator]
        notes.append(
            f"vm.memory {format_size(vm['vm.memory'])} is more than this host can give "  # type: ignore[arg-type]
            f"({format_size(host.memory // (1 << 20) * (1 << 20))} in all); using {format_size(limit)}"
        )
        vm["vm.memory"] = limit
    if not vm["vm.user"]:
        vm["vm.user"] = host.user if host.uid != 0 else "agent"

    raw_shares: tuple[RawShare, ...] = values["share"]  # type: ignore[assignment]
    values["share"] = tuple(_resolve_share(raw, base, i, where) for i, raw in enumerate(raw_shares))
    _check_forwards(values["forward"])  # type: ignore[arg-type]

    sections = {name: cls(**{s.key: values[s.name] for s in SETTINGS if s.section == name}) for name, cls in SECTIONS.items()}
    return Config(
        forward=values["forward"],  # type: ignore[arg-type]
        share=values["share"],  # type: ignore[arg-type]
        uid=guest_uid(str(values["vm.user"]), host),
        source=source,
        notes=tuple(notes),
        **sections,
    )


def _reject_unknown(data: Mapping[str, Any], where: str) -> None:
    known: dict[str, set[str]] = {}
    for s in SETTINGS:
        known.setdefault(s.section, set()).add(s.key)
    for key, value in data.items():
        if key in known[""]:
            continue
        if key not in known:
            raise ConfigError(f"{where}: unknown section or key {key!r}", hint=f"known: {', '.join(sorted(set(known) - {''} | known['']))}")
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: {key!r} must be a table ([{key}])")
        for sub in value:
            if sub not in known[key]:
                raise ConfigError(f"{where}: unknown key {key}.{sub}", hint=f"known keys in [{key}]: {', '.join(sorted(known[key]))}")


def _resolve_share(raw: RawShare, base: Path, i: int, where: str) -> Share:
    host_s, guest_s, mode, protect = raw
    host_path = (base / os.path.expanduser(host_s)).resolve()
    if not host_path.is_dir():
        raise ConfigError(f"{where}: share[{i}].host: {host_path} is not a directory", hint="create it or fix the path")
    return Share(host=host_path, guest=Path(guest_s) if guest_s else host_path, mode=mode, protect=protect)


def _check_forwards(forwards: Sequence[Forward]) -> None:
    seen: set[int] = set()
    for i, f in enumerate(forwards):
        if f.host in seen:
            raise ConfigError(f"forward[{i}].host: port {f.host} is forwarded twice")
        seen.add(f.host)


def to_dict(config: Config) -> dict[str, Any]:
    """The effective settings, shaped like vivarium.toml."""
    out: dict[str, Any] = {}
    for s in SETTINGS:
        value = getattr(getattr(config, s.section), s.key) if s.section else getattr(config, s.key)
        dumped = s.dump(value)
        if isinstance(dumped, tuple):
            dumped = list(dumped)
        if s.section:
            out.setdefault(s.section, {})[s.key] = dumped
        else:
            out[s.key] = dumped
    return out
