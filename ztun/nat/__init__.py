"""Pure address-translation tables for the TUN inbound (TCP system-stack NAT, UDP sessions)."""
