# mediabuilder's tasks. `./setup` installs what they need; `just --list` shows them.

set shell := ["bash", "-euo", "pipefail", "-c"]

venv := justfile_directory() / ".venv"
export PATH := venv / "bin" + ":" + env_var("PATH")
# Nix in a container: no build users, no sandbox, no network substituters, no global registry.
export NIX_CONFIG := "experimental-features = nix-command flakes\nbuild-users-group =\nsandbox = false\nsubstituters =\nflake-registry =\nwarn-dirty = false"

# List the recipes.
default:
    @just --list

# Install system packages, the venv and just (idempotent).
setup:
    ./setup

# Build media for the bundled example flake and install one host offline into a scratch root.
demo: setup
    bash scripts/demo.sh

# Run every test: unit, integration (real nix, real images) and linters.
test: setup
    pytest -m "integration or not integration" -q

# Only the fast unit tests.
test-fast: setup
    pytest -q

# ruff, mypy and shellcheck.
lint: setup
    pytest -q tests/test_lint.py

# Speed ratios against the reference tools (cache, images, substituter), measured in one run.
bench: setup
    python scripts/bench.py
    python scripts/bench_images.py
    python scripts/bench_build.py
    if [ -f scripts/bench_substituter.py ]; then python scripts/bench_substituter.py; fi

# Peak memory of the image writers on a 5,000-NAR, 20 GiB medium (needs 22 GiB free; minutes).
bench-large: setup
    python scripts/bench_large.py
