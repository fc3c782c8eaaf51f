"""``flow serve`` as a real process on loopback: the API, hot swap of refs, and the
safety rules (token, upload limit, bad and hostile uploads, PHI, ids, CORS)."""

from __future__ import annotations

import io
import json
import shutil
import struct
import threading
import time
import zlib

import numpy as np
import pytest
from click.testing import CliRunner

from app.phantoms import phantom_identifiers
from app.retrieval import QUERY_ATTRS, Retriever
from cli.main import cli
from tests.app.serving import Server, built_project, png

httpx = pytest.importorskip("httpx")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    return built_project(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def server(project):
    s = Server(project, "--poll", "0.3").wait()
    yield s
    s.stop()


def _dicom(project, n=0):
    return sorted((project / "images").rglob("*.dcm"))[n]


def _query(url, data=None, name="q.png", headers=None, **fields):
    files = {"file": (name, data, "application/octet-stream")} if data is not None else None
    form = {k: str(v) for k, v in fields.items() if v is not None}
    return httpx.post(url + "/api/query", files=files, data=form, headers=headers, timeout=60)


def test_query_an_upload_whole_image_and_a_region(server, project):
    path = _dicom(project)
    r = _query(server.url, path.read_bytes(), name="q.dcm", target="cnn", k=5)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["target"] == "cnn" and body["kind"] == "cnn" and len(body["results"]) == 5
    assert [h["rank"] for h in body["results"]] == [1, 2, 3, 4, 5]
    d = [h["distance"] for h in body["results"]]
    assert d == sorted(d)
    # the same as the Python API on the same index
    retr = Retriever.open(_store(project), "cnn")
    want = [h.id for h in retr.query(path, k=5)]
    assert [h["id"] for h in body["results"]] == want
    # statistics: counts among the top K, against the archive's base rates
    counts = {}
    for h in body["results"]:
        for lab in h["labels"]:
            counts[lab] = counts.get(lab, 0) + 1
    assert {s["label"]: s["count"] for s in body["stats"]} == counts
    rates = retr.label_rates()
    for s in body["stats"]:
        assert s["base_rate"] == pytest.approx(rates[s["label"]], abs=1e-4)
        assert s["fraction"] == pytest.approx(s["count"] / 5, abs=1e-4)

    data = path.read_bytes()
    r = _query(server.url, data, name="q.dcm", target="regions", k=4, roi="10,20,30,30")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["kind"] == "regions" and body["roi"] == [10, 20, 30, 30]
    assert 1 <= len(body["results"]) <= 4
    for h in body["results"]:
        x, y, w, h_ = h["box"]
        width, height = h["size"]
        assert x >= 0 and y >= 0 and x + w <= width and y + h_ <= height and w > 0 and h_ > 0
    # one result per study at most
    ids = [h["id"] for h in body["results"]]
    assert len(set(ids)) == len(ids)


def _store(project):
    from app.project import load_project

    return load_project(project).open_store()


def test_query_by_item_id_leaves_the_item_out(server, project):
    retr = Retriever.open(_store(project), "cnn")
    item = retr.ids[3]
    r = _query(server.url, id=item, target="cnn", k=6)
    assert r.status_code == 200, r.text
    assert item not in [h["id"] for h in r.json()["results"]]
    assert len(r.json()["results"]) == 6


def test_targets_health_metrics_and_openapi(server):
    t = httpx.get(server.url + "/api/targets").json()["targets"]
    by = {x["name"]: x for x in t}
    assert by["cnn"]["kind"] == "cnn" and by["cnn"]["items"] > 0 and by["cnn"]["seq"] >= 1
    assert by["regions"]["kind"] == "regions" and by["regions"]["regions"] > by["regions"]["items"]
    assert by["cnn"]["built"].endswith("+00:00")
    h = httpx.get(server.url + "/health").json()
    assert h["status"] == "ok" and h["targets"]["cnn"] == by["cnn"]["seq"]
    text = httpx.get(server.url + "/metrics").text
    assert f'flow_index_items{{target="cnn"}} {float(by["cnn"]["items"])}' in text
    assert f'flow_ref_seq{{target="regions"}} {float(by["regions"]["seq"])}' in text
    assert 'flow_http_requests_total{method="GET",route="/api/targets",status="200"}' in text
    assert "flow_http_request_seconds_bucket" in text
    spec = httpx.get(server.url + "/openapi.json").json()
    paths = {"/api/query", "/api/targets", "/api/items/{item_id}/image", "/health", "/metrics"}
    assert paths <= set(spec["paths"])
    assert "QueryResponse" in spec["components"]["schemas"]
    # no interactive docs (they would load scripts from a CDN)
    assert httpx.get(server.url + "/docs").status_code == 404


def test_item_image_is_the_builds_decode_windowed(server, project):
    from PIL import Image

    retr = Retriever.open(_store(project), "cnn")
    item = retr.ids[0]
    r = httpx.get(f"{server.url}/api/items/{item}/image")
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    got = np.asarray(Image.open(io.BytesIO(r.content)))
    from app.workspace import Workspace

    # ids are keyed hashes: the project says which file an item is
    want = retr.picture((project / Workspace.open(project).shown(item)).read_bytes())
    assert got.shape == want.shape
    assert np.abs(got.astype(int) - np.rint(want * 255).astype(int)).max() <= 1
    small = httpx.get(f"{server.url}/api/items/{item}/image", params={"size": 32})
    assert max(Image.open(io.BytesIO(small.content)).size) == 32


@pytest.mark.parametrize(
    "item",
    ["../flow.toml", "..%2Fflow.toml", "%2Fetc%2Fpasswd", "images/../../flow.toml", "labels.csv"],
)
def test_item_ids_are_looked_up_never_opened(server, item):
    r = httpx.get(f"{server.url}/api/items/{item}/image")
    assert r.status_code == 404, r.text
    q = _query(server.url, id=item.replace("%2F", "/"), k=3)
    assert q.status_code == 404


def _bomb_png(side=100_000) -> bytes:
    """A valid PNG header claiming side x side gray pixels, with a few bytes of data."""

    def chunk(kind, data):
        c = struct.pack(">I", len(data)) + kind + data
        return c + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 4096, 9)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"this is not an image at all", "not a DICOM, PNG or JPEG"),
        (b"", "empty"),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "PNG"),
        ("bomb", "pixels"),
    ],
)
def test_bad_and_hostile_uploads_get_400_with_the_reason(server, data, reason):
    if data == "bomb":
        data = _bomb_png()
    r = _query(server.url, data, target="cnn", k=3)
    assert r.status_code == 400, r.text
    detail = r.json()["detail"]
    assert reason.lower() in detail.lower(), detail
    assert "Traceback" not in r.text and 'File "' not in r.text
    assert httpx.get(server.url + "/health").status_code == 200  # still serving


