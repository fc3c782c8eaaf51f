"""An existing Dask scheduler that speaks TLS: ``dask scheduler --protocol tls`` and a
``dask worker`` with certificates from a private CA (made here with openssl), and
flow's TLS options passed through to dask's ``Security`` -- from the CLI
(``--tls-ca-file/--tls-cert/--tls-key``) and from ``[build.tls]`` in flow.toml.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from app.project import project_from_dict
from engine.builder import build
from engine.executors import get_executor, tls_security
from engine.testing import synthetic_graph, synthetic_inputs
from flow.errors import ConfigError, FlowError
from store import open_store
from tests.conftest import project_config, write_project
from tests.processes import (
    START_TIMEOUT,
    Processes,
    assert_same_content,
    start_scheduler,
    store_content,
)

pytestmark = [pytest.mark.cluster, pytest.mark.slow]
_REPO = Path(__file__).resolve().parents[2]


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Path:
    """A CA and one certificate for 127.0.0.1 signed by it (scheduler, worker, client)."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    d = tmp_path_factory.mktemp("tls")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj",
             "/CN=flow-test-ca", "-keyout", "ca.key", "-out", "ca.pem", cwd=d)  # fmt: skip
    (d / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1",
             "-keyout", "key.pem", "-out", "req.csr", cwd=d)  # fmt: skip
    _openssl("x509", "-req", "-in", "req.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
             "-CAcreateserial", "-days", "2", "-extfile", "ext.cnf", "-out", "cert.pem",
             cwd=d)  # fmt: skip
    return d


@pytest.fixture(scope="module")
def tls_cluster(certs, tmp_path_factory):
    pytest.importorskip("distributed")
    folder = tmp_path_factory.mktemp("tls-dask")
    procs = Processes(folder)
    tls = ["--tls-ca-file", str(certs / "ca.pem"), "--tls-cert", str(certs / "cert.pem"),
           "--tls-key", str(certs / "key.pem")]  # fmt: skip
    try:
        _, addr = start_scheduler(procs, "--protocol", "tls", *tls, idle_timeout=600)
        assert addr.startswith("tls://")
        procs.start([sys.executable, "-m", "distributed.cli.dask_worker", addr, "--nthreads",
                     "1", "--no-nanny", "--memory-limit", "0", "--no-dashboard", *tls],
                    "worker.log", cwd=_REPO)  # fmt: skip
        yield addr, certs
    finally:
        procs.close()


def test_build_on_a_tls_scheduler_equals_a_sync_build(tls_cluster, reference, tmp_path):
    addr, certs = tls_cluster
    ref = reference(60)
    st = open_store(tmp_path / "store")
    items, sources = synthetic_inputs(ref.data, st)
    sec = tls_security(str(certs / "ca.pem"), str(certs / "cert.pem"), str(certs / "key.pem"))
    with get_executor(addr, security=sec) as ex:
        ex.client.wait_for_workers(1, timeout=START_TIMEOUT)
        rep = build(synthetic_graph(), items, sources, st, ex, progress=False)
    assert rep.ok and rep.executor == addr
    assert_same_content(store_content(st), ref.content)


def test_the_flow_command_passes_tls_options_to_dask(tls_cluster, tmp_path):
    """``flow build --scheduler tls://... --tls-*`` builds on the TLS cluster; without
    the CA the scheduler's certificate is refused and the command fails cleanly."""
    addr, certs = tls_cluster
    from app.phantoms import write_phantom_study

    root = tmp_path / "p"
    write_phantom_study(root, n=12, size=64, seed=1)
    tls = {"ca_file": certs / "ca.pem", "cert": certs / "cert.pem", "key": certs / "key.pem"}
    bovw = {
        "kind": "bovw",
        "descriptors": {"n_segments": 40},
        "vocabulary": {"words": 16, "sample": 2000},
    }
    write_project(root, project_config(scheduler=None, targets={"bovw": bovw}, build={"tls": tls}))
    cli = [sys.executable, "-c", "from cli.main import main; main()", "-p", str(root)]
    res = subprocess.run([*cli, "build", "index", "--scheduler", addr, "--json"],
                         capture_output=True, text=True, timeout=300, cwd=_REPO)  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr
    doc = json.loads(res.stdout)
    assert doc["ok"] and doc["executor"] == addr
    # the CLI flags take precedence: a CA that did not sign the scheduler is refused
    other = tmp_path / "other"
    other.mkdir()
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
             "/CN=other", "-keyout", "k.pem", "-out", "ca.pem", cwd=other)  # fmt: skip
    (root / "images" / "extra.png").write_bytes((root / "images").rglob("*.dcm").__next__()
                                               .read_bytes())  # fmt: skip
    res = subprocess.run([*cli, "build", "index", "--scheduler", addr, "--tls-ca-file",
                          str(other / "ca.pem")], capture_output=True, text=True,
                         timeout=300, cwd=_REPO)  # fmt: skip
    assert res.returncode == 1, res.stdout + res.stderr
    assert "TLS certificate does not match" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr and "ref bovw NOT moved" in res.stderr


def test_tls_table_is_checked(tmp_path):
    with pytest.raises(ConfigError, match=r"\[build.tls\] ca_file = 'nope.pem' is not a file"):
        project_from_dict({"build": {"tls": {"ca_file": "nope.pem"}}}, root=tmp_path)
    with pytest.raises(ConfigError, match=r"unknown key.*'certificate'"):
        project_from_dict({"build": {"tls": {"certificate": "x"}}}, root=tmp_path)
    with pytest.raises(FlowError, match="CA file and a client certificate"):
        tls_security(None, "cert.pem")
    assert tls_security(None, None) is None
