from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from vivarium import ssh
from vivarium.errors import UsageError, VMError
from vivarium.share import userns
from vivarium.vm import accel, machine
from vivarium.vm.qemu import FENCE_MAC, SECCOMP, SECCOMP_RUNAS, MachineSpec, PortForward, qemu_argv


def spec(tmp_path: Path, **kw: object) -> MachineSpec:
    base = dict(
        name="demo", kernel=tmp_path / "vmlinuz", initrd=tmp_path / "initrd.img",
        disk=tmp_path / "disk.qcow2", swap=tmp_path / "swap.qcow2", memory_mib=2048, cpus=2,
        accel_args=("-accel", "tcg", "-cpu", "max"),
        forwards=(PortForward(2222, 22), PortForward(8080, 80, "0.0.0.0")),
        qmp=tmp_path / "qmp.sock", serial=tmp_path / "serial.log", pidfile=tmp_path / "qemu.pid",
        log=tmp_path / "qemu.log",
        fw_cfg=(("user", tmp_path / "fw/user"),),
    )  # fmt: skip
    base.update(kw)
    return MachineSpec(**base)  # type: ignore[arg-type]


def opt(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag]


def test_qemu_argv(tmp_path: Path) -> None:
    argv = qemu_argv(spec(tmp_path))
    assert argv[0] == "qemu-system-x86_64"
    assert "-nodefaults" in argv and "-daemonize" not in argv  # vm/spawn.py: a daemonizing QEMU could have no seccomp filter
    assert "-sandbox" not in argv and opt(qemu_argv(spec(tmp_path, seccomp=True)), "-sandbox") == [SECCOMP]
    assert opt(argv, "-m") == ["2048M"] and opt(argv, "-smp") == ["2"]
    assert opt(argv, "-netdev") == ["user,id=net0,hostfwd=tcp:127.0.0.1:2222-:22,hostfwd=tcp:0.0.0.0:8080-:80"]
    assert f"name=opt/vivarium/user,file={tmp_path}/fw/user" in opt(argv, "-fw_cfg")
    assert any(d.startswith("virtio-blk-pci") for d in opt(argv, "-device"))
    assert "root=/dev/vda" in opt(argv, "-append")[0]
    assert opt(argv, "-pidfile") == [str(tmp_path / "qemu.pid")]


def test_qemu_started_by_root_drops_to_the_sandboxs_uid(tmp_path: Path) -> None:
    u = userns.sandbox_uid(str(tmp_path))
    assert userns.QEMU_RANGE[0] <= u < sum(userns.QEMU_RANGE) and u != userns.sandbox_uid(str(tmp_path / "other"))
    old = qemu_argv(spec(tmp_path, seccomp=True, runas=(u, u)))
    assert opt(old, "-runas") == [f"{u}:{u}"] and opt(old, "-sandbox") == [SECCOMP_RUNAS] and "-run-with" not in old
    new = qemu_argv(spec(tmp_path, seccomp=True, runas=(u, u), run_with=True, disk_fds=((7, 8), (9, 10))))
    assert opt(new, "-run-with") == [f"user={u}:{u}"] and "-runas" not in new
    assert opt(new, "-add-fd") == ["fd=7,set=1", "fd=8,set=1", "fd=9,set=2", "fd=10,set=2"]  # opened again by QEMU, no path needed
    assert [d.split(",")[2] for d in opt(new, "-drive")] == ["file=/dev/fdset/1", "file=/dev/fdset/2"]


