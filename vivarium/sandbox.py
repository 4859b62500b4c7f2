"""Sandbox: one named VM instance through its life. Also the Python API.

    from vivarium import Sandbox
    box = Sandbox("default")
    box.up()
    box.exec(["uname", "-a"])
    box.reset()

build → create → start → ready → stop / reset / destroy. The CLI is a thin
layer over this class.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import pwd
import re
import secrets
import shlex
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from vivarium import config as cfg
from vivarium import kube, ssh, state
from vivarium import template as template_mod
from vivarium.errors import InstanceError, UsageError, VMError
from vivarium.image.build import Image, build_image, find_image
from vivarium.image.recipe import AGENT_DOMAINS, Recipe
from vivarium.net import control as fence
from vivarium.net import netns
from vivarium.net.policy import Decision
from vivarium.printable import printable
from vivarium.run import find_program, run
from vivarium.share import review, virtiofs
from vivarium.vm import accel as accel_mod
from vivarium.vm import channel, machine, memory
from vivarium.vm.qemu import HOTPLUG_SLOTS, LAYOUT, MachineSpec, PortForward

Progress = Callable[[str, str], None]
log = logging.getLogger("vivarium.sandbox")

# The guest prints these on its serial console as it comes up.
PHASES = (
    ("vivarium-phase: setup", "systemd", "starting services"),
    ("vivarium-phase: sshd", "sshd", "logging in"),
)
PHASE_ORDER = ("kernel", "systemd", "sshd")
MARKLESS_GRACE = 30.0
SSH_PORT = 22
FROZEN_VERSION = 1


def _snapshot_info(d: Path) -> dict[str, Any]:
    """A snapshot's meta.json, with its size on disk."""
    info: dict[str, Any] = json.loads((d / "meta.json").read_text())
    info["size"] = sum(f.stat().st_blocks * 512 for f in d.iterdir())  # on disk: the RAM file is sparse
    return info


def _quiet(phase: str, detail: str) -> None:
    pass


