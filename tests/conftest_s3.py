"""A real S3 endpoint for tests: moto's standalone server in a subprocess, bound to 127.0.0.1.

Use from a test module by importing the fixtures (they are not auto-registered)::

    from tests.conftest_s3 import S3_BUCKET, s3_server, s3_uri  # noqa: F401

``s3_server`` (session) yields the endpoint URL; ``s3_uri`` (function) yields a fresh
``s3://<bucket>/<unique prefix>``. AWS credentials/region are dummy values set in the environment
for the whole session, so boto3 clients need only ``endpoint_url``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator

import pytest

from tests.procs import free_port, stop

S3_BUCKET = "rr-ray-test"
_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}
# Anything that could point boto3 at a real account or another endpoint.
_AWS_UNSET = ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_SECURITY_TOKEN")


# Set for the whole session, before any test starts Ray: Ray's worker processes (Serve replicas among them)
# inherit the environment Ray was started with, and the S3 clients they run need credentials too.
for _key in _AWS_UNSET:
    os.environ.pop(_key, None)
os.environ.update(_AWS_ENV)
os.environ["AWS_CONFIG_FILE"] = os.environ["AWS_SHARED_CREDENTIALS_FILE"] = os.devnull


def _wait_until_up(url: str, proc: subprocess.Popen[bytes], log_path: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        try:
            with urllib.request.urlopen(url + "/moto-api/", timeout=2):
                return
        except urllib.error.HTTPError:
            return  # any HTTP answer means the server is serving
        except OSError:
            time.sleep(0.2)
    with open(log_path, errors="replace") as f:
        tail = f.read()[-2000:]
    raise RuntimeError(f"moto server at {url} did not start (exit code {proc.poll()}):\n{tail}")


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """Start moto's S3 server on 127.0.0.1, create ``S3_BUCKET`` and yield the endpoint URL."""
    import boto3

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tempfile.NamedTemporaryFile(prefix="moto-server-", suffix=".log", delete=False)
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
    )
    with pytest.MonkeyPatch.context() as mp:
        for key in _AWS_UNSET:
            mp.delenv(key, raising=False)
        for key, value in _AWS_ENV.items():
            mp.setenv(key, value)
        # Keep a developer's ~/.aws files out of the tests.
        mp.setenv("AWS_CONFIG_FILE", os.devnull)
        mp.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
        try:
            _wait_until_up(url, proc, log.name)
            boto3.client("s3", endpoint_url=url).create_bucket(Bucket=S3_BUCKET)
            yield url
        finally:
            stop(proc, timeout=10)
            log.close()
            os.unlink(log.name)


@pytest.fixture
def s3_uri(s3_server: str) -> str:
    """A fresh, empty ``s3://`` run prefix in the test bucket."""
    return f"s3://{S3_BUCKET}/runs/{uuid.uuid4().hex[:12]}"
