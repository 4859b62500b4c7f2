"""The command line: verbs → Sandbox calls. The only place that prints for humans or exits."""

from __future__ import annotations

import argparse
import errno
import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from vivarium import config as cfg
from vivarium import doctor as doctor_mod
from vivarium import kube, trust
from vivarium.errors import UsageError, VivariumError
from vivarium.image.build import Image, build_image
from vivarium.image.recipe import Recipe
from vivarium.net.policy import split_host_port
from vivarium.printable import printable
from vivarium.progress import PhaseDisplay
from vivarium.sandbox import Sandbox, list_sandboxes

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)

Handler = Callable[[argparse.Namespace], int]


# ------------------------------------------------------------ the parser


def _add_setting_flags(p: argparse.ArgumentParser) -> None:
    """One flag per setting that has one, straight from the settings table."""
    g = p.add_argument_group("settings (override vivarium.toml)")
    for s in cfg.SETTINGS:
        if s.flag:
            g.add_argument(
                s.flag, dest=f"set:{s.name}", metavar=s.metavar, help=s.help,
                action="append" if s.repeat else "store",
            )  # fmt: skip


def _overrides(args: argparse.Namespace) -> dict[str, object]:
    found: dict[str, object] = {}
    for s in cfg.SETTINGS:
        value = getattr(args, f"set:{s.name}", None)
        if value is None:
            continue
        if s.name == "share":
            value = [cfg.parse_share_flag(v) for v in value]
        found[s.name] = value
    return found


def load_config(args: argparse.Namespace, *, vm: bool = True) -> cfg.Config:
    """The effective config (a ./vivarium.toml only when trusted); `vm`: this verb sizes a VM, so say what was clamped."""
    config = trust.discover(args.config, Path.cwd(), _overrides(args))
    for note in config.notes if vm else ():
        err.print(f"[yellow]note:[/] {escape(note)}")
    return config


def sandbox_for(args: argparse.Namespace) -> Sandbox:
    """The sandbox a verb that may create it works on: a new one takes the settings here; an
    existing one keeps those it was made with, and we say so when the settings here differ."""
    box = Sandbox(args.name)
    if not box.exists():
        return Sandbox(args.name, load_config(args))
    frozen = box.config
    path = cfg.find_config(args.config, Path.cwd())
    overrides = _overrides(args)
    if path is None and not overrides:
        return box
    try:  # parsed only to compare: nothing of it is used
        here = cfg.load(path, overrides)
        differs = cfg.to_dict(here) != cfg.to_dict(frozen)
    except VivariumError:
        differs = True
    if differs:
        what = f"{path}{' and the flags given' if overrides else ''}" if path else "the flags given"
        err.print(f"[yellow]note:[/] sandbox {args.name!r} keeps the settings it was made with; {escape(str(what))} differ "
                  f"(`vivarium destroy {args.name}` and `up` again to take them)")  # fmt: skip
    return box


# --------------------------------------------------------------- verbs


def _command(args: argparse.Namespace) -> list[str]:
    return list(args.command)


def cmd_up(args: argparse.Namespace) -> int:
    box = sandbox_for(args)
    if box.exists() and box.pid() is not None:
        before = box.status()
        had_gateway = before.gateway is not None or before.network == "unfenced"
        box.up()  # brings back a gateway that was killed from outside: egress has been failing closed
        err.print(f"sandbox {args.name!r} is already running" + ("" if had_gateway else "; its egress gateway was down and is restarted"))
        _print_connect(box)
        return 0
    for f in box.config.forward:
        if f.bind not in ("127.0.0.1", "::1"):
            err.print(f"[yellow]warning:[/] host port {f.host} is bound to {f.bind}: reachable from your network")
    with PhaseDisplay(f"up {args.name}", err) as show:
        status = box.up(progress=show, auto_ports=args.auto_ports, timeout=args.timeout, cold=args.cold)
        took = show.elapsed()
    run = box.record().run
    err.print(f"sandbox {args.name!r} is up in {took:.1f}s ({status.accel}: {escape(run.accel_reason if run else '')})")
    _print_connect(box)
    return 0


def _print_json(data: object) -> None:
    """JSON as JSON: ASCII, every guest-made character escaped (rich's print_json would write them raw)."""
    sys.stdout.write(json.dumps(data, indent=2) + "\n")


