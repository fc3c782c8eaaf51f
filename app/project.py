"""A project: ``flow.toml`` names the store, the sources and the targets.

The file is TOML; ``flow init`` writes a commented one.  Every key is
checked, and a mistake is a :class:`flow.errors.ConfigError` naming the file,
the key and the reason -- an unknown key is an error too (a typo such as
``epoch = 3`` must not be silently ignored).

Paths are relative to the folder that holds ``flow.toml``.  The project
turns its sources into the build's items:

* every file under each source folder (recursively) that matches the
  source's ``include`` patterns is one item, named by its path relative to
  the folder (prefixed with ``<source name>/``); its id is a keyed hash of
  that name, or the name itself where ``[ids] scheme = "path"`` (see
  :mod:`app.ids`: no patient's name in a folder reaches the store);
* a ``dicomweb = "http://..."`` source lists an archive's instances with
  QIDO-RS and fetches new ones into a local content-addressed cache
  (:mod:`app.dicomweb`); each instance is one item;
* ``[receive]`` (``flow receive``, :mod:`app.receive`) adds its storage folder
  as a source named ``received``;
* an optional labels CSV gives each item its labels (multi-label, joined by
  ``labels_separator``) and its split, matched on the file's relative path,
  its file name, or a DICOM identifier (``join = "SOPInstanceUID"``);
* items of the ``train`` splits train the fit nodes; ``database`` splits go
  into the indices; ``eval`` says which split queries which.
"""

from __future__ import annotations

import csv
import io
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from app.inbound import (
    DicomwebSource,
    ReceiveConfig,
    dicomweb_source,
    item_limits,
    parse_size,
    receive_config,
)
from engine.refs import ValueRef
from engine.scan import DEFAULT_INCLUDE, FileRefs, StatCache, file_keys, paused_gc, scan_folder
from flow.errors import ConfigError
from flow.keys import key
from flow.plan import ItemTable

__all__ = [  # DicomwebSource, ReceiveConfig, parse_size: app.inbound, kept here too
    "DicomwebSource",
    "Project",
    "ReceiveConfig",
    "SourceFolder",
    "SourceReport",
    "load_project",
    "open_project_store",
    "parse_size",
    "project_text",
    "write_project",
]

FILENAME = "flow.toml"


@dataclass
class SourceFolder:
    name: str
    path: Path
    include: tuple[str, ...] = DEFAULT_INCLUDE
    exclude: tuple[str, ...] = ()
    extensionless: bool = False
    by_content: bool = True  # also files whose content is DICOM/PNG/JPEG, whatever their name
    labels: Path | None = None
    join: str = "file"
    file_column: str = "file"
    labels_column: str = "finding_labels"
    labels_separator: str = "|"
    split_column: str = "split"
    default_split: str = ""


