"""A DICOMweb archive as a source: QIDO-RS to list, WADO-RS to fetch, a local cache.

``[[sources]] dicomweb = "http://pacs:8042/dicom-web"`` makes every instance the
archive holds an item.  At each build (:func:`sync`):

1. **QIDO-RS, study level**: one request per ``page`` studies (1,000 by default)
   lists every study with its ``NumberOfStudyRelatedInstances``.  Compared with
   the stored listing (the **watermark**: each study's instance count and its
   instances, in ``<cache>/listing.json``), only studies that are new or whose
   count changed are looked at further; studies gone from the archive are
   dropped.  A no-op build therefore makes one QIDO request per 1,000 studies
   and downloads nothing.
2. **QIDO-RS, instance level**, for those studies only: their instances (UIDs).
3. **WADO-RS** fetches each instance not in the cache -- the whole series in one
   request where more than half of it is missing, else instance by instance --
   as the archive stores it (no transcoding: ``transfer-syntax=*``), into a local
   **content-addressed cache**: ``<cache>/<2 hex>/<key>.dcm``, the key being the
   BLAKE3 hash flow gives any source file (so the file is never hashed again).
   Each file is written atomically (temporary name, rename).

Then the build runs as for files.  An item's name is
``<source>/<study>/<series>/<instance UID>`` (its id: a keyed hash of that, see
:mod:`app.ids`), so an instance the archive replaces keeps its id and gets a new
content key.  ``flow forget --study UID`` (or ``--id``) withdraws DICOMweb items
like any other.

**What the watermark does not see**: an instance replaced inside a study without
changing the study's instance count (a delete and a re-send of a different
instance between two builds); the usual flows (new studies, new instances,
deleted studies or instances) are all seen.  Deleting the cache's
``listing.json`` makes the next build list every study's instances again (and
download only what the cache lacks).  The listing and the cache are caches:
rebuildable from the archive alone.

**Failures** (the archive unreachable, a request refused) are reported through
``log``; the build goes on with the stored listing, and a study whose instances
could not all be fetched is looked at again by the next build.

**Client**: ``dicomweb-client`` (the Imaging Data Commons' / MGH's Python client,
maintained, used by highdicom and IDC tooling; it builds QIDO/WADO URLs, pages,
parses ``multipart/related`` responses, and rides on a ``requests`` session, so
authentication, TLS and request counting are the session's).  Auth: HTTP basic
(``username`` + the password from the environment variable ``password_env``) or a
bearer token from ``token_env``; ``ca_file`` for a private CA.  No secret is ever
written to flow.toml or the store.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flow.errors import ConfigError

__all__ = ["Listing", "open_client", "sync"]

STUDY, SERIES, SOP, COUNT = "0020000D", "0020000E", "00080018", "00201208"
AS_STORED = (("application/dicom", "*"),)  # WADO-RS: in the archive's own transfer syntax


@dataclass
class Listing:
    """The instances of a DICOMweb source, as items: name, cached file, content key."""

    names: list[str] = field(default_factory=list)  # <study>/<series>/<sop>
    paths: list[str] = field(default_factory=list)
    keys: list[bytes] = field(default_factory=list)
    requests: dict[str, int] = field(default_factory=dict)  # qido / wado
    fetched: int = 0
    errors: list[str] = field(default_factory=list)


def _value(attrs: dict, tag: str) -> Any:
    v = attrs.get(tag, {}).get("Value")
    return v[0] if v else None


def open_client(src: Any) -> tuple[Any, dict[str, int]]:
    """A dicomweb-client for ``src`` and its request counters (by kind)."""
    import requests
    from dicomweb_client.api import DICOMwebClient

    session = requests.Session()
    if src.username:
        password = os.environ.get(src.password_env, "") if src.password_env else ""
        if src.password_env and src.password_env not in os.environ:
            raise ConfigError(
                f"DICOMweb source {src.name!r}: the environment variable {src.password_env} "
                "(its password) is not set"
            )
        session.auth = (src.username, password)
    if src.token_env:
        token = os.environ.get(src.token_env)
        if not token:
            raise ConfigError(
                f"DICOMweb source {src.name!r}: the environment variable {src.token_env} "
                "(its bearer token) is not set"
            )
        session.headers["Authorization"] = f"Bearer {token}"
    if src.ca_file:
        session.verify = src.ca_file
    counts = {"qido": 0, "wado": 0}

    def count(response: Any, *args: Any, **kw: Any) -> None:
        # WADO-RS asks for multipart/related; QIDO-RS for application/dicom+json
        accept = response.request.headers.get("Accept", "")
        counts["wado" if "multipart" in accept else "qido"] += 1

    session.hooks["response"].append(count)
    client = DICOMwebClient(src.url, session=session, timeout=src.timeout)
    return client, counts


def _load_state(src: Any) -> dict:
    try:
        doc = json.loads(Path(src.state).read_text())
    except (OSError, ValueError):
        return {"url": src.url, "studies": {}}
    if doc.get("url") != src.url or not isinstance(doc.get("studies"), dict):
        return {"url": src.url, "studies": {}}  # another archive: list it afresh
    return doc


def _save_state(src: Any, doc: dict) -> None:
    path = Path(src.state)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".listing.", suffix=".tmp")
    with os.fdopen(fd, "w") as fh:
        json.dump(doc, fh, separators=(",", ":"), sort_keys=True)
    os.replace(tmp, path)


def _cached(src: Any, k: bytes) -> Path:
    h = k.hex()
    return Path(src.cache) / h[:2] / f"{h}.dcm"


def _put(src: Any, data: bytes) -> bytes:
    """Write ``data`` into the cache under its key (atomically); the key."""
    from flow.keys import bytes_key

    k = bytes(bytes_key(data))
    path = _cached(src, k)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".fetch.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
    return k


def _raw(ds: Any) -> bytes:
    """The bytes an instance came in (dicomweb-client parses each part with pydicom)."""
    buf = getattr(ds, "buffer", None)
    if buf is not None and hasattr(buf, "getvalue"):
        return buf.getvalue()
    import io

    import pydicom

    out = io.BytesIO()
    pydicom.dcmwrite(out, ds, enforce_file_format=True)
    return out.getvalue()


def _all(search: Callable[..., list], page: int, **kw: Any) -> list[dict]:
    out: list[dict] = []
    while True:
        got = search(limit=page, offset=len(out), **kw)
        out.extend(got)
        if len(got) < page:
            return out


def sync(src: Any, *, log: Callable[[str], None] | None = None, client: Any = None) -> Listing:
    """Bring the cache of ``src`` up to date with the archive; its instances."""
    log = log or (lambda msg: None)
    doc = _load_state(src)
    studies: dict[str, dict] = doc["studies"]
    counts: dict[str, int] = {"qido": 0, "wado": 0}
    out = Listing(requests=counts)
    try:
        if client is None:
            client, counts = open_client(src)
            out.requests = counts
        listed = _all(client.search_for_studies, src.page, fields=[COUNT])
    except ConfigError:
        raise
    except Exception as e:
        out.errors.append(f"cannot list studies: {_brief(e)}")
        log(
            f"DICOMweb source {src.name!r} ({src.url}): {out.errors[-1]}; "
            "building with the instances fetched before"
        )
        return _listing(src, studies, out)
    now = {}
    for s in listed:
        uid = _value(s, STUDY)
        if uid:
            n = _value(s, COUNT)
            now[str(uid)] = int(n) if n is not None else -1
    for gone in set(studies) - set(now):
        del studies[gone]
    changed = [u for u, n in sorted(now.items()) if studies.get(u, {}).get("n") != n or n < 0]
    for uid in changed:
        try:
            complete = _sync_study(src, client, uid, studies.setdefault(uid, {}), out)
        except Exception as e:
            out.errors.append(f"study {uid[:12]}...: {_brief(e)}")
            complete = False
        studies[uid]["n"] = now[uid] if complete else None
    _save_state(src, doc)
    if changed or out.errors:
        log(
            f"DICOMweb source {src.name!r}: {len(now)} studies, {len(changed)} new or changed, "
            f"{out.fetched} instance(s) fetched; {counts['qido']} QIDO-RS and "
            f"{counts['wado']} WADO-RS requests"
            + (f"; {len(out.errors)} problem(s): {out.errors[0]}" if out.errors else "")
        )
    return _listing(src, studies, out)


def _sync_study(src: Any, client: Any, uid: str, entry: dict, out: Listing) -> bool:
    """List a study's instances and fetch the missing ones; whether all are cached."""
    listed = _all(client.search_for_instances, src.page, study_instance_uid=uid)
    had: dict[str, list] = entry.get("instances", {})
    inst: dict[str, list] = {}
    for a in listed:
        series, sop = _value(a, SERIES), _value(a, SOP)
        if series and sop:
            old = had.get(str(sop))
            fresh = old and old[0] == str(series) and _cached(src, bytes.fromhex(old[1])).exists()
            inst[str(sop)] = list(old) if fresh else [str(series), ""]
    missing: dict[str, list[str]] = {}
    for sop, (series, k) in inst.items():
        if not k:
            missing.setdefault(series, []).append(sop)
    per_series = {s: sum(1 for v in inst.values() if v[0] == s) for s in missing}
    complete = True
    for series, sops in sorted(missing.items()):
        want = set(sops)
        try:
            if len(sops) * 2 > per_series[series]:
                got = client.retrieve_series(uid, series, media_types=AS_STORED)
            else:
                got = [
                    client.retrieve_instance(uid, series, sop, media_types=AS_STORED)
                    for sop in sorted(sops)
                ]
        except Exception as e:
            out.errors.append(f"cannot fetch series {series[:12]}...: {_brief(e)}")
            complete = False
            continue
        for ds in got:
            sop = str(getattr(ds, "SOPInstanceUID", ""))
            if sop in want:
                inst[sop][1] = _put(src, _raw(ds)).hex()
                out.fetched += 1
                want.discard(sop)
        complete = complete and not want
    entry["instances"] = {s: v for s, v in inst.items() if v[1]}
    return complete


def _listing(src: Any, studies: dict, out: Listing) -> Listing:
    for study, entry in sorted(studies.items()):
        for sop, (series, k) in sorted(entry.get("instances", {}).items()):
            key = bytes.fromhex(k)
            out.names.append(f"{study}/{series}/{sop}")
            out.paths.append(str(_cached(src, key)))
            out.keys.append(key)
    return out


def _brief(e: BaseException) -> str:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {msg[:200]}" if msg else type(e).__name__