def _print_connect(box: Sandbox) -> None:
    st = box.status()
    out.print(f"  vivarium ssh {box.name}")
    out.print(f"  vivarium ssh-config {box.name} >> ~/.ssh/config && ssh vivarium-{box.name}   # VS Code Remote-SSH too")
    for p in st.ports:
        out.print(f"  {p['bind']}:{p['host']} → guest {p['guest']}")


def cmd_ssh(args: argparse.Namespace) -> int:
    box = Sandbox(args.name)
    cmd = _command(args)
    argv = box.target().argv(cmd, tty=sys.stdin.isatty() or None, batch=False)
    return subprocess.call(argv)


def cmd_exec(args: argparse.Namespace) -> int:
    cmd = _command(args)
    if not cmd:
        raise UsageError("exec needs a command", hint=f"vivarium exec {args.name} -- CMD...")
    box = Sandbox(args.name)
    return box.exec(cmd, cwd=box.guest_dir(Path.cwd())).returncode  # where you are, as the share has it


def cmd_run(args: argparse.Namespace) -> int:
    cmd = _command(args)
    if not cmd:
        raise UsageError("run needs a command", hint=f"vivarium run {args.name} -- claude")
    box = sandbox_for(args)
    if not (box.exists() and box.pid() is not None):
        with PhaseDisplay(f"up {args.name}", err) as show:
            box.up(progress=show)
    session = args.session or os.path.basename(cmd[0]) or "agent"
    box.start_session(cmd, session=session, env_names=args.env)
    if args.detach:
        err.print(f"started {session!r} in sandbox {args.name!r}; `vivarium attach {args.name} {session}` to see it")
        return 0
    return subprocess.call(box.attach_argv(session))


def cmd_attach(args: argparse.Namespace) -> int:
    return subprocess.call(Sandbox(args.name).attach_argv(args.session))


def cmd_sessions(args: argparse.Namespace) -> int:
    rows = Sandbox(args.name).sessions()
    if args.json:
        _print_json(rows)
        return 0
    t = Table("session", "state", "attached", "command")
    for r in rows:
        t.add_row(*(escape(printable(str(x))) for x in (r["session"], r["state"], "yes" if r["attached"] else "", r["command"])))
    out.print(t)
    return 0


def cmd_ssh_config(args: argparse.Namespace) -> int:
    out.print(Sandbox(args.name).target().config_block(), end="")
    return 0


def cmd_ls(args: argparse.Namespace) -> int:
    rows = [b.status() for b in list_sandboxes()]
    if args.json:
        _print_json([r.to_dict() for r in rows])
        return 0
    t = Table("name", "state", "accel", "ssh", "memory", "cpus", "uptime")
    for r in rows:
        t.add_row(r.name, r.state, r.accel, str(r.ssh_port or ""), r.memory, str(r.cpus), _uptime(r.uptime))
    out.print(t)
    return 0


def _uptime(seconds: float | None) -> str:
    if seconds is None:
        return ""
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def cmd_status(args: argparse.Namespace) -> int:
    st = Sandbox(args.name).status()
    if args.json:
        _print_json(st.to_dict())
        return 0
    for key, value in st.to_dict().items():
        if key == "ports":
            value = ", ".join(f"{p['bind']}:{p['host']}→{p['guest']}" for p in value)
        elif key == "agents":
            value = ", ".join(f"{k} {v}" for k, v in value.items())
        elif key == "shares":
            value = ", ".join(f"{s['host']} → {s['guest']} ({s['mode']}, {s['via']})" for s in value)
        elif key == "uptime":
            value = _uptime(value)
        elif key == "gateway":
            value = f"up (pid {value})" if value else ("down" if st.state == "running" and st.network != "unfenced" else "")
        out.print(f"{key:8} {escape(printable(str(value))) if value is not None else ''}")
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    box = Sandbox(args.name)
    box.record()  # one line if there is no such sandbox
    path = box.dir.serial
    if not path.exists():
        err.print("no console log yet")
        return 0
    with path.open(errors="replace") as f:
        sys.stdout.write(printable(f.read(), lines=True))  # the guest's console: shown, never obeyed by the terminal
        while args.follow:
            line = f.readline()
            if line:
                sys.stdout.write(printable(line, lines=True))
                sys.stdout.flush()
            else:
                time.sleep(0.3)
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    how = Sandbox(args.name).stop(timeout=args.timeout)
    err.print(f"sandbox {args.name!r}: {how}")
    return 0


