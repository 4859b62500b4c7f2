"""`vivarium doctor`: what this host has, what is missing, and which package brings it."""

from __future__ import annotations

import os
import resource
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from vivarium import cgroup, state
from vivarium.errors import MissingProgram, VMError
from vivarium.net import netns
from vivarium.run import PACKAGES, find_program, run
from vivarium.share import virtiofs
from vivarium.vm import accel, caps

MIN_FREE = 8 << 30  # an image build needs a few GiB; instances grow from there
MIN_OPEN_FILES = 65536  # files of a share the guest may keep looked up at once (a project with its node_modules)


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""
    required: bool = True


def newest_kernel() -> Path | None:
    """The kernel of the newest cached image: what the probe should boot."""
    kernels = sorted(state.images_dir().glob("*/vmlinuz"), key=lambda p: p.stat().st_mtime)
    return kernels[-1] if kernels else None


def checks(kernel: Path | None = None) -> list[Check]:
    kernel = kernel or newest_kernel()
    out = [_program(p) for p in ("qemu-system-x86_64", "qemu-img", "mmdebstrap", "mke2fs", "ssh", "ssh-keygen", "nft", "unshare")]
    out.append(_program("tmux", required=False))
    try:
        a = accel.choose(kernel)
        detail = f"{a.reason}: {a.detail}" if a.detail else a.reason
        out.append(Check("KVM usable", a.name == "kvm", detail, "" if a.name == "kvm" else "vivarium boots with TCG instead", required=False))
    except MissingProgram as e:
        out.append(Check("KVM usable", False, str(e), e.hint, required=False))
    out.append(_qemu())
    out.append(_shares())
    out.append(_open_files())
    out.append(_userns())
    out.append(_fence())
    out.append(_cgroup())
    out.append(_free_disk())
    return out


def _qemu() -> Check:
    try:
        q = caps.probe()
    except (MissingProgram, VMError) as e:
        return Check("QEMU", False, e.message, e.hint or "apt-get install qemu-system-x86")
    return Check("QEMU", True, f"{q.version}, machine type {q.machine}")


def _shares() -> Check:
    why = virtiofs.supported()
    if why is None:
        binary = virtiofs.find_virtiofsd()
        kind = "QEMU's own (C) virtiofsd" if virtiofs.is_c_daemon(binary) else "the Rust virtiofsd"
        who = ", in a user namespace (root only there)" if os.geteuid() == 0 else ", in a user namespace of yours"
        return Check("shared directories", True, f"virtiofs, served by {kind} ({binary}){who}", required=False)
    fix = "apt-get install virtiofsd (Debian 13, Ubuntu) or qemu-system-common (Debian 12)"
    if "uidmap" in why:
        fix = "apt-get install uidmap"
    elif "subordinate" in why:
        fix = "./scripts/setup (it gives your user subordinate ids)"
    return Check("shared directories", False, f"{why}; `up` refuses a sandbox with shares (`up --no-share` starts one without)", fix, required=False)


def _open_files() -> Check:
    """How many files a share server may hold open: one per file of the share the guest has looked up, so a guest
    past it gets 'Too many open files'. Found by confine.open_files itself, in a child (it changes the limits)."""
    name, fix = "share open files", "raise the hard open-file limit: `ulimit -Hn`, nofile in /etc/security/limits.conf, LimitNOFILE="
    code = "from vivarium.share import confine; print(confine.open_files()[0])"
    try:
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=True)
        most = int(r.stdout)
    except (OSError, subprocess.SubprocessError, ValueError) as e:
        return Check(name, False, f"not found: {e}", required=False)
    if most == resource.RLIM_INFINITY:
        return Check(name, True, "a share server may keep any number of files open", required=False)
    detail = f"a share server may keep {most:,} files open (one per file of the share the guest has looked up)"
    if most < MIN_OPEN_FILES:
        return Check(name, False, f"{detail}; past that the guest gets 'Too many open files'", fix, required=False)
    return Check(name, True, detail, required=False)


def _fence() -> Check:
    """What each sandbox's network namespace needs: a TAP device, and the right to make the namespace."""
    if not os.path.exists("/dev/net/tun"):
        return Check("network fence", False, "/dev/net/tun is missing", "load the tun module (modprobe tun)")
    if not netns.tun_open():
        return Check("network fence", False, f"{netns.TUN} is not open to you", netns.TUN_HINT)
    how = "as root" if os.geteuid() == 0 else "in a user namespace of yours"
    return Check("network fence", True, f"each sandbox gets a network namespace of its own ({how}) with a TAP device (/dev/net/tun)")


def _program(name: str, required: bool = True) -> Check:
    try:
        path = find_program(name)
    except MissingProgram:
        return Check(name, False, "not found", f"apt-get install {PACKAGES[name]}", required)
    return Check(name, True, path, required=required)


def _userns() -> Check:
    if os.geteuid() == 0:
        return Check("user namespaces", True, "not needed: running as root (image builds use root mode)", required=False)
    try:
        run(["mmdebstrap", "--unshare-helper", "true"], timeout=10)
    except Exception as e:  # noqa: BLE001 - any failure means "not usable"
        return Check("user namespaces", False, f"rootless builds unavailable: {e}",
                     "apt-get install uidmap; give your user ranges in /etc/subuid and /etc/subgid", required=True)  # fmt: skip
    return Check("user namespaces", True, "unprivileged user namespaces work (rootless builds)", required=False)


def _cgroup() -> Check:
    why = cgroup.why_none()
    if why:
        fix = "run vivarium as root, or as a user of a systemd host (cgroup v2) whose user manager runs (`loginctl enable-linger`)"
        return Check("sandbox limits", False, f"sandboxes run without a cgroup: {why}", fix, required=False)
    return Check("sandbox limits", True, f"each sandbox's host processes in a cgroup of its own ({cgroup.where()}): [limits] hold", required=False)


def _free_disk() -> Check:
    where = state.cache_dir()
    probe = where
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    detail = f"{free / (1 << 30):.1f} GiB free at {where}"
    return Check("free disk", free >= MIN_FREE, detail, "free some space or set VIVARIUM_HOME elsewhere")
