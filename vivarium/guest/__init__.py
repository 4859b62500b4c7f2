"""Files that ship into the guest image.

`early/` is copied in before the kernel and its initrd are installed (the
initramfs settings), `rootfs/` after all packages, then customize.sh runs in
the image. boot-setup runs at every boot and applies the per-instance
settings QEMU hands over in fw_cfg.
"""

from pathlib import Path

GUEST_DIR = Path(__file__).parent
EARLY = GUEST_DIR / "early"
ROOTFS = GUEST_DIR / "rootfs"
CUSTOMIZE = GUEST_DIR / "customize.sh"
FINAL_HOSTS = GUEST_DIR / "final" / "hosts"
FINAL_RESOLV = GUEST_DIR / "final" / "resolv.conf"
