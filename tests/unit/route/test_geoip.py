"""GeoIP lookups: MaxMind-style and sing-geoip databases, the shipped sample, the 2018 GeoLite2."""

from __future__ import annotations

import importlib.util
import sys
from ipaddress import ip_address
from pathlib import Path

import pytest
from mmdb_writer import MMDBWriter
from netaddr import IPSet

from ztun.errors import ZtunError
from ztun.route.geoip import GeoIPError, open_geoip

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_sample_mmdb import SAMPLE_PATH, maxmind_record, write_mmdb, write_sample


def test_maxmind_records(tmp_path: Path) -> None:
    path = write_mmdb(
        tmp_path / "country.mmdb",
        {
            "198.51.100.0/24": maxmind_record("CN"),
            "203.0.113.0/25": maxmind_record("US"),
            "203.0.113.128/25": maxmind_record("JP", registered_only=True),
            "2001:db8::/32": maxmind_record("DE"),
            "192.0.2.0/24": {"continent": {"code": "EU"}},  # a record without any country
        },
    )
    with open_geoip(path) as db:
        assert db.database_type == "GeoLite2-Country"
        assert db.country(ip_address("198.51.100.200")) == "cn"
        assert db.country(ip_address("203.0.113.1")) == "us"
        assert db.country(ip_address("203.0.113.200")) == "jp"  # registered_country fallback
        assert db.country(ip_address("2001:db8:1::1")) == "de"
        assert db.country(ip_address("::ffff:198.51.100.1")) == "cn"  # IPv4-mapped → IPv4
        assert db.country(ip_address("192.0.2.1")) is None
        assert db.country(ip_address("100.64.0.1")) is None
        assert db.country(ip_address("2001:db9::1")) is None


def test_sing_geoip_records(tmp_path: Path) -> None:
    writer = MMDBWriter(ip_version=6, ipv4_compatible=True, database_type="sing-geoip",
                        languages=["cn", "us"], description="test")  # fmt: skip
    writer.insert_network(IPSet(["198.51.100.0/24"]), "cn")
    writer.insert_network(IPSet(["2001:db8::/32"]), "US")
    path = tmp_path / "geoip.db"
    writer.to_db_file(str(path))
    with open_geoip(path) as db:
        assert db.database_type == "sing-geoip"
        assert db.country(ip_address("198.51.100.9")) == "cn"
        assert db.country(ip_address("2001:db8::9")) == "us"
        assert db.country(ip_address("203.0.113.1")) is None


def test_ipv4_only_database(tmp_path: Path) -> None:
    writer = MMDBWriter(ip_version=4, database_type="GeoLite2-Country")
    writer.insert_network(IPSet(["203.0.113.0/24"]), maxmind_record("FR"))
    path = tmp_path / "v4.mmdb"
    writer.to_db_file(str(path))
    with open_geoip(path) as db:
        assert db.country(ip_address("203.0.113.5")) == "fr"
        assert db.country(ip_address("2001:db8::1")) is None  # no IPv6 tree: no answer, no error


def test_lookups_are_cached(tmp_path: Path) -> None:
    path = write_mmdb(tmp_path / "c.mmdb", {"198.51.100.0/24": maxmind_record("CN")})
    with open_geoip(path) as db:
        for _ in range(5):
            assert db.country(ip_address("198.51.100.1")) == "cn"
        info = db.cache_info()
        assert (info.hits, info.misses) == (4, 1)
        assert info.maxsize == 65536


def test_missing_and_invalid_files(tmp_path: Path) -> None:
    with pytest.raises(GeoIPError, match="does not exist"):
        open_geoip(tmp_path / "nope.mmdb")
    with pytest.raises(GeoIPError, match="is a directory"):
        open_geoip(tmp_path)
    junk = tmp_path / "junk.mmdb"
    junk.write_bytes(b"this is not a database" * 10)
    with pytest.raises(GeoIPError, match=r"not a MaxMind DB \(.mmdb\) file") as info:
        open_geoip(junk)
    assert isinstance(info.value, ZtunError)
    empty = tmp_path / "empty.mmdb"
    empty.write_bytes(b"")
    with pytest.raises(GeoIPError):
        open_geoip(empty)


def test_database_without_countries_is_refused(tmp_path: Path) -> None:
    records = {"198.51.100.0/24": {"autonomous_system_number": 64496}}
    path = write_mmdb(tmp_path / "asn.mmdb", records, database_type="GeoLite2-ASN")
    with pytest.raises(GeoIPError, match="no country data"):
        open_geoip(path)


def test_shipped_sample_is_current(tmp_path: Path) -> None:
    """The shipped data/geoip-sample.mmdb is exactly what make_sample_mmdb.py writes."""
    fresh = write_sample(tmp_path / "sample.mmdb")
    assert SAMPLE_PATH.read_bytes() == fresh.read_bytes()
    with open_geoip(SAMPLE_PATH) as db:
        assert db.country(ip_address("198.51.100.1")) == "cn"
        assert db.country(ip_address("203.0.113.1")) == "us"
        assert db.country(ip_address("2001:db8::1")) == "de"
        assert db.country(ip_address("192.0.2.1")) == "jp"
        assert db.country(ip_address("8.8.8.8")) is None


def _geolite2_city() -> Path:
    # maxminddb-geolite2 is a declared test dependency: its absence fails the test
    spec = importlib.util.find_spec("_maxminddb_geolite2")
    assert spec is not None and spec.origin is not None, "maxminddb-geolite2 is not installed"
    return Path(spec.origin).parent / "GeoLite2-City.mmdb"


@pytest.mark.parametrize(
    ("ip", "code"),
    [
        # Answers of the 2018-07-03 GeoLite2-City database shipped by maxminddb-geolite2 2018.703.
        ("8.8.8.8", "us"),
        ("1.1.1.1", "au"),
        ("202.108.22.5", "cn"),
        ("193.0.6.139", "nl"),
        ("81.2.69.142", "gb"),
        ("2001:4860:4860::8888", "us"),
        ("9.9.9.9", "fr"),  # country FR, registered_country US: `country` wins
        ("10.0.0.1", None),
        ("127.0.0.1", None),
    ],
)
def test_real_geolite2_city(ip: str, code: str | None) -> None:
    path = _geolite2_city()
    with open_geoip(path) as db:
        assert db.database_type == "GeoLite2-City"
        assert db.country(ip_address(ip)) == code
