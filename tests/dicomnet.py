"""Real DICOM servers for the tests and benchmarks: dcmtk's tools and Orthanc.

* :func:`dcmtk` finds a dcmtk program (``storescu``, ``storescp``) -- the real one:
  pynetdicom installs Python scripts of the same names, so each candidate on
  ``PATH`` (``/usr/bin`` first) must say "dcmtk" in its ``--version``;
* :func:`send` sends files with dcmtk's ``storescu`` exactly as they are (no
  transcoding): it writes a storescu configuration with one presentation context
  per (SOP class, transfer syntax) the files have, and proposes only those
  (a configuration profile), so compressed files travel compressed;
* :class:`Orthanc` starts Debian's ``Orthanc`` with the ``orthanc-dicomweb``
  plugin on loopback ports, with a throw-away configuration and storage under a
  temporary folder, HTTP basic auth on, and stops it after.

Where the programs are missing, :func:`need` skips the test with the reason --
or fails it when ``FLOW_REQUIRE_DICOM=1`` (``.ci/run`` sets it where
``.ci/dicom.sh`` installed them), so CI cannot skip them silently.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import warnings
from collections.abc import Iterable
from pathlib import Path

import pytest

__all__ = ["Orthanc", "acknowledged", "corpus", "dcmtk", "free_port", "need", "send"]

ORTHANC_PLUGIN_DIRS = ("/usr/share/orthanc/plugins", "/usr/lib/orthanc")


def need(what: str, found: object) -> None:
    """Skip (or fail, under FLOW_REQUIRE_DICOM=1) when ``found`` is falsy."""
    if found:
        return
    msg = f"{what} is not installed (bash .ci/dicom.sh installs it)"
    if os.environ.get("FLOW_REQUIRE_DICOM"):
        pytest.fail(f"FLOW_REQUIRE_DICOM is set but {msg}")
    pytest.skip(msg)


def dcmtk(name: str) -> str | None:
    """The path of dcmtk's ``name`` (not pynetdicom's script of the same name)."""
    dirs = ["/usr/bin", *os.environ.get("PATH", "").split(os.pathsep)]
    for d in dict.fromkeys(dirs):
        p = Path(d) / name
        if not (p.is_file() and os.access(p, os.X_OK)):
            continue
        try:
            out = subprocess.run(
                [str(p), "--version"], capture_output=True, text=True, timeout=10
            ).stdout
        except (OSError, subprocess.SubprocessError):
            continue
        if "dcmtk" in out.lower():
            return str(p)
    return None


def orthanc_binary() -> str | None:
    return shutil.which("Orthanc") or (
        "/usr/sbin/Orthanc" if os.access("/usr/sbin/Orthanc", os.X_OK) else None
    )


def dicomweb_plugin() -> str | None:
    for d in ORTHANC_PLUGIN_DIRS:
        p = Path(d) / "libOrthancDicomWeb.so"
        if p.exists():
            return str(p)
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def corpus(*roots: Path) -> list[tuple[Path, str, str]]:
    """(file, SOP class UID, transfer syntax UID) of the DICOM files under ``roots``
    that carry both (what storescu can send), sorted by path."""
    import pydicom

    out = []
    for root in roots:
        for p in sorted(Path(root).rglob("*")):
            if not p.is_file():
                continue
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    ds = pydicom.dcmread(p, stop_before_pixels=True)
                sop = str(ds.file_meta.MediaStorageSOPClassUID or ds.SOPClassUID)
                ts = str(ds.file_meta.TransferSyntaxUID)
                _ = str(ds.SOPInstanceUID)
            except Exception:
                continue
            if sop and ts:
                out.append((p, sop, ts))
    return out


def pydicom_data_roots() -> list[Path]:
    """pydicom's own test files and the pydicom-data package's (where installed)."""
    import pydicom.data

    roots = [Path(pydicom.data.__file__).parent / "test_files"]
    with contextlib.suppress(ImportError):
        import data_store  # pydicom-data

        roots.append(Path(data_store.__file__).parent / "data")
    return [r for r in roots if r.is_dir()]


def _storescu_config(files: list[tuple[Path, str, str]], path: Path) -> None:
    pairs = sorted({(sop, ts) for _, sop, ts in files})
    if len(pairs) > 128:
        raise ValueError(f"{len(pairs)} presentation contexts: more than one association holds")
    syntaxes = sorted({ts for _, ts in pairs})
    lines = ["[[TransferSyntaxes]]"]
    for i, ts in enumerate(syntaxes):
        lines += [f"[TS{i}]", f"TransferSyntax1 = {ts}"]
    lines += ["", "[[PresentationContexts]]", "[Corpus]"]
    for i, (sop, ts) in enumerate(pairs):
        lines.append(f"PresentationContext{i + 1} = {sop}\\TS{syntaxes.index(ts)}")
    lines += ["", "[[Profiles]]", "[Corpus]", "PresentationContexts = Corpus"]
    path.write_text("\n".join(lines) + "\n")


def send(
    files: Iterable[tuple[Path, str, str]],
    port: int,
    *,
    called: str = "FLOW",
    calling: str = "STORESCU",
    host: str = "127.0.0.1",
    timeout: float = 600,
    check: bool = True,
) -> subprocess.CompletedProcess:
    """Send ``files`` (from :func:`corpus`) with dcmtk's storescu, as they are."""
    files = list(files)
    exe = dcmtk("storescu")
    need("dcmtk's storescu", exe)
    with tempfile.TemporaryDirectory(prefix="storescu-") as tmp:
        cfg = Path(tmp) / "storescu.cfg"
        _storescu_config(files, cfg)
        args = [exe, "-aet", calling, "-aec", called, "-xf", str(cfg), "Corpus", "-nh", "-v"]
        args += [host, str(port)]
        # many files: storescu reads their names from the command line
        res = subprocess.run(
            [*args, *[str(p) for p, _, _ in files]],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    if check and res.returncode != 0:
        raise AssertionError(f"storescu exited {res.returncode}:\n{res.stderr[-3000:]}")
    return res


def acknowledged(res: subprocess.CompletedProcess) -> set[Path]:
    """The files a :func:`send` got a success (or warning) status for."""
    out, current = set(), None
    for line in (res.stdout + res.stderr).splitlines():
        if line.startswith("I: Sending file: "):
            current = Path(line[len("I: Sending file: ") :].strip())
        elif line.startswith("I: Received Store Response") and current is not None:
            if "(Success" in line or "(Warning" in line:
                out.add(current)
            current = None
    return out


class Orthanc:
    """Debian's Orthanc with the DICOMweb plugin, on loopback, in ``folder``."""

    def __init__(self, folder: Path, *, user: str = "flow", password: str = "s3cret"):
        self.folder = Path(folder)
        self.user, self.password = user, password
        self.http = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http}"

    @property
    def dicomweb(self) -> str:
        return f"{self.url}/dicom-web"

    def start(self) -> Orthanc:
        exe, plugin = orthanc_binary(), dicomweb_plugin()
        need("Orthanc (Debian package orthanc)", exe)
        need("Orthanc's DICOMweb plugin (Debian package orthanc-dicomweb)", plugin)
        (self.folder / "db").mkdir(parents=True, exist_ok=True)
        config = {
            "Name": "flow-test",
            "StorageDirectory": str(self.folder / "db"),
            "IndexDirectory": str(self.folder / "db"),
            "HttpServerEnabled": True,
            "HttpPort": self.http,
            "RemoteAccessAllowed": False,  # loopback only
            "AuthenticationEnabled": True,
            "RegisteredUsers": {self.user: self.password},
            "DicomServerEnabled": False,
            "Plugins": [plugin],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": False},
            "StorageCompression": False,
            "ConcurrentJobs": 1,
        }
        cfg = self.folder / "orthanc.json"
        cfg.write_text(json.dumps(config, indent=2))
        self.log = open(self.folder / "orthanc.log", "w")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [exe, str(cfg)], stdout=self.log, stderr=subprocess.STDOUT, cwd=self.folder
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"Orthanc exited {self.proc.returncode}: "
                    + (self.folder / "orthanc.log").read_text()[-2000:]
                )
            try:
                if self.get("/system").status_code == 200:
                    return self
            except OSError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError("Orthanc did not answer within 60 s")

    def get(self, path: str):
        import requests

        return requests.get(self.url + path, auth=(self.user, self.password), timeout=30)

    def upload(self, files: Iterable[Path]) -> int:
        """POST each file to /instances; how many Orthanc accepted."""
        import requests

        n = 0
        with requests.Session() as s:
            s.auth = (self.user, self.password)
            for p in files:
                r = s.post(f"{self.url}/instances", data=Path(p).read_bytes(), timeout=60)
                n += r.status_code == 200
        return n

    def delete_instance(self, sop_uid: str) -> None:
        import requests

        r = requests.post(
            f"{self.url}/tools/lookup",
            data=sop_uid,
            auth=(self.user, self.password),
            timeout=30,
        )
        for hit in r.json():
            if hit["Type"] == "Instance":
                requests.delete(
                    f"{self.url}/instances/{hit['ID']}", auth=(self.user, self.password), timeout=30
                )

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        with contextlib.suppress(Exception):
            self.log.close()

    def __enter__(self) -> Orthanc:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