def test_bad_requests_say_what_is_wrong(server):
    img = png((np.arange(64 * 64) % 251).reshape(64, 64).astype(np.uint8))
    r = _query(server.url, img, target="nope", k=3)
    assert r.status_code == 404 and "no target 'nope'" in r.json()["detail"]
    r = _query(server.url, img, target="regions", k=3, roi="1,2,3")
    assert r.status_code == 400 and "x,y,w,h" in r.json()["detail"]
    r = _query(server.url, img, target="regions", k=3, roi="500,500,10,10")
    assert r.status_code == 400 and "outside the image" in r.json()["detail"]
    r = _query(server.url, img, target="cnn", k=0)
    assert r.status_code == 422
    r = _query(server.url, target="cnn", k=3)
    assert r.status_code == 400 and "file" in r.json()["detail"]


def test_no_phi_in_any_response(server, project):
    secrets = [v for vals in phantom_identifiers(project / "images").values() for v in vals]
    assert secrets
    path = _dicom(project, 5)
    bodies = [
        _query(server.url, path.read_bytes(), name="q.dcm", target=t, k=8).content
        for t in ("cnn", "regions")
    ]
    bodies.append(
        httpx.post(
            server.url + "/api/preview", files={"file": ("q.dcm", path.read_bytes())}
        ).content
    )
    retr = Retriever.open(_store(project), "cnn")
    bodies += [httpx.get(f"{server.url}/api/items/{i}/image").content for i in retr.ids[:5]]
    bodies.append(httpx.get(server.url + "/api/targets").content)
    for body in bodies:
        for s in secrets:
            for spelling in {s, s.replace("^", " "), s.lower()}:
                assert spelling.encode() not in body, spelling
    q = json.loads(bodies[0])["query"]
    assert set(q) <= set(QUERY_ATTRS) and "study" not in q


