"""Storage failures on the loopback S3 endpoint reach the user of `beit3 data build`, `beit3 train` and
`beit3 tokenizer train-text` as one line naming the URL and the cause, with exit status 2 and no traceback;
a failed first build does not lock its output; the tokenizer trains from and to S3."""

import gzip
import json
import urllib.request
import uuid

import boto3
import pytest
import ray
import yaml

from beit3.cli import main
from beit3.data_pipeline.config import DataConfig
from beit3.data_pipeline.job import storage_failure
from beit3.data_pipeline.manifest import Manifest, ManifestMismatch, content_digest, load_or_start
from beit3.data_pipeline.processing import prepare_text
from beit3.data_pipeline.sources import plan_shards
from beit3.data_pipeline.storage import MissingObject, StoreUnusable, local_copy, open_storage
from beit3.sample_data import sample_data_config, stdlib_documents, tiny_recipe, write_sample_corpora
from beit3.tokenizers.text_training import train_text_tokenizer
from s3_endpoint import free_port, moto_endpoint, point_boto3_at


@pytest.fixture(scope="module")
def corpora(tmp_path_factory) -> dict:
    """Small raw corpora and a text tokenizer, on local disk, uploaded to a bucket by each test that needs them."""
    root = tmp_path_factory.mktemp("corpora")
    write_sample_corpora(root / "raw", images_per_class=2, pairs=4, text_files=1)
    spm = train_text_tokenizer(sorted((root / "raw" / "text").glob("*.txt")), root / "spm", vocab_size=200,
                               num_threads=1).model_path
    return {"root": root, "spm": spm}


def upload(corpora: dict, bucket: str) -> None:
    client = boto3.client("s3")
    for path in (corpora["root"] / "raw").rglob("*"):
        if path.is_file():
            client.upload_file(str(path), bucket, "raw/" + path.relative_to(corpora["root"] / "raw").as_posix())
    client.upload_file(str(corpora["spm"]), bucket, "tokenizers/spm.model")


def data_config(corpora: dict, bucket: str, tmp_path, **changes) -> str:
    """A data YAML reading the sample corpora from `bucket` and writing to `bucket/shards`."""
    config = sample_data_config(corpora["root"] / "raw", corpora["spm"], f"s3://{bucket}/shards")
    text = yaml.safe_dump(config).replace(str(corpora["root"] / "raw"), f"s3://{bucket}/raw")
    config = {**yaml.safe_load(text.replace(str(corpora["spm"]), f"s3://{bucket}/tokenizers/spm.model")), **changes}
    path = tmp_path / f"data-{uuid.uuid4().hex[:6]}.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def train_config(bucket: str, tmp_path, dataset: str | None = None, tokenizer: str | None = None) -> str:
    data = {"shards": dataset or f"s3://{bucket}/shards", "spm": tokenizer or f"s3://{bucket}/tokenizers/spm.model"}
    path = tmp_path / f"recipe-{uuid.uuid4().hex[:6]}.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe(tmp_path / "run", data)))
    return str(path)


def one_line_failure(capsys, argv: list[str]) -> str:
    """Run the command; it must exit with 2 and print exactly one line, no traceback. Returns the line."""
    status = main(argv)
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert status == 2, captured.err
    assert len(lines) == 1 and "Traceback" not in captured.err + captured.out, captured.err
    return lines[0]


@pytest.fixture
def stocked_bucket(s3_bucket, corpora) -> str:
    upload(corpora, s3_bucket)
    return s3_bucket


# --- beit3 data build ---------------------------------------------------------------------------------------

def test_build_missing_output_bucket(capsys, stocked_bucket, corpora, tmp_path):
    config = data_config(corpora, stocked_bucket, tmp_path, output="s3://no-such-output-bucket/shards")
    line = one_line_failure(capsys, ["data", "build", "--quiet", "--config", config])
    assert line.startswith("beit3 data: output: s3://no-such-output-bucket/shards: no such bucket"), line


def test_build_missing_input_bucket(capsys, stocked_bucket, corpora, tmp_path):
    sources = [{"kind": "text", "name": "wiki", "paths": ["s3://no-such-input-bucket/text"]}]
    config = data_config(corpora, stocked_bucket, tmp_path, sources=sources)
    line = one_line_failure(capsys, ["data", "build", "--quiet", "--config", config])
    assert "sources[0].paths: s3://no-such-input-bucket/text: no such bucket" in line, line


@pytest.mark.parametrize("setting", ["text_tokenizer", "visual_tokenizer.checkpoint"])
def test_build_missing_tokenizer_key(capsys, stocked_bucket, corpora, tmp_path, setting):
    missing = f"s3://{stocked_bucket}/tokenizers/absent.pth"
    change = ({"text_tokenizer": missing} if setting == "text_tokenizer" else
              {"visual_tokenizer": {"kind": "vqkd", "checkpoint": missing}})
    config = data_config(corpora, stocked_bucket, tmp_path, **change)
    line = one_line_failure(capsys, ["data", "build", "--quiet", "--config", config])
    assert line == f"beit3 data: {setting}: {missing}: no such key"
    assert not open_storage(f"s3://{stocked_bucket}/shards").list()  # failed before any work


