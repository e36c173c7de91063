"""Where shards and manifests live: a local folder or an S3 prefix, behind one small interface.

Everything else takes URLs (`/data/shards`, `s3://bucket/prefix`) and calls `open_storage`. Writes are atomic:
a local file appears under its name only once complete (written beside it, then renamed), and an S3 object
only exists once its (multipart) upload completes, so a reader never sees a half-written shard.

S3 goes through boto3 with its standard configuration: credentials, region and endpoint come from the AWS
environment variables or config files (`AWS_ENDPOINT_URL` or `endpoint_url` for any S3-compatible store).
Transient failures are retried with backoff by botocore's standard retry mode.
"""

import functools
import os
import tempfile
from pathlib import Path
from typing import Protocol

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import ClientError

MULTIPART_THRESHOLD = 64 * 2**20
"""Objects larger than this are uploaded in parts of this size (S3 allows at most 10,000 parts)."""


class StorageError(OSError):
    """A storage operation that failed for a reason the caller should report (missing object, no access)."""


class UnsupportedLocation(StorageError, ValueError):
    """A location that is neither a local path nor an s3:// URL (a ValueError too, so config schemas report it)."""


def check_location(url: str) -> str:
    """A local path or an s3:// URL, returned as is. Anything else (`pipe:`, `http://`) is refused, so no location
    from a config or a manifest is ever handed to a shell or another reader."""
    if url.startswith("pipe:") or ("://" in url and not url.startswith("s3://")):
        raise UnsupportedLocation(f"{url!r} is not a local path or an s3:// URL")
    return url


class Storage(Protocol):
    """The three things the pipeline and the trainer need from storage, plus names for messages."""

    def read_bytes(self, name: str) -> bytes: ...

    def read_range(self, name: str, start: int, stop: int) -> bytes: ...

    def size(self, name: str) -> int: ...

    def write_atomic(self, name: str, data: bytes) -> None: ...

    def upload_atomic(self, name: str, local_path: Path) -> None: ...

    def list(self, prefix: str = "") -> list[str]: ...

    def exists(self, name: str) -> bool: ...

    def url(self, name: str) -> str: ...


class LocalStorage:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    def _path(self, name: str) -> Path:
        path = (self.root / name).resolve()
        if self.root.resolve() not in path.parents and path != self.root.resolve():
            raise StorageError(f"{name!r} lies outside {self.root}")
        return path

    def read_bytes(self, name: str) -> bytes:
        try:
            return self._path(name).read_bytes()
        except FileNotFoundError:
            raise StorageError(f"{self.url(name)}: not found") from None

    def read_range(self, name: str, start: int, stop: int) -> bytes:
        try:
            with self._path(name).open("rb") as handle:
                handle.seek(start)
                return handle.read(max(0, stop - start))
        except FileNotFoundError:
            raise StorageError(f"{self.url(name)}: not found") from None

    def size(self, name: str) -> int:
        try:
            return self._path(name).stat().st_size
        except FileNotFoundError:
            raise StorageError(f"{self.url(name)}: not found") from None

    def write_atomic(self, name: str, data: bytes) -> None:
        path = self._path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
        try:
            with os.fdopen(descriptor, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temporary, path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise

    def upload_atomic(self, name: str, local_path: Path) -> None:
        self.write_atomic(name, Path(local_path).read_bytes())

    def list(self, prefix: str = "") -> list[str]:
        if not self.root.is_dir():
            return []
        names = (p.relative_to(self.root).as_posix() for p in self.root.rglob("*") if p.is_file())
        return sorted(n for n in names if n.startswith(prefix) and not Path(n).name.startswith("."))

    def exists(self, name: str) -> bool:
        return self._path(name).is_file()

    def url(self, name: str) -> str:
        return str(self.root / name)


class S3Storage:
    def __init__(self, bucket: str, prefix: str = "", max_attempts: int = 10, part_bytes: int = MULTIPART_THRESHOLD):
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.client = boto3.client("s3", config=Config(retries={"max_attempts": max_attempts, "mode": "standard"}))
        self.transfer = TransferConfig(multipart_threshold=part_bytes, multipart_chunksize=part_bytes)

    def _key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def read_bytes(self, name: str) -> bytes:
        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._key(name))["Body"].read()
        except ClientError as error:
            raise StorageError(f"{self.url(name)}: {error.response['Error'].get('Code', error)}") from None

    def read_range(self, name: str, start: int, stop: int) -> bytes:
        if stop <= start:
            return b""
        try:
            byte_range = f"bytes={start}-{stop - 1}"
            return self.client.get_object(Bucket=self.bucket, Key=self._key(name), Range=byte_range)["Body"].read()
        except ClientError as error:
            if error.response["Error"].get("Code") == "InvalidRange":
                return b""
            raise StorageError(f"{self.url(name)}: {error.response['Error'].get('Code', error)}") from None

    def size(self, name: str) -> int:
        try:
            return self.client.head_object(Bucket=self.bucket, Key=self._key(name))["ContentLength"]
        except ClientError as error:
            raise StorageError(f"{self.url(name)}: {error.response['Error'].get('Code', error)}") from None

    def write_atomic(self, name: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=self._key(name), Body=data)

    def upload_atomic(self, name: str, local_path: Path) -> None:
        self.client.upload_file(str(local_path), self.bucket, self._key(name), Config=self.transfer)

    def list(self, prefix: str = "") -> list[str]:
        names = []
        base = f"{self.prefix}/" if self.prefix else ""
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=base + prefix):
            names.extend(item["Key"][len(base) :] for item in page.get("Contents", []))
        return sorted(names)

    def exists(self, name: str) -> bool:
        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key(name))
            return True
        except ClientError as error:
            if error.response["Error"].get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise StorageError(f"{self.url(name)}: {error.response['Error'].get('Code', error)}") from None

    def url(self, name: str) -> str:
        return f"s3://{self.bucket}/{self._key(name)}"


@functools.lru_cache(maxsize=64)
def open_storage(url: str | Path) -> Storage:
    """`s3://bucket/prefix` or a local folder (one instance per URL and process: S3 clients are costly)."""
    text = str(url)
    if text.startswith("s3://"):
        bucket, _, prefix = text[len("s3://") :].partition("/")
        if not bucket:
            raise StorageError(f"{text}: no bucket named")
        return S3Storage(bucket, prefix)
    return LocalStorage(check_location(text))


@functools.lru_cache(maxsize=8)
def local_copy(url: str) -> str:
    """A local path for a file given as a local path or an s3:// URL (fetched once per process), for readers
    that only open paths (SentencePiece, checkpoint loaders)."""
    if not url.startswith("s3://"):
        return url
    root, _, name = url.rpartition("/")
    with tempfile.NamedTemporaryFile(suffix=f"-{name}", delete=False) as handle:
        handle.write(open_storage(root).read_bytes(name))
    return handle.name
