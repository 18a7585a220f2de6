"""HTTP proxy request codec: CONNECT, absolute-form rewrite, credentials, fuzzing."""

from __future__ import annotations

import base64

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ztun.errors import ProtocolError
from ztun.proto import http_proxy as hp


def test_connect():
    data = b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\nextra"
    req, n = hp.parse_request(data)
    assert req.is_connect and (req.host, req.port, req.path) == ("example.com", 443, None)
    assert data[n:] == b"extra"
    req, _ = hp.parse_request(b"CONNECT [2001:db8::1]:8443 HTTP/1.1\r\n\r\n")
    assert (req.host, req.port) == ("2001:db8::1", 8443)
    with pytest.raises(ProtocolError):
        hp.parse_request(b"CONNECT example.com HTTP/1.1\r\n\r\n")


def test_incomplete_and_too_large():
    assert hp.parse_request(b"GET http://a/ HTTP/1.1\r\nHost: a\r\n") is None
    with pytest.raises(ProtocolError):
        hp.parse_request(b"GET http://a/ HTTP/1.1\r\nX: " + b"a" * (hp.MAX_HEAD + 10))


def test_absolute_form_rewrite():
    data = (
        b"GET http://example.com:8080/a/b?q=1 HTTP/1.1\r\nHost: example.com:8080\r\n"
        b"Proxy-Connection: keep-alive\r\nConnection: keep-alive, X-Hop\r\nX-Hop: 1\r\n"
        b"Proxy-Authorization: Basic Zm9vOmJhcg==\r\nAccept: */*\r\n\r\n"
    )
    req, _ = hp.parse_request(data)
    assert (req.host, req.port, req.path) == ("example.com", 8080, "/a/b?q=1")
    out = hp.build_origin_request(req)
    assert out.startswith(b"GET /a/b?q=1 HTTP/1.1\r\n")
    assert b"Host: example.com:8080\r\n" in out and b"Accept: */*\r\n" in out
    for gone in (b"Proxy-Connection", b"X-Hop", b"Proxy-Authorization", b"keep-alive"):
        assert gone not in out
    assert out.endswith(b"Connection: close\r\n\r\n")


def test_absolute_form_adds_host_and_defaults():
    req, _ = hp.parse_request(b"GET http://[2001:db8::5] HTTP/1.0\r\n\r\n")
    assert (req.host, req.port, req.path) == ("2001:db8::5", 80, "/")
    assert b"Host: [2001:db8::5]\r\n" in hp.build_origin_request(req)
    with pytest.raises(ProtocolError):
        hp.parse_request(b"GET /relative HTTP/1.1\r\n\r\n")
    with pytest.raises(ProtocolError):
        hp.parse_request(b"GET https://a/ HTTP/1.1\r\n\r\n")


def test_credentials():
    tok = base64.b64encode(b"alice:s3:cret").decode()
    req, _ = hp.parse_request(
        f"CONNECT a:1 HTTP/1.1\r\nProxy-Authorization: Basic {tok}\r\n\r\n".encode()
    )
    assert hp.proxy_credentials(req) == ("alice", "s3:cret")
    req, _ = hp.parse_request(b"CONNECT a:1 HTTP/1.1\r\nProxy-Authorization: Basic !!\r\n\r\n")
    assert hp.proxy_credentials(req) is None
    req, _ = hp.parse_request(b"CONNECT a:1 HTTP/1.1\r\n\r\n")
    assert hp.proxy_credentials(req) is None


def test_responses():
    assert hp.build_response(200) == b"HTTP/1.1 200 Connection established\r\n\r\n"
    r = hp.build_response(407, extra_headers=(("Proxy-Authenticate", 'Basic realm="ztun"'),))
    assert r.startswith(b"HTTP/1.1 407 ") and b"Proxy-Authenticate" in r
    assert b"Content-Length:" in hp.build_response(502)


@given(data=st.binary(max_size=400))
def test_fuzz_bytes(data):
    try:
        res = hp.parse_request(data)
    except ProtocolError:
        return
    if res is not None and res[0].path is not None:
        hp.build_origin_request(res[0])


@given(
    method=st.sampled_from(["GET", "CONNECT", "POST", "G\x00T"]),
    target=st.text(max_size=60),
    headers=st.lists(st.tuples(st.text(max_size=10), st.text(max_size=20)), max_size=4),
)
def test_fuzz_structured(method, target, headers):
    text = f"{method} {target} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers) + "\r\n"
    data = text.encode("utf-8", "surrogatepass")
    for i in (len(data), *range(0, len(data), 7)):
        try:
            res = hp.parse_request(data[:i])
        except ProtocolError:
            continue
        if res is not None:
            hp.proxy_credentials(res[0])
            if res[0].path is not None:
                hp.build_origin_request(res[0])
