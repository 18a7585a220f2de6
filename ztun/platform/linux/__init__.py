"""Linux: the TUN device and policy routing (auto_route)."""
