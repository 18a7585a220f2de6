"""Helpers that ask a real sing-box how it matches, for differential tests of ztun's engine."""
