"""The command line: a table of verbs, from which argparse is built, and main. What each verb does is in
vivarium/verbs/; only the CLI prints for humans or exits."""

from __future__ import annotations

import argparse
import errno
import logging
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.markup import escape

from vivarium import config as cfg
from vivarium import host as machine
from vivarium import state
from vivarium.errors import VivariumError
from vivarium.printable import printable
from vivarium.verbs import box, egress, host, review
from vivarium.verbs.common import Handler, err


def _add_setting_flags(p: argparse.ArgumentParser) -> None:
    """One flag per setting that has one, straight from the settings table."""
    g = p.add_argument_group("settings (override vivarium.toml)")
    for s in cfg.SETTINGS:
        if s.flag:
            g.add_argument(
                s.flag, dest=f"set:{s.name}", metavar=s.metavar, help=s.help,
                action="append" if s.repeat else "store",
            )  # fmt: skip


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


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
         (arg("--force", action="store_true", help="rebuild even if the image is cached"),), host.cmd_build, settings=True),
    Verb("config", "show the effective settings; trust a project's vivarium.toml", sub_dest="config_verb", sub=(
        Verb("show", "print the effective settings", (JSON,), host.cmd_config_show, settings=True),
        Verb("trust", "trust this vivarium.toml as it is now (a changed file must be trusted again)",
             (arg("file", nargs="?", type=Path, metavar="FILE", help="default: ./vivarium.toml"),
              arg("--show", action="store_true", help="only show what changed since the trusted version, and what it reaches")),
             host.cmd_config_trust),
    )),
    Verb("doctor", "check what this host has and what is missing", (JSON,), host.cmd_doctor),
    Verb("up", "build if needed, create if needed, boot, wait for SSH", (
        NAME,
        arg("--auto-ports", action="store_true", help="pick free host ports where the configured ones are busy"),
        arg("--cold", action="store_true", help="boot a new sandbox instead of restoring the ready template"),
        arg("--no-share", action="store_true", help="start without the configured shares (an error if they cannot be served, otherwise)"),
        arg("--timeout", type=float, metavar="SECONDS", help="how long to wait for SSH (default 180 with KVM, 600 with TCG)"),
    ), box.cmd_up, settings=True),
    Verb("ssh", "open a shell (or run CMD) in the sandbox over SSH", (NAME,), box.cmd_ssh,
         usage="vivarium ssh [NAME] [-- CMD...]", takes_command=True),
    Verb("exec", "run CMD in the sandbox, in this directory where a share holds it, with this stdin; exits with its exit code", (
        NAME,
        arg("-t", "--tty", action="store_true", help="give CMD a terminal (default: none, as ssh does for a command)"),
        arg("-T", "--no-tty", action="store_true", help="never a terminal"),
    ), box.cmd_exec, usage="vivarium exec [NAME] [-t|-T] -- CMD...", takes_command=True),
    Verb("cp", "copy a file or directory into or out of a sandbox (NAME:PATH on one side), over SSH", (
        arg("src", metavar="SRC", help="a host path, or NAME:PATH in a sandbox"),
        arg("dst", metavar="DST", help="a host path, or NAME:PATH in a sandbox (into it, if a directory)"),
    ), box.cmd_cp, usage="vivarium cp SRC DST   (NAME:PATH on one side)"),
    Verb("mcp", "serve sandboxes to an agent on this host as MCP tools, over stdio (claude mcp add vivarium -- vivarium mcp)", (
        arg("--sandbox", action="append", required=True, metavar="NAME", help="a sandbox its tools may use (repeatable)"),
    ), box.cmd_mcp),
    Verb("ssh-config", "print a Host block for ~/.ssh/config", (NAME,), box.cmd_ssh_config),
    Verb("ls", "list sandboxes", (JSON,), box.cmd_ls),
    Verb("status", "state, pid, accelerator, ports, image, uptime", (NAME, JSON), box.cmd_status),
    Verb("logs", "the serial console log", (NAME, arg("-f", "--follow", action="store_true")), box.cmd_logs),
    Verb("stop", "power off (ACPI), kill after a timeout", (NAME, arg("--timeout", type=float, default=30.0, metavar="SECONDS")), box.cmd_stop),
    Verb("destroy", "stop and delete the sandbox and its disk", (NAME,), box.cmd_destroy),
    Verb("reset", "back to clean: a new copy of the ready template (or of the image); restarts it if it ran", (NAME, TIMEOUT), box.cmd_reset),
    Verb("run", "run CMD (an agent) in a tmux session in the sandbox; up first if needed", (
        NAME,
        arg("--env", action="append", default=[], metavar="VAR",
            help="copy this host variable into CMD's environment only (not for secrets: the agent can read it)"),
        arg("--secret", action="append", default=[], metavar="NAME",
            help="a [[secret]] (or a preset: ANTHROPIC_API_KEY, ...): CMD gets a placeholder, the gateway puts the value in for its hosts"),
        arg("-d", "--detach", action="store_true", help="leave it running in the background"),
        arg("--session", help="session name (default: the command's name)"),
    ), box.cmd_run, settings=True, usage="vivarium run [NAME] [--env VAR]... [--secret NAME]... [-d] [--session S] -- CMD...", takes_command=True),
    Verb("attach", "reattach to a session started by `run`", (NAMED, arg("session", nargs="?")), box.cmd_attach),
    Verb("sessions", "list the sandbox's sessions", (NAME, JSON), box.cmd_sessions),
    Verb("port", "add, remove or list forwarded ports at runtime", (NAMED,), box.cmd_port, sub_dest="port_verb", sub=(
        Verb("add", "forward HOST:GUEST (bound to 127.0.0.1 unless --bind)", (arg("spec", metavar="HOST:GUEST"), arg("--bind", default="127.0.0.1"))),
        Verb("rm", "remove the forward on host port HOST", (arg("host", type=int, metavar="HOST"),)),
        Verb("ls", "list forwards", (JSON,)),
    )),
    Verb("diff", "what the sandbox changed in its review-mode shares",
         (NAME, arg("--patch", action="store_true", help="a unified diff of text files"), JSON), review.cmd_diff),
    Verb("apply", "copy the changes the last `diff` showed (review-mode shares) to the host", (
        NAMED,
        arg("paths", nargs="*", metavar="PATH", help="only changes at or under these host paths (default: all)"),
        arg("--id", metavar="ID", help="the change set a diff printed (default: the last diff)"),
        arg("--branch", metavar="BRANCH", help="commit them on this new git branch instead (working tree and index untouched)"),
    ), review.cmd_apply),
    Verb("snapshot", "save and restore a running sandbox's memory and disks", (NAMED,), box.cmd_snapshot, sub_dest="snapshot_verb", sub=(
        Verb("save", "save it as TAG (default: a timestamp); it keeps running", (arg("tag", nargs="?"),)),
        Verb("restore", "go back to TAG: memory and disks, where it left off", (arg("tag"),)),
        Verb("ls", "list snapshots", (JSON,)),
        Verb("rm", "delete snapshot TAG", (arg("tag"),)),
    )),
    Verb("kubeconfig", "a kubeconfig for the sandbox's Kind cluster, through the forwarded API port",
         (NAME, arg("--merge", action="store_true", help="merge it into ~/.kube/config as context vivarium-NAME")), box.cmd_kubeconfig),
    Verb("docker-context", "a Docker context on this host for the sandbox's daemon (over SSH)", (NAME,), box.cmd_docker_context),
    Verb("egress", "the network fence: its log, live allow/deny, what a destination would meet", (), egress.cmd_egress, sub_dest="egress_verb", sub=(
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
        if (whom := machine.sudo_user()) is not None:
            roots = state.instances_dir()  # root's own, looked at before we are someone else
            left = roots.is_dir() and any(roots.iterdir())
            machine.become(whom)
            logging.getLogger("vivarium").info("running as %s, who ran sudo: nothing of vivarium needs root", whom.pw_name)
            if left:
                err.print(f"[yellow]note:[/] sandboxes made with sudo before live under {escape(str(roots))} and stay root's; "
                          "`sudo env -u SUDO_UID vivarium destroy NAME` removes one")  # fmt: skip
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
