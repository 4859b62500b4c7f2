"""`vivarium mcp`: the sandboxes the user names, as tools for an agent on the host (Claude Code, Cursor,
Codex) over the Model Context Protocol, on stdio, built on the official `mcp` SDK.

Scoped to the sandboxes given with `--sandbox` (a tool asked for another is an error) and to what is in
them: no tool reads or writes the host's files. A failure is a tool error carrying vivarium's one-line
message (and its hint), never a traceback. Blocking work runs in a thread, so the server keeps answering.

    claude mcp add vivarium -- vivarium mcp --sandbox default
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import anyio.to_thread
from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError

from vivarium import trust
from vivarium.errors import VivariumError
from vivarium.sandbox import Sandbox

T = TypeVar("T")
OUTPUT_LIMIT = 1 << 20  # characters of a command's stdout or stderr handed back (the rest is cut, and says so)


async def _call(fn: Callable[[], T]) -> T:
    try:
        return await anyio.to_thread.run_sync(fn)
    except VivariumError as e:
        raise ToolError(f"{e}" + (f" ({e.hint})" if e.hint else "")) from None


def _cut(text: str) -> str:
    return text if len(text) <= OUTPUT_LIMIT else text[:OUTPUT_LIMIT] + f"\n[… {len(text) - OUTPUT_LIMIT} more characters cut]"


def build(names: Sequence[str]) -> MCPServer:
    """The server for the sandboxes `names` (at least one)."""
    allowed = tuple(dict.fromkeys(names))
    server = MCPServer(
        "vivarium",
        instructions=f"Disposable, network-fenced Debian sandboxes for running code: {', '.join(allowed)}. Commands run as "
        "the sandbox's agent user (with sudo); the host is not reachable from them.",
    )

    def box(sandbox: str | None) -> Sandbox:
        name = sandbox or (allowed[0] if len(allowed) == 1 else None)
        if name is None:
            raise ToolError(f"name the sandbox: one of {', '.join(allowed)}")
        if name not in allowed:
            raise ToolError(f"sandbox {name!r} is not one this server was given (vivarium mcp --sandbox): {', '.join(allowed)}")
        return Sandbox(name)

    @server.tool()
    async def up(sandbox: str | None = None) -> str:
        """Start the sandbox (made from this directory's settings if it does not exist yet); says where it stands."""

        def go() -> str:
            b = box(sandbox)
            if not b.exists():
                b = Sandbox(b.name, trust.discover(None, Path.cwd(), {}))
            st = b.up()
            return f"sandbox {st.name!r} is {st.state} ({st.accel}, {st.memory}, {st.cpus} CPUs, network {st.network})"

        return await _call(go)

    @server.tool(name="exec")
    async def exec_(command: list[str], cwd: str | None = None, timeout: float = 600, sandbox: str | None = None) -> dict[str, Any]:
        """Run `command` (argv, no shell unless you run one) in the sandbox, in `cwd` if given; its stdout, stderr
        and exit code once it ends, or an error after `timeout` seconds."""

        def go() -> dict[str, Any]:
            if not command:
                raise ToolError("exec needs a command")
            try:
                r = box(sandbox).exec(command, cwd=cwd, timeout=timeout, capture=True)
            except subprocess.TimeoutExpired:
                raise ToolError(f"the command did not end within {timeout:g}s (it was stopped)") from None
            return {"stdout": _cut(r.stdout), "stderr": _cut(r.stderr), "exit_code": r.returncode}

        return await _call(go)

    @server.tool()
    async def read_file(path: str, sandbox: str | None = None) -> str:
        """A file of the sandbox, as text (bytes that are not UTF-8 shown as U+FFFD)."""
        return await _call(lambda: _cut(box(sandbox).files.read(path).decode(errors="replace")))

    @server.tool()
    async def write_file(path: str, content: str, sandbox: str | None = None) -> str:
        """Make or replace a file of the sandbox with `content`."""

        def go() -> str:
            box(sandbox).files.write(path, content)
            return f"wrote {len(content.encode())} bytes to {path}"

        return await _call(go)

    @server.tool()
    async def list_dir(path: str, sandbox: str | None = None) -> list[dict[str, Any]]:
        """What a directory of the sandbox holds: name, kind (file, dir, link, ...), size, mode."""
        return await _call(lambda: [{"name": e.name, "kind": e.kind, "size": e.size, "mode": f"{e.mode:o}"} for e in box(sandbox).files.list(path)])

    @server.tool()
    async def diff(sandbox: str | None = None) -> str:
        """The changes the sandbox made in its review shares, as a patch (`vivarium apply` on the host takes them)."""
        return await _call(lambda: "".join(share["patch"] for share in box(sandbox).diff(patch=True)) or "no changes")

    @server.tool()
    async def egress_log(limit: int = 100, denied_only: bool = False, sandbox: str | None = None) -> list[dict[str, Any]]:
        """The newest records of the sandbox's network fence: each connection and DNS query, allowed or denied, and the rule."""

        def go() -> list[dict[str, Any]]:
            records = (r for r in box(sandbox).egress_log() if not denied_only or r.get("decision") == "deny")
            kept: list[dict[str, Any]] = []
            for r in records:
                kept.append(r)
                del kept[: max(0, len(kept) - max(1, limit))]
            return kept

        return await _call(go)

    @server.tool()
    async def reset(sandbox: str | None = None) -> str:
        """Throw the sandbox's changes away: back to clean (started again if it ran)."""

        def go() -> str:
            b = box(sandbox)
            again = b.reset()
            return f"sandbox {b.name!r} reset to clean" + (" and started again" if again else "")

        return await _call(go)

    return server


def serve(names: Sequence[str]) -> None:
    build(names).run("stdio")
