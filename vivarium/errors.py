"""The exceptions vivarium raises: one small tree under VivariumError.

Deep code raises these with the cause attached; only cli.py turns them into a
line for a human and an exit code.
"""

from __future__ import annotations

from collections.abc import Sequence


class VivariumError(Exception):
    """Something went wrong that the user can act on.

    `message` is one line saying what is wrong; `hint` says what to do.
    """

    exit_code = 1

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message


class ConfigError(VivariumError):
    """A setting has a bad value; nothing was done."""

    exit_code = 2


class UsageError(VivariumError):
    """The command line asks for something that cannot be."""

    exit_code = 2


class MissingProgram(VivariumError):
    """An external program vivarium needs is not installed."""

    def __init__(self, program: str, package: str) -> None:
        super().__init__(
            f"{program} is not installed",
            hint=f"install it with: apt-get install {package}",
        )
        self.program = program
        self.package = package


class CommandFailed(VivariumError):
    """An external program exited with an error."""

    def __init__(self, argv: Sequence[str], returncode: int, output: str) -> None:
        tail = output.strip().splitlines()[-1:] or [""]
        super().__init__(
            f"{argv[0]} failed with exit code {returncode}: {tail[0]}".rstrip(": "),
            hint="run with --debug to see the full command and its output",
        )
        self.argv = list(argv)
        self.returncode = returncode
        self.output = output


class BuildError(VivariumError):
    """The guest image could not be built."""


class DownloadError(BuildError):
    """A binary download failed or did not match its checksum."""


class InstanceError(VivariumError):
    """An instance is missing, busy, or in a state that forbids the request."""


class VMError(VivariumError):
    """QEMU or the guest misbehaved."""