@pytest.mark.skipif(os.geteuid() != 0, reason="dropping root needs root (the test suite runs as root)")
def test_this_hosts_qemu_drops_root_under_its_filter(tmp_path: Path) -> None:
    """The host's own QEMU, given what launch gives it: it runs on as the uid, no capability left; with the filter's
    elevateprivileges=deny it dies of SIGSYS at the change (why SECCOMP_RUNAS allows it)."""
    u = userns.sandbox_uid(str(tmp_path))
    base = ["qemu-system-x86_64", "-machine", "none", "-nodefaults", "-display", "none", "-S", "-runas", f"{u}:{u}", "-sandbox"]
    with subprocess.Popen([*base, SECCOMP_RUNAS, "-qmp", f"unix:{tmp_path}/qmp,server=on,wait=off"]) as qemu:
        try:
            for _ in range(100):
                status = dict(ln.split(":\t", 1) for ln in Path(f"/proc/{qemu.pid}/status").read_text().splitlines() if ":\t" in ln)
                if (tmp_path / "qmp").exists() and status["Uid"].split()[0] != "0":
                    break
                time.sleep(0.05)
            assert status["Uid"].split() == [str(u)] * 4 and status["Gid"].split() == [str(u)] * 4, status
            assert int(status["CapEff"], 16) == 0 and status["Groups"].strip() in ("", str(u)) and qemu.poll() is None
        finally:
            qemu.kill()
    killed = subprocess.run([*base, SECCOMP], timeout=30)
    assert killed.returncode == -signal.SIGSYS


def test_fenced_network_is_restricted_with_one_way_out(tmp_path: Path) -> None:
    argv = qemu_argv(spec(tmp_path, fence_tap=7))
    assert opt(argv, "-netdev") == [
        # user networking only brings the forwarded ports in; the way out is the TAP in the sandbox's namespace
        "user,id=net0,ipv6=off,restrict=on,hostfwd=tcp:127.0.0.1:2222-:22,hostfwd=tcp:0.0.0.0:8080-:80",
        "tap,id=net1,fd=7,vhost=off",
    ]
    assert f"virtio-net-pci,netdev=net1,mac={FENCE_MAC}" in opt(argv, "-device")
    plain = qemu_argv(spec(tmp_path))
    assert "restrict" not in opt(plain, "-netdev")[0] and len(opt(plain, "-netdev")) == 1


def test_qemu_argv_escapes_commas(tmp_path: Path) -> None:
    argv = qemu_argv(spec(tmp_path, disk=Path("/a,b/disk.qcow2")))
    assert "file=/a,,b/disk.qcow2" in opt(argv, "-drive")[0]


def test_accel_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VIVARIUM_ACCEL", "tcg")
    a = accel.choose(None)
    assert a.name == "tcg" and "VIVARIUM_ACCEL" in a.reason
    assert a.qemu_args()[:2] == ["-accel", "tcg,thread=multi,tb-size=256"]
    monkeypatch.setenv("VIVARIUM_ACCEL", "hvf")
    with pytest.raises(UsageError):
        accel.choose(None)


def test_ssh_argv_keeps_word_boundaries(tmp_path: Path) -> None:
    t = ssh.Target("vivarium-x", "agent", 2222, tmp_path / "key", tmp_path / "known_hosts")
    argv = t.argv(["sh", "-c", "echo 'a b'; exit 3"], tty=False)
    assert argv[-1] == "sh -c 'echo '\"'\"'a b'\"'\"'; exit 3'"
    assert "StrictHostKeyChecking=yes" in argv and "-T" in argv and argv[-3:-1] == ["--", "agent@127.0.0.1"]
    # no command: nothing after the destination (a bare "--" there would be run as the command)
    assert t.argv([], tty=True)[-2:] == ["--", "agent@127.0.0.1"]
    block = t.config_block()
    assert block.startswith("Host vivarium-x\n") and "Port 2222" in block
    assert "ControlMaster=auto" not in argv  # no control path: a connection per command


def test_ssh_shares_one_connection_where_the_socket_path_fits(tmp_path: Path) -> None:
    t = ssh.Target("vivarium-x", "agent", 2222, tmp_path / "key", tmp_path / "known_hosts", control_path=tmp_path / "ssh-2222.sock")
    argv = t.argv(["true"])
    assert "ControlMaster=auto" in argv and f"ControlPath={tmp_path}/ssh-2222.sock" in argv
    assert "ControlMaster" not in t.config_block()  # the user's own ssh is left as it is
    deep = ssh.Target("vivarium-x", "agent", 2222, tmp_path / "key", tmp_path / "kh", control_path=Path("/" + "d" * 120) / "s.sock")
    assert "ControlMaster=auto" not in deep.argv(["true"])  # too long for a unix socket: connect afresh
    # 92 bytes fit a sun_path, but not with the 17 that ssh adds while it sets the socket up: it then never
    # connected ("ControlSocket ... too long"), and `up` waited for SSH for ever (found by test_rootless.py)
    near = Path("/var/tmp/vivarium-rootless-uyxtxmsx/home/viv/state/instances/tpl-31174a151b1c/ssh-33601.sock")
    assert len(str(near)) == 92
    assert "ControlMaster=auto" not in ssh.Target("v", "agent", 2222, tmp_path / "k", tmp_path / "kh", control_path=near).argv(["true"])