def cmd_destroy(args: argparse.Namespace) -> int:
    Sandbox(args.name).destroy()
    err.print(f"sandbox {args.name!r} destroyed")
    return 0


def cmd_reset(args: argparse.Namespace) -> int:
    box = sandbox_for(args)
    started = time.monotonic()
    with PhaseDisplay(f"reset {args.name}", err) as show:
        restarted = box.reset(progress=show, timeout=args.timeout)
    again = " and started again" if restarted else ""
    err.print(f"sandbox {args.name!r} reset to clean{again} in {time.monotonic() - started:.1f}s")
    return 0


def cmd_port(args: argparse.Namespace) -> int:
    box = Sandbox(args.name)
    if args.port_verb == "add":
        host_s, _, guest_s = args.spec.partition(":")
        try:
            host, guest = cfg.parse_port(host_s, "HOST"), cfg.parse_port(guest_s or host_s, "GUEST")
        except VivariumError as e:
            raise UsageError(f"port add: {e.message}", hint="write it as HOST:GUEST, e.g. 8080:80") from None
        box.port_add(host, guest, args.bind)
        err.print(f"{args.bind}:{host} → guest {guest}")
    elif args.port_verb == "rm":
        box.port_rm(args.host)
    else:
        ports = box.status().ports
        if args.json:
            _print_json(ports)
        else:
            for p in ports:
                out.print(f"{p['bind']}:{p['host']} → guest {p['guest']}")
    return 0


def cmd_snapshot(args: argparse.Namespace) -> int:
    verb = args.snapshot_verb
    if verb == "save":
        box = Sandbox(args.name)
        info = box.snapshot_save(args.tag or time.strftime("snap-%Y%m%d-%H%M%S"))
        err.print(f"saved snapshot {info['tag']} of {args.name!r} in {info['seconds']:.1f}s ({info['size'] / 2**20:.0f} MiB on disk)")
    elif verb == "restore":
        box = Sandbox(args.name)  # with the settings it was made with
        started = time.monotonic()
        with PhaseDisplay(f"restore {args.name}", err) as show:
            box.snapshot_restore(args.tag, progress=show)
        err.print(f"sandbox {args.name!r} restored to {args.tag} in {time.monotonic() - started:.1f}s")
    elif verb == "rm":
        Sandbox(args.name).snapshot_rm(args.tag)
        err.print(f"snapshot {args.tag} of {args.name!r} deleted")
    else:
        rows = Sandbox(args.name).snapshots()
        if args.json:
            _print_json(rows)
        else:
            t = Table("tag", "created", "memory", "cpus", "accel", "size")
            for r in rows:
                t.add_row(r["tag"], time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["created"])), cfg.format_size(r["memory"]),
                          str(r["cpus"]), r["accel"], f"{r['size'] / 2**20:.0f} MiB")  # fmt: skip
            out.print(t)
    return 0


def cmd_kubeconfig(args: argparse.Namespace) -> int:
    config = Sandbox(args.name).kubeconfig()
    if args.merge:
        path = Path(os.environ.get("KUBECONFIG", "").split(":")[0] or Path.home() / ".kube" / "config")
        kube.merge_into_file(path, config)
        err.print(f"merged into {path} as context {config['current-context']}: kubectl --context {config['current-context']} get nodes")
    else:
        sys.stdout.write(kube.dump(config))
    return 0


def cmd_docker_context(args: argparse.Namespace) -> int:
    name = Sandbox(args.name).docker_context()
    err.print(f"docker context {name} created: docker --context {name} ps")
    return 0


