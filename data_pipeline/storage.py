"""Where shards and manifests live: a local folder or an S3 prefix, behind one small interface.

Everything else takes URLs (`/data/shards`, `s3://bucket/prefix`) and calls `open_storage`. Writes are atomic:
a local file appears under its name only once complete (written beside it, then renamed), and an S3 object
only exists once its (multipart) upload completes, so a reader never sees a half-written shard.

S3 goes through boto3 with its standard configuration: credentials, region and endpoint come from the AWS
environment variables or config files (`AWS_ENDPOINT_URL` or `endpoint_url` for any S3-compatible store).
Transient failures are retried with backoff by botocore's standard retry mode.

Failures are reported in one line naming the URL, the problem and the setting to check. A missing object is a
`StorageError` (an OSError: readers count one missing input file as skipped); a store that cannot be used at
all (no such bucket, access refused, credentials missing or rejected, endpoint unreachable) is a
`StoreUnusable`, which no reader counts as a skip and which botocore-aware retry loops treat like botocore's
own errors. `check_readable` and `check_writable` find those in seconds, before a job starts work.
"""

import functools
import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO, Literal, Protocol
from urllib.parse import urlsplit

import boto3
from boto3.exceptions import S3UploadFailedError
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError, PartialCredentialsError

MULTIPART_THRESHOLD = 64 * 2**20
"""Objects larger than this are uploaded in parts of this size (S3 allows at most 10,000 parts)."""
COPY_BLOCK_BYTES = 1 << 20
"""Files are copied in blocks of this size, so a copy's memory does not grow with the file."""


class StorageError(OSError):
    """A storage operation that failed for a reason the caller should report (missing object, no access)."""


class MissingObject(StorageError):
    """No object or file under that name."""


class StoreUnusable(BotoCoreError):
    """The store, bucket or credentials cannot be used at all: stops the work instead of skipping inputs."""

    fmt = "{message}"

    def __init__(self, message: str):
        super().__init__(message=message)


STORAGE_FAILURES = (StorageError, StoreUnusable)
"""What a command reports in one line instead of a traceback."""

NOT_FOUND = ("404", "NoSuchKey", "NotFound")
DENIED = ("403", "AccessDenied", "AllAccessDisabled", "AccountProblem")
CREDENTIALS_REJECTED = ("InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken",
                        "TokenRefreshRequired")
CHECK_CREDENTIALS = "check AWS_PROFILE or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
CHECK_ENDPOINT = "check AWS_ENDPOINT_URL or endpoint_url in the AWS config"


def s3_failure(error: Exception, url: str, bucket: str) -> Exception:
    """A botocore error as one line naming the URL, the problem and the setting to check."""
    if isinstance(error, (NoCredentialsError, PartialCredentialsError)):
        return StoreUnusable(f"{url}: credentials missing ({CHECK_CREDENTIALS}, or the AWS config files)")
    if isinstance(error, BotoCoreError) and not isinstance(error, StoreUnusable):
        endpoint = urlsplit(getattr(error, "kwargs", {}).get("endpoint_url", ""))
        endpoint = f"{endpoint.scheme}://{endpoint.netloc}" if endpoint.netloc else ""
        return StoreUnusable(f"{url}: endpoint unreachable{f' ({endpoint})' if endpoint else ''} "
                             f"after retries: {type(error).__name__}; {CHECK_ENDPOINT}")
    if not isinstance(error, ClientError):
        return error
    code = str(error.response.get("Error", {}).get("Code", "unknown"))
    if code == "NoSuchBucket":
        return StoreUnusable(f"{url}: no such bucket {bucket!r} (check the bucket name in the URL, and "
                             f"AWS_ENDPOINT_URL if it lives on another store)")
    if code in CREDENTIALS_REJECTED:
        return StoreUnusable(f"{url}: credentials rejected by the store ({code}; {CHECK_CREDENTIALS})")
    if code in DENIED:
        return StoreUnusable(f"{url}: access denied ({code}; {CHECK_CREDENTIALS}, and the bucket policy)")
    if code in NOT_FOUND:
        return MissingObject(f"{url}: no such key")
    message = error.response.get("Error", {}).get("Message", "")
    return StorageError(f"{url}: {code}" + (f" ({message})" if message else ""))


