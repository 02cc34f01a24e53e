"""The package version, in a leaf module so that low layers can record it."""

__version__ = "0.1.0"
