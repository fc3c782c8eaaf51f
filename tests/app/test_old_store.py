"""A store built by an older flow stays valid: no step recomputes, no ref moves.

The fixture (tests/fixtures/store-0a35567, see its README) was built by flow at
0a35567.  Keys must never change without a reason: a changed node fingerprint,
a changed recipe derivation or a changed ref layout would make every user's
store stale, and this test fails first.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "store-0a35567"
CLI = [sys.executable, "-c", "from cli.main import main; main()"]
REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


def _flow(root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*CLI, "-p", str(root), *args], capture_output=True, text=True, cwd=REPO, timeout=300
    )


@pytest.fixture(scope="module")
def old(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("old") / "project"
    shutil.copytree(FIXTURE, root)
    return root


#: steps whose code changed on purpose since 0a35567, and why: each recomputes once
#: over an old store, and early cutoff stops everything after it (same outputs)
CHANGED = {
    # issue 14: a 16-bit PNG is scaled by the range of the bits its values use, not
    # always 65535 (nodes.decode._stored_range); 8-bit images decode as before
    "decoded": 20,
}


def test_a_store_built_at_0a35567_recomputes_only_the_steps_changed_since(old: Path):
    refs = {p.name: p.read_bytes() for p in (old / "store" / "refs").rglob("*") if p.is_file()}
    res = _flow(old, "-q", "build", "index", "--target=all", "--json")
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["ok"] and doc["fits"] == []
    computed = {s: r["computed"] for s, r in doc["steps"].items() if r["computed"]}
    assert computed == CHANGED, f"recomputed from an old store: {computed}"
    if not CHANGED:
        assert sorted(doc["unchanged"]) == ["bovw", "cnn", "codes"] and doc["refs"] == {}
        after = {p.name: p.read_bytes() for p in (old / "store" / "refs").rglob("*") if p.is_file()}
        assert after == refs
        return
    # the refs move to the very same index objects: only their query chains name the
    # new code (an index's query runs the code its items were computed with)
    from store import open_store
    from store.refs import ref_history

    st = open_store(str(old / "store"))
    assert sorted(doc["refs"]) == ["bovw", "cnn", "codes"]
    for t, segs in doc["refs"].items():
        hist = ref_history(st, t)
        assert hist[-2]["value"]["segments"] == segs, t


def test_status_of_the_old_store_has_nothing_stale(old: Path):
    res = _flow(old, "status", "--json")
    assert res.returncode == 0, res.stderr
    rows = json.loads(res.stdout)
    assert rows and all(r["stale"] == 0 and r["failed"] == 0 for r in rows), [
        (r["target"], r["step"], r["reasons"]) for r in rows if r["stale"] or r["failed"]
    ]


@pytest.mark.parametrize("target", ["cnn", "bovw", "codes"])
def test_queries_answer_as_they_did(old: Path, target: str):
    res = _flow(old, "query", str(old / "images" / "im13.png"), "--target", target, "-k", "3",
                "--json")  # fmt: skip
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout)["results"]
    want = json.loads((old / f"expected_query_{target}.json").read_text())["results"]
    assert [(r["id"], r["labels"]) for r in got] == [(r["id"], r["labels"]) for r in want]
    assert [r["distance"] for r in got] == pytest.approx([r["distance"] for r in want], abs=1e-5)
