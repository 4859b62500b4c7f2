"""Instance records for unit tests."""

from __future__ import annotations

from typing import Any

from vivarium import record


def made(name: str = "box", **changes: Any) -> record.Record:
    """A record of an instance that was made and never started."""
    fields: dict[str, Any] = {"name": name, "created": 1.0, "image": "k", "build_id": "b", "user": "agent", "template": None,
                              "pristine": False, "cold": False, "disk": 1 << 30, "swap": 1 << 30}  # fmt: skip
    fields.update(changes)
    return record.Record(record.Instance(**fields))
