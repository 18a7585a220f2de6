"""Providers: the I/O that feeds the pure rule engine (rule-set files, downloads, caches)."""
