"""The host side of one sandbox's fence: start, stop and steer its gateway process.

The gateway reads `policy.json` in the instance directory; live changes
(`vivarium egress allow|deny`) edit that file and send SIGHUP. It takes the
guest's connections from the sandbox's network namespace (netns.py), which
must be made first.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import dns.message
import dns.rdatatype

from vivarium import logfile, state, values
from vivarium.errors import InstanceError, UsageError, VMError
from vivarium.logfile import Cap
from vivarium.net import dns as dns_
from vivarium.net import gateway
from vivarium.net.inject import Secret
from vivarium.net.policy import AllowRule, Decision, Policy, unwrap
from vivarium.net.routes import Router


def write_policy(directory: Path, mode: str, allow: Iterable[tuple[str, str]], allow_cidrs: Iterable[str],
                 deny_cidrs: Iterable[str], dns_upstream: str, deny: Iterable[tuple[str, str]] = (),
                 upstream_ca: str = "", audit: Cap = gateway.AUDIT_CAP) -> None:  # fmt: skip
    """The policy the gateway enforces; `allow`/`deny` are (rule, who added it); `audit`: the audit log's cap."""
    data = {
        "mode": mode,
        "allow": [{"rule": r, "source": s} for r, s in allow],
        "deny": [{"rule": r, "source": s} for r, s in deny],
        "allow_cidrs": list(allow_cidrs),
        "deny_cidrs": list(deny_cidrs),
        "dns_upstream": dns_upstream,
        "upstream_ca": upstream_ca,
        "audit": {"size": audit.size, "keep": audit.keep},
    }
    _write(directory / gateway.POLICY, data)


def give_secret(directory: Path, secret: Secret, timeout: float = 10.0) -> None:
    """Hand the running gateway a secret's real value (over its owner-only socket; it keeps it in memory)."""
    line = json.dumps({"name": secret.name, "placeholder": secret.placeholder, "value": secret.value,
                       "hosts": list(secret.hosts), "header": secret.header or ""})  # fmt: skip
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(str(directory / gateway.SECRETS_SOCKET))
            s.sendall(line.encode() + b"\n")
            reply = s.makefile("rb").readline().decode(errors="replace").strip()
    except OSError as e:
        raise VMError(f"cannot hand secret {secret.name} to the egress gateway: {e.strerror or e}",
                      hint="is the sandbox running? `vivarium up` restarts its gateway") from None  # fmt: skip
    if reply != "ok":
        raise VMError(f"the egress gateway did not take secret {secret.name}: {reply or 'no answer'}")


