"""im58d: a self-hostable mobile instant-messaging server."""

__version__ = "0.1.0"