class UnsupportedLocation(StorageError, ValueError):
    """A location that is neither a local path nor an s3:// URL (a ValueError too, so config schemas report it)."""


def check_location(url: str) -> str:
    """A local path or an s3:// URL, returned as is. Anything else (`pipe:`, `http://`) is refused, so no location
    from a config or a manifest is ever handed to a shell or another reader."""
    if url.startswith("pipe:") or ("://" in url and not url.startswith("s3://")):
        raise UnsupportedLocation(f"{url!r} is not a local path or an s3:// URL")
    return url


class Storage(Protocol):
    """What the pipeline, the trainer and the tokenizer trainer need from storage, plus names for messages and
    the checks made before a job starts."""

    def read_bytes(self, name: str) -> bytes: ...

    def read_range(self, name: str, start: int, stop: int) -> bytes: ...

    def size(self, name: str) -> int: ...

    def write_atomic(self, name: str, data: bytes) -> None: ...

    def upload_atomic(self, name: str, local_path: Path) -> None: ...

    def list(self, prefix: str = "") -> list[str]: ...

    def exists(self, name: str) -> bool: ...

    def url(self, name: str) -> str: ...

    def open_stream(self, name: str) -> BinaryIO: ...

    def check_readable(self, name: str) -> None: ...

    def check_reachable(self) -> None: ...

    def check_writable(self) -> None: ...


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
            raise MissingObject(f"{self.url(name)}: not found") from None

    def read_range(self, name: str, start: int, stop: int) -> bytes:
        try:
            with self._path(name).open("rb") as handle:
                handle.seek(start)
                return handle.read(max(0, stop - start))
        except FileNotFoundError:
            raise MissingObject(f"{self.url(name)}: not found") from None

    def open_stream(self, name: str) -> BinaryIO:
        try:
            return self._path(name).open("rb")
        except FileNotFoundError:
            raise MissingObject(f"{self.url(name)}: not found") from None

    def size(self, name: str) -> int:
        try:
            return self._path(name).stat().st_size
        except FileNotFoundError:
            raise MissingObject(f"{self.url(name)}: not found") from None

    def write_atomic(self, name: str, data: bytes) -> None:
        self._replace_atomically(name, lambda handle: handle.write(data))

    def upload_atomic(self, name: str, local_path: Path) -> None:
        """Copied in 1 MiB blocks, so that a large part never sits in memory."""
        def copy(handle: BinaryIO) -> None:
            with open(local_path, "rb") as source:
                shutil.copyfileobj(source, handle, COPY_BLOCK_BYTES)

        self._replace_atomically(name, copy)

    def _replace_atomically(self, name: str, write: Callable[[BinaryIO], object]) -> None:
        """Written and fsynced beside its name, then renamed: readers see the old file or the whole new one."""
        path = self._path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
        try:
            with os.fdopen(descriptor, "wb") as handle:
                write(handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temporary, path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise

    def list(self, prefix: str = "") -> list[str]:
        if not self.root.is_dir():
            return []
        names = (p.relative_to(self.root).as_posix() for p in self.root.rglob("*") if p.is_file())
        return sorted(n for n in names if n.startswith(prefix) and not Path(n).name.startswith("."))

    def exists(self, name: str) -> bool:
        return self._path(name).is_file()

    def url(self, name: str) -> str:
        return str(self.root / name)

    def check_readable(self, name: str) -> None:
        if not self._path(name).is_file():
            raise MissingObject(f"{self.url(name)}: not found")

    def check_reachable(self) -> None:
        """A local folder needs no connection; whether it holds anything is for the reader to say."""

    def check_writable(self) -> None:
        """The folder, or the nearest folder above it that exists, can be written; nothing is created, so a job
        that fails its checks leaves no trace."""
        existing = self.root.absolute()
        while not existing.exists():
            existing = existing.parent
        if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
            raise StorageError(f"{self.root}: not writable ({existing} is not a folder this user can write)")


class S3Storage:
    PROBE = ".beit3-write-check"
    """The object `check_writable` writes and removes again."""

    def __init__(self, bucket: str, prefix: str = "", max_attempts: int = 10, part_bytes: int = MULTIPART_THRESHOLD):
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.client = boto3.client("s3", config=Config(retries={"max_attempts": max_attempts, "mode": "standard"}))
        self.probe_client = boto3.client("s3", config=Config(retries={"max_attempts": 2, "mode": "standard"},
                                                             connect_timeout=10, read_timeout=30))
        """For the checks before a job: a wrong endpoint is reported in seconds, not after a minute of retries."""
        self.transfer = TransferConfig(multipart_threshold=part_bytes, multipart_chunksize=part_bytes)

    def _key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix and name else self.prefix or name

    def _failure(self, error: Exception, name: str, client=None) -> Exception:
        """The one-line error; a HEAD request's bare 404 is told apart into no such bucket or no such key."""
        failure = s3_failure(error, self.url(name), self.bucket)
        if isinstance(error, ClientError) and error.response.get("Error", {}).get("Code") in ("404", "NotFound"):
            try:
                (client or self.client).head_bucket(Bucket=self.bucket)
            except (ClientError, BotoCoreError) as bucket_error:
                return s3_failure(bucket_error, self.url(name), self.bucket)
        return failure

    def read_bytes(self, name: str) -> bytes:
        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._key(name))["Body"].read()
        except (ClientError, BotoCoreError) as error:
            raise self._failure(error, name) from None

    def open_stream(self, name: str) -> BinaryIO:
        """The object's body as a binary stream, read as it is consumed (bounded memory for large objects)."""
        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._key(name))["Body"]
        except (ClientError, BotoCoreError) as error:
            raise self._failure(error, name) from None

    def read_range(self, name: str, start: int, stop: int) -> bytes:
        if stop <= start:
            return b""
        try:
            byte_range = f"bytes={start}-{stop - 1}"
            return self.client.get_object(Bucket=self.bucket, Key=self._key(name), Range=byte_range)["Body"].read()
        except ClientError as error:
            if error.response["Error"].get("Code") == "InvalidRange":
                return b""
            raise self._failure(error, name) from None
        except BotoCoreError as error:
            raise self._failure(error, name) from None

    def _head(self, name: str) -> dict:
        """The object's metadata (HEAD), a storage failure named after the object."""
        try:
            return self.client.head_object(Bucket=self.bucket, Key=self._key(name))
        except (ClientError, BotoCoreError) as error:
            raise self._failure(error, name) from None

    def size(self, name: str) -> int:
        return self._head(name)["ContentLength"]

    def etag(self, name: str) -> str:
        """The object's entity tag, which changes whenever the object is replaced."""
        return self._head(name)["ETag"].strip('"')

    def download(self, name: str, handle: BinaryIO) -> str:
        """Copy the object into `handle` block by block; returns the entity tag of the version copied."""
        try:
            response = self.client.get_object(Bucket=self.bucket, Key=self._key(name))
            shutil.copyfileobj(response["Body"], handle, COPY_BLOCK_BYTES)
            return response["ETag"].strip('"')
        except (ClientError, BotoCoreError) as error:
            raise self._failure(error, name) from None

    def write_atomic(self, name: str, data: bytes) -> None:
        try:
            self.client.put_object(Bucket=self.bucket, Key=self._key(name), Body=data)
        except (ClientError, BotoCoreError) as error:
            raise self._failure(error, name) from None

    def upload_atomic(self, name: str, local_path: Path) -> None:
        try:
            self.client.upload_file(str(local_path), self.bucket, self._key(name), Config=self.transfer)
        except (ClientError, BotoCoreError) as error:
            raise self._failure(error, name) from None
        except S3UploadFailedError as error:  # the transfer manager raises it while handling the ClientError
            cause = error.__context__ if isinstance(error.__context__, ClientError) else error
            raise self._failure(cause, name) from None

    def list(self, prefix: str = "") -> list[str]:
        names = []
        base = f"{self.prefix}/" if self.prefix else ""
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=base + prefix):
                names.extend(item["Key"][len(base) :] for item in page.get("Contents", []))
        except (ClientError, BotoCoreError) as error:
            raise self._failure(error, prefix) from None
        return sorted(names)

    def exists(self, name: str) -> bool:
        try:
            self._head(name)
            return True
        except MissingObject:
            return False

    def url(self, name: str) -> str:
        return f"s3://{self.bucket}/{self._key(name)}"

    def check_readable(self, name: str) -> None:
        """The object exists and may be read; fails fast (two attempts) on a store that cannot be used."""
        try:
            self.probe_client.head_object(Bucket=self.bucket, Key=self._key(name))
        except (ClientError, BotoCoreError) as error:
            raise self._failure(error, name, self.probe_client) from None

    def check_reachable(self) -> None:
        """The endpoint answers, the credentials are accepted and the bucket exists."""
        try:
            self.probe_client.head_bucket(Bucket=self.bucket)
        except (ClientError, BotoCoreError) as error:
            failure = s3_failure(error, self.url(""), self.bucket)
            raise (StoreUnusable(f"{self.url('')}: no such bucket {self.bucket!r} (check the bucket name in the URL, "
                                 "and AWS_ENDPOINT_URL if it lives on another store)")
                   if isinstance(failure, MissingObject) else failure) from None

    def check_writable(self) -> None:
        """An object can be written under the prefix: one small object written and removed again."""
        try:
            self.probe_client.put_object(Bucket=self.bucket, Key=self._key(self.PROBE), Body=b"")
            self.probe_client.delete_object(Bucket=self.bucket, Key=self._key(self.PROBE))
        except (ClientError, BotoCoreError) as error:
            raise self._failure(error, "", self.probe_client) from None


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


