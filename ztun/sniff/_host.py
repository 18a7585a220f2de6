"""Host-name validation shared by the sniffers: a sniffed name reaches the rule engine only if
it is a plausible DNS host name, so junk in a ClientHello cannot match or poison domain rules."""

from __future__ import annotations

import re

# Letters, digits and inner hyphens (RFC 952/1123 "LDH"), 1..63 per label; input is lower-cased.
_LDH = re.compile(
    rb"(?:[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.)*[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
)
# DNS questions also carry service labels (_dmarc, _sip._tcp): underscores allowed there.
_LDH_UNDERSCORE = re.compile(
    rb"(?:[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?\.)*[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?"
)
MAX_NAME = 253


def host_name(raw: bytes, *, underscore: bool = False) -> str | None:
    """`raw` lower-cased as text if it is a host name (no trailing dot, ≤253 bytes, LDH labels
    of 1..63, IDNA A-labels that decode), else None. An IPv4 literal is not a host name."""
    if not 0 < len(raw) <= MAX_NAME:
        return None
    name = raw.lower()
    if (_LDH_UNDERSCORE if underscore else _LDH).fullmatch(name) is None:
        return None
    last = name.rpartition(b".")[2]
    if last.isdigit():
        # all-numeric top label: an address literal (1.2.3.4), never a registrable name
        return None
    if b"xn--" in name and not all(_a_label_ok(label) for label in name.split(b".")):
        return None
    return name.decode("ascii")


def _a_label_ok(label: bytes) -> bool:
    """A label that claims to be an A-label ("xn--") must decode to a printable, non-ASCII
    U-label (not the full IDNA 2008 check: that needs Unicode tables for a rare case)."""
    if not label.startswith(b"xn--"):
        return True
    try:
        text = label[4:].decode("punycode")
    except (UnicodeError, ValueError, IndexError, OverflowError):
        return False
    return not text.isascii() and text.isprintable()
