"""What a sniffer answers: `Sniffed`, or `NEED_MORE` while the bytes so far are a valid prefix."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Final, Literal


@dataclass(frozen=True, slots=True)
class Sniffed:
    """The protocol of a flow (sing-box sniffer names: "tls", "http", "quic", "dns") and the
    domain it names, lower-case and a valid host name, or None when it names none or an
    invalid one. `alpn` is what a TLS or QUIC client offers, in its order. `bad_name`: the
    flow named a host that is not a valid name (so `domain` is None): the consumer counts it
    (`ztun.stack.flow.apply_sniffed`)."""

    protocol: str
    domain: str | None = None
    alpn: tuple[str, ...] = ()
    bad_name: bool = False


class NeedMore(Enum):
    """The bytes so far are a valid prefix of a message a sniffer knows: wait for more."""

    NEED_MORE = "need more"

    def __repr__(self) -> str:
        return "NEED_MORE"


NEED_MORE: Final = NeedMore.NEED_MORE
#: A stream sniffer's answer: a verdict, wait, or None ("not this protocol": stop waiting).
StreamResult = Sniffed | Literal[NeedMore.NEED_MORE] | None
