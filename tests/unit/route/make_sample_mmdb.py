"""Build small MaxMind DB files for tests and for ztun/resources/data/geoip-sample.mmdb.

Run `python tests/unit/route/make_sample_mmdb.py` to regenerate the shipped sample (the output
is byte-for-byte reproducible: the build time is pinned). Only documentation address ranges are
used, so the sample never says anything about real hosts.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from unittest import mock

from mmdb_writer import MMDBWriter
from netaddr import IPSet

ROOT = Path(__file__).resolve().parents[3]
SAMPLE_PATH = ROOT / "ztun" / "resources" / "data" / "geoip-sample.mmdb"
#: 2020-01-01T00:00:00Z: a fixed build time, so the file does not change on every run.
BUILD_EPOCH = 1577836800

#: The shipped sample: documentation ranges → countries.
SAMPLE_COUNTRIES = {
    "198.51.100.0/24": "CN",
    "203.0.113.0/24": "US",
    "2001:db8::/32": "DE",
}
#: A range with only `registered_country` (as MaxMind writes for some anycast/satellite blocks).
SAMPLE_REGISTERED_ONLY = {"192.0.2.0/24": "JP"}


def maxmind_record(code: str, *, registered_only: bool = False) -> dict[str, Any]:
    """A GeoLite2-Country style record for ISO code `code`."""
    entry = {"iso_code": code, "geoname_id": 1, "names": {"en": code}}
    if registered_only:
        return {"registered_country": entry}
    return {"country": entry, "registered_country": entry}


def write_mmdb(
    path: Path,
    records: Mapping[str, Any],
    *,
    database_type: str = "GeoLite2-Country",
) -> Path:
    """Write an IPv6 (IPv4-compatible) MaxMind DB mapping each CIDR in `records` to its record."""
    writer = MMDBWriter(
        ip_version=6,
        ipv4_compatible=True,
        database_type=database_type,
        languages=["en"],
        description="ztun test data (documentation ranges only)",
    )
    for cidr, record in records.items():
        writer.insert_network(IPSet([cidr]), record)
    with mock.patch("mmdb_writer.time.time", return_value=BUILD_EPOCH):
        writer.to_db_file(str(path))
    return path


def write_sample(path: Path = SAMPLE_PATH) -> Path:
    records: dict[str, Any] = {c: maxmind_record(k) for c, k in SAMPLE_COUNTRIES.items()}
    for cidr, code in SAMPLE_REGISTERED_ONLY.items():
        records[cidr] = maxmind_record(code, registered_only=True)
    return write_mmdb(path, records)


if __name__ == "__main__":
    out = write_sample(Path(sys.argv[1]) if len(sys.argv) > 1 else SAMPLE_PATH)
    print(f"wrote {out} ({out.stat().st_size} bytes)")
