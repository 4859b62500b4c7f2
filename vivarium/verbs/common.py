"""What the verbs share: the consoles, the settings a verb runs with, the sandbox it works on, printing."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from vivarium import config as cfg
from vivarium import trust, values
from vivarium.errors import VivariumError
from vivarium.image.build import Image, build_image
from vivarium.image.recipe import Recipe
from vivarium.progress import PhaseDisplay
from vivarium.sandbox import Sandbox

out = Console(highlight=False, soft_wrap=True)


err = Console(stderr=True, highlight=False, soft_wrap=True)


Handler = Callable[[argparse.Namespace], int]


def setting_overrides(args: argparse.Namespace) -> dict[str, object]:
    found: dict[str, object] = {}
    for s in cfg.SETTINGS:
        value = getattr(args, f"set:{s.name}", None)
        if value is None:
            continue
        if s.name == "share":
            value = [values.parse_share_flag(v) for v in value]
        found[s.name] = value
    return found


def load_config(args: argparse.Namespace, *, vm: bool = True) -> cfg.Config:
    """The effective config (a ./vivarium.toml only when trusted); `vm`: this verb sizes a VM, so say what was clamped."""
    config = trust.discover(args.config, Path.cwd(), setting_overrides(args))
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
    overrides = setting_overrides(args)
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


def command_of(args: argparse.Namespace) -> list[str]:
    return list(args.command)


def print_json(data: object) -> None:
    """JSON as JSON: ASCII, every guest-made character escaped (rich's print_json would write them raw)."""
    sys.stdout.write(json.dumps(data, indent=2) + "\n")


def print_connect(box: Sandbox) -> None:
    st = box.status()
    out.print(f"  vivarium ssh {box.name}")
    out.print(f"  vivarium ssh-config {box.name} >> ~/.ssh/config && ssh vivarium-{box.name}   # VS Code Remote-SSH too")
    for p in st.ports:
        out.print(f"  {p['bind']}:{p['host']} → guest {p['guest']}")


def build_with_progress(config: cfg.Config, *, force: bool = False) -> tuple[Image, bool]:
    recipe = Recipe.from_config(config)
    with PhaseDisplay("build", err) as show:
        return build_image(recipe, force=force, progress=show)