def check_usable(setting: str, url: str, use: Literal["read_file", "read_folder", "write"]) -> None:
    """Before a job: fail in seconds, in one line naming the config setting, the URL and the problem, when a
    file cannot be read, the store behind a folder cannot be reached, or an output cannot be written."""
    try:
        if use == "read_file":
            root, _, name = str(url).rpartition("/")
            open_storage(root or ".").check_readable(name)
        elif use == "read_folder":
            open_storage(url).check_reachable()
        else:
            open_storage(url).check_writable()
    except STORAGE_FAILURES as error:
        raise type(error)(f"{setting}: {error}") from None


def cache_folder() -> Path:
    """Where copies of S3 objects are kept: `BEIT3_CACHE_DIR`, else `beit3` under the user's cache folder."""
    if configured := os.environ.get("BEIT3_CACHE_DIR"):
        return Path(configured)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "beit3"


def _cached_path(url: str, etag: str) -> Path:
    digest = hashlib.sha256(f"{url}\0{etag}".encode()).hexdigest()[:32]
    return cache_folder() / "s3" / f"{digest}-{url.rpartition('/')[2][-100:]}"


def local_copy(url: str) -> str:
    """A local path for a file given as a local path or an s3:// URL, for readers that only open paths
    (SentencePiece, checkpoint loaders). An object is fetched once per version (its entity tag) into a cache
    folder that every process of the machine shares: a tokenizer retrained to the same URL is fetched again, and
    a machine's workers keep one copy between them, not one each. Old versions stay there until removed."""
    if not url.startswith("s3://"):
        return url
    root, _, name = url.rpartition("/")
    storage = open_storage(root)
    cached = _cached_path(url, storage.etag(name))
    if not cached.exists():
        cached.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=cached.parent, prefix=".partial-", delete=False) as handle:
            try:
                etag = storage.download(name, handle)
            except BaseException:
                os.unlink(handle.name)
                raise
        cached = _cached_path(url, etag)  # the version fetched, should the object have been replaced meanwhile
        os.replace(handle.name, cached)
    return str(cached)
