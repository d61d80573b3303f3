"""nixfs: a userspace overlay filesystem for sharing a read-only Nix store."""

__version__ = "0.1.0"