def test_build_unreachable_endpoint(capsys, stocked_bucket, corpora, tmp_path, monkeypatch):
    config = data_config(corpora, stocked_bucket, tmp_path, output=f"s3://{stocked_bucket}/elsewhere")
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    line = one_line_failure(capsys, ["data", "build", "--quiet", "--config", config])
    assert f"output: s3://{stocked_bucket}/elsewhere: endpoint unreachable" in line and "AWS_ENDPOINT_URL" in line


@pytest.fixture(scope="module")
def guarded_endpoint():
    """A second loopback S3 endpoint that checks credentials: the test keys are unknown to it, so every request
    is refused as a real store refuses bad keys."""
    with moto_endpoint() as url:
        request = urllib.request.Request(f"{url}/moto-api/reset-auth", data=b"0", method="POST",
                                         headers={"Content-Type": "text/plain"})
        urllib.request.urlopen(request, timeout=10).read()
        yield url


def test_build_access_denied(capsys, corpora, tmp_path, monkeypatch, guarded_endpoint):
    point_boto3_at(monkeypatch, guarded_endpoint)
    config = data_config(corpora, "guarded-bucket", tmp_path)
    line = one_line_failure(capsys, ["data", "build", "--quiet", "--config", config])
    assert "output: s3://guarded-bucket/shards: credentials rejected by the store (InvalidAccessKeyId" in line, line


def test_a_store_that_fails_mid_job_stops_the_shard_instead_of_skipping_its_input(
        stocked_bucket, corpora, tmp_path, monkeypatch, guarded_endpoint):
    """The inputs' store refuses every request once the shards are planned (as one does after an outage outlasts
    the storage layer's retries): preparing a text shard raises the one-line storage error, which fails the job,
    rather than counting the file as skipped and storing a shard without it."""
    sources = [{"kind": "text", "name": "stdlib", "paths": [f"s3://{stocked_bucket}/raw/text"]}]
    config = DataConfig.model_validate(yaml.safe_load(open(data_config(corpora, stocked_bucket, tmp_path,
                                                                      sources=sources, visual_tokenizer=None))))
    plan = next(plan for plan in plan_shards(config) if plan.kind == "text")
    # The tokenizer from its local copy, so that the first request to the bad store is for the input itself.
    config = config.model_copy(update={"text_tokenizer": local_copy(config.text_tokenizer)})
    point_boto3_at(monkeypatch, guarded_endpoint)
    open_storage.cache_clear()
    try:
        with pytest.raises(StoreUnusable, match=rf"s3://{stocked_bucket}/raw/text/.*: credentials rejected"):
            prepare_text(plan, config)
    finally:
        open_storage.cache_clear()


# --- beit3 train --------------------------------------------------------------------------------------------

def test_train_missing_dataset_bucket(capsys, stocked_bucket, tmp_path):
    config = train_config(stocked_bucket, tmp_path, dataset="s3://no-such-dataset-bucket/shards")
    line = one_line_failure(capsys, ["train", "--config", config])
    assert line.startswith("beit3 train: data.datasets: s3://no-such-dataset-bucket/shards: no such bucket"), line


def test_train_missing_tokenizer_key(capsys, stocked_bucket, tmp_path):
    config = train_config(stocked_bucket, tmp_path, tokenizer=f"s3://{stocked_bucket}/tokenizers/absent.model")
    line = one_line_failure(capsys, ["train", "--config", config])
    assert line == f"beit3 train: data.text_tokenizer: s3://{stocked_bucket}/tokenizers/absent.model: no such key"


def test_train_unreachable_endpoint(capsys, stocked_bucket, tmp_path, monkeypatch):
    config = train_config(stocked_bucket, tmp_path, dataset=f"s3://{stocked_bucket}/other-shards")
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    line = one_line_failure(capsys, ["train", "--config", config])
    assert f"data.datasets: s3://{stocked_bucket}/other-shards: endpoint unreachable" in line, line


def test_train_access_denied(capsys, tmp_path, monkeypatch, guarded_endpoint):
    point_boto3_at(monkeypatch, guarded_endpoint)
    config = train_config("guarded-train-bucket", tmp_path)
    line = one_line_failure(capsys, ["train", "--config", config])
    assert "data.datasets: s3://guarded-train-bucket/shards: access denied" in line, line


# --- errors raised inside Ray -------------------------------------------------------------------------------

@ray.remote
def _read_missing(url: str) -> bytes:
    root, _, name = url.rpartition("/")
    return open_storage(root).read_bytes(name)


@ray.remote
class _Holder:
    def __init__(self, url: str):
        root, _, name = url.rpartition("/")
        open_storage(root).read_bytes(name)

    def ping(self) -> bool:
        return True


