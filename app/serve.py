"""``flow serve``: the indices as an HTTP API and a web viewer, kept fresh without restarts.

The stack is FastAPI on uvicorn.  FastAPI because the OpenAPI description is
generated from the same typed models that shape every response (it cannot drift
from the code), because it enforces the request body limit itself
(``max_body_size``: 413 before an oversized upload is read) and because
multipart uploads, validation errors (422) and the threadpool for blocking work
come with it; Starlette alone would leave the schema to be written by hand.
uvicorn (with httptools and uvloop where installed) is the ASGI server both are
made for.  FastAPI's interactive docs pages load their scripts from a CDN, so
they are off: the description is ``GET /openapi.json``.

State.  One :class:`Service` holds a :class:`app.retrieval.LiveRetriever` per
target (each current ref's index, opened once), the item id -> source file map
of the project (for thumbnails and queries by id; empty when serving a bare
store) and the Prometheus registry.  A background thread checks the refs every
``poll`` seconds; a moved ref's new index is opened and warmed beside the old
one, then swapped in by one assignment.  A request takes the index it starts
with and keeps it to the end, so no request fails or sees half an index during
a swap (the old index's files are memory-mapped: a ``flow gc`` that deletes
them does not pull them from under it).

Safety.  Binds 127.0.0.1 unless told otherwise; any other bind needs a token,
required then as ``Authorization: Bearer <token>`` on every API call
(``/api/*``, ``/metrics``, ``/openapi.json``; 401 without it).  The viewer's own
files and ``/health`` hold no data and stay open.  Request bodies over
``max_upload`` bytes get 413; an undecodable image or a decompression bomb gets
400 with the reason (decode checks the declared size before decoding anything);
an unexpected error is a 500 with no detail (logged here).  Responses carry
item ids, labels, distances, boxes and the query's whitelisted attributes
(:data:`app.retrieval.QUERY_ATTRS`): never a DICOM tag beyond it.  An item id
is looked up in the served indices and the project's scan, never joined to a
path.  No CORS headers unless origins are configured.
"""

from __future__ import annotations

import hmac
import io
import ipaddress
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from flow.errors import ConfigError, FlowError

__all__ = ["ServeConfig", "Service", "create_app", "is_loopback", "serve"]

log = logging.getLogger("flow.serve")

VIEWER = Path(__file__).resolve().parent / "viewer"
DEFAULT_MAX_UPLOAD = 64 << 20
_GUARDED = ("/metrics", "/openapi.json")  # besides /api/*: the token is checked there
_CSP = (
    "default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'; "
    "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
)


@dataclass(frozen=True)
class ServeConfig:
    """What ``flow serve`` was asked for."""

    project: str | None = None  # flow.toml (or its folder); None: a bare store
    store: str | None = None  # store URL (overrides the project's)
    targets: tuple[str, ...] = ()  # () = every target with a ref
    host: str = "127.0.0.1"
    port: int = 8000
    token: str | None = None
    max_upload: int = DEFAULT_MAX_UPLOAD
    cors_origins: tuple[str, ...] = ()
    poll: float = 2.0
    thumbnail: int = 512
    max_k: int = 200
    access_log: bool = False
    extra: dict = field(default_factory=dict)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


# --------------------------------------------------------------------------
# the state behind the API


