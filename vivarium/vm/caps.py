"""What this host's QEMU is: its version, the versioned machine type that `q35` stands for, and whether
it has its seccomp filter.

Probed once per QEMU binary (its path, size and mtime) and cached beside the accelerator probe. A
saved state only loads into the QEMU and machine type that saved it, so templates are keyed by them
and a snapshot names them: after an upgrade (bookworm's 7.2 to backports' 10.0) a template is made
again and an old snapshot is refused in one line, never half-loaded.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass

from vivarium import state
from vivarium.errors import VMError
from vivarium.run import find_program, run

MACHINE_ALIAS = "q35"


@dataclass(frozen=True)
class Qemu:
    version: str  # "7.2.22"
    machine: str  # what q35 stands for in it: "pc-q35-7.2"
    seccomp: bool = False  # built with its seccomp filter (-sandbox)

    def at_least(self, major: int, minor: int) -> bool:
        have = tuple(int(x) for x in self.version.split(".")[:2])
        return have >= (major, minor)


def probe(*, use_cache: bool = True) -> Qemu:
    """This host's QEMU: cached per binary, else asked (two runs of it, ~50 ms)."""
    binary = find_program("qemu-system-x86_64")
    st = os.stat(binary)
    ident = f"{binary}:{st.st_size}:{st.st_mtime_ns}"
    cache = state.cache_dir() / "qemu.json"
    if use_cache:
        try:
            saved = json.loads(cache.read_text())
            if saved.get("ident") == ident and isinstance(saved.get("seccomp"), bool):
                return Qemu(saved["version"], saved["machine"], saved["seccomp"])
        except (OSError, ValueError, KeyError, TypeError):
            pass
    found = ask(binary)
    cache.parent.mkdir(parents=True, exist_ok=True)
    state.write_atomic(cache, json.dumps({"ident": ident, **asdict(found)}) + "\n")
    return found


def ask(binary: str = "qemu-system-x86_64") -> Qemu:
    """Ask the QEMU binary itself (no cache)."""
    version = version_of(run([binary, "--version"], timeout=30).stdout)
    seccomp = run([binary, "-sandbox", "on", "-version"], timeout=30, check=False).returncode == 0  # "not supported" otherwise
    return Qemu(version, machine_of(run([binary, "-machine", "help"], timeout=30).stdout), seccomp)


def version_of(text: str) -> str:
    m = re.search(r"QEMU emulator version (\d+\.\d+(?:\.\d+)?)", text)
    if m is None:
        raise VMError(f"cannot tell QEMU's version from {text.strip()[:80]!r}", hint="is qemu-system-x86_64 QEMU?")
    return m.group(1)


def machine_of(text: str) -> str:
    """The versioned machine type the q35 alias names, from `-machine help`."""
    m = re.search(rf"^{MACHINE_ALIAS}\s.*\(alias of ([\w.-]+)\)", text, re.M)
    if m is None:
        raise VMError(f"this QEMU has no {MACHINE_ALIAS} machine", hint="install qemu-system-x86 (the x86-64 system emulator)")
    return m.group(1)
