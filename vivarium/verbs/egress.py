"""egress: the fence of a running sandbox, its audit log, live changes and checks."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable
from typing import Any

from rich.markup import escape

from vivarium.errors import UsageError
from vivarium.net.policy import split_host_port
from vivarium.printable import printable
from vivarium.sandbox import Sandbox
from vivarium.verbs.common import err, out, print_json


def cmd_egress(args: argparse.Namespace) -> int:
    box = Sandbox(args.name)
    if args.egress_verb in ("allow", "deny"):
        err.print(f"sandbox {args.name!r}: {box.egress_change(args.egress_verb, args.domain)}")
        return 0
    if args.egress_verb == "check":
        host, port = _host_port(args.target)
        rows = box.egress_check(host, port)
        if args.json:
            print_json([{"address": a, "name": n, "allow": d.allow, "rule": d.rule} for a, n, d in rows])
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
            sys.stdout.write(egress_line(record) + "\n")
        sys.stdout.flush()
    return 0


def _host_port(text: str) -> tuple[str, int]:
    try:
        return split_host_port(text, 443)
    except ValueError as e:
        raise UsageError(f"egress check: {e}", hint="write it as HOST or HOST:PORT, e.g. pypi.org:443") from None


def egress_line(r: dict[str, Any]) -> str:
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