class Service:
    """The served targets, the item -> file map and the metrics, kept current."""

    def __init__(self, cfg: ServeConfig):
        self.cfg = cfg
        self.project = None
        if cfg.project is not None:
            from app.project import load_project

            self.project = load_project(cfg.project, store=cfg.store)
            self.store = self.project.open_store()
        elif cfg.store is not None:
            from store import open_store

            self.store = open_store(cfg.store)
        else:
            raise ConfigError("flow serve needs a project (flow.toml) or --store")
        self.live: dict[str, Any] = {}
        self.paths: dict[str, str] = {}
        self._thumbs: OrderedDict[tuple, bytes] = OrderedDict()
        self._thumbs_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.errors: dict[str, str] = {}
        self._metrics()
        self.discover()
        self.scan()

    # -- targets -----------------------------------------------------------------------

    def target_names(self) -> list[str]:
        from store.refs import list_refs, read_ref

        if self.cfg.targets:
            return list(self.cfg.targets)
        names = []
        for name in list_refs(self.store):
            if "/" in name or name == "forgotten":
                continue
            ref = read_ref(self.store, name)
            if ref and isinstance(ref.get("value"), dict) and "segments" in ref["value"]:
                names.append(name)
        return names

    def discover(self) -> list[str]:
        """Open targets that have a ref and are not served yet; their names."""
        from app.retrieval import LiveRetriever

        added = []
        for name in self.target_names():
            if name in self.live:
                continue
            try:
                self.live[name] = LiveRetriever(self.store, name)
                added.append(name)
                self.errors.pop(name, None)
            except FlowError as e:
                self.errors[name] = str(e)
        if self.cfg.targets and not self.live:
            raise ConfigError(
                "none of the targets can be served: "
                + "; ".join(f"{t}: {self.errors.get(t, 'no ref')}" for t in self.cfg.targets)
            )
        self._gauges()
        return added

    def refresh(self) -> list[str]:
        """Follow ref moves (and new targets); the targets whose index changed."""
        moved = [name for name, live in list(self.live.items()) if live.refresh()]
        for name, live in self.live.items():
            if live.error:
                self.errors[name] = live.error
        added = self.discover()
        changed = moved + added
        if changed:
            for name in moved:
                self.m_swaps.labels(target=name).inc()
            self._gauges()
            self.scan()
        return changed

    def retriever(self, target: str | None):
        """The current index of ``target`` (default: cnn, else the first)."""
        from fastapi import HTTPException

        if target in (None, ""):
            if not self.live:
                raise HTTPException(404, "no target has an index yet: run `flow build` first")
            target = "cnn" if "cnn" in self.live else next(iter(self.live))
        live = self.live.get(target)
        if live is None:
            raise HTTPException(
                404, f"no target {target!r}; served: {', '.join(self.live) or 'none'}"
            )
        return live.current

    # -- items -------------------------------------------------------------------------

    def scan(self) -> None:
        """The item id -> source file map, from the project's sources (swapped whole)."""
        if self.project is None:
            return
        try:
            from app.workspace import Workspace

            ws = Workspace(self.project)
            items, _, meta = ws.items()
            self.paths = dict(zip(items.ids, meta["paths"]))
        except Exception as e:  # keep the map we have
            log.warning("scanning the sources failed: %s", e)

    def locate(self, item_id: str, target: str | None = None) -> tuple[Any, str]:
        """(an index holding ``item_id``, its source file), or 404.  The id is only
        ever a key: of the indices' id tables, then of the project's scan."""
        from fastapi import HTTPException

        candidates = [self.retriever(target)] if target else [v.current for v in self.live.values()]
        retr = next((r for r in candidates if r.position(item_id) is not None), None)
        if retr is None:
            raise HTTPException(404, f"no item {item_id!r} in the served indices")
        path = self.paths.get(item_id)
        if path is None:
            raise HTTPException(
                404, f"item {item_id!r}: its source file is not known (serve from the project)"
            )
        return retr, path

    def thumbnail(self, item_id: str, size: int, target: str | None = None) -> bytes:
        """A PNG of the item as the build decoded it (same VOI window), longer side
        ``size`` at most."""
        retr, path = self.locate(item_id, target)
        try:
            st = Path(path).stat()
        except OSError as e:
            raise FlowError(f"item {item_id!r}: its source file is gone ({e.strerror})") from None
        k = (path, st.st_size, st.st_mtime_ns, retr.name, retr.seq, size)
        with self._thumbs_lock:
            if k in self._thumbs:
                self._thumbs.move_to_end(k)
                return self._thumbs[k]
        png = png_bytes(retr.picture(Path(path).read_bytes()), size)
        with self._thumbs_lock:
            self._thumbs[k] = png
            while len(self._thumbs) > 512:
                self._thumbs.popitem(last=False)
        return png

    # -- metrics -----------------------------------------------------------------------

    def _metrics(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        r = self.registry = CollectorRegistry()
        self.m_requests = Counter(
            "flow_http_requests", "HTTP requests", ["method", "route", "status"], registry=r
        )
        self.m_latency = Histogram(
            "flow_http_request_seconds",
            "HTTP request latency",
            ["route"],
            buckets=(0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5),
            registry=r,
        )
        self.m_items = Gauge(
            "flow_index_items", "Items in the served index", ["target"], registry=r
        )
        self.m_regions = Gauge(
            "flow_index_regions", "Regions in the served index", ["target"], registry=r
        )
        self.m_seq = Gauge(
            "flow_ref_seq", "Sequence number of the served ref", ["target"], registry=r
        )
        self.m_swaps = Counter(
            "flow_index_swaps", "Ref moves picked up without a restart", ["target"], registry=r
        )

    def _gauges(self) -> None:
        for name, live in self.live.items():
            cur = live.current
            self.m_items.labels(target=name).set(cur.count)
            self.m_regions.labels(target=name).set(cur.regions)
            self.m_seq.labels(target=name).set(cur.seq)

    # -- following refs ----------------------------------------------------------------

    def start(self) -> None:
        if self.cfg.poll <= 0 or self._thread is not None:
            return

        def loop() -> None:
            while not self._stop.wait(self.cfg.poll):
                try:
                    changed = self.refresh()
                    if changed:
                        log.info("serving new index of %s", ", ".join(changed))
                except Exception as e:  # never let the follower die
                    log.warning("following refs: %s", e)

        self._thread = threading.Thread(target=loop, name="flow-serve-refs", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None


def png_bytes(pixels: np.ndarray, size: int) -> bytes:
    """A gray [0, 1] image as an 8-bit PNG, its longer side at most ``size`` px
    (no text chunks: nothing but pixels)."""
    from PIL import Image

    img = Image.fromarray(np.clip(np.rint(np.asarray(pixels) * 255), 0, 255).astype(np.uint8))
    if max(img.size) > size:
        img.thumbnail((size, size), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


# --------------------------------------------------------------------------
# the ASGI application


def create_app(cfg: ServeConfig, service: Service | None = None):
    """The FastAPI application (``service`` defaults to one made from ``cfg``)."""
    from app import api

    return api.build(cfg, service or Service(cfg))


def serve(cfg: ServeConfig, *, echo: Any = print) -> None:
    """Run the server until interrupted (``flow serve``)."""
    import uvicorn

    if not is_loopback(cfg.host) and not cfg.token:
        raise ConfigError(
            f"binding {cfg.host} exposes the archive beyond this machine: give a token "
            "(--token-file FILE or FLOW_SERVE_TOKEN) or bind 127.0.0.1"
        )
    if cfg.max_upload < 1:
        raise ConfigError(f"--max-upload must be positive, got {cfg.max_upload}")
    started = time.monotonic()
    service = Service(cfg)
    app = create_app(cfg, service)
    host = f"[{cfg.host}]" if ":" in cfg.host else cfg.host
    names = ", ".join(f"{n} ({v.current.count} items)" for n, v in service.live.items())
    token = "required" if cfg.token else "off"
    echo(
        f"flow serve: http://{host}:{cfg.port}/  targets: {names or 'none yet'}  "
        f"(loaded in {time.monotonic() - started:.1f} s; token {token})"
    )
    for name, why in service.errors.items():
        echo(f"flow serve: not serving {name}: {why}")
    uvicorn.run(
        app,
        host=cfg.host,
        port=cfg.port,
        log_level="warning",
        access_log=cfg.access_log,
        server_header=False,
        timeout_graceful_shutdown=5,
    )


def check_token(given: str | None, want: str) -> bool:
    """Constant-time comparison of a bearer token."""
    return given is not None and hmac.compare_digest(given.encode(), want.encode())
