"""An S3-compatible HTTP endpoint on loopback: moto's server mode in a process of its own."""

import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import boto3
from botocore.exceptions import EndpointConnectionError

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def moto_endpoint(startup_timeout: float = 60.0):
    """Start `moto_server` on a free loopback port; yields its URL once it answers S3 requests."""
    port = free_port()
    server = Path(sys.executable).parent / "moto_server"
    process = subprocess.Popen([str(server), "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    client = boto3.client("s3", endpoint_url=url, region_name="us-east-1", aws_access_key_id="testing",
                          aws_secret_access_key="testing")
    deadline = time.monotonic() + startup_timeout
    try:
        while True:
            try:
                client.list_buckets()
                break
            except EndpointConnectionError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto_server did not start on {url}") from None
                time.sleep(0.1)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


def point_boto3_at(monkeypatch, url: str) -> None:
    """Make every boto3 client of this process use the endpoint, as a user's AWS environment would."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", url)
    for name, value in CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
