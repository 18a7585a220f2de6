"""Where the files ztun reads at run time live: they ship inside the package.

The JSON schema, the shipped profiles (`include: [NAME]`), the shipped examples and the files
they point at (the ads rule set, the sample GeoIP database) are package data, so an installed
ztun (`pip install .`, not only editable) finds them wherever it is run from.

They are found through `importlib.resources` but handed out as `Path`s: configs name files by
path (`path: ../rule-sets/ads.txt` relative to the profile, error marks show the file), so ztun
needs them on the file system — which is how pip installs a wheel. A zip import would break that,
and is refused here with a clear message rather than later with a confusing one.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from ztun.errors import ZtunError

__all__ = [
    "DATA_DIR",
    "EXAMPLE_DIR",
    "PROFILE_DIR",
    "RULE_SET_DIR",
    "SCHEMA_PATH",
    "UI_DIR",
    "examples",
]


def _on_disk(name: str) -> Path:
    found = files(__name__).joinpath(name)
    if not isinstance(found, Path):
        raise ZtunError(f"ztun's package data ({name}) is not on the file system: {found}")
    # resolved, so paths shown in messages and compared in tests do not depend on symlinks
    return found.resolve()


#: The JSON schema of the config format (`ztun schema`).
SCHEMA_PATH = _on_disk("schema") / "ztun.schema.json"
#: The shipped profiles: `include: [bypass-private]` reads bypass-private.yaml here.
PROFILE_DIR = _on_disk("profiles")
#: The shipped example configs (`ztun examples`).
EXAMPLE_DIR = _on_disk("examples")
#: Rule sets the profiles reference (relative to themselves: `../rule-sets/ads.txt`).
RULE_SET_DIR = _on_disk("rule-sets")
#: Data files the profiles reference (the sample GeoIP database).
DATA_DIR = _on_disk("data")
#: The built-in status page the Clash API serves at /ui.
UI_DIR = _on_disk("ui")


def examples() -> list[Path]:
    """The shipped example configs, sorted by name."""
    return sorted(EXAMPLE_DIR.glob("*.yaml"))
