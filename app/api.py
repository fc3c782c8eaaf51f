"""The routes of ``flow serve`` (see :mod:`app.serve` for the design).

Every response model here is part of the OpenAPI description (``GET
/openapi.json``); what a response may say is exactly these fields.
"""

from __future__ import annotations

import base64
import datetime as _dt
import logging
import time
from typing import Annotated, Any

from fastapi import FastAPI, File, Form, HTTPException, Query, Request, UploadFile
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field

from flow.errors import FlowError

log = logging.getLogger("flow.serve")


class TargetInfo(BaseModel):
    name: str
    kind: str = Field(description="bovw, cnn, codes or regions")
    items: int = Field(description="items in the served index")
    regions: int = Field(0, description="regions in the served index (region targets)")
    segments: int
    seq: int = Field(description="sequence number of the ref entry being served")
    built: str = Field(description="when the ref moved to this index (UTC, ISO 8601)")
    message: str = ""


class Targets(BaseModel):
    targets: list[TargetInfo]
    not_served: dict[str, str] = Field(default_factory=dict, description="target -> why")


class HitModel(BaseModel):
    rank: int
    id: str = Field(description="the item's id (its path relative to its source folder)")
    distance: float = Field(description="1 - cosine (comparable within one query)")
    labels: list[str]
    box: list[int] | None = Field(
        None, description="region targets: the matched box, x, y, w, h in the item's pixels"
    )
    size: list[int] | None = Field(None, description="region targets: the item's width, height")


class FindingStat(BaseModel):
    label: str
    count: int = Field(description="results carrying the label")
    fraction: float = Field(description="count / results")
    base_rate: float = Field(description="share of the archive's indexed items carrying it")


class QueryResponse(BaseModel):
    target: str
    kind: str
    seq: int = Field(description="the ref entry whose index answered")
    k: int
    roi: list[int] | None = Field(None, description="the query box, x, y, w, h in pixels")
    query: dict[str, str | int] = Field(
        description="the query image's whitelisted attributes (format, modality, size...)"
    )
    results: list[HitModel]
    stats: list[FindingStat] = Field(description="finding counts among the results")
    seconds: float


class Preview(BaseModel):
    width: int
    height: int
    image: str = Field(description="the image as decoded for the index, a PNG data URL")


class Health(BaseModel):
    status: str
    targets: dict[str, int] = Field(description="target -> ref sequence being served")


class Problem(BaseModel):
    detail: str


_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": Problem, "description": "bad input (undecodable image, bad roi...)"},
    401: {"model": Problem, "description": "missing or wrong bearer token"},
    404: {"model": Problem, "description": "no such target or item"},
    413: {"model": Problem, "description": "upload larger than the server's limit"},
}


def _stats(hits: list, rates: dict[str, float]) -> list[FindingStat]:
    counts: dict[str, int] = {}
    for h in hits:
        for lab in h.labels:
            counts[lab] = counts.get(lab, 0) + 1
    n = max(len(hits), 1)
    out = [
        FindingStat(
            label=lab, count=c, fraction=round(c / n, 4), base_rate=round(rates.get(lab, 0), 4)
        )
        for lab, c in counts.items()
    ]
    return sorted(out, key=lambda s: (-s.count, -(s.fraction - s.base_rate), s.label))


def _route(path: str) -> str:
    """A request path as its route template (bounded label values for metrics)."""
    if path.startswith("/api/items/"):
        return "/api/items/{id}/image"
    if path.startswith("/viewer/"):
        return "/viewer/*"
    if path in ("/", "/health", "/metrics", "/openapi.json") or path.startswith("/api/"):
        return path if path.count("/") <= 2 else "other"
    return "other"


class Guard:
    """Pure ASGI middleware: bearer token on every API call, security headers,
    request metrics."""

    def __init__(self, app: Any, service: Any, token: str | None):
        self.app = app
        self.service = service
        self.token = token

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        from app.serve import _CSP, _GUARDED, check_token

        path = scope.get("path", "")
        route = _route(path)
        start = time.perf_counter()
        status = {"code": 500}
        html = path == "/"

        async def send_wrapped(message: dict) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                headers = list(message.get("headers", []))
                headers.append((b"x-content-type-options", b"nosniff"))
                headers.append((b"referrer-policy", b"no-referrer"))
                headers.append((b"cache-control", b"no-store"))
                if html:
                    headers.append((b"content-security-policy", _CSP.encode()))
                message = {**message, "headers": headers}
            await send(message)

        try:
            if self.token and (path.startswith("/api/") or path in _GUARDED):
                auth = dict(scope.get("headers") or []).get(b"authorization", b"").decode("latin-1")
                given = auth[7:].strip() if auth[:7].lower() == "bearer " else None
                if not check_token(given, self.token):
                    resp = JSONResponse(
                        {"detail": "a bearer token is required (Authorization: Bearer <token>)"},
                        status_code=401,
                        headers={"WWW-Authenticate": "Bearer"},
                    )
                    return await resp(scope, receive, send_wrapped)
            await self.app(scope, receive, send_wrapped)
        finally:
            s = self.service
            s.m_requests.labels(scope.get("method", ""), route, str(status["code"])).inc()
            s.m_latency.labels(route).observe(time.perf_counter() - start)


