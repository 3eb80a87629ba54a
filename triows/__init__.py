"""triows: a real-time messaging server on Trio that routes through a message broker."""

__version__ = "0.1.0"
