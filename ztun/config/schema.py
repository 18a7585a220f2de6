"""The JSON schema of the config format: its text (`ztun schema`) and its parsed form.

The file ships inside the package (`ztun/resources/schema/ztun.schema.json`, see ztun.resources),
so the shipped configs' yaml-language-server lines can point at it and an installed ztun finds it.
"""

from __future__ import annotations

import json
from functools import cache
from typing import Any

from ztun.resources import SCHEMA_PATH

__all__ = ["SCHEMA_PATH", "schema", "schema_text"]


def schema_text() -> str:
    return SCHEMA_PATH.read_text(encoding="utf-8")


@cache
def schema() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(schema_text())
    return loaded
