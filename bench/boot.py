"""Boot benchmarks, each printed against a baseline from the same run.

    .venv/bin/python -m bench.boot

(a) `up` of a new sandbox from a cached image to SSH-ready, against a boot of
    the same image with QEMU's defaults (default machine and devices, no
    -nodefaults), Debian's initrd and an untuned kernel command line.
    Goal: ratio <= 0.5.
(b) `reset` and creating an instance's disks: goal under 50 ms, the same on a
    big and a tiny base image.
(c) QEMU's resident memory beyond the guest's RAM.
"""

from __future__ import annotations

import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from bench.common import env, median_of, report, rss_beyond_guest_ram, timed
from vivarium import Sandbox, ssh
from vivarium import config as cfg
from vivarium.image.build import build_image, find_image
from vivarium.image.recipe import Recipe
from vivarium.ports import free_port
from vivarium.run import run
from vivarium.vm import accel

ROUNDS = 2
MEMORY = "2G"


def untuned_boot(box: Sandbox, image_kernel: Path, image_initrd: Path) -> float:
    """QEMU defaults, the same image and keys: start to a successful `ssh true`."""
    port = free_port()
    fw = box.dir.fwcfg
    acc = accel.choose(image_kernel)
    argv = [
        "qemu-system-x86_64", *acc.qemu_args(), "-m", MEMORY, "-smp", "2", "-display", "none",
        "-kernel", str(image_kernel), "-initrd", str(image_initrd), "-append", "root=/dev/vda rw console=ttyS0",
        "-drive", f"file={box.dir.disk},if=virtio,format=qcow2", "-drive", f"file={box.dir.swap},if=virtio,format=qcow2",
        "-netdev", f"user,id=n0,hostfwd=tcp:127.0.0.1:{port}-:22", "-device", "virtio-net-pci,netdev=n0",
        "-serial", f"file:{box.dir.path / 'untuned-serial.log'}",
        *(x for name in ("user", "hostname", "authorized_key") for x in ("-fw_cfg", f"name=opt/vivarium/{name},file={fw / name}")),
        "-fw_cfg", f"name=opt/vivarium/ssh_host_key,file={box.dir.host_key}",
    ]  # fmt: skip
    target = box.target_at(port)
    started = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = started + 900
        while time.perf_counter() < deadline:
            if ssh.banner("127.0.0.1", port) and ssh.check(target):
                return time.perf_counter() - started
            time.sleep(0.25)
        raise RuntimeError("the untuned boot never answered SSH")
    finally:
        proc.kill()
        proc.wait()


def overlay_times(base: Path, tmp: Path) -> tuple[float, float]:
    """Median ms to create a 320G overlay on `base`, and on a 64 MiB base."""
    tiny = tmp / "tiny.qcow2"
    run(["qemu-img", "create", "-q", "-f", "qcow2", tiny, "64M"])
    times = []
    for b in (base, tiny):
        argv = ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(b), str(tmp / "overlay.qcow2"), "320G"]
        times.append(median_of(10, lambda argv=argv: run(argv)) * 1000)  # type: ignore[misc]
    return times[0], times[1]


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="vivarium-bench-") as tmp, env(XDG_STATE_HOME=tmp):
        conf = cfg.load(None, {"vm.memory": MEMORY, "vm.cpus": "2", "forward": [{"host": free_port(), "guest": 22}]}, cwd=Path(tmp))
        build_image(Recipe.from_config(conf))  # outside the timing: this measures boots of a cached image
        tuned: list[float] = []
        untuned: list[float] = []
        overhead = guest_rss = 0
        for i in range(ROUNDS):
            box = Sandbox(f"bench{i}", conf)
            tuned.append(timed(lambda box=box: box.up()))  # type: ignore[misc]
            pid = box.pid()
            assert pid is not None
            overhead, guest_rss = rss_beyond_guest_ram(pid, conf.vm.memory)
            key = box.record().instance.image
            box.stop()
            image = find_image(key)
            assert image is not None
            box.reset()  # a fresh disk: the untuned boot also starts from first boot
            # Untuned: Debian's own initrd (initramfs-tools), not vivarium's minimal one.
            untuned.append(untuned_boot(box, image.kernel, image.path / "initrd.distro.img"))
            if i == ROUNDS - 1:
                reset_ms = median_of(10, box.reset) * 1000
                big, tiny = overlay_times(image.disk, Path(tmp))
                base_size = image.disk.stat().st_size
            box.destroy()
        t, u = statistics.median(tuned), statistics.median(untuned)
        report(
            f"(a) up to SSH-ready, {accel.choose(None).name}, {MEMORY}, 2 vCPUs, median of {ROUNDS}",
            [
                ("untuned (QEMU defaults)", f"{u:.1f} s  {[round(x, 1) for x in untuned]}"),
                ("vivarium up (new sandbox)", f"{t:.1f} s  {[round(x, 1) for x in tuned]}"),
                ("ratio", f"{t / u:.2f}x  (goal <= 0.5x)"),
            ],
        )
        report(
            "(b) reset and new-instance disks, median of 10",
            [
                ("reset (stopped sandbox)", f"{reset_ms:.1f} ms"),
                (f"overlay on the {base_size / (1 << 30):.1f} GiB base", f"{big:.1f} ms"),
                ("overlay on a 64 MiB base", f"{tiny:.1f} ms"),
                ("ratio big/tiny", f"{big / tiny:.2f}x"),
            ],
        )
        report(
            "(c) QEMU host memory beyond guest RAM, after boot",
            [
                ("beyond guest RAM", f"{overhead / (1 << 20):.0f} MiB"),
                ("guest RAM resident", f"{guest_rss / (1 << 20):.0f} MiB of {MEMORY}"),
            ],
        )


if __name__ == "__main__":
    main()
