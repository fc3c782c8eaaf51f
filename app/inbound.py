"""Where studies come in besides source folders, as flow.toml declares them.

* ``[receive]`` (:class:`ReceiveConfig`): the DICOM Storage SCP of ``flow receive``
  (:mod:`app.receive`); its folder is a source of the project named ``received``;
* ``[[sources]] dicomweb = "http://..."`` (:class:`DicomwebSource`): an archive listed
  with QIDO-RS and fetched with WADO-RS into a local cache (:mod:`app.dicomweb`);
* ``[build] item_timeout`` / ``item_memory``: the per-item limits of the steps that
  read source files (:mod:`engine.sandbox`).

Every key is checked as :mod:`app.project` checks its own: an unknown key or a bad
value is a :class:`flow.errors.ConfigError` naming the table, the key and the reason.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flow.errors import ConfigError

__all__ = ["DicomwebSource", "ReceiveConfig", "parse_size"]

_DICOMWEB_KEYS = {
    "name",
    "dicomweb",
    "cache",
    "username",
    "password_env",
    "token_env",
    "ca_file",
    "timeout",
    "page",
    "default_split",
}
_RECEIVE_KEYS = {"folder", "ae_title", "host", "port", "allowed", "settle", "default_split"}


@dataclass
class DicomwebSource:
    """An archive's DICOMweb service as a source (see :mod:`app.dicomweb`)."""

    name: str
    url: str
    cache: Path  # the local content-addressed cache of fetched instances
    state: Path  # the stored QIDO listing (the watermark)
    username: str = ""
    password_env: str = ""  # the password comes from this environment variable
    token_env: str = ""  # a bearer token from this environment variable
    ca_file: str = ""
    timeout: float = 60.0
    page: int = 1000  # QIDO-RS limit per request
    default_split: str = ""


@dataclass
class ReceiveConfig:
    """``[receive]``: the DICOM Storage SCP of ``flow receive`` (:mod:`app.receive`)."""

    folder: Path
    ae_title: str = "FLOW"
    host: str = "0.0.0.0"
    port: int = 11112
    allowed: tuple[str, ...] = ()  # calling AE titles (empty: any)
    settle: float = 2.0  # seconds without an instance before a study is built
    default_split: str = ""

    def source(self) -> Any:
        """The receive folder as a source folder (:class:`app.project.SourceFolder`)."""
        from app.project import SourceFolder

        return SourceFolder(
            name="received",
            path=self.folder,
            include=("*.dcm",),
            default_split=self.default_split,
        )


def _check_keys(where: str, table: Any, allowed: set[str]) -> None:
    from app.project import _check_keys as check

    check(where, table, allowed)


def _str_tuple(where: str, v: Any) -> tuple[str, ...]:
    from app.project import _str_tuple as strs

    return strs(where, v)


def dicomweb_source(w: str, s: dict, default_name: str, root: Path, rel) -> DicomwebSource:
    _check_keys(w, s, _DICOMWEB_KEYS)
    url = s["dicomweb"]
    if not isinstance(url, str) or not url.startswith(("http://", "https://")):
        raise ConfigError(f"{w}: dicomweb = {url!r}: expected an http:// or https:// URL")
    name = s.get("name", default_name)
    for k in ("username", "password_env", "token_env", "ca_file", "default_split", "name"):
        if k in s and not isinstance(s[k], str):
            raise ConfigError(f"{w}: {k} must be a string")
    if s.get("password_env") and not s.get("username"):
        raise ConfigError(f"{w}: password_env needs a username")
    if s.get("password_env") and s.get("token_env"):
        raise ConfigError(f"{w}: give password_env (basic auth) or token_env (bearer), not both")
    ca = s.get("ca_file", "")
    if ca and not rel(ca).is_file():
        raise ConfigError(f"{w}: ca_file = {ca!r} is not a file")
    page = s.get("page", 1000)
    if not isinstance(page, int) or isinstance(page, bool) or page < 1:
        raise ConfigError(f"{w}: page must be a positive integer (QIDO-RS results per request)")
    timeout = s.get("timeout", 60.0)
    if not isinstance(timeout, int | float) or timeout <= 0:
        raise ConfigError(f"{w}: timeout must be a positive number of seconds")
    cache = rel(s["cache"]) if s.get("cache") else root / ".flow" / "dicomweb" / name
    return DicomwebSource(
        name=name,
        url=url.rstrip("/"),
        cache=cache,
        state=cache / "listing.json",
        username=s.get("username", ""),
        password_env=s.get("password_env", ""),
        token_env=s.get("token_env", ""),
        ca_file=str(rel(ca)) if ca else "",
        timeout=float(timeout),
        page=page,
        default_split=s.get("default_split", ""),
    )


def receive_config(where: str, t: Any, rel) -> ReceiveConfig:
    w = f"{where}: [receive]"
    if not isinstance(t, dict):
        raise ConfigError(f"{w} must be a table")
    _check_keys(w, t, _RECEIVE_KEYS)
    if "folder" not in t:
        raise ConfigError(f"{w}: 'folder' (where received instances are stored) is required")
    ae = t.get("ae_title", "FLOW")
    if not isinstance(ae, str) or not 0 < len(ae.strip()) <= 16 or "\\" in ae:
        raise ConfigError(f"{w}: ae_title = {ae!r}: 1 to 16 characters, no backslash")
    port = t.get("port", 11112)
    if not isinstance(port, int) or isinstance(port, bool) or not 0 <= port < 65536:
        raise ConfigError(f"{w}: port = {port!r}: a TCP port (0 picks a free one)")
    settle = t.get("settle", 2.0)
    if not isinstance(settle, int | float) or settle < 0:
        raise ConfigError(f"{w}: settle must be a number of seconds >= 0")
    allowed = _str_tuple(f"{w} allowed", t.get("allowed", []))
    return ReceiveConfig(
        folder=rel(str(t["folder"])),
        ae_title=ae.strip(),
        host=str(t.get("host", "0.0.0.0")),
        port=port,
        allowed=tuple(a.strip() for a in allowed),
        settle=float(settle),
        default_split=str(t.get("default_split", "")),
    )


_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10, "m": 1 << 20,
          "mb": 1 << 20, "mib": 1 << 20, "g": 1 << 30, "gb": 1 << 30, "gib": 1 << 30,
          "t": 1 << 40, "tb": 1 << 40, "tib": 1 << 40}  # fmt: skip


def parse_size(text: str | int) -> int:
    """``"2 GiB"``, ``"512M"``, ``1073741824`` -> bytes (binary units)."""
    if isinstance(text, int) and not isinstance(text, bool):
        return text
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"{text!r} is not a size (e.g. '2 GiB', '512 MiB')")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def item_limits(where: str, build: dict) -> tuple[float, int]:
    """``[build] item_timeout`` (seconds; 0: none) and ``item_memory`` (0: none)."""
    t = build.get("item_timeout", 30)
    if not isinstance(t, int | float) or isinstance(t, bool) or t < 0:
        raise ConfigError(f"{where}: [build] item_timeout must be seconds >= 0 (0: no limit)")
    try:
        m = parse_size(build.get("item_memory", "2 GiB"))
    except ValueError as e:
        raise ConfigError(f"{where}: [build] item_memory: {e}") from None
    if m and m < (64 << 20):
        raise ConfigError(f"{where}: [build] item_memory must be at least 64 MiB (or 0: none)")
    return float(t), m