@dataclass
class Project:
    root: Path
    file: Path | None
    store_url: str
    storage_options: dict = field(default_factory=dict)
    sources: list[SourceFolder] = field(default_factory=list)
    train_splits: tuple[str, ...] = ("train",)
    database_splits: tuple[str, ...] | None = None  # None: every item
    eval_queries: tuple[str, ...] = ("val",)
    eval_database: tuple[str, ...] = ("train",)
    eval_k: int = 10
    targets: dict[str, dict] = field(default_factory=dict)
    nodes: dict[str, dict] = field(default_factory=dict)  # project-wide node params
    scheduler: str = "local"
    workers: int | None = None
    batch_size: int | None = None
    threads_below: int = 400  # local builds with less stale item work run in threads
    tls: dict = field(default_factory=dict)  # [build.tls]: ca_file, cert, key (absolute)
    cluster: dict = field(default_factory=dict)  # [cluster] table (Slurm etc.)
    ids: dict = field(default_factory=dict)  # [ids]: scheme, salt_file (see app.ids)
    dicomweb: list[DicomwebSource] = field(default_factory=list)
    receive: ReceiveConfig | None = None
    item_limits: tuple[float, int] = (30.0, 2 << 30)  # [build] item_timeout, item_memory
    raw: dict = field(default_factory=dict)

    def open_store(self):
        from store import open_store

        return open_store(self.store_url, **self.storage_options)

    # -- items -------------------------------------------------------------------

    def items(
        self, store=None, *, scans: dict | None = None, log: Any = None
    ) -> tuple[ItemTable, Any, dict]:
        """Scan the sources: the item table, where workers find each file, and
        per-item metadata (``labels``, ``paths``, ``names``) for queries and reports.

        ``scans``: a source's ``scan()`` taken moments ago (by ``flow watch``), by
        source path, used instead of scanning it again.  ``log``: progress lines
        (a DICOMweb source's listing and downloads)."""
        with paused_gc():  # per-item lists of a whole archive (see paused_gc)
            return self._items(store, scans or {}, log)

    def folder_sources(self) -> list[SourceFolder]:
        """The folders to scan: ``[[sources]]`` and the ``[receive]`` folder."""
        out = list(self.sources)
        if self.receive is not None:
            real = os.path.realpath(self.receive.folder)
            if not any(os.path.realpath(s.path) == real for s in out):
                out.append(self.receive.source())
        return out

    def scan(
        self, src: SourceFolder, *, known: Any = None, skipped: dict | None = None
    ) -> tuple[list[str], list]:
        """The files of one source: (relative paths, their stats).  ``known`` and
        ``skipped``: see :func:`engine.scan.scan_folder`."""
        if self.receive is not None and src.path == self.receive.folder:
            src.path.mkdir(parents=True, exist_ok=True)
        try:
            return scan_folder(
                src.path,
                src.include,
                src.exclude,
                src.extensionless,
                by_content=src.by_content,
                known=known,
                skipped=skipped,
            )
        except FileNotFoundError as e:
            raise ConfigError(f"{self._where('sources')}: {e}") from None

    def id_scheme(self, store) -> Any:
        """How item names become ids over ``store`` (see :mod:`app.ids`)."""
        from app.ids import resolve_scheme

        return resolve_scheme(self, store)

    def _items(self, store, scans: dict, log: Any) -> tuple[ItemTable, Any, dict]:
        from engine.builder import SourceRefs

        names: list[str] = []
        ids: list[str] = []
        paths: list[str] = []
        keys: list[bytes | None] = []
        errors: dict[int, str] = {}
        labels: list[tuple[str, ...]] = []
        splits: list[str] = []
        hashed = 0
        folders = self.folder_sources()
        multi = len(folders) + len(self.dicomweb) > 1
        scheme = self.id_scheme(store)
        # path ids keep their old form (no source prefix for a single source)
        prefixed = multi or scheme.scheme != "path"
        reports = []
        for src in folders:
            cache = StatCache(store, str(src.path)) if store is not None else None
            pre = f"{src.name}/" if prefixed else ""
            skipped: dict[str, list[str]] = {}
            if src.path in scans:
                rels, stats = scans[src.path]
            else:
                known = None
                if cache is not None:  # keyed: the stat cache records ids, not paths
                    known = cache.holds if scheme.scheme == "path" else _holds(cache, scheme, pre)
                rels, stats = self.scan(src, known=known, skipped=skipped)
            mine = [pre + rel for rel in rels]
            masked = scheme.ids(mine) if scheme.scheme != "path" else None
            ks, errs, n = file_keys(str(src.path), rels, stats, cache, names=masked)
            hashed += n
            if cache is not None:
                cache.save()
            report = SourceReport(src.name, os.path.realpath(src.path), len(rels), skipped)
            table = _read_labels(src, rels, report) if src.labels else {}
            reports.append(report)
            base = len(ids)
            real = os.path.realpath(src.path)
            names.extend(mine)
            ids.extend(masked if masked is not None else mine)
            for i, rel in enumerate(rels):
                paths.append(f"{real}/{rel}")
                lab, split = table.get(i, ((), src.default_split))
                labels.append(lab)
                splits.append(split)
            keys.extend(ks)
            errors.update({base + i: r for i, r in errs.items()})
        for web in self.dicomweb:
            from app.dicomweb import sync

            listing = sync(web, log=log)
            mine = [f"{web.name}/{u}" for u in listing.names]
            names.extend(mine)
            ids.extend(scheme.ids(mine))
            paths.extend(listing.paths)
            keys.extend(listing.keys)
            labels.extend([()] * len(listing.names))
            splits.extend([web.default_split] * len(listing.names))
        order = sorted(range(len(ids)), key=ids.__getitem__)
        if len(set(ids)) != len(ids):
            raise ConfigError(f"{self._where('sources')}: two sources give the same item ids")
        ids = [ids[i] for i in order]
        names = [names[i] for i in order]
        paths = [paths[i] for i in order]
        keys = [keys[i] for i in order]
        labels = [labels[i] for i in order]
        splits = [splits[i] for i in order]
        inv = {old: new for new, old in enumerate(order)}
        errors = {inv[i]: r for i, r in errors.items()}
        distinct = {lab: bytes(key(lab)) for lab in set(map(tuple, labels))}
        label_keys = [distinct[tuple(lab)] for lab in labels]
        items = ItemTable(
            ids=ids,
            splits=splits,
            sources={"files": keys, "labels": label_keys},
            source_errors={"files": errors},
        )
        refs = SourceRefs(
            {
                "files": FileRefs(paths, keys),
                "labels": [ValueRef(tuple(lab)) for lab in labels],
            }
        )
        meta = {
            "labels": labels,
            "paths": paths,
            "names": names,
            "hashed": hashed,
            "sources": tuple(reports),
            "scheme": scheme,
        }
        return items, refs, meta

    def _where(self, k: str) -> str:
        return f"{self.file or FILENAME}: [{k}]"


