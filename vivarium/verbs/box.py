"""The verbs of a sandbox's life and use: up, exec, run, sessions, status, logs, stop, reset, ports, snapshots, kube."""

from __future__ import annotations

import argparse
import codecs
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from rich.markup import escape
from rich.table import Table

from vivarium import kube, logfile, ssh, state, transfer, values
from vivarium.errors import UsageError, VivariumError
from vivarium.printable import printable
from vivarium.progress import PhaseDisplay
from vivarium.sandbox import Sandbox, list_sandboxes
from vivarium.verbs.common import command_of, err, out, print_connect, print_json, sandbox_for


def cmd_up(args: argparse.Namespace) -> int:
    box = sandbox_for(args)
    if box.exists() and box.pid() is not None:
        before = box.status()
        had_gateway = before.gateway is not None or before.network == "unfenced"
        box.up()  # brings back a gateway that was killed from outside: egress has been failing closed
        err.print(f"sandbox {args.name!r} is already running" + ("" if had_gateway else "; its egress gateway was down and is restarted"))
        print_connect(box)
        return 0
    for f in box.config.forward:
        if f.bind not in ("127.0.0.1", "::1"):
            err.print(f"[yellow]warning:[/] host port {f.host} is bound to {f.bind}: reachable from your network")
    with PhaseDisplay(f"up {args.name}", err) as show:
        status = box.up(progress=show, auto_ports=args.auto_ports, timeout=args.timeout, cold=args.cold, share=not args.no_share)
        took = show.elapsed()
    run = box.record().run
    err.print(f"sandbox {args.name!r} is up in {took:.1f}s ({status.accel}: {escape(run.accel_reason if run else '')})")
    print_connect(box)
    return 0


def cmd_ssh(args: argparse.Namespace) -> int:
    box = Sandbox(args.name)
    cmd = command_of(args)
    argv = box.target().argv(cmd, tty=sys.stdin.isatty() or None, batch=False)
    return subprocess.call(argv)


def cmd_exec(args: argparse.Namespace) -> int:
    cmd = command_of(args)
    if not cmd:
        raise UsageError("exec needs a command", hint=f"vivarium exec {args.name} -- CMD...")
    box = Sandbox(args.name)
    if args.tty and args.no_tty:
        raise UsageError("exec -t and -T: one or the other", hint="-t gives CMD a terminal, -T never")
    tty = True if args.tty else False if args.no_tty else None  # as ssh decides: none for a command
    # where you are, as the share has it; your stdin is the command's (`git diff | vivarium exec -- git apply`)
    return box.exec(cmd, cwd=box.guest_dir(Path.cwd()), stdin=ssh.INHERIT, tty=tty).returncode


def cmd_cp(args: argparse.Namespace) -> int:
    (src_box, src), (dst_box, dst) = transfer.split(args.src), transfer.split(args.dst)
    if (src_box is None) == (dst_box is None):
        raise UsageError("cp copies between this host and a sandbox: NAME:PATH on one side, a host path on the other",
                         hint="vivarium cp ./file default:/home/agent/ or vivarium cp default:/tmp/out ./")  # fmt: skip
    if dst_box is not None:
        where = Sandbox(dst_box).files.copy_in(Path(src), dst)
        err.print(f"copied {src} to {dst_box}:{escape(printable(where))}")
    else:
        assert src_box is not None
        got = Sandbox(src_box).files.copy_out(src, Path(dst))
        err.print(f"copied {src_box}:{escape(printable(src))} to {got}")
    return 0


def cmd_mcp(args: argparse.Namespace) -> int:
    for name in args.sandbox:
        state.check_name(name)
    from vivarium import mcp_server  # the SDK (pydantic and all) only for this verb

    mcp_server.serve(args.sandbox)
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    cmd = command_of(args)
    if not cmd:
        raise UsageError("run needs a command", hint=f"vivarium run {args.name} -- claude")
    box = sandbox_for(args)
    if not (box.exists() and box.pid() is not None):
        with PhaseDisplay(f"up {args.name}", err) as show:
            box.up(progress=show)
    session = args.session or os.path.basename(cmd[0]) or "agent"
    box.start_session(cmd, session=session, env_names=args.env, secrets=args.secret)
    if args.detach:
        err.print(f"started {session!r} in sandbox {args.name!r}; `vivarium attach {args.name} {session}` to see it")
        return 0
    return subprocess.call(box.attach_argv(session))


def cmd_attach(args: argparse.Namespace) -> int:
    return subprocess.call(Sandbox(args.name).attach_argv(args.session))


def cmd_sessions(args: argparse.Namespace) -> int:
    rows = Sandbox(args.name).sessions()
    if args.json:
        print_json(rows)
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
        print_json([r.to_dict() for r in rows])
        return 0
    t = Table("name", "state", "accel", "ssh", "memory", "cpus", "uptime")
    for r in rows:
        t.add_row(r.name, r.state, r.accel, str(r.ssh_port or ""), r.memory, str(r.cpus or ""), _uptime(r.uptime))
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
        print_json(st.to_dict())
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
        elif key == "cgroup":
            value = _cgroup(value)
        out.print(f"{key:8} {escape(printable(str(value))) if value is not None else ''}")
    return 0


def _cgroup(cg: dict[str, Any]) -> str:
    if not cg:
        return ""
    if "none" in cg:
        return f"none ({cg['none']})"
    most = values.format_size(cg["memory_max"]) if cg["memory_max"] != "max" else "no limit"
    memory = f"{values.format_size(cg['memory'])} of {most}"
    return f"{cg['path']}: {cg['pids']} of {cg['pids_max']} processes and threads, {memory} memory"


def cmd_logs(args: argparse.Namespace) -> int:
    box = Sandbox(args.name)
    box.record()  # one line if there is no such sandbox
    path = box.dir.serial
    if not logfile.all_of(path):
        err.print("no console log yet")
        return 0
    text = codecs.getincrementaldecoder("utf-8")(errors="replace")
    for data in logfile.chunks(path, follow=args.follow):  # the rotated files first, oldest first
        sys.stdout.write(printable(text.decode(data), lines=True))  # the guest's console: shown, never obeyed by the terminal
        sys.stdout.flush()
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
            host, guest = values.parse_port(host_s, "HOST"), values.parse_port(guest_s or host_s, "GUEST")
        except VivariumError as e:
            raise UsageError(f"port add: {e.message}", hint="write it as HOST:GUEST, e.g. 8080:80") from None
        box.port_add(host, guest, args.bind)
        err.print(f"{args.bind}:{host} → guest {guest}")
    elif args.port_verb == "rm":
        box.port_rm(args.host)
    else:
        ports = box.status().ports
        if args.json:
            print_json(ports)
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
            print_json(rows)
        else:
            t = Table("tag", "created", "memory", "cpus", "accel", "size")
            for r in rows:
                t.add_row(r["tag"], time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["created"])), values.format_size(r["memory"]),
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
