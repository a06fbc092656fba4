"""blockd: thinly provisioned, checksummed, replicated block volumes served over NBD."""

__version__ = "0.1.0"
