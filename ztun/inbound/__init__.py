"""Inbounds: where flows come in (the mixed SOCKS/HTTP proxy, the TUN device)."""
