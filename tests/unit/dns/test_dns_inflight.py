"""Identical queries in flight share one upstream exchange, and a cancelled asker does not
take the others down with it (both the fast path's bytes and the dnspython path). On the fast
path the upstream query belongs to no asker, so it goes on; on the dnspython path a waiter
asks again."""

from __future__ import annotations

import asyncio

import dns.message
import dns.rrset

from ztun.config.options import build_options
from ztun.dns import wire as dnswire
from ztun.dns.client import DnsClient
from ztun.route.metadata import FlowMeta


class SlowTransport:
    """Answers every query with 203.0.113.7 once `release` is set; counts exchanges."""

    tag = "slow"
    cacheable = True

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.exchanges = 0

    async def exchange(self, query: bytes, timeout: float) -> bytes:
        self.exchanges += 1
        await self.release.wait()
        msg = dns.message.from_wire(query)
        answer = dns.message.make_response(msg)
        answer.answer.append(
            dns.rrset.from_text(msg.question[0].name, 60, "IN", "A", "203.0.113.7")
        )
        return answer.to_wire()

    async def close(self) -> None:
        return None


def client(transport: SlowTransport) -> DnsClient:
    options = build_options({
        "outbounds": [{"type": "direct", "tag": "direct"}],
        "dns": {"servers": [{"type": "udp", "tag": "slow", "server": "203.0.113.53"}]},
    })  # fmt: skip
    return DnsClient(options.dns, None, {}, transports={"slow": transport})  # type: ignore[dict-item]


async def _a_cancelled_asker_leaves_the_others_their_answer(slow_path: bool) -> None:
    transport = SlowTransport()
    dns_client = client(transport)
    query = dns.message.make_query("shared.test", "A")
    if slow_path:
        # An additional record other than OPT is no plain query: dnspython's path takes it.
        query.additional.append(dns.rrset.from_text("x.test.", 60, "IN", "TXT", "x"))
    wire = query.to_wire()
    assert (dnswire.read_question(wire) is None) == slow_path

    async def ask() -> bytes | None:
        return await dns_client.exchange(wire, FlowMeta(network="udp"))

    asker = asyncio.create_task(ask())
    await asyncio.sleep(0)
    waiters = [asyncio.create_task(ask()) for _ in range(3)]
    await asyncio.sleep(0)
    assert transport.exchanges == 1  # one upstream query for all four
    asker.cancel()  # its flow went away while it was asking for everyone
    await asyncio.sleep(0.01)
    transport.release.set()
    answers = await asyncio.wait_for(asyncio.gather(*waiters), 2)
    for answer in answers:
        assert answer is not None
        msg = dns.message.from_wire(answer)
        assert msg.rcode() == 0 and msg.answer[0][0].to_text() == "203.0.113.7"
    # dnspython path: asked once more, by one of the waiters; fast path: the one query went on
    assert transport.exchanges == (2 if slow_path else 1)
    await dns_client.close()


def test_a_cancelled_asker_leaves_the_others_their_answer_fast_path() -> None:
    asyncio.run(_a_cancelled_asker_leaves_the_others_their_answer(False))


def test_a_cancelled_asker_leaves_the_others_their_answer_dnspython_path() -> None:
    asyncio.run(_a_cancelled_asker_leaves_the_others_their_answer(True))
