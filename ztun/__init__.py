"""ztun: a rules router that splits traffic between a direct path and a SOCKS5 proxy."""

__version__ = "0.1.0"
