"""A Nix `file://` binary cache: its layout, the writer that fills it, and the verifier."""
