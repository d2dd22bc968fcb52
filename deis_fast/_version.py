"""The package version, in one place (read by the CLI, the tuned-file writer and setup)."""
__version__ = "0.1.0"
