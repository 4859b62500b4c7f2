"""`vivarium mcp` as an agent on the host meets it: the SDK's own stdio client, against the real CLI (no VM:
the failure paths; tests/integration/test_files.py calls it against a running sandbox)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import anyio
import pytest
from mcp import Client, StdioServerParameters
from mcp_types import TextContent

TOOLS = {"up", "exec", "read_file", "write_file", "list_dir", "diff", "egress_log", "reset"}


def server(*names: str) -> StdioServerParameters:
    return StdioServerParameters(command=sys.executable, args=["-m", "vivarium", "mcp", *(a for n in names for a in ("--sandbox", n))],
                                 env=dict(os.environ))  # fmt: skip


def text(result: object) -> str:
    return "".join(c.text for c in getattr(result, "content", []) if isinstance(c, TextContent))


def test_tools_listed_and_failures_are_one_line_tool_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VIVARIUM_HOME", str(tmp_path))

    async def go() -> None:
        async with Client(server("nosuch", "other")) as client:
            assert {t.name for t in (await client.list_tools()).tools} == TOOLS
            missing = await client.call_tool("exec", {"command": ["true"], "sandbox": "nosuch"})
            assert missing.is_error and "no sandbox named 'nosuch'" in text(missing) and "Traceback" not in text(missing)
            elsewhere = await client.call_tool("read_file", {"path": "/etc/hostname", "sandbox": "mine"})
            assert elsewhere.is_error and "sandbox 'mine' is not one this server was given" in text(elsewhere)
            unnamed = await client.call_tool("list_dir", {"path": "/"})  # two sandboxes: which one must be said
            assert unnamed.is_error and "name the sandbox: one of nosuch, other" in text(unnamed)

    anyio.run(go)
