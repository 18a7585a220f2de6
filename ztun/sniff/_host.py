"""Host-name validation shared by the sniffers: a sniffed name reaches the rule engine only if
it is a plausible DNS host name, so junk in a ClientHello cannot match or poison domain rules.

The structural limits (length, empty and long labels) are `ztun.address.name_problem`, the one
check every parser of peer names shares; sniffed names must in addition be LDH host names."""

from __future__ import annotations

import re

from ztun.address import MAX_NAME, name_problem

# Letters, digits and inner hyphens (RFC 952/1123 "LDH"), 1..63 per label; input is lower-cased.
_LDH = re.compile(
    rb"(?:[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.)*[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
)
# DNS questions also carry service labels (_dmarc, _sip._tcp): underscores allowed there.
_LDH_UNDERSCORE = re.compile(
    rb"(?:[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?\.)*[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?"
)
_DIGITS_AND_DOTS = re.compile(rb"[0-9.]+")


def sniffed_name(raw: bytes, *, underscore: bool = False) -> tuple[str | None, bool]:
    """(`raw` lower-cased as text, False) if it is a host name (no trailing dot, ≤253 bytes,
    LDH labels of 1..63, IDNA A-labels that decode); else (None, refused): refused is True for
    a bad name (to be counted), False for an IPv4 literal, which is simply not a name."""
    if len(raw) > MAX_NAME or name_problem(raw) is not None or raw.endswith(b"."):
        return None, True
    name = raw.lower()
    if (_LDH_UNDERSCORE if underscore else _LDH).fullmatch(name) is None:
        return None, True
    if name.rpartition(b".")[2].isdigit():
        # all-numeric top label: an address literal (1.2.3.4), never a registrable name
        return None, _DIGITS_AND_DOTS.fullmatch(name) is None
    if b"xn--" in name and not all(_a_label_ok(label) for label in name.split(b".")):
        return None, True
    return name.decode("ascii"), False


def host_name(raw: bytes, *, underscore: bool = False) -> str | None:
    """`raw` lower-cased as text if it is a host name (see `sniffed_name`), else None."""
    return sniffed_name(raw, underscore=underscore)[0]


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
