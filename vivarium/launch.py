"""Launching a sandbox's QEMU and everything it needs: cold boot, restore of a saved state, and a copy
of a template, over one launch.

Every helper a launch starts (the network namespace, the gateway, the share servers, QEMU) is
registered on one ExitStack as it starts; a failure anywhere unwinds all of it, newest first, and
marks the instance stopped. Only once the guest answers SSH is the stack let go (`pop_all`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import secrets
import shutil
import socket
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from vivarium import cgroup, logfile, ports, record, ssh, state, values
from vivarium import config as cfg
from vivarium import template as template_mod
from vivarium.errors import VMError
from vivarium.image.build import Image
from vivarium.image.recipe import AGENT_DOMAINS
from vivarium.net import control as fence
from vivarium.net import netns
from vivarium.net.ca import CA
from vivarium.progress import WARNING, Progress
from vivarium.run import run
from vivarium.share import gitbranch, userns, virtiofs, writeback
from vivarium.vm import accel as accel_mod
from vivarium.vm import caps, channel, console, machine, memory
from vivarium.vm.qemu import MachineSpec

# The guest prints these on its serial console as it comes up.
PHASES = (
    ("vivarium-phase: setup", "systemd", "starting services"),
    ("vivarium-phase: sshd", "sshd", "logging in"),
)
PHASE_ORDER = ("kernel", "systemd", "sshd")
MARKLESS_GRACE = 30.0


@dataclass(frozen=True)
class Launch:
    """What a launch is of: the instance, its settings, its image."""

    name: str
    dir: state.InstanceDir
    config: cfg.Config
    image: Image
    fenced: bool
    progress: Progress
    share: bool = True  # False: this start serves none of the configured shares (`up --no-share`)


def start(how: Launch, rec: record.Record, *, auto_ports: bool, timeout: float | None,
          saved: Path | None = None, template: template_mod.Template | None = None) -> None:  # fmt: skip
    """Boot (or resume the state saved in directory `saved`; or, with `template`, become a copy of it) and wait for SSH."""
    c, d, progress = how.config, how.dir, how.progress
    if template is not None:
        saved = template.path
    progress("start", "choosing the accelerator")
    acc, qemu_caps = accel_mod.choose(how.image.kernel), caps.probe()
    forwards = ports.choose(c.forward, how.name, auto_ports=auto_ports)
    ssh_port = next(f.host for f in forwards if f.guest == ports.SSH_PORT)
    d.pidfile.unlink(missing_ok=True)  # a dead QEMU's: the gateway waits for the one started now
    # unwound innermost first: fds (closed whatever happens), then started (stopped on failure), then held
    with contextlib.ExitStack() as held, contextlib.ExitStack() as started, contextlib.ExitStack() as fds:

        @started.callback
        def stopped() -> None:
            d.write(d.read().stopped())

        group = _cgroup(how)
        if group is not None:  # everything started from here to QEMU is the sandbox's, in its cgroup
            started.callback(cgroup.remove, group)
            fds.enter_context(group.joined())
        tap = gateway = None
        if how.fenced:
            progress("start", "making the sandbox's network namespace")
            netns.start(d.path, d.pidfile)
            started.callback(netns.stop, d.path)
            (tap,) = netns.take(d.path, "tap")
            fds.callback(os.close, tap)
            gateway = _launch_gateway(how)
            started.callback(_stop_gateway, d.path, gateway)
        shares = _start_shares(how, started)
        fw = _write_fw_cfg(how, rec.instance.user, shares)
        if saved is not None:
            progress("kernel", "loading the saved memory")
            ram = memory.load_memfd(saved / "ram", f"vivarium-{how.name}")
        else:
            ram = memory.new_memfd(f"vivarium-{how.name}", c.vm.memory >> 20 << 20)
        fds.callback(os.close, ram)
        if saved is None:
            rec = _resize_disk(d, c.vm.disk, rec)
            logfile.remove(d.serial)
        _check_space(how)
        keeper = userns.keeper_uid(str(d.path)) if os.geteuid() == 0 else None  # run by a user, it is theirs
        serial = console.start(d.serial, logfile.Cap(c.logs.console_size, c.logs.console_keep), keeper)
        fds.callback(os.close, serial)  # QEMU's exit (or its failure to start) then ends the console's keeper
        disk_fds = tuple((_open(fds, how, path, os.O_RDWR), _open(fds, how, path, os.O_RDONLY)) for path in (d.disk, d.swap))
        spec = MachineSpec(
            name=how.name, kernel=how.image.kernel, initrd=how.image.initrd, disk=d.disk, swap=d.swap,
            memory_mib=c.vm.memory >> 20, cpus=c.vm.cpus, accel_args=tuple(acc.qemu_args()),
            forwards=tuple(forwards), qmp=d.qmp, serial=d.serial, pidfile=d.pidfile, log=d.log,
            fw_cfg=fw, fence_tap=tap, control=d.control, ram_fd=ram, serial_fd=serial,
            shares=() if template else tuple((sh.tag, sh.socket) for sh in shares),  # a template's are plugged in
            extra=("-incoming", "defer") if saved else (), machine=qemu_caps.machine, seccomp=qemu_caps.seccomp,
            runas=_qemu_ids(d), run_with=qemu_caps.at_least(9, 1), disk_fds=(disk_fds[0], disk_fds[1]),
        )  # fmt: skip
        progress("kernel", f"starting QEMU ({acc.name})" if saved is None else f"restoring the saved state ({acc.name})")
        qemu = machine.start(spec)
        held.callback(qemu.close)
        started.callback(d.qmp.unlink, missing_ok=True)  # QEMU leaves its socket behind
        started.callback(qemu.kill)
        fds.close()  # QEMU has them open now
        rec = dataclasses.replace(rec, run=record.Run(
            running=True, pid=qemu.pid, qemu_started=qemu.start, started_at=time.time(), accel=acc.name, accel_reason=acc.reason,
            ssh_port=ssh_port, memory=c.vm.memory, cpus=c.vm.cpus,
            network=c.network.mode if how.fenced else "unfenced",
            ports=tuple(record.Forward(f.host, f.guest, f.bind) for f in forwards),
            shares=tuple(record.Shared(str(sh.source), str(sh.guest), sh.mode, "virtiofs", sh.tag) for sh in shares),
        ))  # fmt: skip
        d.write(rec)
        limit = timeout or (180.0 if acc.name == "kvm" else 600.0)
        try:
            if saved is not None:
                machine.load(d.qmp, saved / "state", without_ram=True)
            if template is not None:
                _become(how, shares, fw, limit)
            elif saved is not None:  # the clock stood still, and a second restore must not repeat the first's randomness
                channel.request(d.control, "resume", f"{time.time():.3f} {secrets.token_hex(32)}", timeout=min(60.0, limit))
            if gateway is not None:
                # Waited for only now, its start overlapping the restore: a connection the guest
                # made before it listened waited in the namespace (the fence fails closed), never let out.
                fence.wait_started(d.path, gateway)
            _wait_ready(how, qemu, ssh_port, rec.instance.user, limit, restored=saved is not None)
        except VMError:
            # QEMU gone: its own reason (in its log) says more than how we noticed ("load of migration failed: ...")
            if qemu.wait(1.0) and (words := machine.last_words(d.log)):
                raise VMError(f"QEMU exited while starting sandbox {how.name!r}: {words}", hint=f"QEMU's log: {d.log}") from None
            raise
        if rec.instance.pristine:  # a template's copy has become itself
            d.write(dataclasses.replace(rec, instance=dataclasses.replace(rec.instance, pristine=False)))
        started.pop_all()  # it runs: keep everything


def _open(fds: contextlib.ExitStack, how: Launch, path: Path, flags: int) -> int:
    try:
        fd = os.open(path, flags | os.O_CLOEXEC)
    except OSError as e:
        raise VMError(f"sandbox {how.name!r}: cannot open {path}: {e.strerror}",
                      hint=f"`vivarium reset {how.name}` gives it new disks (what the old ones held is lost)") from None  # fmt: skip
    fds.callback(os.close, fd)
    return fd


def _qemu_ids(d: state.InstanceDir) -> tuple[int, int] | None:
    """Run by root itself, QEMU drops to a uid of the sandbox's own (issue 16, 2); run by a user, it is theirs."""
    if os.geteuid() != 0:
        return None
    uid = userns.sandbox_uid(str(d.path))
    return uid, uid