def _holds(cache: Any, scheme: Any, pre: str) -> Any:
    """``StatCache.holds`` by path, for a cache that records keyed ids."""

    def known(rel: str, st: Any) -> bool:
        return cache.holds(scheme.ids([pre + rel])[0], st)

    return known


@dataclass
class SourceReport:
    """What scanning one source found, for the preflight (:mod:`app.preflight`)."""

    name: str
    path: str
    files: int  # items found
    skipped: dict[str, list[str]]  # reason -> files under the folder not taken
    labels: str | None = None  # the labels CSV
    rows: int = 0  # its rows
    unmatched: list[str] = field(default_factory=list)  # join values matching no file
    unlabeled: list[str] = field(default_factory=list)  # files with no row


def _read_labels(
    src: SourceFolder, rels: list[str], report: SourceReport | None = None
) -> dict[int, tuple[tuple[str, ...], str]]:
    """Row per item index: (labels, split), joined as the source says.  ``report``:
    filled with the rows, the rows that matched no file, the files without a row."""
    out = _joined_labels(src, rels)
    if report is not None:
        rows, used = out.pop(-1)  # type: ignore[misc]  # see _joined_labels
        report.labels, report.rows = str(src.labels), len(rows)
        report.unmatched = sorted(set(rows) - used)
        report.unlabeled = [rel for i, rel in enumerate(rels) if i not in out]
    else:
        out.pop(-1)
    return out


def _joined_labels(src: SourceFolder, rels: list[str]) -> dict:
    """Row per item index, and at -1: (the join values of the CSV's rows, those used)."""
    path = src.labels
    assert path is not None
    where = f"labels file {path}"
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except OSError as e:
        raise ConfigError(f"{where}: cannot open ({e.strerror or e})") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{where}: not UTF-8 text ({e})") from None
    reader = csv.DictReader(io.StringIO(text, newline=""))
    cols = reader.fieldnames or []
    join_col = src.file_column if src.join == "file" else src.join
    for needed in (join_col, src.labels_column):
        if needed not in cols:
            raise ConfigError(
                f"{where}: no column {needed!r} (columns: {', '.join(cols) or 'none'})"
            )
    rows = list(reader)
    has_split = src.split_column in cols
    if not has_split and not src.default_split:
        raise ConfigError(
            f"{where}: no column {src.split_column!r} (columns: {', '.join(cols)}): every "
            "item needs a split (the fits learn from [train] splits); add the column, name "
            "it with split_column, or give the source a default_split"
        )
    by_value: dict[str, tuple[tuple[str, ...], str]] = {}
    for r in rows:
        raw = (r.get(src.labels_column) or "").strip()
        labs = tuple(sorted({x.strip() for x in raw.split(src.labels_separator) if x.strip()}))
        split = (r.get(src.split_column) or "").strip() if has_split else src.default_split
        by_value[(r.get(join_col) or "").strip()] = (labs, split or src.default_split)
    out: dict = {}
    used: set[str] = set()
    out[-1] = (list(by_value), used)
    if src.join == "file":
        # match on the path relative to the labels file, to the source, or the bare name
        label_dir = os.path.realpath(os.path.dirname(path))
        src_dir = os.path.realpath(src.path)
        names: dict[str, list[int]] = {}
        for i, rel in enumerate(rels):
            names.setdefault(os.path.basename(rel), []).append(i)
        for i, rel in enumerate(rels):
            full = os.path.join(src_dir, rel)
            for cand in (os.path.relpath(full, label_dir).replace(os.sep, "/"), rel):
                if cand in by_value:
                    out[i] = by_value[cand]
                    used.add(cand)
                    break
            else:
                base = os.path.basename(rel)
                if base in by_value and len(names[base]) == 1:
                    out[i] = by_value[base]
                    used.add(base)
        return out
    # a DICOM identifier: read headers only (cheap), no pixels
    from nodes.decode import dicom_identifiers

    src_dir = os.path.realpath(src.path)
    for i, rel in enumerate(rels):
        try:
            ident = dicom_identifiers(os.path.join(src_dir, rel)).get(src.join)
        except Exception:
            continue
        if ident and str(ident) in by_value:
            out[i] = by_value[str(ident)]
            used.add(str(ident))
    return out


