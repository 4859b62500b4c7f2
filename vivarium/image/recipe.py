"""What goes into the guest image, and the cache key that names it.

A Recipe is plain data derived from the config. Everything that changes the
image's bytes is in it, and so in its key: the same recipe is the same image.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from vivarium.config import Config, Download
from vivarium.guest import GUEST_DIR

INITRD_SOURCE = Path(__file__).with_name("initrd.py")

# Bump when the way an image is put together changes in a way the fields miss.
RECIPE_VERSION = 3

# The default "dev" profile.
BASE_PACKAGES = (
    # boot and the machine
    "systemd", "systemd-sysv", "dbus", "udev", "kmod", "linux-image-cloud-amd64", "initramfs-tools", "lz4", "busybox-static",
    "e2fsprogs", "util-linux", "iproute2", "procps", "less", "tmux",
    # getting in
    "openssh-server", "sudo",
    # containers (apparmor: the cloud kernel enforces it and Docker needs apparmor_parser)
    "docker.io", "containerd", "apparmor", "nftables", "iptables",
    # developing
    "git", "curl", "ca-certificates", "build-essential", "python3", "python3-venv",
    "nodejs", "npm", "jq",
)  # fmt: skip

AGENT_PACKAGES = {
    "claude-code": "@anthropic-ai/claude-code",
    "codex": "@openai/codex",
    "gemini": "@google/gemini-cli",
    "opencode": "opencode-ai",
}

# The names each agent needs to work, allowed in allowlist mode when it is in
# the image (`vivarium egress check` names the agent that added the rule).
AGENT_DOMAINS = {
    "claude-code": ("api.anthropic.com:443", "statsig.anthropic.com:443", "sentry.io:443", "claude.ai:443", "console.anthropic.com:443"),
    "codex": ("api.openai.com:443", "auth.openai.com:443", "chatgpt.com:443"),
    "gemini": ("generativelanguage.googleapis.com:443", "cloudcode-pa.googleapis.com:443", "oauth2.googleapis.com:443", "accounts.google.com:443"),
    "opencode": ("opencode.ai:443", "models.dev:443", "api.anthropic.com:443", "api.openai.com:443"),
}


@dataclass(frozen=True)
class Recipe:
    suite: str
    mirror: str
    packages: tuple[str, ...]
    user: str
    uid: int
    agents: tuple[str, ...]
    setup: str
    downloads: tuple[Download, ...]
    guest_files: str  # a hash of vivarium/guest, so editing a unit rebuilds the image
    initrd: str  # a hash of the initrd's maker (its /init, its modules)
    version: int = RECIPE_VERSION

    @classmethod
    def from_config(cls, config: Config) -> Recipe:
        img = config.image
        return cls(
            suite=img.suite,
            mirror=img.mirror or host_mirror(),
            packages=tuple(sorted(set(BASE_PACKAGES) | set(img.packages))),
            user=config.vm.user,
            uid=config.uid,
            agents=img.agents,
            setup=img.setup,
            downloads=img.download,
            guest_files=hash_tree(GUEST_DIR),
            initrd=hashlib.sha256(INITRD_SOURCE.read_bytes()).hexdigest()[:16],
        )

    def key(self) -> str:
        blob = json.dumps(asdict(self), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def npm_packages(self) -> list[str]:
        return [AGENT_PACKAGES[a] for a in self.agents]

    def describe(self) -> dict[str, object]:
        d = asdict(self)
        d["downloads"] = [x["name"] for x in d["downloads"]]
        return d


def hash_tree(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file() and "__pycache__" not in p.parts:
            h.update(str(p.relative_to(root)).encode() + b"\0")
            # Only the executable bit: a checkout's umask must not change the key.
            h.update(b"x" if p.stat().st_mode & 0o111 else b"-")
            h.update(p.read_bytes())
    return h.hexdigest()[:16]


DEFAULT_MIRROR = "http://deb.debian.org/debian"


def host_mirror(sources: tuple[Path, ...] = (Path("/etc/apt/sources.list"), Path("/etc/apt/sources.list.d"))) -> str:
    """The Debian mirror the host's apt uses, or deb.debian.org."""
    files: list[Path] = []
    for s in sources:
        if s.is_dir():
            files += sorted(p for p in s.iterdir() if p.suffix in (".list", ".sources"))
        elif s.is_file():
            files.append(s)
    for f in files:
        try:
            text = f.read_text()
        except OSError:
            continue
        for uri in _debian_uris(text, deb822=f.suffix == ".sources"):
            return uri
    return DEFAULT_MIRROR


def _debian_uris(text: str, *, deb822: bool) -> list[str]:
    uris: list[str] = []
    if deb822:
        for stanza in re.split(r"\n\s*\n", text):
            fields = dict((m.group(1).lower(), m.group(2).strip()) for m in re.finditer(r"^([A-Za-z-]+):\s*(.*)$", stanza, re.MULTILINE))
            if "deb" in fields.get("types", "").split() and "main" in fields.get("components", "").split():
                uris += fields.get("uris", "").split()
    else:
        for line in text.splitlines():
            parts = re.sub(r"\[[^]]*\]", "", line.split("#", 1)[0]).split()
            if len(parts) >= 4 and parts[0] == "deb" and "main" in parts[3:]:
                uris.append(parts[1])
    # The main archive, not security or a third-party repository.
    return [u.rstrip("/") for u in uris if re.search(r"/debian/?$", u) and "security" not in u]
