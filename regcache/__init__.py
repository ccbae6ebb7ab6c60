"""
regcache: a pull-through cache for Docker Hub and other OCI registries.

Each manifest and blob is fetched from upstream once, verified, kept on disk
and served to every client from there, including while upstream is down.
"""

__version__ = "0.1.0"
