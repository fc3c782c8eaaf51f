#!/usr/bin/env bash
# CI: a fresh install resolves at once.
#
# CI's own Python already holds every package, so it never sees what a new user's
# `pip install torch==2.13.0 -e '.[test]'` does in an empty venv.  This resolves
# that install in a fresh venv (pip --dry-run: it reads the indexes and
# resolves, installs nothing) and fails when pip's resolver backtracks (it says
# "pip is looking at multiple versions of ...": a range in setup.cfg lets it try
# versions that cannot go together -- s3fs/aiobotocore/boto3/moto once cost 8.5
# minutes) or when resolving takes longer than LIMIT seconds.
#
#   bash .ci/install_check.sh            # LIMIT=300 by default
set -euo pipefail
cd "$(dirname "$0")/.."
LIMIT="${LIMIT:-300}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
python -m venv "$work/venv"
"$work/venv/bin/python" -m pip install -q --upgrade "pip>=23.2" >/dev/null 2>&1 || true
start=$(date +%s)
status=0
timeout "$LIMIT" "$work/venv/bin/python" -m pip install --dry-run --ignore-installed \
    --report "$work/report.json" torch==2.13.0 -e '.[test]' >"$work/pip.log" 2>&1 || status=$?
took=$(( $(date +%s) - start ))
if [ "$status" = 124 ]; then
    echo "install_check: resolving a fresh install took over ${LIMIT} s" >&2
    tail -20 "$work/pip.log" >&2
    exit 1
fi
if [ "$status" != 0 ]; then
    echo "install_check: pip could not resolve a fresh install (exit $status)" >&2
    tail -30 "$work/pip.log" >&2
    exit 1
fi
if grep -q "is looking at multiple versions" "$work/pip.log"; then
    echo "install_check: pip backtracked resolving a fresh install (pin these together in setup.cfg):" >&2
    grep "is looking at multiple versions" "$work/pip.log" | sort | uniq -c >&2
    exit 1
fi
n=$(python -c "import json,sys; print(len(json.load(open(sys.argv[1]))['install']))" "$work/report.json")
echo "install_check: a fresh install resolves at once: $n packages in ${took} s"