def test_no_cors_headers_unless_configured(server):
    r = httpx.get(server.url + "/api/targets", headers={"Origin": "http://evil.example"})
    assert "access-control-allow-origin" not in {k.lower() for k in r.headers}
    pre = httpx.options(
        server.url + "/api/query",
        headers={"Origin": "http://evil.example", "Access-Control-Request-Method": "POST"},
    )
    assert "access-control-allow-origin" not in {k.lower() for k in pre.headers}


def test_token_and_upload_limit(project, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("s3cret-token\n")
    s = Server(
        project,
        "--token-file",
        str(token_file),
        "--max-upload",
        "256k",
        "--cors-origin",
        "http://viewer.example",
    )
    try:
        s.wait()
        img = png((np.arange(64 * 64) % 251).reshape(64, 64).astype(np.uint8))
        for path in ("/api/targets", "/metrics", "/openapi.json", "/api/items/x/image"):
            r = httpx.get(s.url + path)
            assert r.status_code == 401, (path, r.status_code)
            assert r.headers["www-authenticate"] == "Bearer"
        assert _query(s.url, img, k=3).status_code == 401
        bad = {"Authorization": "Bearer wrong"}
        assert httpx.get(s.url + "/api/targets", headers=bad).status_code == 401
        good = {"Authorization": "Bearer s3cret-token"}
        assert httpx.get(s.url + "/api/targets", headers=good).status_code == 200
        assert _query(s.url, img, k=3, headers=good).status_code == 200
        # open without a token: liveness and the viewer's own files
        assert httpx.get(s.url + "/health").status_code == 200
        assert httpx.get(s.url + "/").status_code == 200
        # too large: 413, whether or not the client says so up front
        big = img + b"\x00" * (300 << 10)
        r = _query(s.url, big, k=3, headers=good)
        assert r.status_code == 413, r.text

        def chunks():
            yield b"--b\r\nContent-Disposition: form-data; name=file; filename=x.png\r\n\r\n"
            for _ in range(40):
                yield b"\x00" * (16 << 10)

        r = httpx.post(
            s.url + "/api/query",
            content=chunks(),
            headers={**good, "Content-Type": "multipart/form-data; boundary=b"},
        )
        assert r.status_code == 413, r.text
        # CORS only for the configured origin
        r = httpx.get(s.url + "/health", headers={"Origin": "http://viewer.example"})
        assert r.headers["access-control-allow-origin"] == "http://viewer.example"
        r = httpx.get(s.url + "/health", headers={"Origin": "http://evil.example"})
        assert "access-control-allow-origin" not in r.headers
    finally:
        s.stop()


def test_binding_beyond_loopback_needs_a_token(project, monkeypatch):
    monkeypatch.delenv("FLOW_SERVE_TOKEN", raising=False)
    res = CliRunner().invoke(cli, ["-p", str(project), "serve", "--host", "0.0.0.0"])
    assert res.exit_code == 2, res.output
    assert "token" in res.output and "0.0.0.0" in res.output


def test_refs_move_under_load_without_a_failed_request(project, server, tmp_path):
    """New studies built into a new segment, then a forget: each ref move is picked
    up within seconds, while queries run, and not one query fails."""
    from app.workspace import Workspace

    img = (project / "images").rglob("*.dcm").__next__().read_bytes()
    results: list[tuple[int, int, int]] = []
    stop = threading.Event()

    def load():
        with httpx.Client(base_url=server.url, timeout=30) as c:
            deadline = time.monotonic() + 120
            while not stop.is_set() and time.monotonic() < deadline:
                for t, roi in (("cnn", {}), ("regions", {"roi": "10,10,40,40"})):
                    r = c.post(
                        "/api/query",
                        files={"file": ("q.dcm", img)},
                        data={"target": t, "k": "5", **roi},
                    )
                    seq = r.json().get("seq", -1) if r.status_code == 200 else -1
                    results.append((r.status_code, seq, len(r.content)))

    threads = [threading.Thread(target=load) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        seq0 = httpx.get(server.url + "/health").json()["targets"]
        extra = tmp_path / "extra"
        from app.phantoms import write_phantom_study

        write_phantom_study(extra, n=6, size=96, seed=11)
        shutil.copytree(extra / "images", project / "images" / "new")
        ws = Workspace.open(project)
        built = ws.build("all", progress=False)
        assert set(built.moved) == {"cnn", "regions"}, built.incomplete

        def seqs():
            return httpx.get(server.url + "/health").json()["targets"]

        deadline = time.monotonic() + 30
        while any(seqs()[t] <= seq0[t] for t in seq0):
            assert time.monotonic() < deadline, "the server did not pick up the new refs"
            time.sleep(0.2)
        targets = {x["name"]: x for x in httpx.get(server.url + "/api/targets").json()["targets"]}
        assert targets["cnn"]["segments"] == 2
        ids = Retriever.open(ws.store, "cnn").ids
        new_ids = [i for i in ids if ws.shown(i).startswith("images/new/")]
        assert len(new_ids) == 6
        r = _query(server.url, id=new_ids[0], target="cnn", k=3)
        assert r.status_code == 200  # the new study is an item of the served index
        seq1 = seqs()
        ws.forget(ids=new_ids[:2])
        built = Workspace.open(project).build("all", progress=False)
        assert set(built.moved) == {"cnn", "regions"}
        deadline = time.monotonic() + 30
        while any(seqs()[t] <= seq1[t] for t in seq1):
            assert time.monotonic() < deadline, "the server did not pick up the forget"
            time.sleep(0.2)
        assert _query(server.url, id=new_ids[0], target="cnn", k=3).status_code == 404
        time.sleep(1.0)
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    assert len(results) > 20
    failed = [r for r in results if r[0] != 200]
    assert not failed, failed[:5]
    assert len({r[1] for r in results}) >= 3  # answered by the old and the new indices
    text = httpx.get(server.url + "/metrics").text
    assert 'flow_index_swaps_total{target="cnn"} 2.0' in text


def test_flow_query_roi_from_the_command_line(project):
    path = _dicom(project, 2)
    res = CliRunner().invoke(
        cli,
        ["-p", str(project), "query", str(path), "-t", "regions", "--roi", "8,12,40,36", "--json"],
    )
    assert res.exit_code == 0, res.output
    doc = json.loads(res.output)
    assert doc["roi"] == [8, 12, 40, 36] and doc["results"]
    assert all(len(h["box"]) == 4 and len(h["size"]) == 2 for h in doc["results"])
    retr = Retriever.open(_store(project), "regions")
    want = [(h.id, list(h.box)) for h in retr.query(path, k=10, roi=(8, 12, 40, 36))]
    assert [(h["id"], h["box"]) for h in doc["results"]] == want
    table = CliRunner().invoke(
        cli, ["-p", str(project), "query", str(path), "-t", "regions", "--roi", "8,12,40,36"]
    )
    assert table.exit_code == 0 and "box x,y,w,h" in table.output
    bad = CliRunner().invoke(
        cli, ["-p", str(project), "query", str(path), "-t", "regions", "--roi", "8,12"]
    )
    assert bad.exit_code == 1 and "x,y,w,h" in bad.output
    ev = CliRunner().invoke(cli, ["-p", str(project), "eval", "-t", "regions"])
    assert ev.exit_code == 2 and "regions target" in ev.output
