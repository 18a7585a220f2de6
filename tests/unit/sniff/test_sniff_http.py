"""HTTP/1.x request and HTTP/2 preface sniffing."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from sniffkit import check_prefixes, vector

from ztun.sniff import NEED_MORE, Sniffed, http, sniff_stream


def head(*lines: str, method: str = "GET", target: str = "/", version: str = "HTTP/1.1") -> bytes:
    return "\r\n".join((f"{method} {target} {version}", *lines, "", "")).encode("latin-1")


@pytest.mark.parametrize(
    ("name", "domain"),
    [("http_python.bin", "www.example.com"), ("http_curl.bin", "curl.example.com")],
)
def test_captured_requests(name, domain):
    assert check_prefixes(vector(name)) == Sniffed("http", domain)


@pytest.mark.parametrize("method", [m.decode() for m in http.METHODS])
def test_every_method(method):
    assert sniff_stream(head("Host: a.example", method=method)) == Sniffed("http", "a.example")


@pytest.mark.parametrize(
    ("data", "domain"),
    [
        (head("Host: Example.COM:8080"), "example.com"),
        (head("host:example.com"), "example.com"),
        (head("HOST: \texample.com. \t"), "example.com"),
        (head("Accept: */*", "Host: a.example", "X: y"), "a.example"),
        (head("Host: 203.0.113.1:80"), None),
        (head("Host: [2001:db8::1]:8080"), None),
        (head("Host: a.example:http"), None),
        (head("Host: a.example:123456"), None),
        (head("Host: under_score.example"), None),
        (head("Host: a.example", "Host: b.example"), None),
        (head("Host a.example"), None),
        (head("Bad Name: x", "Host: a.example"), None),
        (head("Host: "), None),
        (head(target="http://user@Abs.Example:81/p?q", version="HTTP/1.0"), "abs.example"),
        (head(target="ftp://abs.example/"), None),
        (head("Host: b.example", target="http://a.example/"), "b.example"),
        (head(method="CONNECT", target="tunnel.example:443"), "tunnel.example"),
        (head(method="OPTIONS", target="*"), None),
        (head(version="HTTP/1.0"), None),
        (b"GET / HTTP/1.1\nHost: lf.example\n\n", "lf.example"),
    ],
)
def test_host(data, domain):
    # Only a name that is not a host name is flagged (counted); other refusals are not names.
    bad = data == head("Host: under_score.example")
    assert check_prefixes(data) == Sniffed("http", domain, bad_name=bad)


def test_http2_preface():
    assert check_prefixes(http.H2_PREFACE + b"\x00\x00\x12\x04") == Sniffed("http")
    assert sniff_stream(b"PRI * HTTP/2.0\r\n\r\nXX") is None


@pytest.mark.parametrize(
    "data",
    [
        b"X",
        b"get ",
        b"GETX",
        b"GET\t/",
        b"POS\x00",
        b"GET /\x00",
        b"GET /\xff",
        b"GET / HTTP/1.1 extra\r\n",
        b"GET /a b HTTP/1.1\r\n",
        b"GET / HTTP/2\r\n",
        b"GET  HTTP/1.1\r\n",
    ],
)
def test_refused_early(data):
    assert sniff_stream(data) is None


def test_waits_for_the_whole_head():
    assert sniff_stream(b"G") is NEED_MORE
    assert sniff_stream(b"GET / HTTP/1.1\r\nHost: a.example\r\n") is NEED_MORE


def test_head_limit():
    line = b"GET /" + b"a" * http.MAX_HEAD
    assert sniff_stream(line[: http.MAX_HEAD - 1]) is NEED_MORE
    assert sniff_stream(line) is None
    big = head("X: " + "y" * http.MAX_HEAD, "Host: a.example")
    assert sniff_stream(big[: http.MAX_HEAD - 1]) is NEED_MORE
    assert sniff_stream(big) is None
    assert check_prefixes(head("X: " + "y" * 7000, "Host: a.example")) == Sniffed(
        "http", "a.example"
    )


_texty = st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=0x7F), max_size=120)


@given(st.sampled_from([b"GET ", b"CONNECT ", b"PRI ", b"P", b""]), _texty, st.binary(max_size=60))
def test_arbitrary_requests(start, text, tail):
    check_prefixes(start + text.encode() + tail)
    check_prefixes(start + text.replace("\n", "\r\n").encode() + b"\r\n\r\n")


def test_module_entry_point():
    assert http.sniff_stream(b"") is NEED_MORE
    assert http.sniff_stream(b"\x16") is None