@dataclass(frozen=True)
class Status:
    name: str
    state: str  # running | stopped | crashed
    pid: int | None
    accel: str
    ports: list[dict[str, Any]]
    image: str
    uptime: float | None
    ssh_port: int | None
    user: str
    memory: str
    cpus: int
    path: str
    shares: list[dict[str, Any]]
    agents: dict[str, str]
    network: str  # the fence's mode, or "unfenced"
    gateway: int | None  # the egress gateway's pid while running

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Sandbox:
    """A named instance. Cheap to construct; nothing happens until a method is called."""

    def __init__(self, name: str = "default", config: cfg.Config | None = None, *, fence: bool = True) -> None:
        self.dir = state.InstanceDir.of(name)
        self.name = name
        self._config = config
        # fence=False boots on plain QEMU user networking: no gateway, the host
        # and the LAN reachable. Only for proving that the fence is what stops
        # an attack (tests) and for measuring what it costs (bench/).
        self._fence = fence

    # ------------------------------------------------------------ queries

    @property
    def config(self) -> cfg.Config:
        """The settings given to this Sandbox; else those the sandbox was made (or last reset) with,
        frozen in its directory; else, for a new one, the current directory's trusted vivarium.toml."""
        if self._config is None:
            self._config = self.frozen_config() or cfg.discover(None, Path.cwd())
        return self._config

    def frozen_config(self) -> cfg.Config | None:
        try:
            data = json.loads(self.dir.frozen.read_text())
        except FileNotFoundError:
            return None
        except ValueError:
            raise InstanceError(f"the saved settings of sandbox {self.name!r} are damaged ({self.dir.frozen})",
                                hint=f"`vivarium destroy {self.name}` and make it again") from None  # fmt: skip
        if not isinstance(data, dict) or data.get("version") != FROZEN_VERSION or not isinstance(data.get("settings"), dict):
            raise InstanceError(f"the saved settings of sandbox {self.name!r} are of another vivarium version",
                                hint=f"`vivarium destroy {self.name}` and make it again")  # fmt: skip
        source = Path(data["source"]) if data.get("source") else None
        return cfg.load_data(data["settings"], f"sandbox {self.name!r}'s saved settings", Path("/"), source=source)

    def _freeze(self) -> None:
        """Keep the settings this sandbox runs with: its later `up` and `reset` use them, whatever
        a vivarium.toml where they are typed says (the guest may have written it)."""
        c = self.config
        data = {"version": FROZEN_VERSION, "source": str(c.source) if c.source else None, "settings": cfg.to_dict(c)}
        state.write_atomic(self.dir.frozen, json.dumps(data, indent=1) + "\n", 0o600)

    def exists(self) -> bool:
        return self.dir.exists()

    def meta(self) -> dict[str, Any]:
        return self.dir.read_meta()

    def pid(self) -> int | None:
        return machine.read_pid(self.dir.pidfile, self.name)

    def status(self) -> Status:
        meta = self.meta()
        pid = self.pid()
        # Recorded as running but no QEMU of ours: it died under us.
        st = "running" if pid else ("crashed" if meta.get("running") else "stopped")
        started = meta.get("started_at")
        return Status(
            name=self.name,
            state=st,
            pid=pid,
            accel=meta.get("accel", ""),
            ports=meta.get("ports", []),
            image=meta.get("image", ""),
            uptime=round(time.time() - started, 1) if pid and started else None,
            ssh_port=meta.get("ssh_port"),
            user=meta.get("user", ""),
            memory=cfg.format_size(meta.get("memory", 0)),
            cpus=meta.get("cpus", 0),
            path=str(self.dir.path),
            shares=meta.get("shares", []) if pid else [],
            agents=_image_agents(meta.get("image", "")),
            network=meta.get("network", ""),
            gateway=fence.pid(self.dir.path) if pid else None,
        )

    def target(self) -> ssh.Target:
        meta = self.meta()
        if self.pid() is None:
            raise InstanceError(f"sandbox {self.name!r} is not running", hint=f"start it with `vivarium up {self.name}`")
        return self.target_at(meta["ssh_port"], meta["user"])

    def target_at(self, port: int, user: str | None = None) -> ssh.Target:
        """This instance's SSH identity (its key, its pinned host key) at a given host port."""
        return ssh.Target(
            alias=f"vivarium-{self.name}", user=user or self.meta()["user"], port=port,
            key=self.dir.key, known_hosts=self.dir.known_hosts, control_path=self.dir.path / f"ssh-{port}.sock",
        )  # fmt: skip

    # ---------------------------------------------------------- lifecycle

    def up(self, *, progress: Progress = _quiet, auto_ports: bool = False, timeout: float | None = None, cold: bool = False) -> Status:
        """Build if needed, create if needed, start if stopped, wait for SSH.

        A new sandbox is restored from a ready template of its shape (made on
        first use) unless `cold`; an existing one boots."""
        given = self._config is not None
        with self.dir.lock():
            if self.exists() and self.pid() is not None:
                meta = self.meta()
                if meta.get("network") != "unfenced" and fence.pid(self.dir.path) is None:
                    # its gateway is gone (killed from outside): egress has been failing closed; bring it back
                    progress("start", "restarting the egress gateway")
                    fence.start(self.dir.path, self.dir.pidfile)
                return self.status()
            image = self._image(progress)
            if not self.exists():
                self._create(image, None if cold else self._template(image, progress), cold=cold)
            elif given:
                self._freeze()
            meta = self.meta()
            if meta["build_id"] != image.build_id:
                raise InstanceError(
                    f"sandbox {self.name!r} was made from an image that has since been rebuilt",
                    hint=f"`vivarium reset {self.name}` starts it afresh from the new image",
                )
            self._start(meta, image, progress, auto_ports=auto_ports, timeout=timeout, template=self._unstarted_template(meta))
        return self.status()

    def _unstarted_template(self, meta: dict[str, Any]) -> template_mod.Template | None:
        """The template whose disks this sandbox's overlays were made on, while it has not yet started from it."""
        if not meta.get("template") or not meta.get("pristine"):
            return None
        tpl = template_mod.get(meta["template"])
        if tpl is None:
            raise InstanceError(f"the template sandbox {self.name!r} was to start from is gone from the cache",
                                hint=f"`vivarium reset {self.name}` starts it afresh")  # fmt: skip
        return tpl

    def _template(self, image: Image, progress: Progress) -> template_mod.Template | None:
        """The ready template for a new sandbox of this shape, made now if missing; None where none can serve."""
        c = self.config
        if len(c.share) > HOTPLUG_SLOTS or not self._fence:
            return None
        acc = accel_mod.choose(image.kernel)
        return template_mod.find(image, c, acc.name) or template_mod.make(image, c, acc.name, progress)

    def _image(self, progress: Progress) -> Image:
        if self.exists():
            key = self.meta()["image"]
            image = find_image(key)
            if image is None:
                raise InstanceError(
                    f"the image of sandbox {self.name!r} ({key}) is gone from the cache",
                    hint=f"`vivarium reset {self.name}` rebuilds it from the current settings",
                )
            return image
        image, _ = build_image(Recipe.from_config(self.config), progress=progress)
        return image

    def _create(self, image: Image, tpl: template_mod.Template | None, *, cold: bool = False) -> None:
        """A new instance: overlay disks on the base (or on a template's), keys. Milliseconds."""
        c = self.config
        self.dir.path.mkdir(parents=True, exist_ok=True)
        os.chmod(self.dir.path, 0o700)
        self._new_disks(image, c.vm.disk, c.vm.swap, tpl)
        ssh.make_keys(self.dir.key, self.dir.host_key, self.dir.known_hosts, f"vivarium-{self.name}")
        self._freeze()
        self.dir.write_meta({
            "name": self.name,
            "created": time.time(),
            "image": image.key,
            "build_id": image.build_id,
            "user": c.vm.user,
            "template": tpl.path.name if tpl else None,
            "pristine": True,  # until its first start: then a template's copy has become itself
            "cold": cold,  # --cold: a reset boots it cold again
            "disk": c.vm.disk,
            "swap": c.vm.swap,
            "running": False,
        })  # fmt: skip

    def _new_disks(self, image: Image, disk: int, swap: int, tpl: template_mod.Template | None = None) -> None:
        """Overlays on the image's disk (a fresh swap), or on a template's disks."""
        for path in (self.dir.disk, self.dir.swap):
            path.unlink(missing_ok=True)
        if tpl is not None:
            for ours, theirs in ((self.dir.disk, tpl.disk), (self.dir.swap, tpl.swap)):
                run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", theirs, ours])
            return
        run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", image.disk, self.dir.disk, str(disk)])
        run(["qemu-img", "create", "-q", "-f", "qcow2", self.dir.swap, str(swap)])

    def _forwards(self, auto_ports: bool) -> list[PortForward]:
        """The configured forwards, with a free port swapped in for busy ones if asked."""
        wanted = [PortForward(f.host, f.guest, f.bind) for f in self.config.forward]
        if not any(f.guest == SSH_PORT for f in wanted):
            wanted.append(PortForward(free_port(), SSH_PORT))
        out = []
        for f in wanted:
            if not port_free(f.bind, f.host):
                if not auto_ports:
                    holder = port_holder(f.host, exclude=self.name)
                    who = f" by sandbox {holder!r}" if holder else ""
                    raise VMError(
                        f"host port {f.host} (forward to guest port {f.guest}) is in use{who}",
                        hint="pass --auto-ports to pick free ports, or change [[forward]] in vivarium.toml",
                    )
                f = PortForward(free_port(f.bind), f.guest, f.bind)
            out.append(f)
        return out

    def _start(self, meta: dict[str, Any], image: Image, progress: Progress, *, auto_ports: bool, timeout: float | None,
               saved: Path | None = None, template: template_mod.Template | None = None) -> None:  # fmt: skip
        """Boot (or resume the state saved in directory `saved`; or, with `template`, become a copy of it) and wait for SSH."""
        c = self.config
        if template is not None:
            saved = template.path
        progress("start", "choosing the accelerator")
        acc = accel_mod.choose(image.kernel)
        forwards = self._forwards(auto_ports)
        ssh_port = next(f.host for f in forwards if f.guest == SSH_PORT)
        helpers: list[subprocess.Popen[bytes]] = []
        pid: int | None = None
        ram: int | None = None
        tap: int | None = None
        self.dir.pidfile.unlink(missing_ok=True)  # a dead QEMU's: the gateway waits for the one started now
        try:
            gateway = None
            if self._fence:
                progress("start", "making the sandbox's network namespace")
                netns.start(self.dir.path, self.dir.pidfile)
                (tap,) = netns.take(self.dir.path, "tap")
                gateway = self._launch_gateway(progress, image)
            shares = self._start_shares(progress, helpers)
            fw = self._write_fw_cfg(meta["user"], shares)
            if saved is not None:
                progress("kernel", "loading the saved memory")
                ram = memory.load_memfd(saved / "ram", f"vivarium-{self.name}")
            spec = MachineSpec(
                name=self.name, kernel=image.kernel, initrd=image.initrd,
                disk=self.dir.disk, swap=self.dir.swap,
                memory_mib=c.vm.memory >> 20, cpus=c.vm.cpus, accel_args=tuple(acc.qemu_args()),
                forwards=tuple(forwards), qmp=self.dir.qmp, serial=self.dir.serial, pidfile=self.dir.pidfile,
                fw_cfg=fw, fence_tap=tap, control=self.dir.control, ram_fd=ram,
                shares=() if template else tuple((sh.tag, sh.socket) for sh in shares),  # a template's are plugged in
                extra=("-incoming", "defer") if saved else (),
            )  # fmt: skip
            if saved is None:
                self._resize_disk(c.vm.disk, meta)
                self.dir.serial.unlink(missing_ok=True)
            progress("kernel", f"starting QEMU ({acc.name})" if saved is None else f"restoring the saved state ({acc.name})")
            pid = machine.start(spec)
            for fd in (ram, tap):
                if fd is not None:
                    os.close(fd)  # QEMU has it open now
            ram = tap = None
            meta.update({
                "running": True, "pid": pid, "started_at": time.time(), "accel": acc.name, "accel_reason": acc.reason,
                "ssh_port": ssh_port, "memory": c.vm.memory, "cpus": c.vm.cpus,
                "network": c.network.mode if self._fence else "unfenced",
                "ports": [{"host": f.host, "guest": f.guest, "bind": f.bind} for f in forwards],
                "shares": [{"host": str(sh.source), "guest": str(sh.guest), "mode": sh.mode, "via": "virtiofs",
                            "tag": sh.tag}
                           for sh in shares],
            })  # fmt: skip
            self.dir.write_meta(meta)
            if saved is not None:
                machine.load(self.dir.qmp, saved / "state", without_ram=True)
            limit = timeout or (180.0 if acc.name == "kvm" else 600.0)
            if template is not None:
                self._become(shares, fw, progress, limit)
            elif saved is not None:  # the clock stood still, and a second restore must not repeat the first's randomness
                channel.request(self.dir.control, "resume", f"{time.time():.3f} {secrets.token_hex(32)}", timeout=min(60.0, limit))
            if gateway is not None:
                # Waited for only now, its start overlapping the restore: a connection the guest
                # made before it listened was refused (the fence fails closed), never let out.
                fence.wait_started(self.dir.path, gateway)
            self._wait_ready(pid, ssh_port, limit, progress, restored=saved is not None)
            if meta.pop("pristine", False):
                self.dir.write_meta(meta)
        except BaseException:
            for fd in (ram, tap):
                if fd is not None:
                    os.close(fd)
            if pid is not None:
                machine.kill(pid, self.name)
            for helper in helpers:  # a virtiofsd whose QEMU never came would wait for ever
                helper.kill()
                helper.wait()
            fence.stop(self.dir.path)
            netns.stop(self.dir.path)
            meta["running"] = False
            self.dir.write_meta(meta)
            raise

    def _launch_gateway(self, progress: Progress, image: Image) -> subprocess.Popen[bytes]:
        """Write this start's policy (the config's, the image's agents' domains, rules changed live before) and launch the gateway."""
        n = self.config.network
        live: dict[str, list[tuple[str, str]]] = {"allow": [], "deny": []}
        with contextlib.suppress(OSError, ValueError, KeyError):
            old = fence.read_policy(self.dir.path)
            for verb in live:
                live[verb] = [(r["rule"], r["source"]) for r in old[verb] if r.get("source") == "cli"]
        denied = {r for r, _ in live["deny"]}
        allow = [(a, "config") for a in n.allow if a not in denied]
        for agent in image.manifest.get("agents") or {}:
            allow += [(d, agent) for d in AGENT_DOMAINS.get(agent, ()) if d not in denied]
        allow += live["allow"]
        fence.write_policy(self.dir.path, n.mode, allow, n.allow_cidrs, n.deny_cidrs, n.dns_upstream, live["deny"])
        progress("start", f"starting the egress gateway ({n.mode})")
        return fence.launch(self.dir.path, self.dir.pidfile)

    def _become(self, shares: Sequence[virtiofs.ShareSpec], fw: Sequence[tuple[str, Path]], progress: Progress, limit: float) -> None:
        """Turn a guest just restored from a template into this instance: plug in its shares, then
        hand it (over the control channel) this instance's settings, the ones a boot reads from fw_cfg."""
        for i, sh in enumerate(shares):
            machine.qmp(self.dir.qmp, "chardev-add", {"id": f"fs{i}", "backend": {
                "type": "socket", "data": {"addr": {"type": "unix", "data": {"path": str(sh.socket)}}, "server": False}}})  # fmt: skip
            machine.qmp(self.dir.qmp, "device_add", {"driver": "vhost-user-fs-pci", "id": f"fsdev{i}", "chardev": f"fs{i}",
                                                     "tag": sh.tag, "bus": f"hp{i}"})  # fmt: skip
        progress("sshd", "making the template's copy this sandbox")
        body = [("time", f"{time.time():.3f}"), ("entropy", secrets.token_hex(32)), ("plugged", str(len(shares)))]
        body += [(name, line) for name, path in fw for line in path.read_text().splitlines() if line.strip()]
        try:
            channel.request(self.dir.control, "become", body=body, timeout=min(120.0, limit))
        except VMError as e:
            raise VMError(f"sandbox {self.name!r} restored from its template but could not take its own identity: {e}",
                          hint=f"`vivarium destroy {self.name}` and `vivarium up --cold {self.name}`") from None  # fmt: skip

    def _resize_disk(self, disk: int, meta: dict[str, Any]) -> None:
        if disk > meta.get("disk", 0):
            run(["qemu-img", "resize", "-q", self.dir.disk, str(disk)])
            meta["disk"] = disk

    def _start_shares(self, progress: Progress, helpers: list[subprocess.Popen[bytes]]) -> list[virtiofs.ShareSpec]:
        wanted = list(self.config.share)
        if not wanted:
            return []
        why = virtiofs.supported()
        if why:
            progress("start", f"not sharing {', '.join(str(s.host) for s in wanted)}: {why}")
            log.warning("not sharing %s: %s", ", ".join(str(s.host) for s in wanted), why)
            return []
        specs = [virtiofs.ShareSpec(f"share{i}", s.host, s.guest, s.mode, self.dir.path / f"share{i}.sock", s.protect)
                 for i, s in enumerate(wanted)]  # fmt: skip
        for spec in specs:
            if spec.mode == "review":
                snap = self.dir.path / f"review-{spec.tag}.json"
                if not snap.exists():  # "since the sandbox started": kept across restarts, like the overlay itself
                    progress("start", f"noting the state of {spec.source} for review")
                    review.save_snapshot(snap, review.snapshot(spec.source))
            progress("start", f"sharing {spec.source} ({spec.mode}, virtiofs)")
            helpers.append(virtiofs.start(spec))
        return specs

    def _write_fw_cfg(self, user: str, shares: Sequence[virtiofs.ShareSpec] = ()) -> tuple[tuple[str, Path], ...]:
        d = self.dir.fwcfg
        d.mkdir(mode=0o700, exist_ok=True)
        files = {
            "user": user,
            "hostname": self.name if self.name != "default" else "vivarium",
            "authorized_key": self.dir.key.with_suffix(".pub").read_text().strip(),
            # one line per share: tag, mode, mount point (paths with spaces are fine: the last field)
            "shares": "".join(f"{sh.tag} {sh.mode} {sh.guest}\n" for sh in shares),
            "kube_link": str(shares[0].guest) if shares and self.config.kube.link_into_share else "",
        }
        out = []
        for name, text in files.items():
            if not text:
                continue
            (d / name).write_text(text)
            out.append((name, d / name))
        out.append(("ssh_host_key", self.dir.host_key))
        return tuple(out)

    def _wait_ready(self, pid: int, port: int, limit: float, progress: Progress, *, restored: bool = False) -> None:
        target = self.target_at(port)
        started = time.monotonic()
        deadline = started + limit
        phase = "sshd" if restored else "kernel"  # a restored guest is past its boot: log in at once
        while time.monotonic() < deadline:
            if not machine.is_ours(pid, self.name):
                raise VMError(f"QEMU exited while sandbox {self.name!r} was booting: {self._serial_tail(1)}",
                              hint=f"console log: {self.dir.serial}")  # fmt: skip
            console = self._serial_text()
            for mark, name, what in PHASES:
                if mark in console and PHASE_ORDER.index(name) > PHASE_ORDER.index(phase):
                    phase = name
                    progress(phase, what)
            # Log in only once the guest says sshd has started: an attempt made
            # before the guest has its address waits in slirp for seconds, and
            # every connection costs a booting TCG guest a forked sshd. (An
            # image without the marks is tried after a grace period.)
            if phase == "sshd" or time.monotonic() > started + MARKLESS_GRACE:
                if ssh.check(target, timeout=max(1.0, min(20.0, deadline - time.monotonic()))):
                    return
            time.sleep(0.25)
        tail = self._serial_tail(8)
        raise VMError(
            f"sandbox {self.name!r} did not answer SSH within {limit:.0f}s (stuck in phase {phase}); last console lines:\n{tail}",
            hint=f"console log: {self.dir.serial}",
        )

    def _serial_text(self) -> str:
        try:
            return self.dir.serial.read_text(errors="replace")
        except OSError:
            return ""

    def _serial_tail(self, n: int) -> str:
        lines = [ln for ln in self._serial_text().splitlines() if ln.strip()]
        return "\n".join(lines[-n:]) or "(the console printed nothing)"

    def stop(self, timeout: float = 30.0) -> str:
        with self.dir.lock():
            meta = self.meta()
            pid = self.pid()
            how = "was not running"
            if pid is not None:
                how = machine.stop(pid, self.name, self.dir.qmp, timeout)
            meta["running"] = False
            self.dir.write_meta(meta)
            fence.stop(self.dir.path)
            netns.stop(self.dir.path)
            self.dir.qmp.unlink(missing_ok=True)
            self.dir.pidfile.unlink(missing_ok=True)
            return how

    def destroy(self) -> None:
        if not self.exists():
            raise InstanceError(f"no sandbox named {self.name!r}", hint="see `vivarium ls`")
        self.stop(timeout=10)
        shutil.rmtree(self.dir.path)

    def reset(self, *, progress: Progress = _quiet, timeout: float | None = None) -> bool:
        """Back to clean: new overlays on the ready template of its shape (or, made --cold, on the image).
        Restarts it if it was running."""
        was_running = self.pid() is not None
        given = self._config is not None
        if was_running:
            self.stop()
        with self.dir.lock():
            meta = self.meta()
            self._freeze()
            image = find_image(meta["image"])
            # Settings given to this Sandbox (or a missing image) decide the image; otherwise keep its own.
            if image is None or given:
                recipe = Recipe.from_config(self.config)
                if image is None or recipe.key() != meta["image"]:
                    image, _ = build_image(recipe, progress=progress)
            tpl = None if meta.get("cold") else self._template(image, progress)
            self._new_disks(image, meta["disk"], meta["swap"], tpl)
            for snap in self.dir.path.glob("review-*.json"):  # the overlays went with the disk
                snap.unlink()
            meta.update({"image": image.key, "build_id": image.build_id, "running": False,
                         "template": tpl.path.name if tpl else None, "pristine": True})  # fmt: skip
            if tpl is not None:
                meta.update({"disk": self.config.vm.disk, "swap": self.config.vm.swap})
            self.dir.write_meta(meta)
        if was_running:
            self.up(progress=progress, timeout=timeout)
        return was_running

    # ------------------------------------------------------------ review

    def _review_shares(self) -> list[dict[str, Any]]:
        if self.pid() is None:
            raise InstanceError(f"sandbox {self.name!r} is not running", hint=f"start it with `vivarium up {self.name}`: its changes are on its disk")
        shares = [sh for sh in self.meta().get("shares", []) if sh.get("mode") == "review"]
        if not shares:
            raise UsageError(f"sandbox {self.name!r} has no share in review mode", hint='set mode = "review" on a [[share]] in vivarium.toml')
        return shares

    def _upper(self, share: dict[str, Any]) -> str:
        return review.UPPER.format(tag=share["tag"])

    def _scan(self, share: dict[str, Any]) -> object:
        """The guest's own account of its changes: untrusted, checked by review.changes()."""
        r = self.exec(["sudo", "python3", "-c", review.SCAN, self._upper(share)], capture=True, timeout=600)
        if r.returncode != 0:
            raise VMError(f"cannot read the changes to {share['host']} in the sandbox: {r.stderr.strip()[-200:]}")
        try:
            entries: object = json.loads(r.stdout)
        except ValueError:
            raise VMError(f"the sandbox's account of its changes to {share['host']} is not JSON") from None
        return entries

    def _fetch(self, share: dict[str, Any], rel: str) -> bytes:
        argv = self.target().argv(["sudo", "cat", "--", f"{self._upper(share)}/{rel}"], tty=False)
        r = subprocess.run(argv, capture_output=True, stdin=subprocess.DEVNULL, timeout=600, check=False)
        if r.returncode != 0:
            raise VMError(f"cannot read {rel} from the sandbox: {r.stderr.decode(errors='replace').strip()[-200:]}")
        return r.stdout

    def diff(self, *, patch: bool = False) -> list[dict[str, Any]]:
        """What the guest changed in each review share: [{share, guest, id, changes: [...], skipped: [...], patch?}].

        The change set is recorded under its id: `apply` takes exactly it (the last one, or the one named)."""
        out = []
        record: dict[str, dict[str, Any]] = {}
        for share in self._review_shares():
            host = Path(share["host"])
            found = review.changes(host, self._scan(share))
            changes = [c.to_dict() for c in found.changes]
            record[share["host"]] = {"tag": share["tag"], "changes": changes, "skipped": found.skipped}
            item: dict[str, Any] = {"share": share["host"], "guest": share["guest"], "changes": changes, "skipped": found.skipped}
            if patch:
                text = []
                for c in found.changes:
                    if c.what != "file":
                        continue
                    old = review.read_host(host, c.path) if c.kind != "added" else None
                    new = self._fetch(share, c.path) if c.kind != "deleted" else None
                    text.append(review.unified(printable(c.path), old, new))
                item["patch"] = "".join(text)
            out.append(item)
        set_id = review.set_id(record)
        d = self.dir.path / "reviewed"
        d.mkdir(mode=0o700, exist_ok=True)
        state.write_atomic(d / f"{set_id}.json", json.dumps({"id": set_id, "shares": record}), 0o600)
        state.write_atomic(d / "last", set_id + "\n", 0o600)
        for item in out:
            item["id"] = set_id
        return out

    def _reviewed(self, set_id: str | None) -> dict[str, Any]:
        d = self.dir.path / "reviewed"
        if set_id is None:
            try:
                set_id = (d / "last").read_text().strip()
            except FileNotFoundError:
                raise UsageError(f"nothing of sandbox {self.name!r} was reviewed yet: apply takes the changes a diff showed",
                                 hint=f"vivarium diff {self.name}") from None  # fmt: skip
        if not re.fullmatch(r"[0-9a-f]{12}", set_id) or not (d / f"{set_id}.json").exists():
            raise UsageError(f"sandbox {self.name!r} has no reviewed change set {set_id!r}", hint=f"vivarium diff {self.name}")
        data: dict[str, Any] = json.loads((d / f"{set_id}.json").read_text())
        return data

    def apply(self, paths: Sequence[str] = (), *, set_id: str | None = None) -> list[tuple[str, review.ApplyResult, list[dict[str, str]]]]:
        """Copy the reviewed changes (all, or those at or under `paths`) to the host: exactly what `diff` showed
        (the last one, or `set_id`), or nothing when the guest changed any of it since. Host-changed paths are left alone.
        Returns (share, result, skipped) per share."""
        record = self._reviewed(set_id)
        wanted = [os.path.normpath(os.path.abspath(p)) for p in paths]
        plans = []
        for share in self._review_shares():
            host = Path(share["host"])
            rec = record["shares"].get(share["host"])
            if rec is None:
                continue
            rels: list[str] | None = None
            if wanted:
                rels = [os.path.relpath(w, host) for w in wanted if w == str(host) or w.startswith(str(host).rstrip("/") + "/")]
                if not rels:
                    continue
            chosen = review.select((review.Change.from_dict(c) for c in rec["changes"]), rels)
            skipped = [s for s in rec["skipped"] if review.under(s["path"], rels)]
            plans.append((share, host, chosen, skipped))
        # The guest as it is now must still hold what was reviewed, byte for byte: fetch and check all before writing any.
        fetched: dict[str, dict[str, bytes]] = {}  # share → path → content
        moved: list[str] = []
        for share, host, chosen, _ in plans:
            content = fetched.setdefault(share["host"], {})
            if not chosen:
                continue
            now = {c.path: c for c in review.changes(host, self._scan(share)).changes}
            for c in chosen:
                if now.get(c.path) not in (c, None):
                    moved.append(f"{host}/{c.path}")
                elif c.what == "file" and c.kind != "deleted":
                    content[c.path] = self._fetch(share, c.path)
                    if hashlib.sha256(content[c.path]).hexdigest() != c.sha256:
                        moved.append(f"{host}/{c.path}")
        if moved:
            raise InstanceError(f"sandbox {self.name!r} changed {', '.join(printable(m) for m in moved[:5])}"
                                f"{' and more' if len(moved) > 5 else ''} since the diff you reviewed; nothing was applied",
                                hint=f"`vivarium diff {self.name}` again, then apply what it shows")  # fmt: skip
        results = []
        for share, host, chosen, skipped in plans:
            snap_path = self.dir.path / f"review-{share['tag']}.json"
            snap = review.load_snapshot(snap_path)
            st = host.stat()
            owner = (st.st_uid, st.st_gid) if os.geteuid() == 0 else None
            with self.dir.lock():
                result = review.apply(host, chosen, snap, fetched[share["host"]], owner)
                review.save_snapshot(snap_path, snap)
            results.append((share["host"], result, skipped))
        return results

    # ----------------------------------------------------------- snapshots

    def _snapshot_dir(self, tag: str) -> Path:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", tag):
            raise UsageError(f"{tag!r} is not a snapshot name", hint="letters, digits, '.', '_' and '-', at most 64")
        return self.dir.path / "snapshots" / tag

    def snapshots(self) -> list[dict[str, Any]]:
        if not self.exists():
            raise InstanceError(f"no sandbox named {self.name!r}", hint="see `vivarium ls`")
        return [_snapshot_info(m.parent) for m in sorted((self.dir.path / "snapshots").glob("*/meta.json"))]

    def snapshot_save(self, tag: str) -> dict[str, Any]:
        """Memory and disks of the running sandbox, saved together; it keeps running."""
        d = self._snapshot_dir(tag)
        with self.dir.lock():
            pid = self.pid()
            if pid is None:
                raise InstanceError(f"sandbox {self.name!r} is not running", hint="a snapshot saves a running sandbox's memory")
            meta = self.meta()
            if meta.get("shares"):
                raise UsageError(
                    f"sandbox {self.name!r} has shared directories, and QEMU's virtiofs device cannot be saved",
                    hint='snapshot a sandbox without shares (share = [] in vivarium.toml)',
                )  # fmt: skip
            if d.exists():
                raise UsageError(f"snapshot {tag!r} exists", hint=f"vivarium snapshot {self.name} rm {tag}")
            tmp = d.with_name(f".{tag}.tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            try:
                info = {"tag": tag, **self._save_state(tmp, pid, meta)}
                (tmp / "meta.json").write_text(json.dumps(info, indent=1))
                tmp.rename(d)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        return _snapshot_info(d)

    def _save_state(self, dest: Path, pid: int, meta: dict[str, Any]) -> dict[str, Any]:
        """The running guest's device state, RAM and disks into `dest`, all of one instant; it runs on after."""
        started = time.monotonic()
        machine.save_memory(self.dir.qmp, dest / "state", without_ram=True)
        try:  # paused, its disks flushed: RAM and disks as they are now
            ram = memory.save_sparse(memory.qemu_ram_fd(pid, meta["memory"] >> 20 << 20), dest / "ram")
            for disk in (self.dir.disk, self.dir.swap):
                run(["cp", "--reflink=auto", "--sparse=always", disk, dest / disk.name])
        finally:
            machine.qmp(self.dir.qmp, "cont")
        return {
            "created": time.time(), "seconds": round(time.monotonic() - started, 2), "ram_data": ram,
            "memory": meta["memory"], "cpus": meta["cpus"], "accel": meta["accel"], "build_id": meta["build_id"],
            "qemu": machine.qemu_version(self.dir.qmp), "layout": LAYOUT,
        }  # fmt: skip

    def snapshot_restore(self, tag: str, *, progress: Progress = _quiet) -> Status:
        """Back to a saved snapshot, memory and disks: the guest goes on where it was saved."""
        d = self._snapshot_dir(tag)
        if not (d / "meta.json").exists():
            raise UsageError(f"sandbox {self.name!r} has no snapshot {tag!r}", hint=f"vivarium snapshot {self.name} ls")
        info = json.loads((d / "meta.json").read_text())
        c = self.config
        image = self._image(progress)
        acc = accel_mod.choose(image.kernel)
        mismatch = [f"{what} {was} now {now}" for what, was, now in (
            ("memory", cfg.format_size(info["memory"]), cfg.format_size(c.vm.memory)), ("cpus", info["cpus"], c.vm.cpus),
            ("accelerator", info["accel"], acc.name), ("image", info["build_id"], image.build_id),
            ("device layout", info.get("layout", 1), LAYOUT),
        ) if was != now]  # fmt: skip
        if any(s.mode for s in c.share):
            mismatch.append("shared directories are configured (a snapshot has none)")
        if mismatch:
            raise UsageError(f"snapshot {tag!r} no longer fits sandbox {self.name!r}: {'; '.join(mismatch)}",
                             hint="restore with the settings it was saved with, or save a new one")  # fmt: skip
        if self.pid() is not None:
            self.stop(timeout=0)
        with self.dir.lock():
            meta = self.meta()
            for disk in (self.dir.disk, self.dir.swap):
                run(["cp", "--reflink=auto", "--sparse=always", d / disk.name, disk])
            self._start(meta, image, progress, auto_ports=False, timeout=None, saved=d)
        return self.status()

    def snapshot_rm(self, tag: str) -> None:
        d = self._snapshot_dir(tag)
        if not d.exists():
            raise UsageError(f"sandbox {self.name!r} has no snapshot {tag!r}", hint=f"vivarium snapshot {self.name} ls")
        shutil.rmtree(d)

    # ------------------------------------------------------- kube, docker

    def kubeconfig(self) -> dict[str, Any]:
        """The sandbox's Kind cluster's kubeconfig, pointed at the host side of the API server's forward."""
        if self.pid() is None:
            raise InstanceError(f"sandbox {self.name!r} is not running", hint=f"start it with `vivarium up {self.name}`")
        fwd = next((p for p in self.meta().get("ports", []) if p["guest"] == kube.API_PORT), None)
        if fwd is None:
            raise UsageError(f"no host port forwards to the Kind API server (guest port {kube.API_PORT})",
                             hint=f"vivarium port {self.name} add {kube.API_PORT}:{kube.API_PORT}")  # fmt: skip
        r = self.exec(["sh", "-c", "kind get kubeconfig 2>/dev/null || cat ~/.kube/config"], capture=True, timeout=120)
        if r.returncode != 0 or not r.stdout.strip():
            raise InstanceError(f"sandbox {self.name!r} has no Kind cluster yet",
                                hint=f"vivarium exec {self.name} -- kind create cluster --config {kube.KIND_CONFIG}")  # fmt: skip
        return kube.rewrite(r.stdout, self.name, fwd["host"], fwd["bind"])

    def docker_context(self) -> str:
        """A Docker context on the host that reaches the sandbox's daemon over SSH. Returns its name."""
        docker = find_program("docker")
        target = self.target()
        home = Path(pwd.getpwuid(os.getuid()).pw_dir)  # where ssh itself looks, whatever $HOME says
        conf_dir = home / ".ssh" / "vivarium"
        conf_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        (conf_dir / f"{self.name}.conf").write_text(target.config_block())
        ssh.ensure_include(home / ".ssh" / "config", conf_dir)
        name = f"vivarium-{self.name}"
        subprocess.run([docker, "context", "rm", "-f", name], capture_output=True, check=False)
        run([docker, "context", "create", name, "--description", f"vivarium sandbox {self.name}", "--docker", f"host=ssh://{target.alias}"])
        return name

    # ------------------------------------------------------------ egress

    def _fenced(self) -> None:
        if not self.exists():
            raise InstanceError(f"no sandbox named {self.name!r}", hint="see `vivarium ls`")
        if not (self.dir.path / "policy.json").exists():
            raise InstanceError(f"sandbox {self.name!r} has no network fence yet", hint=f"start it with `vivarium up {self.name}`")

    def egress_change(self, verb: str, domain: str) -> str:
        """Allow or deny a domain for this sandbox, live and kept across restarts."""
        self._fenced()
        cfg.check_domain(domain, f"egress {verb}")
        with self.dir.lock():
            what = fence.change_rule(self.dir.path, verb, domain)
        if self.pid() is not None and fence.pid(self.dir.path) is None:
            raise VMError(
                f"sandbox {self.name!r} has no running gateway; {what} from its next start",
                hint=f"vivarium stop {self.name} && vivarium up {self.name}",
            )
        return what

    def set_network_mode(self, mode: str) -> None:
        """Switch the running sandbox's fence to lan-block, allowlist or offline, live (until its next start)."""
        self._fenced()
        if mode not in ("lan-block", "allowlist", "offline"):
            raise UsageError(f"unknown network mode {mode!r}", hint="lan-block, allowlist or offline")
        with self.dir.lock():
            fence.set_mode(self.dir.path, mode)

    def egress_check(self, host: str, port: int) -> list[tuple[str, str, Decision]]:
        """What a connection to host:port would meet: (address, name, Decision) per address."""
        self._fenced()
        return fence.check(self.dir.path, host, port)

    def egress_log(self, *, follow: bool = False) -> Iterator[dict[str, Any]]:
        """The audit log's records, oldest first; with follow, wait for new ones for ever."""
        if not self.exists():
            raise InstanceError(f"no sandbox named {self.name!r}", hint="see `vivarium ls`")
        yield from fence.records(self.dir.path, follow=follow)

    # -------------------------------------------------------------- exec

    def exec(
        self,
        command: Sequence[str],
        *,
        capture: bool = False,
        input: str | None = None,
        timeout: float | None = None,
        cwd: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run a command in the guest as the agent user. Its exit code is returned as is.

        In the guest directory `cwd` if given and there, else in the agent's home."""
        if not command:
            raise UsageError("exec needs a command", hint="vivarium exec NAME -- CMD...")
        if cwd is not None:
            command = ["sh", "-c", 'cd -- "$0" 2>/dev/null || cd; exec "$@"', cwd, *command]
        argv = self.target().argv(command, tty=False)
        return subprocess.run(
            argv,
            input=input,
            stdin=None if input is not None else subprocess.DEVNULL,
            capture_output=capture,
            text=True,
            timeout=timeout,
            check=False,
        )

    # ---------------------------------------------------------- sessions

    def guest_dir(self, host_dir: Path) -> str:
        """Where `host_dir` is in the guest, if a share holds it (at the same path unless the share
        says otherwise); else workdir()."""
        here = host_dir.resolve()
        for share in self.meta().get("shares") or []:
            with contextlib.suppress(ValueError):
                return str(Path(share["guest"]) / here.relative_to(share["host"]))
        return self.workdir()

    def workdir(self) -> str:
        """Where agents start: the guest path of the first share, else the agent's home."""
        shares = self.meta().get("shares") or []
        return str(shares[0]["guest"]) if shares else "~"

    def start_session(self, command: Sequence[str], *, session: str, env_names: Sequence[str] = ()) -> None:
        """Start `command` as the agent user in a detached tmux session, in workdir().

        Variables named in env_names travel from this process's environment over
        ssh's stdin into that session's environment only: never on a command line
        on the host, never on the guest's disk.
        """
        for name in env_names:
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
                raise UsageError(f"--env {name!r} is not a variable name")
            if name not in os.environ:
                raise UsageError(f"--env {name}: that variable is not set here")
        reads = "".join(f"IFS= read -r v{i}; " for i in range(len(env_names)))
        env = "".join(f'-e {name}="$v{i}" ' for i, name in enumerate(env_names))
        work = self.workdir()
        cd = 'cd "$HOME"' if work == "~" else f"cd {shlex.quote(work)}"
        script = f"{reads}{cd} && exec tmux new-session -d -s {shlex.quote(session)} {env}-- {shlex.join(command)}"
        stdin = "".join(os.environ[name] + "\n" for name in env_names)
        r = self.exec(["sh", "-c", script], capture=True, input=stdin)
        if r.returncode != 0:
            raise InstanceError(f"could not start session {session!r}: {r.stderr.strip() or f'exit code {r.returncode}'}")

    def attach_argv(self, session: str | None = None) -> list[str]:
        target = ["-t", session] if session else []
        return self.target().argv(["tmux", "attach-session", *target], tty=True, batch=False)

    def sessions(self) -> list[dict[str, Any]]:
        fmt = "#{session_name}\t#{session_created}\t#{session_attached}\t#{pane_dead}\t#{pane_start_command}"
        r = self.exec(["sh", "-c", f"tmux list-panes -a -F '{fmt}' 2>/dev/null || true"], capture=True)
        out = []
        for line in r.stdout.splitlines():
            name, created, attached, dead, command = (line.split("\t") + [""] * 5)[:5]
            out.append({
                "session": name, "created": int(created or 0), "attached": attached not in ("", "0"),
                "state": "exited" if dead == "1" else "running", "command": command,
            })  # fmt: skip
        return out

    # ------------------------------------------------------------- ports

    def port_add(self, host: int, guest: int, bind: str = "127.0.0.1") -> None:
        with self.dir.lock():
            meta = self.meta()
            if self.pid() is None:
                raise InstanceError(f"sandbox {self.name!r} is not running")
            if not port_free(bind, host):
                holder = port_holder(host)
                raise VMError(f"host port {host} is in use{f' by sandbox {holder!r}' if holder else ''}")
            reply = machine.hmp(self.dir.qmp, f"hostfwd_add net0 tcp:{bind}:{host}-:{guest}")
            if reply:
                raise VMError(f"QEMU refused the forward: {reply}")
            meta["ports"].append({"host": host, "guest": guest, "bind": bind})
            self.dir.write_meta(meta)

    def port_rm(self, host: int) -> None:
        with self.dir.lock():
            meta = self.meta()
            match = [p for p in meta.get("ports", []) if p["host"] == host]
            if not match:
                raise UsageError(f"sandbox {self.name!r} forwards no host port {host}", hint=f"see `vivarium port {self.name} ls`")
            if match[0]["guest"] == SSH_PORT and match[0]["host"] == meta.get("ssh_port"):
                raise UsageError(f"port {host} carries vivarium's own SSH connection; it stays")
            reply = machine.hmp(self.dir.qmp, f"hostfwd_remove net0 tcp:{match[0]['bind']}:{host}")
            if reply and "removed" not in reply:
                raise VMError(f"QEMU refused to remove the forward: {reply}")
            meta["ports"] = [p for p in meta["ports"] if p["host"] != host]
            self.dir.write_meta(meta)


def _image_agents(key: str) -> dict[str, str]:
    image = find_image(key) if key else None
    return dict(image.manifest.get("agents") or {}) if image else {}


def list_sandboxes() -> list[Sandbox]:
    return [Sandbox(d.name) for d in state.list_instances()]


def port_free(bind: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in bind else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((bind, port))
        except OSError:
            return False
    return True


def free_port(bind: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((bind, 0))
        port: int = s.getsockname()[1]
        return port


def port_holder(port: int, exclude: str = "") -> str | None:
    """Which of our running sandboxes holds host `port`, if any."""
    for box in list_sandboxes():
        if box.name == exclude:
            continue
        with contextlib.suppress(Exception):
            if box.pid() is not None and any(p["host"] == port for p in box.meta().get("ports", [])):
                return box.name
    return None
