"""Packet handlers: :class:`~golconde.handlers.base.Handler` and loading by dotted path."""
