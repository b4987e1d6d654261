"""via-sd: an inference server for three-tier speculative decoding (VIA-SD)."""

__version__ = "0.1.0"
