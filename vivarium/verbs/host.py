"""The verbs about the host: build, config show and trust, doctor."""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

from rich.markup import escape
from rich.table import Table

from vivarium import config as cfg
from vivarium import doctor as doctor_mod
from vivarium import trust
from vivarium.errors import UsageError
from vivarium.printable import printable
from vivarium.verbs.common import build_with_progress, err, load_config, out, print_json


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


def cmd_config_show(args: argparse.Namespace) -> int:
    config = load_config(args)
    data = cfg.to_dict(config)
    if args.json:
        print_json(data)
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
        print_json([c.__dict__ for c in results])
    else:
        t = Table("check", "", "detail", "fix")
        for c in results:
            mark = "[green]ok[/]" if c.ok else ("[red]missing[/]" if c.required else "[yellow]no[/]")
            t.add_row(c.name, mark, escape(c.detail), escape(c.fix))
        out.print(t)
    return 1 if bad else 0
