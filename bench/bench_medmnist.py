"""Precision@1 on the MedMNIST dev sets.  Run: ``python bench/bench_medmnist.py``.

For each of ``../shared/data/medmnist/*_dev.npz`` (28x28 images, one class label
each), the ``train`` and ``val`` arrays are written as PNG files with a labels
CSV (the class as the label, the split as the split), and the project that
``flow init`` writes is built over them with ``flow build index --target=all``
(training on ``train``), normalized to 32x32 (the embedding network halves the
image four times).  ``flow eval --json -k 1`` then scores the ``val`` queries
against the ``train`` database: precision@1 of every target beside the random
baseline of the same run.  Build wall time is reported too.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
MEDMNIST = REPO / ".." / "shared" / "data" / "medmnist"
CLI = [sys.executable, "-c", "from cli.main import main; main()"]
SETS = ("pneumoniamnist", "breastmnist", "retinamnist")


def _flow(root: Path, *args: str) -> tuple[float, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    t = time.perf_counter()
    res = subprocess.run(
        [*CLI, "-q", "-p", str(root), *args], capture_output=True, text=True, env=env
    )
    if res.returncode != 0:
        sys.exit(f"flow {' '.join(args)} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}")
    return time.perf_counter() - t, res.stdout


def _study(npz: Path, root: Path, size: int) -> None:
    from click.testing import CliRunner
    from PIL import Image

    from app.project import write_project
    from cli.main import cli

    data = np.load(npz, allow_pickle=False)
    images = root / "images"
    images.mkdir(parents=True)
    rows = ["file,split,label"]
    for split in ("train", "val"):
        x, y = data[f"{split}_images"], data[f"{split}_labels"].reshape(-1)
        for i, (img, lab) in enumerate(zip(x, y, strict=True)):
            name = f"{split}_{i:05d}.png"
            Image.fromarray(np.asarray(img, np.uint8)).save(images / name)
            rows.append(f"{name},{split},class{int(lab)}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    res = CliRunner().invoke(cli, ["init", str(root), "--labels", "labels.csv"])
    assert res.exit_code == 0, res.output
    config = tomllib.loads((root / "flow.toml").read_text())
    config["sources"][0]["labels_column"] = "label"
    config["targets"]["cnn"]["normalize"]["size"] = size
    config["targets"]["bovw"]["normalize"] = {"size": size}
    write_project(root, config)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sets", nargs="+", default=list(SETS))
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    out = {}
    print(f"load average before: {os.getloadavg()[0]:.2f}", file=sys.stderr)
    for name in args.sets:
        npz = MEDMNIST / f"{name}_dev.npz"
        if not npz.is_file():
            sys.exit(f"missing {npz}")
        with tempfile.TemporaryDirectory(prefix=f"bench-{name}-") as tmp:
            root = Path(tmp)
            _study(npz, root, args.size)
            build_s, _ = _flow(root, "build", "index", "--target=all")
            _, text = _flow(root, "eval", "--json", "-k", "1")
            evals = json.loads(text)
        out[name] = {
            "build_s": build_s,
            "queries": evals[0]["queries"],
            "database": evals[0]["database"],
            "p_at_1": {r["target"]: r["metrics"]["precision"]["1"] for r in evals},
            "random_p_at_1": {r["target"]: r["random"]["precision"]["1"] for r in evals},
        }
        print(f"{name}: {out[name]}", file=sys.stderr)
    print("\n| set | queries / database | build (s) | cnn P@1 | bovw P@1 | codes P@1 "
          "| random P@1 |")  # fmt: skip
    print("|---|---|---:|---:|---:|---:|---:|")
    for name, r in out.items():
        p = r["p_at_1"]
        print(f"| {name} | {r['queries']} / {r['database']} | {r['build_s']:.0f} | "
              f"{p['cnn']:.3f} | {p['bovw']:.3f} | {p['codes']:.3f} | "
              f"{r['random_p_at_1']['cnn']:.3f} |")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