def _cgroup(how: Launch) -> cgroup.Group | None:
    """The sandbox's cgroup with its limits, where the host lets vivarium make one (why not: `status`)."""
    c = how.config
    limits = cgroup.Limits(c.limits.pids, c.limits.memory or cgroup.memory_for(c.vm.memory), c.limits.io_weight)
    try:
        group = cgroup.make(cgroup.leaf_name(how.name, how.dir.path), limits)
    except cgroup.Unavailable as e:
        cgroup.remember(how.dir.path, None, str(e))
        return None
    cgroup.remember(how.dir.path, group)
    return group


def _launch_gateway(how: Launch) -> subprocess.Popen[bytes]:
    """Write this start's policy (the config's, the image's agents' domains, rules changed live before) and launch the gateway."""
    n, d = how.config.network, how.dir
    live: dict[str, list[tuple[str, str]]] = {"allow": [], "deny": []}
    with contextlib.suppress(OSError, ValueError, KeyError):
        old = fence.read_policy(d.path)
        for verb in live:
            live[verb] = [(r["rule"], r["source"]) for r in old[verb] if r.get("source") == "cli"]
    denied = {r for r, _ in live["deny"]}
    allow = [(a, "config") for a in n.allow if a not in denied]
    for agent in how.image.manifest.get("agents") or {}:
        allow += [(domain, agent) for domain in AGENT_DOMAINS.get(agent, ()) if domain not in denied]
    allow += live["allow"]
    fence.write_policy(d.path, n.mode, allow, n.allow_cidrs, n.deny_cidrs, n.dns_upstream, live["deny"], n.upstream_ca,
                       logfile.Cap(how.config.logs.audit_size, how.config.logs.audit_keep))  # fmt: skip
    how.progress("start", f"starting the egress gateway ({n.mode})")
    return fence.launch(d.path, d.pidfile)


