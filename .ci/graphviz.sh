#!/usr/bin/env bash
# CI: Graphviz's dot program for `flow graph` (tests/cli/test_first_run.py renders
# an SVG with it; without it that test checks the DOT text and skips the rest).
# Installs Debian's graphviz when missing (as root, with apt-get).  Exit 1: it
# could not.
set -uo pipefail
say() { echo "graphviz.sh: $*" >&2; }
command -v dot >/dev/null 2>&1 && exit 0
if [ "$(id -u)" != 0 ]; then say "not root: cannot install graphviz"; exit 1; fi
if ! command -v apt-get >/dev/null 2>&1; then say "no apt-get: install graphviz"; exit 1; fi
export DEBIAN_FRONTEND=noninteractive
timeout 600 apt-get install -y --no-install-recommends graphviz >/dev/null 2>&1 \
    || { timeout 300 apt-get update -q >/dev/null \
         && timeout 600 apt-get install -y --no-install-recommends graphviz >/dev/null; } \
    || { say "apt-get install graphviz failed"; exit 1; }
command -v dot >/dev/null 2>&1
