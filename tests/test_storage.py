"""Local and S3 storage behave alike: atomic writes, listing, reads, clear errors (S3 on a loopback endpoint)."""

import os
import subprocess
import sys

import pytest

from beit3.data_pipeline.storage import LocalStorage, S3Storage, StorageError, open_storage
from conftest import REPO


@pytest.fixture(params=["local", "s3"])
def storage(request, tmp_path):
    if request.param == "local":
        return open_storage(tmp_path / "shards")
    return open_storage(f"s3://{request.getfixturevalue('s3_bucket')}/datasets/v1")


def test_write_read_list_exists(storage):
    storage.write_atomic("image/image-000000.tar", b"first")
    storage.write_atomic("image/image-000001.tar", b"second")
    storage.write_atomic("manifest.json", b"{}")
    assert storage.read_bytes("image/image-000001.tar") == b"second"
    assert storage.list("image/") == ["image/image-000000.tar", "image/image-000001.tar"]
    assert storage.list() == ["image/image-000000.tar", "image/image-000001.tar", "manifest.json"]
    assert storage.exists("manifest.json") and not storage.exists("absent.json")
    storage.write_atomic("manifest.json", b'{"v": 2}')
    assert storage.read_bytes("manifest.json") == b'{"v": 2}'


def test_missing_object_is_a_storage_error_naming_it(storage):
    with pytest.raises(StorageError, match="absent.tar"):
        storage.read_bytes("absent.tar")


def test_upload_of_a_local_file(storage, tmp_path):
    source = tmp_path / "big.bin"
    source.write_bytes(bytes(range(256)) * 4096)
    storage.upload_atomic("big.bin", source)
    assert storage.read_bytes("big.bin") == source.read_bytes()


def test_multipart_upload_to_s3(s3_bucket, tmp_path):
    storage = S3Storage(s3_bucket, "parts", part_bytes=5 * 2**20)
    source = tmp_path / "large.bin"
    source.write_bytes(bytes(range(256)) * (12 * 2**12))  # 12 MiB: three parts
    storage.upload_atomic("large.bin", source)
    head = storage.client.head_object(Bucket=s3_bucket, Key="parts/large.bin")
    assert head["ETag"].strip('"').endswith("-3")
    assert storage.read_bytes("large.bin") == source.read_bytes()


def test_failed_local_write_leaves_nothing_visible(tmp_path):
    storage = LocalStorage(tmp_path)

    class Unwritable:
        def __len__(self):
            return 1

    with pytest.raises(TypeError):
        storage.write_atomic("shard.tar", Unwritable())
    assert storage.list() == [] and list(tmp_path.iterdir()) == []


def test_names_cannot_escape_the_root(tmp_path):
    with pytest.raises(StorageError, match="outside"):
        LocalStorage(tmp_path / "root").write_atomic("../escape.txt", b"x")


def test_unsupported_urls_are_refused():
    with pytest.raises(StorageError, match="is not a local path or an s3:// URL"):
        open_storage("gs://bucket/x")
    with pytest.raises(StorageError, match="is not a local path or an s3:// URL"):
        open_storage("pipe:cat /etc/passwd")
    with pytest.raises(StorageError, match="no bucket"):
        open_storage("s3:///x")


def test_ranges_and_sizes(storage):
    storage.write_atomic("corpus.txt", b"0123456789")
    assert storage.size("corpus.txt") == 10
    assert storage.read_range("corpus.txt", 2, 5) == b"234"
    assert storage.read_range("corpus.txt", 8, 20) == b"89"
    assert storage.read_range("corpus.txt", 10, 12) == b"" and storage.read_range("corpus.txt", 4, 4) == b""
    with pytest.raises(StorageError, match="absent.txt"):
        storage.size("absent.txt")


def test_local_copy_fetches_each_version_of_an_s3_object_once_for_every_process(s3_bucket, tmp_path,
                                                                               monkeypatch):
    """One copy per version in the shared cache folder: a second process reuses it, and a replaced object (a
    tokenizer retrained to the same URL) is fetched again rather than served stale."""
    from beit3.data_pipeline.storage import local_copy

    monkeypatch.setenv("BEIT3_CACHE_DIR", str(tmp_path / "cache"))
    url = f"s3://{s3_bucket}/tokenizers/vqkd.pth"
    storage = open_storage(f"s3://{s3_bucket}/tokenizers")
    storage.write_atomic("vqkd.pth", b"weights")
    path = local_copy(url)
    assert open(path, "rb").read() == b"weights" and path == local_copy(url)
    fetched = os.stat(path)
    other_process = subprocess.run([sys.executable, "-c", "import sys; from beit3.data_pipeline.storage import "
                                    "local_copy; print(local_copy(sys.argv[1]))", url],
                                   capture_output=True, text=True, check=True, cwd=REPO)
    assert other_process.stdout.strip() == path and os.stat(path).st_ino == fetched.st_ino  # not fetched again
    storage.write_atomic("vqkd.pth", b"retrained weights")
    retrained = local_copy(url)
    assert retrained != path and open(retrained, "rb").read() == b"retrained weights"
    assert open(path, "rb").read() == b"weights"  # a reader of the old version is not cut short
    assert sorted(p.name.split("-", 1)[1] for p in (tmp_path / "cache" / "s3").iterdir()) == ["vqkd.pth"] * 2
    assert local_copy(str(tmp_path / "x.pth")) == str(tmp_path / "x.pth")


