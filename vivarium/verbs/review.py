"""diff and apply: a review share's changes shown, and the reviewed ones copied to the host."""

from __future__ import annotations

import argparse
import sys

from rich.markup import escape

from vivarium.printable import printable
from vivarium.sandbox import Sandbox
from vivarium.verbs.common import err, print_json


def cmd_diff(args: argparse.Namespace) -> int:
    shares = Sandbox(args.name).diff(patch=args.patch)
    if args.json:
        print_json(shares)
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
    if args.branch is not None:
        return _apply_branch(args)
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


def _apply_branch(args: argparse.Namespace) -> int:
    for made in Sandbox(args.name).apply_branch(args.branch, args.paths, set_id=args.id):
        parent = made.parent[:12] + ("" if made.noted else " (HEAD now: the sandbox's start noted no commit)")
        err.print(f"committed {made.changes} change{'s' if made.changes != 1 else ''} of {escape(printable(made.share))} as branch "
                  f"{escape(printable(args.branch))} ({made.commit[:12]}) on {parent} in {escape(made.repo)}: "
                  f"`git log -p {escape(printable(args.branch))}` shows it, `git merge` takes it")  # fmt: skip
        for sk in made.skipped:
            err.print(f"skipped {escape(printable(sk['path']))}: {escape(printable(sk['why']))}")
    return 0
