"""Latency measurement: timing harness, device fingerprint, latency cache and local oracle."""
