"""Guest strings shown as data: no escape sequence, newline or stray byte reaches the terminal."""

from __future__ import annotations

from vivarium.printable import printable
from vivarium.verbs.egress import egress_line


def test_control_and_format_characters_are_escaped() -> None:
    assert printable("x\nD harmless") == "x\\nD harmless"
    assert printable("\x1b]0;pwned\x07") == "\\x1b]0;pwned\\x07"
    assert printable("a\u202eb\u200b") == "a\\u202eb\\u200b"  # bidi override, zero-width space
    assert printable("latin\udcff.txt") == "latin\\xff.txt"  # not UTF-8 (surrogate-escaped)
    assert printable("back\\slash") == "back\\\\slash"  # so an escape shown cannot be faked
    assert printable("ok/ä/日本") == "ok/ä/日本"
    assert printable("one\n\ttwo\x1b[2J", lines=True) == "one\n\ttwo\\x1b[2J"


def test_an_audit_line_escapes_every_field() -> None:
    line = egress_line({"time": "2026-12-02T02:00:00.000", "kind": "tcp", "decision": "deny", "name": "\x1b]0;pwned\x07",
                         "dst": "198.51.100.7", "port": 443, "rule": "deny x\nALLOW", "error": "\x07"})  # fmt: skip
    assert "\x1b" not in line and "\x07" not in line and "\n" not in line and "\\x1b]0;pwned\\x07" in line


def test_last_words_of_a_failed_command() -> None:
    from vivarium.printable import last_words

    assert last_words("warning: x\ntar: evil\x1b]0;title\x07 name\n\n", 2) == "tar: evil\\x1b]0;title\\x07 name"
    assert last_words(b"one\ntwo\n", 1) == "two"
    assert last_words("", 141) == last_words(None, 141) == "exit code 141"
