"""Golconde benchmark harness (see bench/README.md)."""
