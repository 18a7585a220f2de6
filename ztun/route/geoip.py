"""GeoIP: an IP address → its country code, from a MaxMind DB file.

Reads MaxMind GeoLite2/GeoIP2 Country and City databases (and others with the same record
layout, such as DB-IP's country lite), where a record is a map with `country.iso_code`
(falling back to `registered_country.iso_code`); sing-box's old `geoip.db` (`database_type`
"sing-geoip"), where a record is just the country code; and mihomo's geoip.metadb, where it is
a list of codes (the first is used). Codes come back in
lower case, as sing-box writes them in rules. Lookups are cached (bounded LRU).

Takes a file path; otherwise pure (no sockets, no clocks).
"""

from __future__ import annotations

import ipaddress
from functools import lru_cache
from pathlib import Path
from typing import Any

import maxminddb

from ztun.address import IPAddress
from ztun.errors import ZtunError

#: Distinct addresses whose answers are kept; a lookup costs ~10 µs, a cache hit ~0.1 µs.
CACHE_SIZE = 65536
#: Words in the database_type of MaxMind products that carry no country data.
_NOT_COUNTRY = ("asn", "isp", "anonymous", "connection-type", "domain")


class GeoIPError(ZtunError):
    """A GeoIP database that cannot be used."""


class GeoIPDatabase:
    """An open GeoIP database; `country(ip)` answers lookups."""

    def __init__(self, reader: Any, path: Path) -> None:
        self._reader = reader
        self.path = path
        metadata = reader.metadata()
        self.database_type: str = str(metadata.database_type)
        self.ip_version: int = int(metadata.ip_version)
        self.build_epoch: int = int(metadata.build_epoch)
        # Per instance, so the cache dies with the database (a decorated method would pin it).
        self._cached = lru_cache(maxsize=CACHE_SIZE)(self._lookup)

    def country(self, ip: IPAddress) -> str | None:
        """The lower-case ISO 3166 code of `ip`'s country, or None when the database has none."""
        return self._cached(ip)

    def _lookup(self, ip: IPAddress) -> str | None:
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped  # ::ffff:a.b.c.d is the IPv4 host a.b.c.d
        if ip.version == 6 and self.ip_version == 4:
            return None  # an IPv4-only database has no IPv6 tree; maxminddb would raise
        try:
            record = self._reader.get(ip)
        except ValueError:
            return None
        return _code_of(record)

    def cache_info(self) -> Any:
        return self._cached.cache_info()

    def close(self) -> None:
        self._reader.close()

    def __enter__(self) -> GeoIPDatabase:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"GeoIPDatabase({str(self.path)!r}, type={self.database_type!r})"


def _code_of(record: Any) -> str | None:
    if isinstance(record, str):  # sing-geoip: the record is the code itself
        return record.lower() or None
    if isinstance(record, list):  # mihomo's geoip.metadb: a list of codes
        first = record[0] if record else None
        return first.lower() if isinstance(first, str) and first else None
    if not isinstance(record, dict):
        return None
    for key in ("country", "registered_country"):
        entry = record.get(key)
        if isinstance(entry, dict):
            code = entry.get("iso_code")
            if isinstance(code, str) and code:
                return code.lower()
    return None


def open_geoip(path: str | Path) -> GeoIPDatabase:
    """Open the MaxMind DB file at `path`; a missing or unreadable file raises GeoIPError."""
    file = Path(path)
    if file.is_dir():
        raise GeoIPError(f"GeoIP database {file} is a directory, not a .mmdb file")
    try:
        reader = maxminddb.open_database(str(file))
    except FileNotFoundError:
        raise GeoIPError(f"GeoIP database {file} does not exist") from None
    except PermissionError:
        raise GeoIPError(f"GeoIP database {file} cannot be read: permission denied") from None
    except (maxminddb.InvalidDatabaseError, ValueError, OSError):
        raise GeoIPError(
            f"{file} is not a MaxMind DB (.mmdb) file; ztun reads GeoLite2/GeoIP2 Country or "
            "City databases and sing-box's geoip.db"
        ) from None
    db = GeoIPDatabase(reader, file)
    kind = db.database_type
    if any(word in kind.lower() for word in _NOT_COUNTRY):
        db.close()
        raise GeoIPError(
            f"{file} is a '{kind}' database, which has no country data; use a GeoLite2/GeoIP2 "
            "Country or City database (or sing-box's geoip.db)"
        )
    return db
