"""Test and benchmark helpers shared by tests/ and bench/: not part of any service, not installed."""
