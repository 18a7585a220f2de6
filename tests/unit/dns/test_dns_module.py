"""The DNS module as `ztun run` assembles it: names for IP flows, the FakeIP table kept in
experimental.cache_file across restarts, a hijack-only module without a dns section."""

from __future__ import annotations

import asyncio
import ipaddress
import json
from pathlib import Path
from typing import Any

import dns.message

from ztun.config.options import build_options
from ztun.dns.module import build_dns
from ztun.outbound.registry import build_outbound
from ztun.route.metadata import FlowMeta


def config(tmp_path: Path, **experimental: Any) -> dict[str, Any]:
    return {
        "outbounds": [{"type": "direct", "tag": "direct"}],
        "dns": {
            "servers": [
                {"type": "hosts", "tag": "hosts", "predefined": {"real.test": "203.0.113.5"}},
                {"type": "fakeip", "tag": "fake", "inet4_range": "198.18.128.0/17"},
            ],
            "rules": [{"domain_suffix": ["fake.test"], "server": "fake"}],
            "final": "hosts",
            "reverse_mapping": True,
        },
        "experimental": experimental,
    }


def module(tmp_path: Path, data: dict[str, Any]) -> Any:
    from ztun.check import check_file

    path = tmp_path / "config.json"
    path.write_text(json.dumps(data))
    result = check_file(path)
    assert not result.errors, result.errors
    options = build_options(data)
    outbounds = {o.tag: build_outbound(o) for o in options.outbounds}
    return build_dns(options, outbounds, result.dns_router, tmp_path)


async def ask(m: Any, name: str) -> str:
    wire = await m.client.exchange(dns.message.make_query(name, "A").to_wire(), FlowMeta())
    answer = dns.message.from_wire(wire)
    return str(answer.answer[0][0])


def test_names_from_reverse_mapping_and_fakeip(tmp_path: Path) -> None:
    async def main() -> None:
        m = module(tmp_path, config(tmp_path))
        try:
            assert m.gives_names
            real = await ask(m, "real.test")
            assert m.names(ipaddress.ip_address(real)) == ("real.test", False)
            fake = await ask(m, "a.fake.test")
            assert ipaddress.ip_address(fake) in ipaddress.ip_network("198.18.128.0/17")
            assert m.names(ipaddress.ip_address(fake)) == ("a.fake.test", True)
            # A pool address nobody was given: known as fake, with no name (refused upstream).
            assert m.names(ipaddress.ip_address("198.18.200.200")) == ("", True)
            assert m.names(ipaddress.ip_address("203.0.113.99")) is None
            # ztun's own lookups never get a FakeIP answer (it would loop into the TUN).
            assert await m.client.lookup("real.test") == [ipaddress.ip_address("203.0.113.5")]
        finally:
            await m.close()

    asyncio.run(main())


def test_the_fakeip_table_survives_a_restart_with_the_cache_file(tmp_path: Path) -> None:
    cache = {"cache_file": {"enabled": True, "path": "state/cache.json", "store_fakeip": True}}

    async def first() -> str:
        m = module(tmp_path, config(tmp_path, **cache))
        try:
            return await ask(m, "kept.fake.test")
        finally:
            await m.close()  # writes the table

    async def second(address: str) -> None:
        m = module(tmp_path, config(tmp_path, **cache))
        try:
            assert m.names(ipaddress.ip_address(address)) == ("kept.fake.test", True)
            assert await ask(m, "kept.fake.test") == address  # the same address again
        finally:
            await m.close()

    address = asyncio.run(first())
    saved = tmp_path / "state" / "cache.json"
    assert saved.is_file() and "kept.fake.test" in saved.read_text()
    asyncio.run(second(address))
    # A damaged file is ignored (with a warning) and rewritten, never fatal.
    saved.write_text("{not json")
    asyncio.run(first())
    assert "kept.fake.test" in saved.read_text()


def test_without_the_cache_file_the_table_starts_empty(tmp_path: Path) -> None:
    async def main() -> None:
        m = module(tmp_path, config(tmp_path))
        try:
            assert m.cache_file is None
        finally:
            await m.close()
        assert not list(tmp_path.glob("**/cache.json"))

    asyncio.run(main())


def test_a_hijack_rule_without_a_dns_section_gets_a_local_server(tmp_path: Path) -> None:
    async def main() -> None:
        data = {"outbounds": [{"type": "direct", "tag": "direct"}],
                "route": {"rules": [{"port": 53, "action": "hijack-dns"}]}}  # fmt: skip
        options = build_options(data)
        outbounds = {o.tag: build_outbound(o) for o in options.outbounds}
        assert build_dns(options, outbounds, None) is None  # nothing asks for one
        m = build_dns(options, outbounds, None, hijack=True)
        assert m is not None and list(m.client.transports) == ["local"]
        assert not m.gives_names
        # The direct outbound keeps the system resolver: no dns section was written.
        assert getattr(outbounds["direct"], "_resolver", None) is None
        await m.close()

    asyncio.run(main())


def rebuilt(tmp_path: Path, data: dict[str, Any], previous: Any) -> Any:
    """What a reload that rebuilds the DNS module does (box.py `_switch`)."""
    from ztun.check import check_file

    path = tmp_path / "config.json"
    path.write_text(json.dumps(data))
    result = check_file(path)
    assert not result.errors, result.errors
    options = build_options(data)
    outbounds = {o.tag: build_outbound(o) for o in options.outbounds}
    return build_dns(options, outbounds, result.dns_router, tmp_path, previous=previous)


def test_a_reload_carries_the_fakeip_table_and_reverse_map_over(tmp_path: Path) -> None:
    async def main() -> None:
        old = module(tmp_path, config(tmp_path))
        fake = await ask(old, "app.fake.test")
        real = await ask(old, "real.test")
        data = config(tmp_path)
        data["dns"]["servers"][0]["predefined"]["other.test"] = "203.0.113.6"
        new = rebuilt(tmp_path, data, old)
        try:
            assert new.fakeip is old.fakeip and new.reverse is old.reverse
            assert new.names(ipaddress.ip_address(fake)) == ("app.fake.test", True)
            assert new.names(ipaddress.ip_address(real)) == ("real.test", False)
            assert await ask(new, "other.test") == "203.0.113.6"
            # other ranges: a pool of its own
            data["dns"]["servers"][1]["inet4_range"] = "198.18.64.0/18"
            other = rebuilt(tmp_path, data, new)
            assert other.fakeip is not new.fakeip
            await other.close()
        finally:
            await old.close()
            await new.close()

    asyncio.run(main())


def test_a_kept_module_adopts_new_rules_and_outbounds(tmp_path: Path) -> None:
    async def main() -> None:
        from ztun.check import check_file

        m = module(tmp_path, config(tmp_path))
        try:
            assert (await ask(m, "x.fake.test")).startswith("198.18.")
            assert m.client.cache is not None
            data = config(tmp_path)
            data["dns"]["rules"] = []  # nothing goes to the FakeIP server any more
            path = tmp_path / "config.json"
            path.write_text(json.dumps(data))
            result = check_file(path)
            options = build_options(data)
            outbounds = {o.tag: build_outbound(o) for o in options.outbounds}
            m.adopt(result.dns_router, outbounds)
            assert len(m.client.cache) == 0
            wire = await m.client.exchange(
                dns.message.make_query("x.fake.test", "A").to_wire(), FlowMeta())
            assert not dns.message.from_wire(wire).answer  # hosts does not know it
        finally:
            await m.close()

    asyncio.run(main())
