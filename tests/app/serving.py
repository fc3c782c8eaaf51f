"""Helpers for the ``flow serve`` tests: a small built phantom project and a real
server process on loopback (started by the test, stopped after it)."""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from app.phantoms import write_phantom_study
from tests.conftest import REPO, TINY_TARGETS, project_config, write_project

N_IMAGES = 48
#: a cnn and a regions target, small enough for a test
SERVE_TARGETS = {
    "cnn": TINY_TARGETS["cnn"],
    "regions": {
        "kind": "regions",
        "normalize": {"size": 96},
        "descriptors": {"n_segments": 80, "patch": 12},
        "vocabulary": {"words": 24, "sample": 4000},
    },
}


def built_project(folder: Path, n: int = N_IMAGES) -> Path:
    """Phantom DICOMs (``images/``, ``labels.csv``) with both targets built."""
    from app.workspace import Workspace

    write_phantom_study(folder, n=n, size=96, seed=3)
    write_project(folder, project_config(targets=SERVE_TARGETS))
    built = Workspace.open(folder).build("all", progress=False)
    assert not built.incomplete and set(built.moved) == {"cnn", "regions"}, built.incomplete
    return folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def png(array: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


class Server:
    """``flow serve`` as a child process in its own session (its group is killed
    at :meth:`stop`)."""

    def __init__(self, project: Path, *args: str, env: dict | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = Path(project) / f"serve-{self.port}.log"
        cmd = [sys.executable, "-c", "from cli.main import main; main()", "-p", str(project)]
        cmd += ["serve", "--port", str(self.port), *args]
        full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
        self._out = open(self.log, "wb")  # noqa: SIM115 -- closed in stop()
        self.proc = subprocess.Popen(
            cmd,
            stdout=self._out,
            stderr=subprocess.STDOUT,
            env=full_env,
            start_new_session=True,
        )

    def wait(self, timeout: float = 90.0) -> Server:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"flow serve exited: {self.output()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"flow serve did not come up in {timeout} s: {self.output()}")

    def output(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self._out.close()
