"""Test helpers for the sniffers: the captured vectors, a ClientHello builder and a QUIC Initial
builder (so tests can make what no captured client sends: frames out of order, ACKs, a
CONNECTION_CLOSE, odd names)."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from pathlib import Path

from cryptography.hazmat.primitives.ciphers import algorithms, modes

from ztun.sniff import NEED_MORE, Sniffed, StreamResult, sniff_stream
from ztun.sniff import quic as q

VECTORS = Path(__file__).resolve().parent / "vectors"


def vector(name: str) -> bytes:
    return (VECTORS / name).read_bytes()


def vec16(data: bytes, size: int = 2) -> bytes:
    """`data` with a big-endian length prefix of `size` bytes (a TLS vector)."""
    return len(data).to_bytes(size, "big") + data


def extension(ext_type: int, body: bytes) -> bytes:
    return ext_type.to_bytes(2, "big") + vec16(body)


def sni_extension(name: bytes, name_type: int = 0) -> bytes:
    return extension(0, vec16(bytes((name_type,)) + vec16(name)))


def alpn_extension(*protocols: bytes) -> bytes:
    return extension(16, vec16(b"".join(vec16(p, 1) for p in protocols)))


def client_hello_body(extensions: bytes | None = b"", version: bytes = b"\x03\x03") -> bytes:
    """A ClientHello body (no handshake header); `extensions` None leaves the block out."""
    body = version + bytes(32) + vec16(bytes(32), 1) + vec16(b"\x13\x01\x13\x02") + b"\x01\x00"
    return body if extensions is None else body + vec16(extensions)


def handshake(body: bytes, msg_type: int = 1) -> bytes:
    return bytes((msg_type,)) + vec16(body, 3)


def records(message: bytes, cuts: Sequence[int] = (), content: int = 0x16) -> bytes:
    """`message` split at `cuts` into handshake records."""
    bounds = [0, *sorted(set(cuts)), len(message)]
    parts = [message[a:b] for a, b in itertools.pairwise(bounds) if b > a]
    return b"".join(bytes((content, 3, 1)) + vec16(p) for p in parts)


def client_hello(sni: bytes | None = b"example.com", *alpn: bytes) -> bytes:
    """A whole ClientHello record with an optional server_name and ALPN."""
    exts = b"" if sni is None else sni_extension(sni)
    if alpn:
        exts += alpn_extension(*alpn)
    return records(handshake(client_hello_body(exts)))


def varint(value: int) -> bytes:
    for size, prefix in ((1, 0), (2, 0x40), (4, 0x80), (8, 0xC0)):
        if value < 1 << (8 * size - 2):
            raw = value.to_bytes(size, "big")
            return bytes((raw[0] | prefix,)) + raw[1:]
    raise ValueError(value)


def crypto_frame(offset: int, data: bytes) -> bytes:
    return b"\x06" + varint(offset) + varint(len(data)) + data


def initial_packet(
    frames: bytes,
    dcid: bytes = bytes(range(8)),
    version: int = q.VERSION_1,
    pn: int = 0,
    size: int = 1200,
) -> bytes:
    """A protected client Initial carrying `frames`, padded with PADDING to `size` bytes."""
    vinfo = q._VERSIONS[version]
    keys = q._client_keys(vinfo, dcid)
    pn_bytes = pn.to_bytes(2, "big")
    first = 0xC0 | (vinfo.initial_type << 4) | (len(pn_bytes) - 1)

    def head(length: int) -> bytes:
        return (
            bytes((first,))
            + version.to_bytes(4, "big")
            + vec16(dcid, 1)
            + vec16(b"\x01\x02\x03\x04", 1)
            + varint(0)  # token
            + varint(length)
            + pn_bytes
        )

    overhead = len(head(2000)) + 16  # the length varint takes 2 bytes at these sizes
    frames += bytes(max(0, size - overhead - len(frames)))
    header = head(len(pn_bytes) + len(frames) + 16)
    nonce = (int.from_bytes(keys.iv, "big") ^ pn).to_bytes(12, "big")
    sealed = keys.aead.encrypt(nonce, frames, header)
    pn_at = len(header) - len(pn_bytes)
    sample = sealed[4 - len(pn_bytes) : 20 - len(pn_bytes)]
    hp_key = keys.hp.algorithm
    assert isinstance(hp_key, algorithms.AES)
    enc = type(keys.hp)(hp_key, modes.ECB()).encryptor()
    mask = enc.update(sample) + enc.finalize()
    protected = bytearray(header + sealed)
    protected[0] ^= mask[0] & 0x0F
    for i in range(len(pn_bytes)):
        protected[pn_at + i] ^= mask[1 + i]
    return bytes(protected)


def is_valid(result: object) -> bool:
    return result is NEED_MORE or result is None or isinstance(result, Sniffed)


def check_prefixes(data: bytes, sniffers: frozenset[str] | None = None) -> StreamResult:
    """Feed every prefix of `data`: each answer is valid, and once one is final (Sniffed or
    None) every longer prefix, and the whole, answers the same. Returns the whole's answer."""
    kwargs = {} if sniffers is None else {"sniffers": sniffers}
    decided: StreamResult = NEED_MORE
    for i in range(len(data) + 1):
        result = sniff_stream(data[:i], **kwargs)
        assert is_valid(result), (i, result)
        if decided is not NEED_MORE:
            assert result == decided, (i, result, decided)
        decided = result
    return decided
