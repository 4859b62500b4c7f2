"""The modules' import graph: no cycle, each layer imports only from below (or beside) it, every module imports alone.

A new import that points up a layer, or closes a cycle (function-level imports count; TYPE_CHECKING ones,
which never run, do not), fails here: move the code to the owner it belongs to instead.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "vivarium"

# Lowest first. A module may import modules of its own layer or of layers below it.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("errors", "printable", "progress", "run", "guest", "image", "record", "host", "defaults", "logfile", "share.userns", "cgroup"),
    ("state", "net.routes", "net.policy", "values", "credentials", "config", "trust"),
    ("vm.accel", "vm.caps", "vm.channel", "vm.machine", "vm.memory", "vm.qemu", "vm.console", "vm.spawn", "net.sniff", "net.dns", "net.ca",
     "net.inject", "net.tls", "net.relay", "image.recipe", "image.initrd", "image.mmdebstrap", "share.confine", "share.review", "share.writeback",
     "share.gitbranch", "ssh", "kube"),
    ("net.netns", "net.terminate", "net.gateway", "net.supervisor", "net.control", "net.__main__", "image.build", "share.virtiofs",
     "share.changesets", "ports", "snapshots", "template", "sessions", "transfer", "files"),
    ("instance", "launch", "provision"),
    ("sandbox",),
    ("doctor", "mcp_server", "verbs.common", "verbs.box", "verbs.review", "verbs.egress", "verbs.host", "cli", "__main__", "__init__"),
)  # fmt: skip
LAYER = {name: i for i, names in enumerate(LAYERS) for name in names}


def modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT).with_suffix("")
        parts = rel.parts[:-1] if rel.name == "__init__" and len(rel.parts) > 1 else rel.parts
        name = ".".join(parts)
        if path.name == "__init__.py" and path.stat().st_size == 0:
            continue  # an empty package marker
        out[name] = path
    return out


def imports(path: Path, known: set[str]) -> set[str]:
    """The vivarium modules `path` imports, wherever in it (but under `if TYPE_CHECKING:`)."""
    tree = ast.parse(path.read_text())
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for child in node.body for n in ast.walk(child))
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for n in names:
            if n.startswith("vivarium."):
                short = n.removeprefix("vivarium.")
                if short in known:
                    found.add(short)
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports(path, set(mods)) - {name} for name, path in mods.items()}


def test_every_module_has_a_layer() -> None:
    assert sorted(set(graph()) - set(LAYER)) == []


def test_imports_point_down_the_layers() -> None:
    upward = [f"{m} imports {t}" for m, targets in graph().items() for t in targets if LAYER[t] > LAYER[m]]
    assert upward == []


def test_no_import_cycle() -> None:
    g = graph()
    done: set[str] = set()

    def visit(node: str, path: list[str]) -> None:
        if node in path:
            raise AssertionError("import cycle: " + " -> ".join([*path[path.index(node) :], node]))
        if node in done:
            return
        for nxt in sorted(g.get(node, ())):
            visit(nxt, [*path, node])
        done.add(node)

    for node in sorted(g):
        visit(node, [])


def test_each_module_imports_on_its_own() -> None:
    names = [n for n in modules() if not n.endswith("__main__")]
    procs = {n: subprocess.Popen([sys.executable, "-c", f"import vivarium.{n}" if n != "__init__" else "import vivarium"],
                                 stderr=subprocess.PIPE, text=True) for n in names}  # fmt: skip
    failed = {n: p.communicate()[1].strip().splitlines()[-1:] for n, p in procs.items() if p.wait() != 0}
    assert failed == {}
