"""The error types of ztun, and the diagnostic a user sees for a config mistake.

Every error a user can cause derives from `ZtunError`, so the CLI can turn any of them into a
clear message instead of a traceback.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Severity = Literal["error", "warning"]
#: A position inside the config data: keys and list indexes from the root of the merged document.
ConfigPath = tuple[str | int, ...]


@dataclass(frozen=True, slots=True)
class Mark:
    """Where a value was written: 1-based line and column in a file."""

    file: str
    line: int
    column: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.column}"


@dataclass(frozen=True, slots=True)
class Diagnostic:
    """One mistake (or warning) in a config, with the place it was written."""

    message: str
    path: ConfigPath = ()
    mark: Mark | None = None
    severity: Severity = "error"

    def __str__(self) -> str:
        where = str(self.mark) if self.mark else "<config>"
        prefix = "warning: " if self.severity == "warning" else ""
        return f"{where}: {prefix}{self.message}"

    def to_json(self) -> dict[str, object]:
        return {
            "severity": self.severity,
            "message": self.message,
            "path": "/".join(str(p) for p in self.path),
            "file": self.mark.file if self.mark else None,
            "line": self.mark.line if self.mark else None,
            "column": self.mark.column if self.mark else None,
        }


class ZtunError(Exception):
    """Root of every error a user can cause; `str()` is the message to show."""


@dataclass
class ConfigError(ZtunError):
    """A config that cannot be used; carries every diagnostic found."""

    diagnostics: list[Diagnostic] = field(default_factory=list)

    def __str__(self) -> str:
        return "\n".join(str(d) for d in self.diagnostics) or "invalid config"


class ProtocolError(ZtunError):
    """Malformed bytes on the wire."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something that breaks the protocol."""


class BadNameError(RemoteProtocolError):
    """A peer named a host that cannot exist (see `ztun.address.name_problem`); the inbound
    answers with its protocol's error reply (SOCKS5 host unreachable, SOCKS4 rejected, 400)."""


class LocalProtocolError(ProtocolError):
    """ztun was asked to send something that breaks the protocol."""
