"""Item ids (app/ids.py) and the new project keys: [ids], [receive], dicomweb sources,
[build] item_timeout / item_memory."""

from __future__ import annotations

import pytest

from app.ids import record_scheme, resolve_scheme
from app.project import load_project, parse_size
from flow.errors import ConfigError
from store import open_store
from store.refs import move_ref
from tests.conftest import project_config, write_project


def _project(tmp_path, **tables):
    (tmp_path / "images").mkdir(exist_ok=True)
    write_project(tmp_path, project_config(targets=("cnn",), **tables))
    return load_project(tmp_path)


def test_a_new_store_is_keyed_and_records_it(tmp_path):
    p = _project(tmp_path)
    store = open_store(str(tmp_path / "store"))
    s = resolve_scheme(p, store)
    assert s.scheme == "keyed" and (tmp_path / ".flow" / "id-salt").is_file()
    (a,) = s.ids(["images/DOE^JOHN/1.dcm"])
    assert len(a) == 32 and "DOE" not in a
    assert s.ids(["images/DOE^JOHN/1.dcm"]) == [a]  # stable
    record_scheme(store, s)
    again = resolve_scheme(load_project(tmp_path), store)
    assert again.recorded and again.ids(["images/DOE^JOHN/1.dcm"]) == [a]


def test_an_old_store_keeps_path_ids_and_is_not_written(tmp_path):
    p = _project(tmp_path)
    store = open_store(str(tmp_path / "store"))
    move_ref(store, "cnn", {"segments": []})  # built before ids were keyed
    s = resolve_scheme(p, store)
    assert s.scheme == "path" and s.ids(["a/b.png"]) == ["a/b.png"]
    record_scheme(store, s)
    assert not (tmp_path / "store" / "refs" / "ids").exists()
    # ... until asked
    p = _project(tmp_path, ids={"scheme": "keyed"})
    assert resolve_scheme(p, store).scheme == "keyed"


def test_a_lost_or_different_salt_is_an_error_not_a_silent_rekey(tmp_path):
    p = _project(tmp_path)
    store = open_store(str(tmp_path / "store"))
    record_scheme(store, resolve_scheme(p, store))
    salt = tmp_path / ".flow" / "id-salt"
    salt.unlink()
    with pytest.raises(ConfigError, match="is missing"):
        resolve_scheme(p, store)
    salt.write_text("ab" * 32 + "\n")
    with pytest.raises(ConfigError, match="another salt"):
        resolve_scheme(p, store)


@pytest.mark.parametrize(
    ("tables", "match"),
    [
        ({"ids": {"scheme": "names"}}, "scheme = 'names'"),
        ({"build": {"item_memory": "lots"}}, "item_memory"),
        ({"build": {"item_memory": "1 MiB"}}, "at least 64 MiB"),
        ({"build": {"item_timeout": -1}}, "item_timeout"),
        ({"receive": {"port": 11112}}, "'folder'"),
        ({"receive": {"folder": "in", "ae_title": "A" * 17}}, "1 to 16"),
        ({"receive": {"folder": "in", "port": 70000}}, "port"),
        ({"sources": [{"dicomweb": "ftp://x"}]}, "http"),
        ({"sources": [{"dicomweb": "http://x", "password_env": "P"}]}, "needs a username"),
        ({"sources": [{"dicomweb": "http://x", "bogus": 1}]}, "bogus"),
    ],
)
def test_bad_new_keys_name_the_key(tmp_path, tables, match):
    (tmp_path / "images").mkdir()
    write_project(tmp_path, project_config(targets=("cnn",), **tables))
    with pytest.raises(ConfigError, match=match):
        load_project(tmp_path)


def test_sizes():
    assert parse_size("2 GiB") == 2 << 30
    assert parse_size("512M") == 512 << 20
    assert parse_size(1024) == 1024
    with pytest.raises(ValueError):
        parse_size("2 parsecs")


def test_receive_makes_a_source_and_defaults(tmp_path):
    p = _project(tmp_path, receive={"folder": "incoming"})
    assert p.receive.port == 11112 and p.receive.ae_title == "FLOW"
    assert [s.name for s in p.folder_sources()] == ["images", "received"]
    assert p.item_limits == (30.0, 2 << 30)