def read_policy(directory: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((directory / gateway.POLICY).read_text())
    return data


def _write(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    tmp.replace(path)


def change_rule(directory: Path, verb: str, rule: str, source: str = "cli") -> str:
    """`allow` or `deny` a name live. Returns what changed, in words."""
    rule = str(AllowRule.parse(rule))  # normalised; the CLI checked the syntax
    data = read_policy(directory)
    other = "deny" if verb == "allow" else "allow"
    removed = [r for r in data[other] if r["rule"] == rule]
    data[other] = [r for r in data[other] if r["rule"] != rule]
    if any(r["rule"] == rule for r in data[verb]):
        what = f"{rule} was already {'allowed' if verb == 'allow' else 'denied'}"
    else:
        data[verb].append({"rule": rule, "source": source})
        what = f"{'allowed' if verb == 'allow' else 'denied'} {rule}" + (f" (no longer {other}ed)" if removed else "")
    _write(directory / gateway.POLICY, data)
    reload(directory)
    return what


def set_mode(directory: Path, mode: str) -> None:
    """Switch the policy mode live, keeping every rule."""
    Policy.build(mode)  # checks the mode
    data = read_policy(directory)
    data["mode"] = mode
    _write(directory / gateway.POLICY, data)
    reload(directory)


def policy_of(directory: Path) -> gateway.Settings:
    return gateway.Settings.load(directory / gateway.POLICY)


def pid(directory: Path, pidfile: str = gateway.PIDFILE) -> int | None:
    """The supervisor's pid, if it is running (the process its pid file names, by pid and start time)."""
    return state.read_pid(directory / pidfile)


def child_pid(directory: Path) -> int | None:
    """The serving process's pid (tests kill it to see the supervisor restart it)."""
    return state.read_pid(directory / gateway.CHILD_PIDFILE)


def start(directory: Path, qemu_pidfile: Path) -> int:
    """Start the gateway (a supervisor and its serving child); return its pid once it serves."""
    return wait_started(directory, launch(directory, qemu_pidfile))


def launch(directory: Path, qemu_pidfile: Path) -> subprocess.Popen[bytes]:
    """Start the gateway without waiting for it (`wait_started` does): the caller starts QEMU meanwhile."""
    stop(directory)
    err = (directory / "gateway.err").open("ab")
    try:
        return subprocess.Popen(
            [sys.executable, "-m", "vivarium.net", "--dir", str(directory), "--qemu-pidfile", str(qemu_pidfile)],
            stdin=subprocess.DEVNULL, stdout=err, stderr=err, start_new_session=True,
        )  # fmt: skip
    finally:
        err.close()


def serving(directory: Path) -> bool:
    """Does the gateway's serving process take connections now?"""
    value = state.read_pid(directory / gateway.SERVING)
    return value is not None and value == child_pid(directory)


def wait_started(directory: Path, proc: subprocess.Popen[bytes]) -> int:
    """Until the gateway `launch` started serves; its pid."""
    proc.wait(30)  # it forks and its first half exits at once
    deadline = time.monotonic() + 15
    while not serving(directory) or pid(directory) is None:
        gone = (directory / gateway.PIDFILE).exists() and pid(directory) is None  # it started, and gave up
        if time.monotonic() > deadline or gone or (proc.returncode and not (directory / gateway.PIDFILE).exists()):
            value = pid(directory)
            if value is not None:
                os.kill(value, signal.SIGKILL)
            lines = (directory / "gateway.err").read_text(errors="replace").strip().splitlines()
            said = ([ln.removeprefix("gateway: ") for ln in lines if ln.startswith("gateway: ")] or lines)[-1:]
            raise VMError(f"the egress gateway did not start: {said[0] if said else 'no output'}", hint=f"see {directory / 'gateway.err'}")
        time.sleep(0.02)
    value = pid(directory)
    assert value is not None
    return value


def stop(directory: Path) -> None:
    """Stop the gateway: its supervisor (one just launched too), and a serving process left without one."""
    value = pid(directory) or pid(directory, gateway.LAUNCHED)
    orphan = child_pid(directory) if value is None else None
    if orphan is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(orphan, signal.SIGKILL)
    if value is not None:
        os.kill(value, signal.SIGTERM)
        deadline = time.monotonic() + 5
        while state.started(value) is not None and time.monotonic() < deadline:
            time.sleep(0.02)
        if state.started(value) is not None:
            os.kill(value, signal.SIGKILL)
    for name in (gateway.PIDFILE, gateway.LAUNCHED, gateway.SERVING, gateway.SECRETS_SOCKET):
        (directory / name).unlink(missing_ok=True)


def reload(directory: Path) -> bool:
    value = pid(directory)
    if value is None:
        return False
    os.kill(value, signal.SIGHUP)
    return True


def records(directory: Path, *, follow: bool = False) -> Iterator[dict[str, Any]]:
    """The audit log's records, oldest first, across its rotation; with follow, wait for new ones for ever.
    A line still being written is read once it is whole."""
    for line in logfile.lines(directory / gateway.AUDIT, follow=follow):
        with contextlib.suppress(ValueError):
            yield json.loads(line)


def check(directory: Path, host: str, port: int) -> list[tuple[str, str, Decision]]:
    """What the gateway would decide for host:port: (address, name, Decision) per address.

    A name is resolved the way the gateway resolves it, so the answer names the rule."""
    settings = policy_of(directory)
    policy: Policy = settings.policy
    router = Router()
    try:
        ip = unwrap(ipaddress.ip_address(host))
    except ValueError:
        pass
    else:
        return [(str(ip), "", policy.decide(ip, port, reach=router.reach(ip)))]
    verdict = policy.name_verdict(host)
    if not verdict.allow:
        return [("", host, verdict)]
    resolver = dns_.Resolver(settings.dns_upstream)
    out: list[tuple[str, str, Decision]] = []
    for rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
        query = dns.message.make_query(host, rdtype)
        reply = asyncio.run(resolver.answer(query, query.to_wire()))
        ips = dns_.answer_ips(reply)
        for ip in ips:
            out.append((str(ip), host, policy.decide(ip, port, host, ips, router.reach(unwrap(ip)))))
    if not out:
        out.append(("", host, Decision(False, f"{host} does not resolve")))
    return out


def fenced(d: state.InstanceDir) -> None:
    """The sandbox exists and has a fence (it started once)."""
    if not d.exists():
        raise InstanceError(f"no sandbox named {d.name!r}", hint="see `vivarium ls`")
    if not (d.path / gateway.POLICY).exists():
        raise InstanceError(f"sandbox {d.name!r} has no network fence yet", hint=f"start it with `vivarium up {d.name}`")


def change(d: state.InstanceDir, verb: str, domain: str, *, running: bool) -> str:
    """Allow or deny a domain for a sandbox, live and kept across restarts. What changed, in words."""
    fenced(d)
    values.check_domain(domain, f"egress {verb}")
    with d.lock():
        what = change_rule(d.path, verb, domain)
    if running and pid(d.path) is None:
        raise VMError(f"sandbox {d.name!r} has no running gateway; {what} from its next start",
                      hint=f"`vivarium up {d.name}` starts it again")  # fmt: skip
    return what


def change_mode(d: state.InstanceDir, mode: str) -> None:
    """Switch a running sandbox's fence to lan-block, allowlist or offline, live (until its next start)."""
    fenced(d)
    if mode not in ("lan-block", "allowlist", "offline"):
        raise UsageError(f"unknown network mode {mode!r}", hint="lan-block, allowlist or offline")
    with d.lock():
        set_mode(d.path, mode)