def build(cfg: Any, service: Any) -> Any:
    """The FastAPI application over ``service``."""
    from contextlib import asynccontextmanager

    from app.retrieval import parse_roi
    from app.serve import VIEWER, png_bytes

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        service.start()
        try:
            yield
        finally:
            service.stop()

    app = FastAPI(
        title="flow",
        summary="Content-based medical image retrieval over the indices flow builds.",
        version="1",
        docs_url=None,  # FastAPI's docs pages load scripts from a CDN
        redoc_url=None,
        openapi_url="/openapi.json",
        lifespan=lifespan,
        max_body_size=cfg.max_upload,
    )
    if cfg.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(cfg.cors_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization"],
        )
    app.add_middleware(Guard, service=service, token=cfg.token)

    @app.exception_handler(FlowError)
    async def flow_error(_request: Request, exc: FlowError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=400)

    @app.exception_handler(Exception)
    async def unexpected(_request: Request, exc: Exception) -> JSONResponse:
        log.error("unexpected error", exc_info=exc)
        return JSONResponse({"detail": "internal error (see the server's log)"}, status_code=500)

    app.mount("/viewer", StaticFiles(directory=VIEWER), name="viewer")

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(VIEWER / "index.html", media_type="text/html")

    @app.get("/health", response_model=Health)
    def health() -> Health:
        """Liveness: the served targets and their ref sequence numbers."""
        return Health(status="ok", targets={n: v.current.seq for n, v in service.live.items()})

    @app.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {}}}})
    def metrics() -> Response:
        """Prometheus text: requests, latency histogram, index sizes, ref sequences."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(service.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/api/targets", response_model=Targets, responses=_ERRORS)
    def targets() -> Targets:
        """The served targets: kind, item (and region) counts, ref sequence, built when."""
        out = []
        for name, live in service.live.items():
            r = live.current
            when = _dt.datetime.fromtimestamp(float(r.ref.get("time", 0)), _dt.UTC)
            out.append(
                TargetInfo(
                    name=name,
                    kind=r.kind,
                    items=r.count,
                    regions=r.regions,
                    segments=len(r.segments),
                    seq=r.seq,
                    built=when.isoformat(timespec="seconds"),
                    message=str(r.ref.get("message", "")),
                )
            )
        return Targets(targets=out, not_served=dict(service.errors))

    @app.post("/api/query", response_model=QueryResponse, responses=_ERRORS)
    def query(
        file: Annotated[UploadFile | None, File(description="a DICOM, PNG or JPEG image")] = None,
        id: Annotated[
            str | None, Form(description="or: the id of an item in the served indices")
        ] = None,
        target: Annotated[str | None, Form(description="default: cnn, else the first")] = None,
        k: Annotated[int, Form(ge=1, description="how many results")] = 10,
        roi: Annotated[str | None, Form(description="a box x,y,w,h in the image's pixels")] = None,
    ) -> QueryResponse:
        """The K nearest items to an image (region targets: regions, one per study)."""
        started = time.perf_counter()
        if k > cfg.max_k:
            raise HTTPException(400, f"k={k} is above this server's limit ({cfg.max_k})")
        box = parse_roi(roi)
        if (file is None) == (id is None or id == ""):
            raise HTTPException(400, "send an image (file) or an item id (id), not both")
        retr = service.retriever(target)
        exclude: tuple[str, ...] = ()
        if file is not None:
            data = file.file.read()
        else:
            _, path = service.locate(id)
            data = _read(path, id)
            exclude = (id,)
        res = retr.search(data, k, roi=box, exclude_ids=exclude)
        return QueryResponse(
            target=res.target,
            kind=res.kind,
            seq=res.seq,
            k=k,
            roi=list(box) if box else None,
            query={a: v for a, v in res.query.items() if isinstance(v, str | int)},
            results=[HitModel(**h.to_json()) for h in res.hits],
            stats=_stats(res.hits, retr.label_rates()),
            seconds=round(time.perf_counter() - started, 6),
        )

    @app.post("/api/preview", response_model=Preview, responses=_ERRORS)
    def preview(
        file: Annotated[UploadFile, File(description="a DICOM, PNG or JPEG image")],
        target: Annotated[str | None, Form()] = None,
    ) -> Preview:
        """An uploaded image as the index's decode step sees it (for drawing a box)."""
        retr = service.retriever(target)
        pixels = retr.picture(file.file.read())
        png = png_bytes(pixels, 1024)
        return Preview(
            width=int(pixels.shape[1]),
            height=int(pixels.shape[0]),
            image="data:image/png;base64," + base64.b64encode(png).decode(),
        )

    @app.get(
        "/api/items/{item_id:path}/image",
        response_class=Response,
        responses={**_ERRORS, 200: {"content": {"image/png": {}}}},
    )
    def item_image(
        item_id: str,
        size: Annotated[int, Query(ge=16, le=2048)] = cfg.thumbnail,
        target: str | None = None,
    ) -> Response:
        """A windowed PNG of a database item (DICOM: the build's decode and VOI window)."""
        return Response(service.thumbnail(item_id, size, target), media_type="image/png")

    return app


def _read(path: str, item_id: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise FlowError(f"item {item_id!r}: cannot read its source file ({e.strerror})") from None
