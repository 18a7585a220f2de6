"""A small client of the Clash API for `ztun status` and `ztun top`.

Owns the requests (the standard library's HTTP client: the CLI needs no event loop for a few
GETs a second) and turning what goes wrong into one clear `ZtunError`.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

from ztun.errors import ZtunError

#: Seconds a request may take.
TIMEOUT = 5.0


class ApiClient:
    def __init__(self, controller: str, secret: str = "") -> None:
        base = controller if "://" in controller else f"http://{controller}"
        self.base = base.rstrip("/")
        self.controller = controller
        self.secret = secret

    def request(self, method: str, path: str, body: Any = None, timeout: float = TIMEOUT) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base + path, data=data, method=method)
        if self.secret:
            req.add_header("Authorization", f"Bearer {self.secret}")
        if data is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as response:
                raw = response.read(16 * 1024 * 1024)
        except urllib.error.HTTPError as e:
            if e.code == 400 and path == "/configs" and method == "PUT":
                return _refusal(e)
            if e.code == 401:
                raise ZtunError(f"the API at {self.controller} wants its secret "
                                "(--secret, or ZTUN_API_SECRET)") from None  # fmt: skip
            raise ZtunError(f"the API at {self.controller} answered {e.code} {e.reason}") from None
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise ZtunError(f"cannot reach the API at {self.controller}: {reason} (is ztun "
                            "running with experimental.clash_api?)") from None  # fmt: skip
        if not raw:
            return None
        try:
            return json.loads(raw)
        except ValueError:
            raise ZtunError(f"the API at {self.controller} did not answer JSON") from None

    def get(self, path: str) -> Any:
        return self.request("GET", path)

    def reload(self, timeout: float) -> list[str]:
        """`PUT /configs`: the running ztun reads its config file again; the problems that
        refused it ([] when it was applied)."""
        found = self.request("PUT", "/configs", {}, timeout=timeout)
        return list(found) if isinstance(found, list) else []


def _refusal(error: urllib.error.HTTPError) -> list[str]:
    """The problems in a 400 answer to `PUT /configs` (`{"message", "errors": [...]}`)."""
    try:
        body = json.loads(error.read(1024 * 1024))
    except (ValueError, OSError):
        return [f"refused: {error.code} {error.reason}"]
    errors = body.get("errors") if isinstance(body, dict) else None
    if isinstance(errors, list) and errors:
        return [str(e) for e in errors]
    message = body.get("message") if isinstance(body, dict) else None
    return [str(message or f"refused: {error.code} {error.reason}")]