def cmd_diff(args: argparse.Namespace) -> int:
    shares = Sandbox(args.name).diff(patch=args.patch)
    if args.json:
        _print_json(shares)
        return 0
    marks = {"added": "A", "modified": "M", "deleted": "D"}
    for share in shares:
        if args.patch:
            text = share["patch"]
            sys.stdout.write(printable(text, lines=True) if sys.stdout.isatty() else text)
            continue
        # what runs on the host (git metadata, CI, build files, executables) first: read those before anything else
        for c in sorted(share["changes"], key=lambda c: not c["runs_on_host"]):
            suffix = "/" if c["what"] == "dir" else ""
            flag = "!" if c["runs_on_host"] else " "
            note = "   (runs on the host)" if c["runs_on_host"] else ""
            sys.stdout.write(f"{marks[c['kind']]}{flag} {printable(share['share'])}/{printable(c['path'])}{suffix}{note}\n")
        for sk in share["skipped"]:
            sys.stdout.write(f"?  {printable(share['share'])}/{printable(sk['path'])}   (skipped: {printable(sk['why'])})\n")
        if not share["changes"] and not share["skipped"]:
            err.print(f"no changes to {escape(printable(share['share']))}")
    if shares:
        set_id = shares[0]["id"]
        err.print(f"change set {set_id}: `vivarium apply {args.name}` applies exactly this (or `--id {set_id}`)")
    return 0


def cmd_apply(args: argparse.Namespace) -> int:
    code = 0
    for host, result, skipped in Sandbox(args.name).apply(args.paths, set_id=args.id):
        where = escape(printable(host))
        for path in result.applied:
            err.print(f"applied {where}/{escape(printable(path))}")
        for path in result.conflicts:
            err.print(f"[yellow]not applied:[/] {where}/{escape(printable(path))} changed on the host since the sandbox started; "
                      f"both versions are kept (the sandbox's stays in `vivarium diff {args.name}`)")  # fmt: skip
            code = 1
        for path, why in result.refused:
            err.print(f"[yellow]not applied:[/] {where}/{escape(printable(path))}: {escape(printable(why))}")
            code = 1
        for sk in skipped:
            err.print(
                f"skipped {where}/{escape(printable(sk['path']))}: {escape(printable(sk['why']))} (only files, directories and symlinks are applied)"
            )
        if not result.applied and not result.conflicts and not result.refused and not skipped:
            err.print(f"nothing to apply to {where}")
    return code


def cmd_egress(args: argparse.Namespace) -> int:
    box = Sandbox(args.name)
    if args.egress_verb in ("allow", "deny"):
        err.print(f"sandbox {args.name!r}: {box.egress_change(args.egress_verb, args.domain)}")
        return 0
    if args.egress_verb == "check":
        host, port = _host_port(args.target)
        rows = box.egress_check(host, port)
        if args.json:
            _print_json([{"address": a, "name": n, "allow": d.allow, "rule": d.rule} for a, n, d in rows])
        else:
            for addr, name, d in rows:
                where = " ".join(x for x in (name, f"[{addr}]" if addr else "") if x)
                out.print(f"{'[green]allow[/]' if d.allow else '[red]deny[/]'} {escape(printable(where))}:{port}  {escape(printable(d.rule))}")
        return 0 if all(d.allow for _, _, d in rows) else 1
    records: Iterable[dict[str, Any]] = box.egress_log(follow=args.follow)
    ended: set[object] = set()
    if not args.follow:  # a connection's "open" record is shown only while (or if) no record of its end follows
        records = list(records)
        ended = {r.get("conn") for r in records if r.get("kind") == "tcp" and r.get("conn")}
    for record in records:
        if args.denied and record.get("decision") != "deny":
            continue
        if record.get("kind") == "open" and record.get("conn") in ended:
            continue
        if args.json:
            sys.stdout.write(json.dumps(record) + "\n")
        else:
            sys.stdout.write(_egress_line(record) + "\n")
        sys.stdout.flush()
    return 0


def _host_port(text: str) -> tuple[str, int]:
    try:
        return split_host_port(text, 443)
    except ValueError as e:
        raise UsageError(f"egress check: {e}", hint="write it as HOST or HOST:PORT, e.g. pypi.org:443") from None


def _egress_line(r: dict[str, Any]) -> str:
    """One audit record as a line: every field the guest could have chosen (names above all) escaped."""

    def f(key: str, default: str = "") -> str:
        return printable(str(r.get(key, default)))

    when = f("time")[11:23]
    verdict = f("decision", "?").upper()
    if r.get("kind") == "dns":
        answers = printable(",".join(str(a) for a in r.get("answers", []))) or f("rcode")
        return f"{when} {verdict:5} dns {f('name')} {f('type')} → {answers}  ({f('rule')})"
    name = f"{f('name')} " if r.get("name") else ""
    if r.get("kind") == "open":
        return f"{when} OPEN  tcp {name}{f('dst')}:{f('port')}  ({f('rule')})"
    extra = f" sent {f('sent', '0')} received {f('received', '0')} in {f('duration', '0')}s"
    error = f" {f('error')}" if r.get("error") else ""
    return f"{when} {verdict:5} tcp {name}{f('dst')}:{f('port')}  ({f('rule')}){extra}{error}"


