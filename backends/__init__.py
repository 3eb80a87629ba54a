"""Broker backends for triows, one module per protocol, behind ``triows.backend.Backend``."""
