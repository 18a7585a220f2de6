"""Pure packet codecs for the TUN inbound: IP, TCP, UDP, ICMP headers, checksums, reassembly."""