def cmd_build(args: argparse.Namespace) -> int:
    config = load_config(args, vm=False)
    image, built = build_with_progress(config, force=args.force)
    if built:
        err.print(f"built image {image.key} in {image.manifest['seconds']:.0f}s ({image.manifest['mode']} mode, kernel {image.manifest['kernel']})")
    else:
        err.print(f"image {image.key} is up to date (cached)")
    agents = image.manifest.get("agents") or {}
    if agents:
        err.print("agents: " + ", ".join(f"{name} {version}" for name, version in agents.items()))
    if image.left_out:
        err.print(f"[yellow]warning:[/] this image lacks {', '.join(image.left_out)}: the download host was unreachable at build time; "
                  "`vivarium build --force` when online")  # fmt: skip
    out.print(str(image.path))
    return 0


def build_with_progress(config: cfg.Config, *, force: bool = False) -> tuple[Image, bool]:
    recipe = Recipe.from_config(config)
    with PhaseDisplay("build", err) as show:
        return build_image(recipe, force=force, progress=show)


def cmd_config_show(args: argparse.Namespace) -> int:
    config = load_config(args)
    data = cfg.to_dict(config)
    if args.json:
        _print_json(data)
        return 0
    out.print(f"# effective settings{' from ' + str(config.source) if config.source else ' (defaults)'}")
    for s in cfg.SETTINGS:
        value = data[s.section][s.key] if s.section else data[s.key]
        out.print(f"{s.name:24} {json.dumps(value)}")
    return 0


def cmd_config_trust(args: argparse.Namespace) -> int:
    path: Path = args.file or Path.cwd() / cfg.CONFIG_NAME
    if not path.is_file():
        raise UsageError(f"{path}: no such config file")
    raw = cfg.read_bytes(path)
    config = cfg.load_data(cfg.parse_toml(raw, path), str(path), path.parent.resolve(), source=path)  # a bad file is refused here
    if args.show:
        out.print(escape(trust.changes(path, raw)) or f"# {escape(str(path))} is trusted as it is", end="")
    out.print(f"# what {escape(str(path))} reaches outside the sandbox:")
    for line in trust.reaching_out(config):
        out.print(f"  {escape(printable(line))}")
    if args.show:
        return 0
    trust.trust(path, raw)
    err.print(f"trusted {escape(str(path))} as it is now (sha256 {hashlib.sha256(raw).hexdigest()[:16]}…); a change must be trusted again")
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    results = doctor_mod.checks()
    bad = [c for c in results if not c.ok and c.required]
    if args.json:
        _print_json([c.__dict__ for c in results])
    else:
        t = Table("check", "", "detail", "fix")
        for c in results:
            mark = "[green]ok[/]" if c.ok else ("[red]missing[/]" if c.required else "[yellow]no[/]")
            t.add_row(c.name, mark, c.detail, c.fix)
        out.print(t)
    return 1 if bad else 0


# --------------------------------------------------------------- main


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


# ------------------------------------------------------------ the verbs, as a table


@dataclass(frozen=True)
class Arg:
    flags: tuple[str, ...]
    options: dict[str, Any]


def arg(*flags: str, **options: Any) -> Arg:
    return Arg(flags, options)


@dataclass(frozen=True)
class Verb:
    """A verb (or a verb's sub-verb): its arguments, what runs it, and its sub-verbs, if any."""

    name: str
    help: str
    args: tuple[Arg, ...] = ()
    run: Handler | None = None
    settings: bool = False  # it takes a flag per setting (config.SETTINGS)
    usage: str | None = None
    takes_command: bool = False  # CMD... after `--`
    sub: tuple[Verb, ...] = ()
    sub_dest: str = ""


NAME = arg("name", nargs="?", default="default", help="sandbox name (default: default)")
NAMED = arg("name", help="sandbox name")
JSON = arg("--json", action="store_true")
TIMEOUT = arg("--timeout", type=float, metavar="SECONDS")

