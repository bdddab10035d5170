"""mediabuilder: offline NixOS install media from a flake."""

__version__ = "0.1.0"
