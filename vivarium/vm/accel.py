"""Which accelerator to boot with: probe, don't assume.

/dev/kvm existing is no proof that KVM works: on a nested (PVM) hypervisor it
is there, yet QEMU aborts setting MSRs or a stock kernel hangs. The probe boots
a real kernel under KVM with no root disk; a kernel that gets as far as
panicking about its root filesystem proves guests run. Anything else means TCG.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from vivarium import state
from vivarium.errors import UsageError
from vivarium.run import find_program, spawn

log = logging.getLogger("vivarium.accel")

PROBE_TIMEOUT = 15.0


@dataclass(frozen=True)
class Accel:
    name: str  # "kvm" | "tcg"
    reason: str
    detail: str = ""  # what the probe saw, for `doctor`

    def qemu_args(self) -> list[str]:
        if self.name == "kvm":
            return ["-accel", "kvm", "-cpu", "host"]
        return ["-accel", "tcg,thread=multi,tb-size=256", "-cpu", "max"]


def host_kernel() -> Path | None:
    p = Path(f"/boot/vmlinuz-{platform.release()}")
    return p if os.access(p, os.R_OK) else None


def choose(kernel: Path | None, *, use_cache: bool = True) -> Accel:
    """The accelerator to use: VIVARIUM_ACCEL, else a cached or fresh probe."""
    forced = os.environ.get("VIVARIUM_ACCEL", "")
    if forced:
        if forced not in ("kvm", "tcg"):
            raise UsageError(f"VIVARIUM_ACCEL={forced!r} is not kvm or tcg")
        return Accel(forced, "set by VIVARIUM_ACCEL")
    if not os.path.exists("/dev/kvm"):
        return Accel("tcg", "no /dev/kvm (software emulation, slow)")
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return Accel("tcg", "/dev/kvm is not accessible to this user (add yourself to group kvm)")
    kernel = kernel or host_kernel()
    if kernel is None:
        return Accel("tcg", "/dev/kvm present but no kernel to probe it with yet")
    cache = state.cache_dir() / "accel.json"
    ident = _probe_ident(kernel)
    if use_cache:
        try:
            saved = json.loads(cache.read_text())
            if saved.get("ident") == ident:
                return Accel(saved["name"], saved["reason"], saved.get("detail", ""))
        except (OSError, ValueError, KeyError):
            pass
    result = probe_kvm(kernel)
    cache.parent.mkdir(parents=True, exist_ok=True)
    state.write_atomic(cache, json.dumps({"ident": ident, **asdict(result)}) + "\n")
    return result


def _probe_ident(kernel: Path) -> str:
    st = kernel.stat()
    qemu = find_program("qemu-system-x86_64")
    return f"{platform.release()}|{qemu}:{os.stat(qemu).st_mtime_ns}|{kernel}:{st.st_size}:{st.st_mtime_ns}"


def probe_kvm(kernel: Path, timeout: float = PROBE_TIMEOUT) -> Accel:
    """Boot `kernel` under KVM with nothing to mount; panic means it works."""
    argv = [
        "qemu-system-x86_64", "-accel", "kvm", "-cpu", "host", "-m", "256", "-smp", "1",
        "-nodefaults", "-display", "none", "-no-reboot", "-serial", "stdio",
        "-kernel", str(kernel), "-append", "console=ttyS0 panic=-1 root=/dev/vivarium-probe",
    ]  # fmt: skip
    started = time.monotonic()
    with tempfile.TemporaryFile() as out:
        proc = spawn(argv, stdout=out, stderr=subprocess.STDOUT)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            return Accel("tcg", f"KVM probe: a guest kernel hung under /dev/kvm for {timeout:.0f}s; using TCG (slow)")
        out.seek(0)
        text = out.read().decode(errors="replace")
    took = time.monotonic() - started
    if "Kernel panic" in text or "VFS: Unable to mount root" in text:
        return Accel("kvm", f"KVM probe: a guest kernel booted in {took:.1f}s")
    last = next((ln for ln in reversed(text.splitlines()) if ln.strip()), f"exit code {proc.returncode}")
    log.debug("KVM probe output:\n%s", text)
    return Accel("tcg", "KVM probe: QEMU could not run a guest under /dev/kvm; using TCG (slow)", _short(last, 100))


def _short(line: str, width: int = 60) -> str:
    line = line.strip().removeprefix("qemu-system-x86_64: ")
    return line if len(line) <= width else line[: width - 1] + "…"
