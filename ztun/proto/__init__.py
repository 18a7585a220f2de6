"""Sans-I/O protocol codecs: bytes in, parsed values or bytes to send out. No sockets, no clocks."""
