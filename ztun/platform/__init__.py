"""Operating-system specific code (devices, routes)."""