@pytest.mark.slow
def test_storage_errors_inside_ray_tasks_and_actors_come_back_as_one_line(stocked_bucket, s3_endpoint_url):
    from s3_endpoint import CREDENTIALS

    url = f"s3://{stocked_bucket}/tokenizers/absent.pth"
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"AWS_ENDPOINT_URL": s3_endpoint_url, **CREDENTIALS}})
    try:
        for run in (lambda: ray.get(_read_missing.remote(url)), lambda: ray.get(_Holder.remote(url).ping.remote())):
            with pytest.raises(Exception) as raised:
                run()
            found = storage_failure(raised.value)
            assert isinstance(found, MissingObject) and str(found) == f"{url}: no such key", raised.value
    finally:
        ray.shutdown()


# --- a failed first build does not lock its output ----------------------------------------------------------

def test_a_manifest_without_shards_does_not_block_a_corrected_config(stocked_bucket, corpora, tmp_path):
    storage = open_storage(f"s3://{stocked_bucket}/shards")
    wrong = DataConfig.model_validate(yaml.safe_load(open(data_config(corpora, stocked_bucket, tmp_path,
                                                                      text_len=16))))
    Manifest(wrong.name, content_digest(wrong), {}).save(storage)  # what a build that failed before any shard left
    corrected = DataConfig.model_validate(yaml.safe_load(open(data_config(corpora, stocked_bucket, tmp_path))))
    assert load_or_start(storage, corrected).config_digest == content_digest(corrected)

    finished = Manifest(wrong.name, content_digest(wrong), {})
    finished.add([{"name": "text-000000.tar", "shard": "text-000000", "samples": 3, "written": {}, "skipped": {},
                   "repaired": {}}])
    finished.save(storage)
    with pytest.raises(ManifestMismatch, match=rf"set `output` to a new location \(e.g. s3://{stocked_bucket}/"
                                               r"shards-2\); the shards there are kept"):
        load_or_start(storage, corrected)


@pytest.mark.slow
def test_a_failed_first_build_reruns_with_a_corrected_config(capsys, stocked_bucket, corpora, tmp_path):
    """The first build's text tokenizer is not a SentencePiece model: it fails inside Ray, after the checks,
    before any shard. The corrected config then builds into the same output."""
    boto3.client("s3").put_object(Bucket=stocked_bucket, Key="tokenizers/broken.model", Body=b"not a model")
    sources = [{"kind": "text", "name": "stdlib", "paths": [f"s3://{stocked_bucket}/raw/text"]}]
    broken = data_config(corpora, stocked_bucket, tmp_path, sources=sources, visual_tokenizer=None,
                         text_tokenizer=f"s3://{stocked_bucket}/tokenizers/broken.model")
    try:
        status = main(["data", "build", "--quiet", "--config", broken])
    except Exception:  # whatever SentencePiece raised inside Ray: not a storage failure
        status = None
    assert status != 0
    manifest = json.loads(open_storage(f"s3://{stocked_bucket}/shards").read_bytes("manifest.json"))
    assert manifest["shards"] == []
    capsys.readouterr()
    corrected = data_config(corpora, stocked_bucket, tmp_path, sources=sources, visual_tokenizer=None)
    assert main(["data", "build", "--quiet", "--config", corrected]) == 0, capsys.readouterr().err
    manifest = json.loads(open_storage(f"s3://{stocked_bucket}/shards").read_bytes("manifest.json"))
    assert sum(entry["samples"] for entry in manifest["shards"]) > 0


# --- the text tokenizer from and to S3 ----------------------------------------------------------------------

def test_text_tokenizer_trains_from_s3_and_writes_to_s3(capsys, s3_bucket):
    client = boto3.client("s3")
    documents = stdlib_documents()
    client.put_object(Bucket=s3_bucket, Key="corpus/a.txt", Body="\n".join(documents[::2]).encode())
    lines = "\n".join(json.dumps({"text": text}) for text in documents[1::2])
    client.put_object(Bucket=s3_bucket, Key="corpus/b.jsonl.gz", Body=gzip.compress(lines.encode()))
    argv = ["tokenizer", "train-text", "--input", f"s3://{s3_bucket}/corpus/a.txt",
            f"s3://{s3_bucket}/corpus/b.jsonl.gz", "--output", f"s3://{s3_bucket}/tokenizers/beit3",
            "--vocab-size", "300"]
    assert main(argv) == 0
    assert f"wrote s3://{s3_bucket}/tokenizers/beit3.model: 300 pieces" in capsys.readouterr().out
    stored = open_storage(f"s3://{s3_bucket}/tokenizers").list()
    assert stored == ["beit3.model", "beit3.vocab"]

    argv[3] = f"s3://{s3_bucket}/corpus/absent.txt"
    line = one_line_failure(capsys, argv)
    assert line == f"beit3 tokenizer: --input: s3://{s3_bucket}/corpus/absent.txt: no such key"


def test_store_unusable_survives_pickling_as_ray_sends_it():
    import pickle

    error = pickle.loads(pickle.dumps(StoreUnusable("s3://b/x: no such bucket 'b'")))
    assert isinstance(error, StoreUnusable) and str(error) == "s3://b/x: no such bucket 'b'"