# --------------------------------------------------------------------------
# loading


_TOP = {
    "store",
    "build",
    "sources",
    "train",
    "database",
    "eval",
    "targets",
    "nodes",
    "cluster",
    "ids",
    "receive",
}
_SOURCE_KEYS = {
    "name",
    "path",
    "include",
    "exclude",
    "extensionless",
    "by_content",
    "labels",
    "join",
    "file_column",
    "labels_column",
    "labels_separator",
    "split_column",
    "default_split",
}


def _check_keys(where: str, table: Mapping, allowed: set[str]) -> None:
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise ConfigError(
            f"{where}: unknown key{'s' if len(unknown) > 1 else ''} "
            f"{', '.join(map(repr, unknown))} (allowed: {', '.join(sorted(allowed))})"
        )


def _str_tuple(where: str, v: Any) -> tuple[str, ...]:
    if isinstance(v, str):
        return (v,)
    if isinstance(v, list) and all(isinstance(x, str) for x in v):
        return tuple(v)
    raise ConfigError(f"{where}: expected a string or a list of strings, got {v!r}")


#: what [build] scheduler may name, besides a scheduler address (tcp://host:port)
SCHEDULERS = ("local", "threads", "sync", "slurm", "distributed")


def _positive_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def _check_scheduler(where: str, v: Any) -> None:
    if isinstance(v, str) and (v in SCHEDULERS or "://" in v):
        return
    import difflib

    close = difflib.get_close_matches(str(v), SCHEDULERS, n=1)
    raise ConfigError(
        f"{where} = {v!r}: use one of {', '.join(SCHEDULERS[:4])} or a scheduler address "
        "(tcp://host:port)" + (f"; did you mean {close[0]!r}?" if close else "")
    )


def _source_value(where: str, s: Mapping, name: str, default: Any) -> Any:
    """``s[name]`` checked against the type of its default (str, bool)."""
    v = s.get(name, default)
    if isinstance(default, bool):
        if not isinstance(v, bool):
            raise ConfigError(f"{where}: {name} must be true or false, got {v!r}")
    elif isinstance(default, str) and not isinstance(v, str):
        raise ConfigError(f"{where}: {name} must be a string, got {v!r}")
    return v


def open_project_store(path: str | os.PathLike | None = None, store: str | None = None):
    """The store of the project at ``path`` (``store`` overrides it; a store URL
    alone needs no project), without scanning sources: queries start fast."""
    if store and not path:
        from store import open_store

        return open_store(store)
    return load_project(path, store=store).open_store()


def project_text(config: Mapping[str, Any]) -> str:
    """``config`` (the tables of a flow.toml, as :func:`load_project` reads them) as
    TOML text.  Nothing is checked: tests write broken projects with it too.

    >>> import tomllib
    >>> config = {"store": {"url": "store"}, "sources": [{"path": "images"}]}
    >>> tomllib.loads(project_text(config)) == config
    True
    """
    import tomli_w

    return tomli_w.dumps(_plain(config))


def write_project(folder: str | os.PathLike, config: Mapping[str, Any]) -> Path:
    """Write ``folder/flow.toml`` from ``config`` (see :func:`project_text`); its path."""
    path = Path(folder) / FILENAME
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(project_text(config), encoding="utf-8")
    return path


