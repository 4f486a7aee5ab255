"""mirror: a pull-through caching mirror and private registry for OCI images, on Twisted."""

__version__ = "0.1.0"
__all__ = ["__version__"]