VERBS: tuple[Verb, ...] = (
    Verb("build", "build the guest image (cached by its recipe)",
         (arg("--force", action="store_true", help="rebuild even if the image is cached"),), cmd_build, settings=True),
    Verb("config", "show the effective settings; trust a project's vivarium.toml", sub_dest="config_verb", sub=(
        Verb("show", "print the effective settings", (JSON,), cmd_config_show, settings=True),
        Verb("trust", "trust this vivarium.toml as it is now (a changed file must be trusted again)",
             (arg("file", nargs="?", type=Path, metavar="FILE", help="default: ./vivarium.toml"),
              arg("--show", action="store_true", help="only show what changed since the trusted version, and what it reaches")),
             cmd_config_trust),
    )),
    Verb("doctor", "check what this host has and what is missing", (JSON,), cmd_doctor),
    Verb("up", "build if needed, create if needed, boot, wait for SSH", (
        NAME,
        arg("--auto-ports", action="store_true", help="pick free host ports where the configured ones are busy"),
        arg("--cold", action="store_true", help="boot a new sandbox instead of restoring the ready template"),
        arg("--timeout", type=float, metavar="SECONDS", help="how long to wait for SSH (default 180 with KVM, 600 with TCG)"),
    ), cmd_up, settings=True),
    Verb("ssh", "open a shell (or run CMD) in the sandbox over SSH", (NAME,), cmd_ssh,
         usage="vivarium ssh [NAME] [-- CMD...]", takes_command=True),
    Verb("exec", "run CMD in the sandbox, in this directory where a share holds it; exits with its exit code", (NAME,), cmd_exec,
         usage="vivarium exec [NAME] -- CMD...", takes_command=True),
    Verb("ssh-config", "print a Host block for ~/.ssh/config", (NAME,), cmd_ssh_config),
    Verb("ls", "list sandboxes", (JSON,), cmd_ls),
    Verb("status", "state, pid, accelerator, ports, image, uptime", (NAME, JSON), cmd_status),
    Verb("logs", "the serial console log", (NAME, arg("-f", "--follow", action="store_true")), cmd_logs),
    Verb("stop", "power off (ACPI), kill after a timeout", (NAME, arg("--timeout", type=float, default=30.0, metavar="SECONDS")), cmd_stop),
    Verb("destroy", "stop and delete the sandbox and its disk", (NAME,), cmd_destroy),
    Verb("reset", "back to clean: a new copy of the ready template (or of the image); restarts it if it ran", (NAME, TIMEOUT), cmd_reset),
    Verb("run", "run CMD (an agent) in a tmux session in the sandbox; up first if needed", (
        NAME,
        arg("--env", action="append", default=[], metavar="VAR", help="copy this host variable into CMD's environment only"),
        arg("-d", "--detach", action="store_true", help="leave it running in the background"),
        arg("--session", help="session name (default: the command's name)"),
    ), cmd_run, settings=True, usage="vivarium run [NAME] [--env VAR]... [-d] [--session S] -- CMD...", takes_command=True),
    Verb("attach", "reattach to a session started by `run`", (NAMED, arg("session", nargs="?")), cmd_attach),
    Verb("sessions", "list the sandbox's sessions", (NAME, JSON), cmd_sessions),
    Verb("port", "add, remove or list forwarded ports at runtime", (NAMED,), cmd_port, sub_dest="port_verb", sub=(
        Verb("add", "forward HOST:GUEST (bound to 127.0.0.1 unless --bind)", (arg("spec", metavar="HOST:GUEST"), arg("--bind", default="127.0.0.1"))),
        Verb("rm", "remove the forward on host port HOST", (arg("host", type=int, metavar="HOST"),)),
        Verb("ls", "list forwards", (JSON,)),
    )),
    Verb("diff", "what the sandbox changed in its review-mode shares",
         (NAME, arg("--patch", action="store_true", help="a unified diff of text files"), JSON), cmd_diff),
    Verb("apply", "copy the changes the last `diff` showed (review-mode shares) to the host", (
        NAMED,
        arg("paths", nargs="*", metavar="PATH", help="only changes at or under these host paths (default: all)"),
        arg("--id", metavar="ID", help="the change set a diff printed (default: the last diff)"),
    ), cmd_apply),
    Verb("snapshot", "save and restore a running sandbox's memory and disks", (NAMED,), cmd_snapshot, sub_dest="snapshot_verb", sub=(
        Verb("save", "save it as TAG (default: a timestamp); it keeps running", (arg("tag", nargs="?"),)),
        Verb("restore", "go back to TAG: memory and disks, where it left off", (arg("tag"),)),
        Verb("ls", "list snapshots", (JSON,)),
        Verb("rm", "delete snapshot TAG", (arg("tag"),)),
    )),
    Verb("kubeconfig", "a kubeconfig for the sandbox's Kind cluster, through the forwarded API port",
         (NAME, arg("--merge", action="store_true", help="merge it into ~/.kube/config as context vivarium-NAME")), cmd_kubeconfig),
    Verb("docker-context", "a Docker context on this host for the sandbox's daemon (over SSH)", (NAME,), cmd_docker_context),
    Verb("egress", "the network fence: its log, live allow/deny, what a destination would meet", (), cmd_egress, sub_dest="egress_verb", sub=(
        Verb("log", "every connection and DNS query the sandbox made, with the decision and its rule", (
            NAMED,
            arg("--json", action="store_true", help="the raw JSON lines"),
            arg("-f", "--follow", action="store_true", help="keep printing new entries"),
            arg("--denied", action="store_true", help="only denials"),
        )),
        *(Verb(verb, what, (NAMED, arg("domain", metavar="DOMAIN", help='e.g. pypi.org, "*.github.com", example.com:443')))
          for verb, what in (("allow", "allow a domain now (allowlist mode), no reboot"), ("deny", "deny a domain now, in any mode"))),
        Verb("check", "what a connection to HOST[:PORT] would meet, and which rule decides", (NAMED, arg("target", metavar="HOST[:PORT]"), JSON)),
    )),
)  # fmt: skip


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vivarium", description="Disposable, network-fenced Debian VMs for AI coding agents.")
    p.add_argument("--config", type=Path, metavar="FILE", help="settings file (default: ./vivarium.toml)")
    p.add_argument("--debug", action="store_true", help="log every command run; tracebacks on errors")
    _add_verbs(p.add_subparsers(dest="verb", metavar="VERB", required=True), VERBS)
    return p


