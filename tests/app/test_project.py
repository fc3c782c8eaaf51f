"""The project file (:mod:`app.project`): loading and checking ``flow.toml`` (every
key, unknown keys and bad values named, paths relative to the file), the items a
project's sources give (labels CSV joins, splits, several sources), and
``project_text`` / ``write_project``.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path

import pytest

from app.project import (
    FILENAME,
    Project,
    load_project,
    project_from_dict,
    project_text,
    write_project,
)
from engine.refs import ValueRef
from engine.scan import DEFAULT_INCLUDE
from flow.errors import ConfigError, FlowError
from flow.keys import bytes_key, key
from tests.conftest import TINY_TARGETS, project_config

CNN = {"cnn": {"kind": "cnn"}}


def config(**tables) -> dict:
    """The smallest valid project: one source folder ``images``, one target.

    Items are named as ``[ids] scheme = "path"`` shows them (the names the default
    keyed ids hash: tests/app/test_ids.py), so the tests here read as paths."""
    tables.setdefault("sources", {"path": "images"})
    tables.setdefault("targets", CNN)
    tables.setdefault("ids", {"scheme": "path"})
    return project_config(scheduler=None, **tables)


def load(tmp_path: Path, **tables) -> Project:
    return project_from_dict(config(**tables), root=tmp_path)


def files(folder: Path, *names: str) -> None:
    for name in names:
        p = folder / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(f"image {name}".encode())


def items_of(tmp_path: Path, **tables):
    """The item table and per-item labels a project of ``tables`` gives."""
    items, _, meta = write_and_load(tmp_path, **tables).items()
    return items, dict(zip(items.ids, meta["labels"])), dict(zip(items.ids, items.splits))


def write_and_load(tmp_path: Path, **tables) -> Project:
    return load_project(write_project(tmp_path, config(**tables)))


# --------------------------------------------------------------------------
# loading


def test_load_a_file_or_the_folder_holding_it(tmp_path):
    path = write_project(tmp_path / "p", config())
    assert path == tmp_path / "p" / FILENAME
    for where in (path, tmp_path / "p", str(path)):
        p = load_project(where)
        assert p.file == path and p.root == (tmp_path / "p").resolve()
        assert p.targets == CNN and p.raw == config()


def test_no_project_file_says_how_to_make_one(tmp_path):
    with pytest.raises(ConfigError, match=r"no project file at .*flow.toml: run `flow init`"):
        load_project(tmp_path)


def test_a_file_that_is_not_toml_is_named(tmp_path):
    # a broken file on purpose: no dict spells invalid TOML, so its text is written here
    (tmp_path / FILENAME).write_text('[store]\nurl = "store\n')
    with pytest.raises(ConfigError, match=rf"{tmp_path / FILENAME}: not valid TOML"):
        load_project(tmp_path)


def test_defaults(tmp_path):
    p = project_from_dict({"sources": [{"path": "images"}], "targets": CNN}, root=tmp_path)
    assert p.store_url == str(tmp_path / ".flow/store") and p.storage_options == {}
    assert (p.scheduler, p.workers, p.batch_size, p.threads_below) == ("local", None, None, 400)
    assert p.tls == {} and p.cluster == {} and p.nodes == {}
    assert p.train_splits == ("train",) and p.database_splits is None
    assert (p.eval_queries, p.eval_database, p.eval_k) == (("val",), ("train",), 10)
    [src] = p.sources
    assert (src.name, src.path, src.labels) == ("images", tmp_path / "images", None)
    assert (src.include, src.exclude, src.extensionless) == (DEFAULT_INCLUDE, (), False)
    assert (src.join, src.file_column, src.labels_column) == ("file", "file", "finding_labels")
    assert (src.labels_separator, src.split_column, src.default_split) == ("|", "split", "")


def test_every_table_is_read(tmp_path):
    (tmp_path / "ca.pem").write_text("ca")
    p = load(
        tmp_path,
        store={"url": "s3://bucket/flow", "options": {"endpoint_url": "http://127.0.0.1:9000"}},
        build={"scheduler": "threads", "workers": 3, "batch_size": 8, "threads_below": 0,
               "tls": {"ca_file": "ca.pem"}},
        sources={"name": "cxr", "path": "data/cxr", "include": "*.dcm", "exclude": ["tmp/*"],
                 "extensionless": True, "labels": "meta/labels.csv", "join": "AccessionNumber",
                 "file_column": "path", "labels_column": "findings", "labels_separator": ";",
                 "split_column": "fold", "default_split": "unlabeled"},
        train={"splits": "fold1"},
        database={"splits": ["fold1", "fold2"]},
        eval={"queries": "fold3", "database": ["fold1"], "k": 5},
        nodes={"decode": {"window": True}},
    )  # fmt: skip
    assert p.store_url == "s3://bucket/flow"
    assert p.storage_options == {"endpoint_url": "http://127.0.0.1:9000"}
    assert (p.scheduler, p.workers, p.batch_size, p.threads_below) == ("threads", 3, 8, 0)
    assert p.tls == {"ca_file": str(tmp_path / "ca.pem")}
    [src] = p.sources
    assert (src.name, src.path, src.labels) == (
        "cxr", tmp_path / "data/cxr", tmp_path / "meta/labels.csv")  # fmt: skip
    assert (src.include, src.exclude, src.extensionless) == (("*.dcm",), ("tmp/*",), True)
    assert (src.join, src.file_column, src.labels_column) == ("AccessionNumber", "path", "findings")
    assert (src.labels_separator, src.split_column, src.default_split) == (";", "fold", "unlabeled")
    assert p.train_splits == ("fold1",) and p.database_splits == ("fold1", "fold2")
    assert (p.eval_queries, p.eval_database, p.eval_k) == (("fold3",), ("fold1",), 5)
    assert p.nodes == {"decode": {"window": True}} and p.targets == CNN


def test_paths_are_relative_to_the_file_and_absolute_ones_stay(tmp_path, monkeypatch):
    elsewhere = tmp_path / "elsewhere"
    p = write_and_load(
        tmp_path / "proj",
        store="../stores/s",
        sources=[{"path": "images", "labels": "labels.csv"}, {"path": str(elsewhere)}],
    )
    root = (tmp_path / "proj").resolve()
    assert Path(p.store_url) == root / "../stores/s"
    assert [s.path for s in p.sources] == [root / "images", elsewhere]
    assert p.sources[0].labels == root / "labels.csv"
    # not relative to the working directory
    monkeypatch.chdir(tmp_path)
    assert load_project("proj").sources[0].path == root / "images"
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert load(tmp_path, sources={"path": "~/x"}).sources[0].path == tmp_path / "home" / "x"


def test_a_store_given_on_the_command_line_wins(tmp_path):
    p = load_project(write_project(tmp_path, config(store="mine")), store="other")
    assert p.store_url == str(tmp_path.resolve() / "other")
    p = load_project(tmp_path, store="memory://x")
    assert p.store_url == "memory://x"


def test_a_single_sources_table_is_one_source(tmp_path):
    raw = config()
    raw["sources"] = {"path": "images"}  # [sources], not [[sources]]
    [src] = project_from_dict(raw, root=tmp_path).sources
    assert src.path == tmp_path / "images"


def test_several_sources_are_named(tmp_path):
    p = load(tmp_path, sources=[{"path": "a"}, {"path": "b", "name": "mine"}, {"path": "c"}])
    assert [s.name for s in p.sources] == ["source1", "mine", "source3"]


@pytest.mark.parametrize(
    "tables, where, key_name",
    [
        ({"stores": {}}, "flow.toml", "stores"),
        ({"store": {"path": "x"}}, r"\[store\]", "path"),
        ({"build": {"worker": 2}}, r"\[build\]", "worker"),
        ({"build": {"tls": {"certificate": "x"}}}, r"\[build.tls\]", "certificate"),
        ({"sources": {"path": "images", "label": "l.csv"}}, r"\[\[sources\]\] #1", "label"),
        ({"train": {"split": ["train"]}}, r"\[train\]", "split"),
        ({"database": {"split": "train"}}, r"\[database\]", "split"),
        ({"eval": {"query": "val"}}, r"\[eval\]", "query"),
        ({"cluster": {"partiton": "cpu"}}, r"\[cluster\]", "partiton"),
    ],
)
def test_unknown_keys_are_named_with_the_table(tmp_path, tables, where, key_name):
    with pytest.raises(ConfigError, match=rf"{where}: unknown key '{key_name}'") as e:
        load(tmp_path, **tables)
    if key_name != "partiton":
        assert "(allowed: " in str(e.value)


def test_several_unknown_keys_are_all_named(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown keys 'a', 'b' \(allowed: build, cluster"):
        project_from_dict({**config(), "a": 1, "b": 2}, root=tmp_path)


@pytest.mark.parametrize(
    "tables, message",
    [
        ({"sources": []}, r"no \[\[sources\]\]: name at least one folder"),
        ({"sources": {"include": "*.png"}}, r"\[\[sources\]\] #1: 'path' .* is required"),
        ({"sources": {"path": "i", "include": [1]}}, r"#1 include: expected a string or a list"),
        ({"sources": {"path": "i", "exclude": 3}}, r"#1 exclude: expected a string or a list"),
        ({"targets": {}}, r"no \[targets.<name>\] tables"),
        ({"targets": {"cnn": "cnn"}}, r"\[targets.cnn\] must be a table"),
        ({"train": {"splits": [1]}}, r"\[train\] splits: expected a string or a list"),
        ({"database": {"splits": 1}}, r"\[database\] splits: expected a string or a list"),
        ({"eval": {"queries": ["val", 2]}}, r"\[eval\] queries: expected a string or a list"),
        ({"build": {"workers": 0}}, r"\[build\] workers must be a positive integer"),
        ({"build": {"workers": "2"}}, r"\[build\] workers must be a positive integer"),
        ({"build": {"threads_below": -1}}, r"\[build\] threads_below must be an integer >= 0"),
        ({"build": {"threads_below": True}}, r"\[build\] threads_below must be an integer >= 0"),
        ({"build": {"tls": "ca.pem"}}, r"\[build\] tls must be a table"),
        ({"build": {"tls": {"ca_file": "nope.pem"}}}, r"ca_file = 'nope.pem' is not a file"),
        ({"cluster": {"cores": 0}}, r"\[cluster\]: cores must be an integer >= 1"),
    ],
)
def test_bad_values_are_named(tmp_path, tables, message):
    with pytest.raises(ConfigError, match=message):
        load(tmp_path, **tables)


@pytest.mark.parametrize(
    "tables",
    [
        {"eval": {"k": "ten"}},
        {"eval": {"k": 0}},
        {"build": {"batch_size": "big"}},
        {"build": {"workers": True}},
        {"build": {"scheduler": 5}},
        {"build": {"scheduler": "lcoal"}},
        {"store": {"url": 5}},
        {"store": {"options": "x"}},
        {"sources": {"path": 5}},
    ],
)
def test_values_of_the_wrong_type_are_config_errors(tmp_path, tables):
    with pytest.raises(ConfigError):
        load(tmp_path, **tables)


def test_config_errors_are_flow_errors():
    assert issubclass(ConfigError, FlowError)


# --------------------------------------------------------------------------
# items: sources, labels, splits


def test_items_are_the_files_of_the_source_by_relative_path(tmp_path):
    files(tmp_path / "images", "b.png", "a.png", "sub/c.dcm", "notes.txt", "sub/d.jpeg")
    items, refs, meta = write_and_load(tmp_path).items()
    assert items.ids == ["a.png", "b.png", "sub/c.dcm", "sub/d.jpeg"]  # sorted, *.txt left out
    assert items.splits == [""] * 4 and meta["labels"] == [()] * 4
    real = os.path.realpath(tmp_path / "images")
    assert meta["paths"] == [f"{real}/{i}" for i in items.ids]
    for i, item_id in enumerate(items.ids):
        data = (tmp_path / "images" / item_id).read_bytes()
        assert items.sources["files"][i] == bytes_key(data)
        assert items.sources["labels"][i] == bytes(key(()))
        assert refs.refs["labels"][i] == ValueRef(())
    assert meta["hashed"] == 4


def test_include_exclude_and_extensionless(tmp_path):
    files(tmp_path / "images", "a.png", "b.dcm", "tmp/c.dcm", "IM0001", "x.txt")
    tables = {"path": "images", "include": "*.dcm", "exclude": "tmp/*", "extensionless": True}
    items, _, _ = items_of(tmp_path, sources=tables)
    assert items.ids == ["IM0001", "b.dcm"]


def test_a_missing_source_folder_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"\[sources\]: .*nope"):
        write_and_load(tmp_path, sources={"path": "nope"}).items()


def _labels(path: Path, *rows: str, header: str = "file,split,finding_labels") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join([header, *rows]) + "\n")


def test_labels_join_on_the_path_relative_to_the_labels_file(tmp_path):
    files(tmp_path / "images", "a.png", "sub/b.png", "c.png")
    _labels(tmp_path / "labels.csv", "images/a.png,train,Mass", "images/sub/b.png,val,No Finding")
    items, labels, splits = items_of(tmp_path, sources={"path": "images", "labels": "labels.csv"})
    assert labels == {"a.png": ("Mass",), "sub/b.png": ("No Finding",), "c.png": ()}
    assert splits == {"a.png": "train", "sub/b.png": "val", "c.png": ""}
    assert items.in_splits(["train", "val"]).tolist() == [True, False, True]  # ids sorted


def test_labels_join_on_the_path_in_the_source_or_the_bare_name(tmp_path):
    files(tmp_path / "images", "x/a.png", "y/b.png", "y/c.png", "z/c.png")
    _labels(
        tmp_path / "meta" / "labels.csv",
        "x/a.png,train,Mass",  # relative to the source folder
        "b.png,val,Effusion",  # a bare name, unique in the source
        "c.png,train,Nodule",  # a bare name of two files: ambiguous, not joined
    )
    _, labels, splits = items_of(tmp_path, sources={"path": "images", "labels": "meta/labels.csv"})
    assert labels == {"x/a.png": ("Mass",), "y/b.png": ("Effusion",), "y/c.png": (), "z/c.png": ()}
    assert splits == {"x/a.png": "train", "y/b.png": "val", "y/c.png": "", "z/c.png": ""}


def test_several_labels_are_split_stripped_sorted_and_deduplicated(tmp_path):
    files(tmp_path / "images", "a.png", "b.png", "c.png")
    _labels(
        tmp_path / "labels.csv",
        "images/a.png,train, Mass | Effusion|Mass ",
        "images/b.png,train,",
        'images/c.png,train,"Nodule||"',
    )
    _, labels, _ = items_of(tmp_path, sources={"path": "images", "labels": "labels.csv"})
    assert labels == {"a.png": ("Effusion", "Mass"), "b.png": (), "c.png": ("Nodule",)}


def test_labels_columns_separator_and_default_split(tmp_path):
    files(tmp_path / "images", "a.png", "b.png", "c.png")
    _labels(
        tmp_path / "labels.csv",
        "a.png,Mass;Effusion,1",
        "b.png,Nodule,",  # no split: the default
        header="path,findings,fold",
    )
    source = {
        "path": "images",
        "labels": "labels.csv",
        "file_column": "path",
        "labels_column": "findings",
        "labels_separator": ";",
        "split_column": "fold",
        "default_split": "pool",
    }
    items, labels, splits = items_of(tmp_path, sources=source)
    assert labels == {"a.png": ("Effusion", "Mass"), "b.png": ("Nodule",), "c.png": ()}
    assert splits == {"a.png": "1", "b.png": "pool", "c.png": "pool"}  # c.png: not in the CSV
    # the labels' keys follow the labels: same labels, same key
    by_id = dict(zip(items.ids, items.sources["labels"]))
    assert by_id["b.png"] == bytes(key(("Nodule",))) != by_id["c.png"] == bytes(key(()))


def test_no_split_column_gives_every_labeled_item_the_default_split(tmp_path):
    files(tmp_path / "images", "a.png")
    _labels(tmp_path / "labels.csv", "a.png,Mass", header="file,finding_labels")
    source = {"path": "images", "labels": "labels.csv", "default_split": "train"}
    _, labels, splits = items_of(tmp_path, sources=source)
    assert labels == {"a.png": ("Mass",)} and splits == {"a.png": "train"}


def test_a_labels_file_with_a_byte_order_mark_reads(tmp_path):
    files(tmp_path / "images", "a.png")
    (tmp_path / "labels.csv").write_bytes(
        b"\xef\xbb\xbffile,split,finding_labels\na.png,val,Mass\n"
    )
    _, labels, splits = items_of(tmp_path, sources={"path": "images", "labels": "labels.csv"})
    assert labels == {"a.png": ("Mass",)} and splits == {"a.png": "val"}


@pytest.mark.parametrize(
    "content, message",
    [
        (None, r"labels file .*labels.csv: cannot open"),
        (b"file,split,finding_labels\n\xff\xfe,x,y\n", r"labels file .*: not UTF-8 text"),
        (
            b"name,split,finding_labels\n",
            r"no column 'file' \(columns: name, split, finding_labels\)",
        ),
        (b"file,split\n", r"no column 'finding_labels' \(columns: file, split\)"),
        (b"", r"no column 'file' \(columns: none\)"),
    ],
)
def test_a_bad_labels_file_is_named(tmp_path, content, message):
    files(tmp_path / "images", "a.png")
    if content is not None:
        (tmp_path / "labels.csv").write_bytes(content)
    with pytest.raises(ConfigError, match=message):
        write_and_load(tmp_path, sources={"path": "images", "labels": "labels.csv"}).items()


def test_labels_join_on_a_dicom_identifier(tmp_path):
    import csv

    import pydicom

    from app.phantoms import write_phantom_study

    labels = write_phantom_study(tmp_path, n=3, size=32, seed=1)
    rows = list(csv.DictReader(labels.open()))
    uids = {r["file"]: pydicom.dcmread(tmp_path / r["file"]).SOPInstanceUID for r in rows}
    _labels(
        tmp_path / "by_uid.csv",
        *(f"{uids[r['file']]},{r['split']},{r['finding_labels']}" for r in rows[:2]),
        header="SOPInstanceUID,split,finding_labels",
    )
    files(tmp_path / "images", "not_dicom.dcm")  # no header: not joined, not an error
    source = {"path": "images", "labels": "by_uid.csv", "join": "SOPInstanceUID"}
    _, got_labels, got_splits = items_of(tmp_path, sources=source)
    want = {r["file"].removeprefix("images/"): r for r in rows}
    assert set(got_labels) == set(want) | {"not_dicom.dcm"}
    for rel, r in want.items():
        if r in rows[:2]:
            assert got_labels[rel] == tuple(sorted(r["finding_labels"].split("|")))
            assert got_splits[rel] == r["split"]
        else:
            assert (got_labels[rel], got_splits[rel]) == ((), "")
    assert (got_labels["not_dicom.dcm"], got_splits["not_dicom.dcm"]) == ((), "")


def test_several_sources_prefix_their_item_ids(tmp_path):
    files(tmp_path / "cxr", "a.png", "b.png")
    files(tmp_path / "ct", "a.png")
    _labels(tmp_path / "cxr.csv", "cxr/a.png,train,Mass")
    _labels(tmp_path / "ct.csv", "a.png,val,Nodule")
    sources = [
        {"path": "cxr", "labels": "cxr.csv", "name": "cxr"},
        {"path": "ct", "labels": "ct.csv"},
    ]
    items, labels, splits = items_of(tmp_path, sources=sources)
    assert items.ids == ["cxr/a.png", "cxr/b.png", "source2/a.png"]
    assert labels == {"cxr/a.png": ("Mass",), "cxr/b.png": (), "source2/a.png": ("Nodule",)}
    assert splits == {"cxr/a.png": "train", "cxr/b.png": "", "source2/a.png": "val"}
    keys = dict(zip(items.ids, items.sources["files"]))
    assert keys["source2/a.png"] == bytes_key((tmp_path / "ct" / "a.png").read_bytes())


def test_two_sources_of_one_name_cannot_give_the_same_ids(tmp_path):
    files(tmp_path / "one", "a.png")
    files(tmp_path / "two", "a.png")
    sources = [{"path": "one", "name": "x"}, {"path": "two", "name": "x"}]
    with pytest.raises(ConfigError, match="names must differ"):
        write_and_load(tmp_path, sources=sources)


# --------------------------------------------------------------------------
# writing


def test_project_text_is_toml_of_the_config_with_paths_and_tuples_made_plain(tmp_path):
    cfg = config(
        sources=[{"path": tmp_path / "images", "include": ("*.png", "*.dcm")}],
        eval={"queries": ("val",), "k": 5},
        targets=TINY_TARGETS,
    )
    doc = tomllib.loads(project_text(cfg))
    assert doc["sources"] == [{"path": str(tmp_path / "images"), "include": ["*.png", "*.dcm"]}]
    assert doc["eval"] == {"queries": ["val"], "k": 5}
    assert doc["targets"] == TINY_TARGETS and doc["store"] == {"url": "store"}


def test_write_project_round_trips_through_load_project(tmp_path):
    (tmp_path / "p" / "certs").mkdir(parents=True)
    (tmp_path / "p" / "certs" / "ca.pem").write_text("ca")
    cfg = project_config(
        build={"workers": 2, "tls": {"ca_file": "certs/ca.pem"}},
        sources=[{"path": "a", "labels": "a.csv"}, {"path": "b", "name": "bee"}],
        train={"splits": ["fold1", "fold2"]},
        cluster={"cores": 2, "jobs": 1},
    )
    path = write_project(tmp_path / "p", cfg)
    assert path.read_text() == project_text(cfg)
    p = load_project(path)
    assert p.raw == cfg  # the same tables, read back
    assert (p.scheduler, p.workers, p.train_splits) == ("sync", 2, ("fold1", "fold2"))
    assert p.targets == TINY_TARGETS and p.cluster == {"cores": 2, "jobs": 1}
    assert [s.name for s in p.sources] == ["source1", "bee"]
    # written again from what was read: the same text
    assert write_project(tmp_path / "q", p.raw).read_text() == path.read_text()


def test_write_project_writes_what_it_is_given_even_a_broken_project(tmp_path):
    path = write_project(tmp_path / "new" / "folder", {"store": {"url": "s"}})
    assert tomllib.loads(path.read_text()) == {"store": {"url": "s"}}
    with pytest.raises(ConfigError, match="no \\[\\[sources\\]\\]"):
        load_project(path)
