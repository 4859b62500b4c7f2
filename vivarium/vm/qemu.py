"""The QEMU command line: a pure function of typed values.

Nothing here touches the disk or reads the config; tests look at the list.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

# The guest's side of QEMU user networking (fixed by slirp's defaults).
GUEST_IP = "10.0.2.15"
# The MAC of a fenced guest's outbound NIC (the guest's setup finds it by this).
FENCE_MAC = "52:54:00:76:69:76"
HOTPLUG_SLOTS = 4
# The virtio-serial port of the guest's control agent (guest/rootfs/.../control).
CONTROL_PORT = "org.vivarium.control"
# Bump when the device set changes: a saved state only loads into the same devices.
LAYOUT = 3

KERNEL_CMDLINE = (
    "root=/dev/vda rw console=ttyS0 quiet loglevel=3 net.ifnames=0 "
    "systemd.show_status=false rd.udev.log_level=3 "
    # The guest is disposable and untrusted as a whole: the host fences it, so
    # side-channel mitigations inside it only cost boot and run time.
    "mitigations=off "
    # Likewise AppArmor: it confines processes from each other inside a guest
    # whose agent is root anyway; loading its profiles costs seconds of boot.
    # Docker runs without it when the kernel has it off.
    "apparmor=0 "
    "tsc=reliable no_timer_check"
)


@dataclass(frozen=True)
class PortForward:
    host: int
    guest: int
    bind: str = "127.0.0.1"

    def hostfwd(self) -> str:
        return f"tcp:{self.bind}:{self.host}-:{self.guest}"


@dataclass(frozen=True)
class MachineSpec:
    """Everything QEMU needs to boot one instance."""

    name: str
    kernel: Path
    initrd: Path
    disk: Path
    swap: Path
    memory_mib: int
    cpus: int
    accel_args: tuple[str, ...]
    forwards: tuple[PortForward, ...]
    qmp: Path
    serial: Path
    pidfile: Path
    # QEMU's stdout and stderr (vm/spawn.py)
    log: Path
    fw_cfg: tuple[tuple[str, Path], ...] = ()  # (name under opt/vivarium/, file)
    cmdline: str = KERNEL_CMDLINE
    # The TAP device (an inherited file descriptor) in the sandbox's own network
    # namespace, where the egress gateway takes every connection (net/netns.py).
    # With it, the guest's outbound NIC is that TAP and user networking runs
    # restrict=on: nothing leaves through slirp, only the hostfwd ports come in.
    # Nothing inside the guest can undo it. None: plain user networking (only
    # for proving in tests that the fence is what stops an attack).
    fence_tap: int | None = None
    shares: tuple[tuple[str, Path], ...] = ()  # (tag, virtiofsd socket)
    # The host's end of the control channel: FIFOs CONTROL.in and CONTROL.out
    # (QEMU's pipe chardev: always open, so the guest's agent blocks in read()
    # until a request comes, instead of polling for a host that connects).
    control: Path | None = None
    # Guest RAM from this (inherited) memfd, as a memory-backend-file (vm/memory.py says why a file):
    # empty for a boot, a template's or snapshot's memory copied in for a restore. None: a memfd of QEMU's own.
    ram_fd: int | None = None
    # The console into this (inherited) pipe, whose reader keeps it rotated (vm/console.py). None: straight
    # into `serial` (a file that grows for as long as the guest prints: builds and tests only).
    serial_fd: int | None = None
    extra: tuple[str, ...] = field(default=())
    # The versioned machine type (what q35 stands for in this QEMU: caps.py), so that a saved state names it.
    machine: str = "q35"
    # Under QEMU's seccomp filter (SECCOMP), where this QEMU has one (caps.py).
    seccomp: bool = False
    # Started by root: the uid and gid QEMU drops to before the guest runs (after it opened its files and
    # devices), with `-run-with user=` (QEMU 9.1 and later) or else `-runas`.
    runas: tuple[int, int] | None = None
    run_with: bool = False
    # The disk and the swap as open files (read-write, read-only) in fd sets 1 and 2, rather than by path: QEMU
    # opens an image again when an incoming migration (a restore) hands it over, after it dropped to `runas`.
    # Their image locks are off: the set keeps both files open for as long as QEMU runs, so the locks one took
    # would stand against the other for ever (and vivarium's instance lock already keeps a second QEMU off them).
    disk_fds: tuple[tuple[int, int], tuple[int, int]] | None = None


# QEMU's seccomp filter: no obsolete system calls, no set*uid/set*gid, no fork or exec (nothing of QEMU's
# needs one: the fence is a namespace, saved states go through handed-over files), no scheduler or CPU
# affinity changes. QEMU that emulates a hostile guest's code (TCG) and parses its device traffic then
# cannot start a program, even once compromised.
SECCOMP = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
# With `runas`, QEMU changes its ids after the filter is in place, which elevateprivileges=deny kills (SIGSYS, on
# 7.2): allowed then. Once its ids are all the sandbox's and it has no capability, there is nothing to elevate to.
SECCOMP_RUNAS = SECCOMP.replace("elevateprivileges=deny", "elevateprivileges=allow")


def qemu_argv(spec: MachineSpec) -> list[str]:
    """The full qemu-system-x86_64 argv for `spec`."""
    net = ["user", "id=net0"]
    if spec.fence_tap is not None:
        net += ["ipv6=off", "restrict=on"]  # in: the forwarded ports; out: nothing
    netdev = ",".join([*net, *(f"hostfwd={f.hostfwd()}" for f in spec.forwards)])
    argv = [
        "qemu-system-x86_64",
        "-name", f"vivarium-{spec.name},process=vivarium-{spec.name}",
        "-machine", f"{spec.machine},vmport=off,hpet=off",
        *spec.accel_args,
        "-m", f"{spec.memory_mib}M",
        # Guest RAM a vhost-user daemon (virtiofsd) can map, always: a machine
        # restored from a template gets its shares plugged in after the fact.
        "-object", _memory(spec), "-numa", "node,memdev=mem",
        "-smp", str(spec.cpus),
        "-nodefaults", "-no-user-config", "-display", "none",
        "-kernel", str(spec.kernel),
        "-initrd", str(spec.initrd),
        "-append", spec.cmdline,
        *_fdsets(spec),
        "-drive", f"if=none,id=root,file={'/dev/fdset/1,file.locking=off' if spec.disk_fds else _escape(spec.disk)},format=qcow2,discard=unmap",
        "-device", "virtio-blk-pci,drive=root",
        "-drive", f"if=none,id=swap,file={'/dev/fdset/2,file.locking=off' if spec.disk_fds else _escape(spec.swap)},format=qcow2,discard=unmap",
        "-device", "virtio-blk-pci,drive=swap",
        "-netdev", netdev,
        "-device", "virtio-net-pci,netdev=net0",
        *(("-netdev", f"tap,id=net1,fd={spec.fence_tap},vhost=off",
           "-device", f"virtio-net-pci,netdev=net1,mac={FENCE_MAC}") if spec.fence_tap is not None else ()),
        "-object", "rng-random,id=rng0,filename=/dev/urandom",
        "-device", "virtio-rng-pci,rng=rng0",
        # A new generation id at every start, restores included: a guest kernel with the
        # vmgenid driver reseeds its RNG. (Debian's cloud kernel has none; the
        # control agent reseeds it with the host's randomness.)
        "-device", "vmgenid,guid=auto",
        # Empty PCIe slots for devices plugged in at run time (shares of a restored template).
        *(x for i in range(HOTPLUG_SLOTS) for x in ("-device", f"pcie-root-port,id=hp{i},chassis={i + 1},slot={i + 1}")),
        "-chardev", f"file,id=serial0,path={f'/dev/fd/{spec.serial_fd}' if spec.serial_fd is not None else _escape(spec.serial)}",
        "-serial", "chardev:serial0",
        "-qmp", f"unix:{_escape(spec.qmp)},server=on,wait=off",
        "-pidfile", str(spec.pidfile),
    ]  # fmt: skip
    if spec.seccomp:
        argv += ["-sandbox", SECCOMP if spec.runas is None else SECCOMP_RUNAS]
    if spec.runas is not None:
        user = "{}:{}".format(*spec.runas)
        argv += ["-run-with", f"user={user}"] if spec.run_with else ["-runas", user]
    if spec.control is not None:
        argv += [
            "-chardev", f"pipe,id=control,path={_escape(spec.control)}",
            "-device", "virtio-serial-pci,id=vser0",
            "-device", f"virtserialport,bus=vser0.0,chardev=control,name={CONTROL_PORT}",
        ]  # fmt: skip
    for i, (tag, sock) in enumerate(spec.shares):
        # In the slot a template's copy has it hot-plugged into (launch._become), with the same id: one
        # device layout either way, so that a snapshot with shares loads whichever way the sandbox started.
        slot = f"id=fsdev{i},bus=hp{i}," if i < HOTPLUG_SLOTS else ""
        argv += ["-chardev", f"socket,id=fs{i},path={_escape(sock)}", "-device", f"vhost-user-fs-pci,{slot}chardev=fs{i},tag={tag}"]
    for name, path in spec.fw_cfg:
        argv += ["-fw_cfg", f"name=opt/vivarium/{name},file={_escape(path)}"]
    argv += spec.extra
    return argv


def _fdsets(spec: MachineSpec) -> list[str]:
    if spec.disk_fds is None:
        return []
    return [x for i, fds in enumerate(spec.disk_fds, 1) for fd in fds for x in ("-add-fd", f"fd={fd},set={i}")]


def _memory(spec: MachineSpec) -> str:
    size = f"size={spec.memory_mib}M,share=on"
    if spec.ram_fd is not None:
        return f"memory-backend-file,id=mem,{size},mem-path=/proc/self/fd/{spec.ram_fd}"
    return f"memory-backend-memfd,id=mem,{size}"


def _escape(path: Path | str) -> str:
    """QEMU option values escape a comma by doubling it."""
    return str(path).replace(",", ",,")


def forwards_of(items: Sequence[tuple[int, int, str]]) -> tuple[PortForward, ...]:
    return tuple(PortForward(h, g, b) for h, g, b in items)
