"""The Nix store's own formats: nix32, hashes, store paths, NAR, narinfo and signing keys."""
