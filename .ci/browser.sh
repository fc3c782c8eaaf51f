#!/usr/bin/env bash
# CI: make a real browser available to tests/app/test_viewer.py.
#
# Installs Debian's chromium and chromium-driver when missing (as root, with
# apt-get), then checks that headless Chromium starts here and renders a page.
# Nothing is left running.
#
# Exit 0: the browser works here -- export FLOW_REQUIRE_BROWSER=1 so that the
# viewer test fails rather than skips.  Exit 1: it cannot (not root, no apt-get,
# Chromium does not start); the viewer test then skips with the reason.
#
#   bash .ci/browser.sh && export FLOW_REQUIRE_BROWSER=1
set -uo pipefail
cd "$(dirname "$0")/.."

say() { echo "browser.sh: $*" >&2; }
missing() { ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; }

if missing; then
    if [ "$(id -u)" != 0 ]; then say "not root: cannot install chromium"; exit 1; fi
    if ! command -v apt-get >/dev/null 2>&1; then say "no apt-get: install chromium and chromium-driver"; exit 1; fi
    export DEBIAN_FRONTEND=noninteractive
    pkgs="chromium chromium-driver"
    timeout 600 apt-get install -y --no-install-recommends $pkgs >/dev/null 2>&1 \
        || { timeout 300 apt-get update -q >/dev/null \
             && timeout 600 apt-get install -y --no-install-recommends $pkgs; } \
        || { say "apt-get install $pkgs failed"; exit 1; }
fi
if missing; then say "still missing chromium or chromedriver"; exit 1; fi

profile="$(mktemp -d)"
trap 'rm -rf "$profile"' EXIT
if ! timeout 60 chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
        --disable-background-networking --disable-component-update --disable-sync \
        --user-data-dir="$profile" --dump-dom 'data:text/html,<p id=x>ok</p>' 2>/dev/null \
        | grep -q 'id="x"'; then
    say "headless chromium does not render a page here"; exit 1
fi
say "$(chromium --version 2>/dev/null | head -1), $(chromedriver --version 2>/dev/null | head -1)"
exit 0
