"""Every pipeline node keeps its fingerprint and key prefix (golden_fingerprints.json).

A node's key covers its name, version, normalized code and parameters; a change
here means every user's store recomputes that step and everything after it.  When
that is intended (a better node), update the file with the reason in the commit:
``python tests/nodes/test_golden_fingerprints.py --update``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

GOLDEN = Path(__file__).resolve().parents[1] / "golden_fingerprints.json"
REPO = Path(__file__).resolve().parents[2]


def current() -> dict[str, dict]:
    from app.pipeline import _NODE_PATHS, load_node

    out = {}
    for path in sorted(_NODE_PATHS.values()):
        n = load_node(path)
        out[n.name] = {
            "path": path,
            "version": n.version,
            "fingerprint": n.fingerprint,
            "prefix": n.prefix(n.params()).hex(),
        }
    return out


def test_pipeline_nodes_keep_their_fingerprints():
    want = json.loads(GOLDEN.read_text())["nodes"]
    got = current()
    fields = ("version", "fingerprint", "prefix")
    changed = {}
    for n in set(want) & set(got):
        diff = {k: (want[n][k], got[n][k]) for k in fields if want[n][k] != got[n][k]}
        if diff:
            changed[n] = diff
    assert not changed, f"node keys changed (users' stores would recompute): {changed}"
    assert set(got) >= set(want), f"nodes gone: {sorted(set(want) - set(got))}"


def test_fingerprints_are_the_same_in_a_fresh_interpreter_without_the_cache(tmp_path):
    code = (
        "import json, sys; sys.path.insert(0, 'tests/nodes');"
        "from test_golden_fingerprints import current; print(json.dumps(current()))"
    )
    env = {"FLOW_FINGERPRINT_CACHE": "0", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    res = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=env
    )
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout) == current()


if __name__ == "__main__":
    if sys.argv[1:] != ["--update"]:
        sys.exit("usage: python tests/nodes/test_golden_fingerprints.py --update")
    doc = json.loads(GOLDEN.read_text())
    doc["nodes"] = current()
    GOLDEN.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"updated {GOLDEN}")
