"""Strings from the guest, made safe to print: shown as data, never as terminal commands.

A file name, an SNI, a session name or a console line can hold escape
sequences (set the window title, rewrite the screen, fake a line of output).
printable() escapes every control character and every invisible formatting
character (bidi overrides included) the way Python's repr does, so what the
user sees is one line per item with the odd bytes spelled out. Names that
were not UTF-8 (surrogate-escaped by Python) show as \\xNN.
"""

from __future__ import annotations

import unicodedata

_KEEP_IN_TEXT = "\n\t"


def printable(text: str, *, lines: bool = False) -> str:
    """`text` with control and format characters escaped; with `lines`, newlines and tabs kept."""
    out = []
    for ch in text:
        if lines and ch in _KEEP_IN_TEXT:
            out.append(ch)
        elif ch == "\\":
            out.append("\\\\")
        elif 0xDC80 <= ord(ch) <= 0xDCFF:  # a byte that was not UTF-8 (surrogateescape)
            out.append(f"\\x{ord(ch) - 0xDC00:02x}")
        elif unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Co", "Zl", "Zp"):
            out.append(ch.encode("unicode_escape").decode("ascii"))
        else:
            out.append(ch)
    return "".join(out)


def last_words(stderr: str | bytes | None, code: int) -> str:
    """One line for a command that failed: the last line it wrote on stderr (printable), else its exit code."""
    text = stderr.decode(errors="replace") if isinstance(stderr, bytes) else (stderr or "")
    said = text.strip().splitlines()
    return printable(said[-1].strip()) if said else f"exit code {code}"
