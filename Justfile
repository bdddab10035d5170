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

# Both environments: this host (Debian 12: Nix 2.8, Python 3.11) and the Debian 13 root (Nix 2.26,
# Python 3.13); fails if either fails. The cross-version installs (tests/test_cross_version.py)
# run from the host only, once.
#
# Run every test, twice: unit, integration (real nix, real images) and linters.
test: setup
    #!/usr/bin/env bash
    set -uo pipefail
    status=0
    echo "== host: $(nix --version), Python $(python -c 'import platform; print(platform.python_version())')"
    start=$SECONDS
    pytest -m "integration or not integration" -q || status=1
    echo "== host run: $((SECONDS - start)) s"
    echo "== trixie root: $(scripts/in-trixie nix --version), Python $(scripts/in-trixie python -c 'import platform; print(platform.python_version())')"
    start=$SECONDS
    scripts/in-trixie pytest -m "integration or not integration" -q -p no:cacheprovider || status=1
    echo "== trixie run: $((SECONDS - start)) s"
    exit "$status"

# Build the Debian 13 test root (Nix 2.26, Python 3.13) unless its recipe's root exists; print its path.
trixie-root:
    scripts/trixie-root.sh

# Run a command in the Debian 13 test root (default: a shell), e.g. `just in-trixie nix --version`.
in-trixie *ARGS: trixie-root
    scripts/in-trixie {{ARGS}}

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
    python scripts/bench_installer.py
    python scripts/bench_build.py
    python scripts/bench_upgrade.py
    if [ -f scripts/bench_substituter.py ]; then python scripts/bench_substituter.py; fi

# Peak memory of the image writers on a 5,000-NAR, 20 GiB medium (needs 22 GiB free; minutes).
bench-large: setup
    python scripts/bench_large.py
