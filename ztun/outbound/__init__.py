"""Outbounds: where a flow goes once the router picked one (direct, socks, block)."""