def _plain(v: Any) -> Any:
    """Tuples as lists and paths as strings, for the TOML writer."""
    if isinstance(v, Mapping):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_plain(x) for x in v]
    if isinstance(v, os.PathLike):
        return os.fspath(v)
    return v


def find_project(path: str | os.PathLike | None = None) -> Path:
    """The project file: ``path`` (a file, or a folder holding one), or else the
    ``flow.toml`` of the current folder or the nearest folder above it, as git
    finds its repository (a command run from ``images/`` finds the project)."""
    if path:
        p = Path(path)
        return p / FILENAME if p.is_dir() else p
    here = Path.cwd()
    for folder in (here, *here.parents):
        if (folder / FILENAME).is_file():
            return folder / FILENAME
    return Path(FILENAME)


def load_project(path: str | os.PathLike | None = None, *, store: str | None = None) -> Project:
    """Load ``flow.toml`` (a file, a folder holding one, or found from the current
    folder upwards: :func:`find_project`)."""
    p = find_project(path)
    if not p.is_file():
        where = p if path else f"{Path.cwd() / FILENAME} (nor in any folder above it)"
        raise ConfigError(
            f"no project file at {where}: run `flow init` to write one, or `flow demo` to try flow"
        )
    try:
        raw = tomllib.loads(p.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{p}: not valid TOML ({e})") from None
    return project_from_dict(raw, root=p.parent.resolve(), file=p, store=store)


def project_from_dict(
    raw: dict, *, root: Path, file: Path | None = None, store: str | None = None
) -> Project:
    where = str(file or FILENAME)
    _check_keys(where, raw, _TOP)

    def rel(v: str) -> Path:
        q = Path(os.path.expanduser(v))
        return q if q.is_absolute() else (root / q)

    st = raw.get("store", {})
    _check_keys(f"{where}: [store]", st, {"url", "options"})
    if not isinstance(st.get("url", ""), str):
        raise ConfigError(f"{where}: [store] url must be a folder or a URL (a string)")
    url = store or st.get("url", ".flow/store")
    if "://" not in url:
        url = str(rel(url))
    build = raw.get("build", {})
    _check_keys(
        f"{where}: [build]",
        build,
        {
            "scheduler",
            "workers",
            "batch_size",
            "threads_below",
            "tls",
            "item_timeout",
            "item_memory",
        },
    )
    tls = build.get("tls", {})
    if not isinstance(tls, dict):
        raise ConfigError(f"{where}: [build] tls must be a table (ca_file, cert, key)")
    _check_keys(f"{where}: [build.tls]", tls, {"ca_file", "cert", "key"})
    for k, v in tls.items():
        if not isinstance(v, str) or not rel(v).is_file():
            raise ConfigError(f"{where}: [build.tls] {k} = {v!r} is not a file")
    tls = {k: str(rel(v)) for k, v in tls.items()}
    sources = []
    raw_sources = raw.get("sources", [])
    if isinstance(raw_sources, dict):
        raw_sources = [raw_sources]
    dicomweb: list[DicomwebSource] = []
    for n, s in enumerate(raw_sources):
        w = f"{where}: [[sources]] #{n + 1}"
        default_name = f"source{n + 1}" if len(raw_sources) > 1 else "images"
        if "dicomweb" in s:
            dicomweb.append(dicomweb_source(w, s, default_name, root, rel))
            continue
        _check_keys(w, s, _SOURCE_KEYS)
        if "path" not in s:
            raise ConfigError(
                f"{w}: 'path' (a folder of images) or 'dicomweb' (an archive's URL) is required"
            )
        for k in ("path", "labels"):
            if k in s and not isinstance(s[k], str):
                raise ConfigError(f"{w}: {k} must be a path (a string), got {s[k]!r}")
        sep = _source_value(w, s, "labels_separator", "|")
        if not sep:
            raise ConfigError(f"{w}: labels_separator must not be empty")
        src = SourceFolder(
            name=_source_value(w, s, "name", default_name),
            path=rel(s["path"]),
            include=_str_tuple(f"{w} include", s.get("include", list(DEFAULT_INCLUDE))),
            exclude=_str_tuple(f"{w} exclude", s.get("exclude", [])),
            extensionless=_source_value(w, s, "extensionless", False),
            by_content=_source_value(w, s, "by_content", True),
            labels=rel(s["labels"]) if s.get("labels") else None,
            join=_source_value(w, s, "join", "file"),
            file_column=_source_value(w, s, "file_column", "file"),
            labels_column=_source_value(w, s, "labels_column", "finding_labels"),
            labels_separator=sep,
            split_column=_source_value(w, s, "split_column", "split"),
            default_split=_source_value(w, s, "default_split", ""),
        )
        sources.append(src)
    receive = receive_config(where, raw.get("receive"), rel) if "receive" in raw else None
    names = [s.name for s in sources] + [d.name for d in dicomweb]
    if receive is not None:
        names.append("received")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"{where}: [[sources]] names must differ ({', '.join(dup)} repeated)")
    if not sources and not dicomweb and receive is None:
        raise ConfigError(
            f"{where}: no [[sources]]: name at least one folder of images "
            "(or a DICOMweb archive, or a [receive] table)"
        )
    ids = raw.get("ids", {})
    if not isinstance(ids, dict):
        raise ConfigError(f"{where}: [ids] must be a table (scheme, salt_file)")
    _check_keys(f"{where}: [ids]", ids, {"scheme", "salt_file"})
    from app.ids import SCHEMES

    if "scheme" in ids and ids["scheme"] not in SCHEMES:
        raise ConfigError(
            f"{where}: [ids] scheme = {ids['scheme']!r}: use one of {', '.join(SCHEMES)}"
        )
    ids = dict(ids)
    if "salt_file" in ids:
        ids["salt_file"] = str(rel(str(ids["salt_file"])))
    limits = item_limits(where, build)
    train = raw.get("train", {})
    _check_keys(f"{where}: [train]", train, {"splits"})
    database = raw.get("database", {})
    _check_keys(f"{where}: [database]", database, {"splits"})
    ev = raw.get("eval", {})
    _check_keys(f"{where}: [eval]", ev, {"queries", "database", "k"})
    targets = raw.get("targets", {})
    if not isinstance(targets, dict) or not targets:
        raise ConfigError(f"{where}: no [targets.<name>] tables: declare at least one index")
    for name, t in targets.items():
        if not isinstance(t, dict):
            raise ConfigError(f"{where}: [targets.{name}] must be a table")
    if "cluster" in raw:  # engine.cluster is imported only where a [cluster] table is
        from engine.cluster import cluster_config

        cluster_config(raw["cluster"], f"{where}: [cluster]", root=root)  # raises on a bad key
    workers = build.get("workers")
    if workers is not None and not _positive_int(workers):
        raise ConfigError(f"{where}: [build] workers must be a positive integer")
    scheduler = build.get("scheduler", "local")
    _check_scheduler(f"{where}: [build] scheduler", scheduler)
    batch_size = build.get("batch_size")
    if batch_size is not None and not _positive_int(batch_size):
        raise ConfigError(f"{where}: [build] batch_size must be a positive integer")
    eval_k = ev.get("k", 10)
    if not _positive_int(eval_k):
        raise ConfigError(f"{where}: [eval] k must be a positive integer, got {eval_k!r}")
    if not isinstance(st.get("options", {}), dict):
        raise ConfigError(f"{where}: [store] options must be a table")
    if not isinstance(raw.get("nodes", {}), dict):
        raise ConfigError(f"{where}: [nodes] must be a table")
    threads_below = build.get("threads_below", 400)
    if not isinstance(threads_below, int) or isinstance(threads_below, bool) or threads_below < 0:
        raise ConfigError(f"{where}: [build] threads_below must be an integer >= 0")
    return Project(
        root=root,
        file=file,
        store_url=url,
        storage_options=dict(st.get("options", {})),
        sources=sources,
        train_splits=_str_tuple(f"{where}: [train] splits", train.get("splits", ["train"])),
        database_splits=(
            _str_tuple(f"{where}: [database] splits", database["splits"])
            if "splits" in database
            else None
        ),
        eval_queries=_str_tuple(f"{where}: [eval] queries", ev.get("queries", ["val"])),
        eval_database=_str_tuple(f"{where}: [eval] database", ev.get("database", ["train"])),
        eval_k=eval_k,
        targets=targets,
        nodes=raw.get("nodes", {}),
        scheduler=scheduler,
        workers=workers,
        batch_size=batch_size,
        threads_below=threads_below,
        tls=tls,
        cluster=raw.get("cluster", {}),
        ids=ids,
        dicomweb=dicomweb,
        receive=receive,
        item_limits=limits,
        raw=raw,
    )
