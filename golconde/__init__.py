"""Golconde: queue-based data distribution for PostgreSQL over STOMP message brokers."""

__version__ = "1.0.0.dev0"