def test_qemu_argv_with_shares(tmp_path: Path) -> None:
    argv = qemu_argv(spec(tmp_path, shares=(("share0", tmp_path / "s0.sock"),)))
    assert opt(argv, "-object")[0].startswith("memory-backend-memfd,id=mem,size=2048M,share=on")
    assert opt(argv, "-numa") == ["node,memdev=mem"]
    assert f"socket,id=fs0,path={tmp_path}/s0.sock" in opt(argv, "-chardev")
    assert "vhost-user-fs-pci,id=fsdev0,bus=hp0,chardev=fs0,tag=share0" in opt(argv, "-device")  # where a copy hot-plugs it
    # the same RAM and spare slots without shares: a restored template can have them plugged in
    plain = qemu_argv(spec(tmp_path))
    assert any("memory-backend-memfd" in a for a in plain)
    assert [d for d in opt(plain, "-device") if d.startswith("pcie-root-port")] == [
        f"pcie-root-port,id=hp{i},chassis={i + 1},slot={i + 1}" for i in range(4)
    ]
    assert "vmgenid,guid=auto" in opt(plain, "-device")


def test_virtiofsd_argv_goes_through_confine_with_its_limits(tmp_path: Path) -> None:
    from vivarium.share.virtiofs import MODCAPS, ShareSpec, virtiofsd_argv

    ids = (((0, 100000, 1000), (1000, 1001, 1)), ((0, 100000, 1000), (1000, 1001, 1)))
    rw = ShareSpec("share0", tmp_path / "src", tmp_path / "src", "rw", tmp_path / "s.sock", (".git/config", ".envrc"))
    argv = virtiofsd_argv("/usr/lib/qemu/virtiofsd", rw, 7, ids)
    at = argv.index("--")
    assert argv[1:at] == ["-m", "vivarium.share.confine", "--root", str(tmp_path / "src"), "--protect", ".git/config", "--protect", ".envrc",
                          "--uid-map", "0:100000:1000,1000:1001:1", "--gid-map", "0:100000:1000,1000:1001:1"]  # fmt: skip
    assert argv[at + 1 :][:2] == ["/usr/lib/qemu/virtiofsd", "--fd=7"] and f"source={tmp_path / 'src'}" in argv and f"modcaps={MODCAPS}" in argv
    ro = virtiofsd_argv("/usr/lib/qemu/virtiofsd", ShareSpec("s", tmp_path / "src", Path("/mnt"), "ro", tmp_path / "s.sock", (".envrc",)), 7, ids)
    assert ro[3 : ro.index("--uid-map")] == ["--root", str(tmp_path / "src"), "--ro"]  # all of it read-only: nothing to protect one by one
    rust = virtiofsd_argv("/usr/libexec/virtiofsd", rw, 7, ids)
    assert f"--shared-dir={tmp_path / 'src'}" in rust and f"--modcaps={MODCAPS}" in rust and "--fd=7" in rust


def test_qemu_argv_control_channel_and_ram_from_a_descriptor(tmp_path: Path) -> None:
    plain = qemu_argv(spec(tmp_path))
    assert opt(plain, "-object")[0] == "memory-backend-memfd,id=mem,size=2048M,share=on"
    assert not any(c.startswith("pipe,") for c in opt(plain, "-chardev"))
    argv = qemu_argv(spec(tmp_path, control=tmp_path / "control", ram_fd=7))
    # the saved RAM comes in as the backend's file, shared (virtiofsd maps it too)
    assert opt(argv, "-object")[0] == "memory-backend-file,id=mem,size=2048M,share=on,mem-path=/proc/self/fd/7"
    assert f"pipe,id=control,path={tmp_path}/control" in opt(argv, "-chardev")
    devices = opt(argv, "-device")
    assert "virtio-serial-pci,id=vser0" in devices
    assert "virtserialport,bus=vser0.0,chardev=control,name=org.vivarium.control" in devices


