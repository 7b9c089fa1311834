"""Portico: an HTTP reverse proxy and load balancer that runs the fleet behind it."""

__version__ = "0.1.0"
