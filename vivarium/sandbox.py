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

import logging
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from vivarium import config as cfg
from vivarium import files as files_mod
from vivarium import instance, kube, launch, ports, provision, sessions, snapshots, ssh, state, trust
from vivarium import template as template_mod
from vivarium.errors import InstanceError
from vivarium.image.build import Image, build_image, find_image
from vivarium.image.recipe import Recipe
from vivarium.instance import Status
from vivarium.net import control as fence
from vivarium.net.policy import Decision
from vivarium.progress import Progress, quiet
from vivarium.record import Record, Run, Shared
from vivarium.share import changesets, writeback
from vivarium.vm import accel as accel_mod
from vivarium.vm import caps

log = logging.getLogger("vivarium.sandbox")


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
            self._config = self.frozen_config() or trust.discover(None, Path.cwd())
        return self._config

    def frozen_config(self) -> cfg.Config | None:
        return instance.frozen_config(self.dir)

    def _freeze(self) -> None:
        """Keep the settings this sandbox runs with: its later `up` and `reset` use them, whatever
        a vivarium.toml where they are typed says (the guest may have written it)."""
        instance.freeze(self.dir, self.config)

    def exists(self) -> bool:
        return self.dir.exists()

    def record(self) -> Record:
        """What the instance is (`.instance`) and what its latest start did (`.run`)."""
        return self.dir.read()

    def _run(self) -> Run:
        """The running sandbox's start record."""
        run = self.record().run
        if run is None or self.pid() is None:
            raise InstanceError(f"sandbox {self.name!r} is not running", hint=f"start it with `vivarium up {self.name}`")
        return run

    def pid(self) -> int | None:
        return self.dir.qemu_pid()

    def status(self) -> Status:
        return instance.status(self.dir, _image_agents)

    def target(self) -> ssh.Target:
        return self.target_at(self._run().ssh_port)

    def target_at(self, port: int, user: str | None = None) -> ssh.Target:
        """This instance's SSH identity (its key, its pinned host key) at a given host port."""
        return launch.target(self.dir, port, user or self.record().instance.user)

    # ---------------------------------------------------------- lifecycle

    def up(self, *, progress: Progress = quiet, auto_ports: bool = False, timeout: float | None = None, cold: bool = False,
           share: bool = True) -> Status:  # fmt: skip
        """Build if needed, create if needed, start if stopped, wait for SSH.

        A new sandbox is restored from a ready template of its shape (made on
        first use) unless `cold`; an existing one boots. Its configured shares are
        served (an error if they cannot be) unless `share` is False."""
        given = self._config is not None
        with self.dir.lock():
            if self.exists() and self.pid() is not None:
                provision.mend(self.dir, self.record().run, progress)
                return self.status()
            if not auto_ports:  # a busy port is known now: say so before minutes of building and a template
                ports.choose(self.config.forward, self.name, auto_ports=False)
            image = provision.image_of(self.dir, self.config, progress)
            if not self.exists():
                tpl = None if cold else provision.template_for(self.config, image, self._fence, progress, Sandbox)
                instance.create(self.dir, self.config, image, tpl, cold=cold)
            elif given:
                self._freeze()
            rec = self.record()
            provision.check_image(self.dir, rec.instance, image)
            tpl = provision.unstarted_template(self.dir, rec.instance)
            self._start(rec, image, progress, auto_ports=auto_ports, timeout=timeout, template=tpl, share=share)
        return self.status()

    def _start(self, rec: Record, image: Image, progress: Progress, *, auto_ports: bool, timeout: float | None,
               saved: Path | None = None, template: template_mod.Template | None = None, share: bool = True) -> None:  # fmt: skip
        """Boot (or resume the state saved in directory `saved`; or, with `template`, become a copy of it) and wait for SSH."""
        how = launch.Launch(self.name, self.dir, self.config, image, self._fence, progress, share)
        launch.start(how, rec, auto_ports=auto_ports, timeout=timeout, saved=saved, template=template)

    def stop(self, timeout: float = 30.0) -> str:
        return instance.stop(self.dir, timeout)

    def destroy(self) -> None:
        if not self.exists():
            raise InstanceError(f"no sandbox named {self.name!r}", hint="see `vivarium ls`")
        self.stop(timeout=10)
        shutil.rmtree(self.dir.path)

    def reset(self, *, progress: Progress = quiet, timeout: float | None = None) -> bool:
        """Back to clean: new overlays on the ready template of its shape (or, made --cold, on the image).
        Restarts it if it was running."""
        was_running = self.pid() is not None
        given = self._config is not None
        if was_running:
            self.stop()
        with self.dir.lock():
            rec = self.record()
            self._freeze()
            image = find_image(rec.instance.image)
            # Settings given to this Sandbox (or a missing image) decide the image; otherwise keep its own.
            if image is None or given:
                recipe = Recipe.from_config(self.config)
                if image is None or recipe.key() != rec.instance.image:
                    image, _ = build_image(recipe, progress=progress)
            made = rec.instance
            tpl = None if made.cold else provision.template_for(self.config, image, self._fence, progress, Sandbox)
            instance.new_disks(self.dir, image, made.disk, made.swap, tpl)
            for snap in self.dir.path.glob("review-*.json"):  # the overlays went with the disk
                snap.unlink()
            made = replace(made, image=image.key, build_id=image.build_id, template=tpl.path.name if tpl else None, pristine=True)
            if tpl is not None:
                made = replace(made, disk=self.config.vm.disk, swap=self.config.vm.swap)
            self.dir.write(replace(rec, instance=made).stopped())
        if was_running:
            self.up(progress=progress, timeout=timeout)
        return was_running

    # ------------------------------------------------------------ review

    def _review_shares(self) -> list[Shared]:
        return changesets.review_shares(self.name, self._run().shares)

    def diff(self, *, patch: bool = False) -> list[dict[str, Any]]:
        """What the guest changed in each review share: [{share, guest, id, changes: [...], skipped: [...], patch?}].

        The change set is recorded under its id: `apply` takes exactly it (the last one, or the one named)."""
        return changesets.diff(self.dir, changesets.SSHFiles(self.exec, self.target), self._review_shares(), patch=patch)

    def apply(self, paths: Sequence[str] = (), *, set_id: str | None = None) -> list[tuple[str, writeback.ApplyResult, list[dict[str, str]]]]:
        """Copy the reviewed changes (all, or those at or under `paths`) to the host: exactly what `diff` showed
        (the last one, or `set_id`), or nothing when the guest changed any of it since. Host-changed paths are left alone.
        Returns (share, result, skipped) per share."""
        return changesets.apply(self.dir, changesets.SSHFiles(self.exec, self.target), self._review_shares(), paths, set_id)

    def apply_branch(self, branch: str, paths: Sequence[str] = (), *, set_id: str | None = None) -> list[changesets.Branched]:
        """The same reviewed changes as a commit on the new git branch `branch` (parent: the commit checked out when
        the sandbox started); the working tree and the index untouched."""
        return changesets.apply_branch(self.dir, changesets.SSHFiles(self.exec, self.target), self._review_shares(), branch, paths, set_id)

    # ----------------------------------------------------------- snapshots

    def snapshots(self) -> list[dict[str, Any]]:
        return snapshots.listing(self.dir)

    def snapshot_save(self, tag: str) -> dict[str, Any]:
        """Memory and disks of the running sandbox, saved together; it keeps running."""
        return snapshots.save(self.dir, tag)

    def snapshot_restore(self, tag: str, *, progress: Progress = quiet) -> Status:
        """Back to a saved snapshot, memory and disks: the guest goes on where it was saved."""
        path = snapshots.existing(self.dir, tag)
        image = provision.image_of(self.dir, self.config, progress)
        snapshots.check_fits(self.dir, path, self.config, accel_mod.choose(image.kernel).name, image.build_id, caps.probe())
        if self.pid() is not None:
            self.stop(timeout=0)
        with self.dir.lock():
            snapshots.put_back_disks(self.dir, path)
            self._start(self.record(), image, progress, auto_ports=False, timeout=None, saved=path)
        return self.status()

    def snapshot_rm(self, tag: str) -> None:
        snapshots.remove(self.dir, tag)

    # ------------------------------------------------------- kube, docker

    def kubeconfig(self) -> dict[str, Any]:
        """The sandbox's Kind cluster's kubeconfig, pointed at the host side of the API server's forward."""
        return kube.kubeconfig(self.name, self._run().ports, self.exec)

    def docker_context(self) -> str:
        """A Docker context on the host that reaches the sandbox's daemon over SSH. Returns its name."""
        return kube.docker_context(self.name, self.target())

    # ------------------------------------------------------------ egress

    def egress_change(self, verb: str, domain: str) -> str:
        """Allow or deny a domain for this sandbox, live and kept across restarts."""
        return fence.change(self.dir, verb, domain, running=self.pid() is not None)

    def set_network_mode(self, mode: str) -> None:
        """Switch the running sandbox's fence to lan-block, allowlist or offline, live (until its next start)."""
        fence.change_mode(self.dir, mode)

    def egress_check(self, host: str, port: int) -> list[tuple[str, str, Decision]]:
        """What a connection to host:port would meet: (address, name, Decision) per address."""
        fence.fenced(self.dir)
        return fence.check(self.dir.path, host, port)

    def egress_log(self, *, follow: bool = False) -> Iterator[dict[str, Any]]:
        """The audit log's records, oldest first; with follow, wait for new ones for ever."""
        if not self.exists():
            raise InstanceError(f"no sandbox named {self.name!r}", hint="see `vivarium ls`")
        yield from fence.records(self.dir.path, follow=follow)

    # -------------------------------------------------------------- exec

    def exec(self, command: Sequence[str], *, capture: bool = False, input: ssh.Input = None, timeout: float | None = None,
             cwd: str | None = None, stdin: str | None = None, tty: bool | None = False,
             on_stdout: ssh.Output | None = None, on_stderr: ssh.Output | None = None) -> subprocess.CompletedProcess[str]:  # fmt: skip
        """Run a command in the guest as the agent user, in `cwd` if there, else home; its exit code as is.
        Input, terminal and output as ssh.execute says (bytes or a file in, output streamed to callbacks)."""
        return ssh.execute(self.target(), command, capture=capture, input=input, timeout=timeout, cwd=cwd, stdin=stdin, tty=tty,
                           on_stdout=on_stdout, on_stderr=on_stderr)  # fmt: skip

    @property
    def files(self) -> files_mod.Files:
        """Its files, as the agent user sees them: read, write, list, remove, copy_in, copy_out."""
        return files_mod.Files(self.target, self.name)

    def spawn(self, command: Sequence[str], *, on_stdout: ssh.Output | None = None, on_stderr: ssh.Output | None = None,
              cwd: str | None = None) -> files_mod.Spawned:  # fmt: skip
        """Start `command` in the guest and return at once: a handle to wait() for it or kill() it."""
        return files_mod.Spawned(self.target(), command, on_stdout, on_stderr, cwd)

    # ---------------------------------------------------------- sessions

    def guest_dir(self, host_dir: Path) -> str:
        """Where `host_dir` is in the guest, if a share holds it (at the same path unless the share
        says otherwise); else workdir()."""
        return sessions.guest_dir(self._shares(), host_dir)

    def workdir(self) -> str:
        """Where agents start: the guest path of the first share, else the agent's home."""
        return sessions.workdir(self._shares())

    def _shares(self) -> tuple[Shared, ...]:
        run = self.record().run
        return run.shares if run else ()

    def start_session(self, command: Sequence[str], *, session: str, env_names: Sequence[str] = (), secrets: Sequence[str] = ()) -> None:
        """Start `command` as the agent user in a detached tmux session, in workdir().

        Variables named in env_names travel from this process's environment over ssh's stdin into that
        session's environment only. Each of `secrets` (a [[secret]] or a preset) is read on the host and
        handed to the gateway; the session gets its placeholder, the gateway puts the value in for its hosts."""
        held = sessions.load_secrets(self.dir, self.config.secret, secrets)
        sessions.start(self.exec, self.workdir(), command, session=session, env_names=env_names, placeholders=held)

    def attach_argv(self, session: str | None = None) -> list[str]:
        return sessions.attach_argv(self.target(), session)

    def sessions(self) -> list[dict[str, Any]]:
        return sessions.listing(self.exec)

    # ------------------------------------------------------------- ports

    def port_add(self, host: int, guest: int, bind: str = "127.0.0.1") -> None:
        ports.add(self.dir, host, guest, bind)

    def port_rm(self, host: int) -> None:
        ports.remove(self.dir, host)


def _image_agents(key: str) -> dict[str, str]:
    image = find_image(key) if key else None
    return dict(image.manifest.get("agents") or {}) if image else {}


def list_sandboxes() -> list[Sandbox]:
    return [Sandbox(d.name) for d in state.list_instances()]