def test_qmp_keeps_qemus_reason_and_a_quit_is_not_an_error(tmp_path: Path) -> None:
    """Against a real QEMU with no machine at all: a refused command says QEMU's own words; `quit` returns."""
    sock, pidfile = tmp_path / "qmp.sock", tmp_path / "qemu.pid"
    subprocess.run(["qemu-system-x86_64", "-machine", "none", "-nodefaults", "-display", "none",
                    "-qmp", f"unix:{sock},server=on,wait=off", "-pidfile", str(pidfile), "-daemonize"], check=True)  # fmt: skip
    pid = int(pidfile.read_text())
    try:
        assert machine.qmp(sock, "query-status")["status"] == "running"
        with pytest.raises(VMError, match="QEMU refused no-such-command: The command no-such-command has not been found"):
            machine.qmp(sock, "no-such-command")
        assert machine.qmp(sock, "quit") == {}
        with pytest.raises(VMError, match="cannot talk to QEMU"):
            machine.qmp(sock, "query-status", timeout=2)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def test_the_host_qemu_is_probed_once_and_named_by_version_and_machine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from vivarium.vm import caps

    monkeypatch.setenv("VIVARIUM_HOME", str(tmp_path))
    q = caps.probe()
    assert re.fullmatch(r"\d+\.\d+\.\d+", q.version) and re.fullmatch(r"pc-q35-\d+\.\d+", q.machine)
    assert q.machine.removeprefix("pc-q35-") == ".".join(q.version.split(".")[:2])  # this QEMU's own newest q35
    assert json.loads((tmp_path / "cache" / "qemu.json").read_text())["machine"] == q.machine
    assert caps.probe() == q  # from the cache now
    assert q.seccomp  # Debian's QEMU (12 and 13) is built with its seccomp filter
    assert caps.version_of("QEMU emulator version 10.0.3 (Debian 1:10.0.3+ds-1)\nCopyright") == "10.0.3"
    assert caps.machine_of("pc-q35-10.0   Standard PC\nq35                  Standard PC (Q35 + ICH9, 2009) (alias of pc-q35-10.0)\n") == "pc-q35-10.0"
    with pytest.raises(VMError, match="no q35 machine"):
        caps.machine_of("pc    Standard PC (i440FX + PIIX, 1996)\n")


def test_the_machine_type_is_pinned_in_the_argv(tmp_path: Path) -> None:
    argv = qemu_argv(spec(tmp_path, machine="pc-q35-7.2"))
    assert opt(argv, "-machine") == ["pc-q35-7.2,vmport=off,hpet=off"]


def test_the_share_servers_migration_is_probed_from_its_help(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from vivarium.share import virtiofs
    from vivarium.vm import caps

    rust = tmp_path / "virtiofsd"
    for help_text, migrates in (("--migration-mode <MIGRATION_MODE>", True), ("--shared-dir <DIR>", False)):
        rust.write_text(f"#!/bin/sh\necho '{help_text}'\n")
        rust.chmod(0o755)
        monkeypatch.setattr(virtiofs, "find_virtiofsd", lambda: str(rust))
        virtiofs.migrates.cache_clear()
        assert virtiofs.migrates() is migrates
    monkeypatch.setattr(virtiofs, "find_virtiofsd", lambda: "/usr/lib/qemu/virtiofsd")  # QEMU's own C daemon never does
    virtiofs.migrates.cache_clear()
    assert virtiofs.migrates() is False
    virtiofs.migrates.cache_clear()
    assert caps.Qemu("8.2.0", "pc-q35-8.2").at_least(8, 2) and caps.Qemu("10.0.13", "pc-q35-10.0").at_least(8, 2)
    assert not caps.Qemu("7.2.22", "pc-q35-7.2").at_least(8, 2)