def _stop_gateway(directory: Path, launched: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(subprocess.TimeoutExpired):
        launched.wait(30)  # its first half names the supervisor, then exits
    fence.stop(directory)


def _become(how: Launch, shares: Sequence[virtiofs.ShareSpec], fw: Sequence[tuple[str, Path]], limit: float) -> None:
    """Turn a guest just restored from a template into this instance: plug in its shares, then
    hand it (over the control channel) this instance's settings, the ones a boot reads from fw_cfg."""
    d = how.dir
    for i, sh in enumerate(shares):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:  # connected here: QEMU may not reach the path
            conn.connect(str(sh.socket))
            machine.hand(d.qmp, conn.fileno(), f"fs{i}")
        machine.qmp(d.qmp, "chardev-add", {"id": f"fs{i}", "backend": {
            "type": "socket", "data": {"addr": {"type": "fd", "data": {"str": f"fs{i}"}}, "server": False}}})  # fmt: skip
        machine.qmp(d.qmp, "device_add", {"driver": "vhost-user-fs-pci", "id": f"fsdev{i}", "chardev": f"fs{i}",
                                          "tag": sh.tag, "bus": f"hp{i}"})  # fmt: skip
    how.progress("sshd", "making the template's copy this sandbox")
    body = [("time", f"{time.time():.3f}"), ("entropy", secrets.token_hex(32)), ("plugged", str(len(shares)))]
    body += [(name, line) for name, path in fw for line in path.read_text().splitlines() if line.strip()]
    try:
        channel.request(d.control, "become", body=body, timeout=min(120.0, limit))
    except VMError as e:
        raise VMError(f"sandbox {how.name!r} restored from its template but could not take its own identity: {e}",
                      hint=f"`vivarium destroy {how.name}` and `vivarium up --cold {how.name}`") from None  # fmt: skip


def _check_space(how: Launch) -> None:
    """One line when the sandbox's disks could grow past the space left where they live."""
    d, vm = how.dir, how.config.vm
    used = sum(p.stat().st_blocks * 512 for p in (d.disk, d.swap) if p.exists())
    free = shutil.disk_usage(d.path).free
    if vm.disk + vm.swap > free + used:
        how.progress(WARNING, f"sandbox {how.name!r} may grow to {values.format_size(vm.disk + vm.swap)} of disk and swap; "
                              f"{values.format_size(free)} is free under {d.path.parent} (vm.disk, vm.swap)")  # fmt: skip


def _resize_disk(d: state.InstanceDir, disk: int, rec: record.Record) -> record.Record:
    if disk <= rec.instance.disk:
        return rec
    run(["qemu-img", "resize", "-q", d.disk, str(disk)])
    rec = dataclasses.replace(rec, instance=dataclasses.replace(rec.instance, disk=disk))
    d.write(rec)
    return rec


def _start_shares(how: Launch, started: contextlib.ExitStack) -> list[virtiofs.ShareSpec]:
    wanted = list(how.config.share) if how.share else []
    if not wanted:
        return []
    why = virtiofs.supported(how.config.uid)
    if why:  # a sandbox without the project in it is not what was asked for: say so, and how to go on
        raise VMError(f"cannot share {', '.join(str(s.host) for s in wanted)} with sandbox {how.name!r}: {why}",
                      hint=f"`vivarium up --no-share {how.name}` starts it without shares "
                           "(or set share = [] in vivarium.toml); `vivarium doctor` says what this host lacks")  # fmt: skip
    specs = [virtiofs.ShareSpec(f"share{i}", s.host, s.guest, s.mode, how.dir.path / f"share{i}.sock", s.protect, how.config.uid)
             for i, s in enumerate(wanted)]  # fmt: skip
    for spec in specs:
        if spec.mode == "review":
            snap = how.dir.path / f"review-{spec.tag}.json"
            if not snap.exists():  # "since the sandbox started": kept across restarts, like the overlay itself
                how.progress("start", f"noting the state of {spec.source} for review")
                writeback.save_snapshot(snap, writeback.snapshot(spec.source))
                if (commit := gitbranch.head(spec.source)) is not None:  # what `apply --branch` puts the changes on
                    state.write_atomic(how.dir.path / f"review-{spec.tag}.head", commit + "\n", 0o600)
        how.progress("start", f"sharing {spec.source} ({spec.mode}, virtiofs)")
        helper = virtiofs.start(spec)
        started.callback(_end, helper, spec.socket)  # a share server whose QEMU never came would wait for ever
    return specs


def _end(proc: subprocess.Popen[bytes], socket: Path) -> None:
    proc.kill()
    proc.wait()
    for left in (socket, socket.with_name(socket.name + ".pid")):  # the Rust virtiofsd's lock file beside its socket
        left.unlink(missing_ok=True)


def _write_fw_cfg(how: Launch, user: str, shares: Sequence[virtiofs.ShareSpec] = ()) -> tuple[tuple[str, Path], ...]:
    d = how.dir.fwcfg
    d.mkdir(mode=0o700, exist_ok=True)
    files = {
        "user": user,
        "hostname": how.name if how.name != "default" else "vivarium",
        "authorized_key": how.dir.key.with_suffix(".pub").read_text().strip(),
        # one line per share: tag, mode, mount point (paths with spaces are fine: the last field)
        "shares": "".join(f"{sh.tag} {sh.mode} {sh.guest}\n" for sh in shares),
        "kube_link": str(shares[0].guest) if shares and how.config.kube.link_into_share else "",
        # the sandbox's own CA (its key stays here): the gateway's certificates for a secret's hosts
        "ca": CA.of(how.dir.path, how.name).cert_pem(),
    }
    out = []
    for name, text in files.items():
        if not text:
            continue
        (d / name).write_text(text)
        out.append((name, d / name))
    out.append(("ssh_host_key", how.dir.host_key))
    return tuple(out)


def target(d: state.InstanceDir, port: int, user: str) -> ssh.Target:
    """An instance's SSH identity (its key, its pinned host key) at a given host port."""
    return ssh.Target(
        alias=f"vivarium-{d.name}", user=user, port=port,
        key=d.key, known_hosts=d.known_hosts, control_path=d.path / f"ssh-{port}.sock",
    )  # fmt: skip


def _wait_ready(how: Launch, qemu: machine.Process, port: int, user: str, limit: float, *, restored: bool = False) -> None:
    d = how.dir
    to = target(d, port, user)
    started = time.monotonic()
    deadline = started + limit
    phase = "sshd" if restored else "kernel"  # a restored guest is past its boot: log in at once
    while time.monotonic() < deadline:
        if not qemu.running():
            raise VMError(f"QEMU exited while sandbox {how.name!r} was booting: {serial_tail(d, 1)}",
                          hint=f"console log: {d.serial}")  # fmt: skip
        console = _serial_text(d)
        for mark, name, what in PHASES:
            if mark in console and PHASE_ORDER.index(name) > PHASE_ORDER.index(phase):
                phase = name
                how.progress(phase, what)
        # Log in only once the guest says sshd has started: an attempt made
        # before the guest has its address waits in slirp for seconds, and
        # every connection costs a booting TCG guest a forked sshd. (An
        # image without the marks is tried after a grace period.)
        if phase == "sshd" or time.monotonic() > started + MARKLESS_GRACE:
            if ssh.check(to, timeout=max(1.0, min(20.0, deadline - time.monotonic()))):
                return
        time.sleep(0.25)
    raise VMError(
        f"sandbox {how.name!r} did not answer SSH within {limit:.0f}s (stuck in phase {phase}; {_doing(d, qemu)}); "
        f"last console lines:\n{serial_tail(d, 8)}",
        hint=f"console log: {d.serial}",
    )


def _doing(d: state.InstanceDir, qemu: machine.Process) -> str:
    """What a guest that never got ready was doing, as far as the host sees it: busy, or stuck (and QEMU's own word)."""
    cpu = qemu.cpu_seconds()
    try:
        status = str(machine.qmp(d.qmp, "query-status", timeout=5.0).get("status", "?"))
    except (VMError, OSError, AttributeError):
        status = "no answer"
    return f"QEMU has used {cpu or 0:.0f} s of CPU, its monitor says {status!r}"


def _serial_text(d: state.InstanceDir) -> str:
    try:
        return d.serial.read_text(errors="replace")
    except OSError:
        return ""


def serial_tail(d: state.InstanceDir, n: int) -> str:
    lines = [ln for ln in _serial_text(d).splitlines() if ln.strip()]
    return "\n".join(lines[-n:]) or "(the console printed nothing)"
