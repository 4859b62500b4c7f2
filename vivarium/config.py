"""Settings, declared once.

SETTINGS is the one table: each entry names its TOML section and key, its
default, the parser that validates it, its help and its CLI flag. The TOML
loader, the argparse options, `config show` and its JSON all come from it.
The result is a frozen Config; nothing downstream reads the file.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vivarium.credentials import SecretSpec, dump_secrets, parse_secrets
from vivarium.defaults import DEFAULT_DOWNLOADS, ORIGIN_FORWARDS
from vivarium.errors import ConfigError
from vivarium.host import Host, guest_uid
from vivarium.values import (
    check_agent,
    check_cidr,
    check_domain,
    check_package,
    check_protect,
    choice,
    dump_tables,
    format_size,
    int_in,
    parse_abs,
    parse_bind,
    parse_bool,
    parse_log_size,
    parse_port,
    parse_sha256,
    parse_size,
    parse_size_or_auto,
    parse_str,
    parse_upstream,
    parse_user,
    str_list,
    table_list,
)

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
    upstream_ca: str = ""


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
class LogSettings:
    """Caps on the host files a guest fills: bytes before a log rotates, rotated files kept."""

    console_size: int
    console_keep: int
    audit_size: int
    audit_keep: int


@dataclass(frozen=True)
class LimitSettings:
    """What a sandbox's host processes may use, together (its cgroup: vivarium/cgroup.py)."""

    pids: int  # processes and threads
    memory: int  # bytes; 0: the guest's memory and room for QEMU's own (cgroup.memory_for)
    io_weight: int


@dataclass(frozen=True)
class Config:
    vm: VMSettings
    forward: tuple[Forward, ...]
    share: tuple[Share, ...]
    network: NetworkSettings
    image: ImageSettings
    kube: KubeSettings
    logs: LogSettings
    limits: LimitSettings
    secret: tuple[SecretSpec, ...] = ()  # what the gateway may inject, and for which hosts (credentials.py)
    uid: int = 1000  # the agent user's uid in the guest: the host user's, unless that is root
    source: Path | None = None  # the file it came from, if any
    notes: tuple[str, ...] = ()  # clamps and other things the user should hear


# ------------------------------------------------------------------- parsers


parse_cpus = int_in(1, 1024, "a CPU count")
parse_keep = int_in(0, 100, "a count of files")
parse_forwards = table_list({"host": parse_port, "guest": parse_port, "bind": parse_bind}, ("host", "guest"), Forward)
parse_downloads = table_list(
    {"name": parse_str, "url": parse_str, "sha256": parse_sha256, "dest": parse_abs}, ("name", "url", "sha256", "dest"), Download
)


RawShare = tuple[str, str, str, tuple[str, ...]]


def _raw_share(host: str, guest: str = "", mode: str = "rw", protect: tuple[str, ...] = DEFAULT_PROTECT) -> RawShare:
    return (host, guest, mode, tuple(p.strip("/") for p in protect))


_parse_raw_shares = table_list(
    {
        "host": parse_str,
        "guest": lambda v, w: v if v == "" else parse_abs(v, w),
        "mode": choice("rw", "ro", "review"),
        "protect": str_list(check_protect),
    },
    ("host",),
    _raw_share,
)


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


SETTINGS: tuple[Setting, ...] = (
    Setting("vm", "memory", "16G", parse_size, "guest memory (clamped to the host)", "--memory", "SIZE", dump=format_size),
    Setting("vm", "cpus", 16, parse_cpus, "virtual CPUs (clamped to the host)", "--cpus", "N"),
    Setting("vm", "disk", "320G", parse_size, "root disk size (sparse)", "--disk", "SIZE", dump=format_size),
    Setting("vm", "swap", "32G", parse_size, "swap disk size (sparse)", "--swap", "SIZE", dump=format_size),
    Setting("vm", "user", "", parse_user, 'agent user in the guest ("" = the host user, or agent)', "--user", "NAME"),
    Setting("", "forward", ORIGIN_FORWARDS, parse_forwards, "host → guest TCP port forwards", dump=dump_tables),
    Setting(
        "",
        "share",
        [{"host": "."}],
        _parse_raw_shares,
        "host directories shared into the guest",
        "--share",
        "HOST[:GUEST][:MODE]",
        repeat=True,
        dump=dump_tables,
    ),
    Setting("network", "mode", "lan-block", choice("lan-block", "allowlist", "offline"), "egress policy", "--network", "MODE"),
    Setting("network", "allow", [], str_list(check_domain), "domains allowed in allowlist mode", "--allow", "DOMAIN", repeat=True),
    Setting("network", "allow_cidrs", [], str_list(check_cidr), "address ranges opened on purpose"),
    Setting("network", "deny_cidrs", [], str_list(check_cidr), "address ranges denied on top"),
    Setting("network", "dns_upstream", "", parse_upstream, 'DNS server the gateway asks ("" = the host\'s)'),
    Setting("network", "upstream_ca", "", lambda v, w: v if v == "" else parse_abs(v, w), 'CA file for servers a secret goes to ("" = the host\'s)'),
    Setting("image", "suite", "bookworm", parse_str, "Debian suite", "--suite", "SUITE"),
    Setting("image", "mirror", "", parse_str, 'Debian mirror ("" = the host\'s apt mirror)', "--mirror", "URL"),
    Setting("image", "packages", [], str_list(check_package), "extra apt packages", "--package", "PKG", repeat=True),
    Setting("image", "agents", ["claude-code"], str_list(check_agent), "agent CLIs from npm", "--agent", "AGENT", repeat=True),
    Setting("image", "setup", "", parse_str, "script run inside the image at build time"),
    Setting("image", "download", DEFAULT_DOWNLOADS, parse_downloads, "binaries fetched at build time", dump=dump_tables),
    Setting("kube", "link_into_share", False, parse_bool, "symlink ~/.kube/config into the share"),
    Setting("logs", "console_size", "10M", parse_log_size, "the console log rotates at this size", dump=format_size),
    Setting("logs", "console_keep", 3, parse_keep, "rotated console logs kept"),
    Setting("logs", "audit_size", "100M", parse_log_size, "the egress audit log rotates at this size", dump=format_size),
    Setting("logs", "audit_keep", 5, parse_keep, "rotated audit logs kept"),
    Setting("limits", "pids", 1024, int_in(64, 1 << 22, "a count of processes"), "processes and threads of the sandbox's host side"),
    Setting(
        "limits",
        "memory",
        "",
        parse_size_or_auto,
        'memory of its host side ("" = the guest\'s, 1G and an eighth more)',
        dump=lambda v: format_size(v) if v else "",
    ),
    Setting("limits", "io_weight", 100, int_in(1, 10000, "an IO weight"), "its share of the disks, against other sandboxes (1-10000)"),
    Setting("", "secret", [], parse_secrets, "secrets the gateway puts into requests to their hosts", dump=dump_secrets),
)

SECTIONS = {"vm": VMSettings, "network": NetworkSettings, "image": ImageSettings, "kube": KubeSettings, "logs": LogSettings, "limits": LimitSettings}


# ------------------------------------------------------------------ loading


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
        secret=values["secret"],  # type: ignore[arg-type]
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
