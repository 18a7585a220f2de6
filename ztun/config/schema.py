"""Where the JSON schema of the config format lives, and its text.

The schema is kept at the top of the repository (`schemas/ztun.schema.json`) so editors can point
at it; ztun reads it from there.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

import ztun

SCHEMA_PATH = Path(ztun.__file__).resolve().parent.parent / "schemas" / "ztun.schema.json"


def schema_text() -> str:
    return SCHEMA_PATH.read_text(encoding="utf-8")


@cache
def schema() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(schema_text())
    return loaded
