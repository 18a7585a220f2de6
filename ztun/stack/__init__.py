"""The sans-I/O cores of the inbounds: bytes and `now` in, what to do out.

`flow.py` is a flow's record and how a routing verdict is expressed, `commands.py` the closed
vocabulary of what a core asks its I/O layer to do, `tun.py` every per-packet decision of the
TUN inbound. The UDP flow/session table both inbounds share is `ztun.nat.udp`. Nothing here
imports sockets, clocks, the event loop or the OS (tests/unit/test_layers.py enforces it).
"""