def _add_verbs(subparsers: Any, verbs: Sequence[Verb]) -> None:
    for v in verbs:
        p = subparsers.add_parser(v.name, help=v.help, **({"usage": v.usage} if v.usage else {}))
        for a in v.args:
            p.add_argument(*a.flags, **a.options)
        if v.settings:
            _add_setting_flags(p)
        if v.sub:
            _add_verbs(p.add_subparsers(dest=v.sub_dest, metavar="|".join(s.name for s in v.sub), required=True), v.sub)
        if v.run is not None:
            p.set_defaults(func=v.run, **({"command": []} if v.takes_command else {}))


def main(argv: Sequence[str] | None = None) -> int:
    p = parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    # Everything after the first `--` is the guest command, never our options.
    command: list[str] | None = None
    if "--" in argv:
        at = argv.index("--")
        argv, command = argv[:at], argv[at + 1 :]
    args = p.parse_args(argv)
    if command is not None:
        if not hasattr(args, "command"):
            p.error(f"{args.verb} takes no command after --")
        args.command = command
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.WARNING,
        format="%(name)s: %(message)s" if args.debug else "%(levelname)s: %(message)s",
        stream=sys.stderr,
    )
    logging.addLevelName(logging.WARNING, "warning")
    logging.addLevelName(logging.ERROR, "error")
    # `kill` (SIGTERM) ends a verb the way Ctrl-C does: half-built images and half-started VMs are cleaned up.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        code: int = args.func(args)
        return code
    except VivariumError as e:
        if args.debug:
            raise
        err.print(f"[red]error:[/] {escape(printable(e.message, lines=True))}")  # may quote the guest (a console tail)
        if e.hint:
            err.print(f"  hint: {escape(printable(e.hint, lines=True))}")
        return e.exit_code
    except OSError as e:  # a full disk, a file gone from under us: one line, not a traceback
        if args.debug:
            raise
        where = f": {e.filename}" if e.filename else ""
        err.print(f"[red]error:[/] {escape(e.strerror or str(e))}{escape(str(where))}")
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            err.print("  hint: free some disk space, or set VIVARIUM_HOME to a disk with room (see `vivarium doctor`)")
        return 1
    except KeyboardInterrupt:
        err.print("interrupted")
        return 130
