"""A minimal initrd: busybox, the kernel modules a boot needs, and an /init that mounts the root disk.

Debian's initramfs-tools initrd spends ~1 s unpacking and ~1.6 s in udev under
TCG. All it has to do for a vivarium guest is load the virtio modules the
cloud kernel lacks built in and mount /dev/vda, so this one does only that:
about 2.5 MB, uncompressed, no udev.
"""

from __future__ import annotations

import stat
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

# The cloud kernel builds these as modules; the root disk and the network need them.
MODULES = ("virtio_pci", "virtio_blk", "virtio_net", "qemu_fw_cfg")
# What the fence's nft rules need, loaded here rather than on demand: the
# kernel's request_module runs modprobe once per module, and under TCG the ten
# of them held the fence (and so sshd) back ~2 s of a ~7 s boot.
FENCE_MODULES = ("nf_tables", "nft_chain_nat", "nft_redir", "nft_ct")

INIT = """#!/bin/busybox sh
# vivarium's initrd: load the virtio modules, mount the root disk, hand over to systemd.
/bin/busybox mkdir -p /proc /sys /dev /root
/bin/busybox mount -t devtmpfs devtmpfs /dev
for m in {modules}; do
    /bin/busybox insmod "/lib/modules/$m" || echo "vivarium initrd: cannot load $m" > /dev/console
done
i=0
while [ ! -b /dev/vda ] && [ $i -lt 1000 ]; do /bin/busybox usleep 10000; i=$((i + 1)); done
if ! /bin/busybox mount -t ext4 -o rw /dev/vda /root; then
    echo "vivarium initrd: cannot mount /dev/vda; dropping to a shell" > /dev/console
    exec /bin/busybox sh
fi
/bin/busybox mount --move /dev /root/dev
exec /bin/busybox switch_root /root /sbin/init
"""


@dataclass(frozen=True)
class Entry:
    name: str
    mode: int
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)


def load_order(modules_dep: str, wanted: Sequence[str]) -> list[str]:
    """Module paths (relative to /lib/modules/VERSION) in the order insmod needs them."""
    deps: dict[str, list[str]] = {}
    by_name: dict[str, str] = {}
    for line in modules_dep.splitlines():
        if ":" not in line:
            continue
        mod, _, rest = line.partition(":")
        deps[mod] = rest.split()
        by_name[Path(mod).name.split(".ko")[0].replace("-", "_")] = mod
    order: list[str] = []

    def visit(mod: str) -> None:
        if mod in order:
            return
        for dep in reversed(deps.get(mod, [])):  # modules.dep lists the deepest dependency last
            visit(dep)
        order.append(mod)

    for name in wanted:
        if name not in by_name:
            raise KeyError(name)
        visit(by_name[name])
    return order


def cpio_newc(entries: Iterable[Entry]) -> bytes:
    """An uncompressed newc cpio archive, as the kernel unpacks it."""
    out = bytearray()
    for ino, e in enumerate([*entries, Entry("TRAILER!!!", 0)], start=1):
        name = e.name.encode() + b"\0"
        fields = (ino, e.mode, 0, 0, 1, 0, len(e.data), 0, 0, e.rdev[0], e.rdev[1], len(name), 0)
        out += b"070701" + b"".join(f"{f:08x}".encode() for f in fields) + name
        out += b"\0" * (-len(out) % 4)
        out += e.data
        out += b"\0" * (-len(out) % 4)
    return bytes(out)


def make_initrd(rootdir: Path, version: str) -> bytes:
    """Build the initrd from files in an image tree (busybox-static and the kernel's modules)."""
    moddir = rootdir / "lib/modules" / version
    order = load_order((moddir / "modules.dep").read_text(), (*MODULES, *FENCE_MODULES))
    d = stat.S_IFDIR | 0o755
    entries = [Entry(n, d) for n in ("bin", "dev", "proc", "sys", "root", "lib", "lib/modules")]
    entries.append(Entry("dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1)))
    entries.append(Entry("bin/busybox", stat.S_IFREG | 0o755, (rootdir / "bin/busybox").read_bytes()))
    flat = [Path(m).name for m in order]
    for rel, name in zip(order, flat, strict=True):
        entries.append(Entry(f"lib/modules/{name}", stat.S_IFREG | 0o644, (moddir / rel).read_bytes()))
    init = INIT.format(modules=" ".join(flat)).encode()
    entries.append(Entry("init", stat.S_IFREG | 0o755, init))
    return cpio_newc(entries)
