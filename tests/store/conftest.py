"""An S3-compatible server on loopback for the S3 store tests (moto's server).

``s3`` (session): a moto S3 server in its own process on 127.0.0.1 (a free
port chosen by the OS), one bucket in it, and the storage options that reach
it.  The environment points every AWS client at dummy credentials and turns
off the instance-metadata lookups, so nothing here can reach real AWS; the
server process is killed at teardown.

moto checks ``If-None-Match: *`` and stores the object in two steps that its
request threads can interleave (two of eight racing conditional PUTs both
won in 1 of 400 trials here), where AWS S3 decides between racing
conditional writes atomically.  The test server therefore handles one
request at a time, which makes it linearizable like S3 itself; the races
the tests run are between clients, as they would be against S3.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

SERVER = r"""
import json, logging, sys, threading
from werkzeug.serving import make_server
from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app

logging.getLogger("werkzeug").setLevel(logging.ERROR)
app = DomainDispatcherApplication(create_backend_app)
one_at_a_time = threading.Lock()
served = {}  # method -> requests, read by GET /__requests__

def serialized(environ, start_response):
    if environ.get("PATH_INFO") == "/__requests__":
        start_response("200 OK", [("Content-Type", "application/json")])
        return [json.dumps(served).encode()]
    with one_at_a_time:
        method = environ.get("REQUEST_METHOD", "?")
        served[method] = served.get(method, 0) + 1
        return app(environ, start_response)

server = make_server("127.0.0.1", 0, serialized, threaded=True)
print(server.server_address[1], flush=True)
server.serve_forever()
"""

REGION = "us-east-1"
AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SECURITY_TOKEN": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": REGION,
    "AWS_EC2_METADATA_DISABLED": "true",
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
}


@dataclass
class S3Server:
    endpoint_url: str
    bucket: str
    proc: subprocess.Popen
    #: flat storage options (what ``[store] options`` in flow.toml holds)
    options: dict = field(default_factory=dict)

    @property
    def client_options(self) -> dict:
        """The options with the region spelled out for the S3 client too."""
        return {**self.options, "client_kwargs": {"region_name": REGION}}

    def requests(self) -> dict[str, int]:
        """Requests the server has handled so far, by HTTP method."""
        import json
        import urllib.request

        with urllib.request.urlopen(f"{self.endpoint_url}/__requests__", timeout=10) as r:
            return json.loads(r.read())

    def url(self, name: str = "") -> str:
        """A fresh store URL in the bucket (``name`` plus a random suffix)."""
        return f"s3://{self.bucket}/{name or 'store'}-{uuid.uuid4().hex[:12]}"


def start_s3_server() -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-c", SERVER], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    line = proc.stdout.readline().strip()  # type: ignore[union-attr]
    if not line.isdigit():
        proc.kill()
        proc.wait()
        pytest.skip(f"the moto S3 server did not start (exit {proc.poll()})")
    return proc, f"http://127.0.0.1:{int(line)}"


@contextlib.contextmanager
def s3_server() -> Iterator[S3Server]:
    """A moto S3 server with one bucket, with AWS pointed at dummy credentials."""
    pytest.importorskip("moto.server")
    pytest.importorskip("s3fs")
    with pytest.MonkeyPatch.context() as mp:
        for k, v in AWS_ENV.items():
            mp.setenv(k, v)
        proc, endpoint = start_s3_server()
        try:
            import boto3

            bucket = "flow-test"
            boto3.client("s3", endpoint_url=endpoint, region_name=REGION).create_bucket(
                Bucket=bucket
            )
            options = {"endpoint_url": endpoint, "key": "testing", "secret": "testing"}
            yield S3Server(endpoint, bucket, proc, options)
        finally:
            proc.kill()
            proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()


@pytest.fixture(scope="session")
def s3() -> Iterator[S3Server]:
    with s3_server() as server:
        yield server
