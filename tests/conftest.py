"""Shared fixtures: repository paths and small model configs."""

import gc
import json
import os
import uuid
from pathlib import Path

import boto3
import pytest
from filelock import FileLock

from beit3.cli import freeze_imports
from beit3.config import load_config
from beit3.pretrain.model_config import ModelConfig
from s3_endpoint import moto_endpoint, point_boto3_at

REPO = Path(__file__).resolve().parent.parent
MODEL_CONFIGS = REPO / "configs" / "model"
SLOW_FIXTURES = {"training_data", "mlflow_url", "hostile_build", "untrusted_build", "ray_instance",
                 "ray_through_forwarder", "fuzz_report", "bomb_peaks"}
"""Fixtures that build data on Ray, start a server or measure in a fresh process: a test using one is end to end,
so it is marked slow (`make test-fast` leaves it out), wherever it lives."""
SLOW_TESTS = {
    # a `beit3` process each, whose imports alone take seconds
    "test_alias_bombs_are_refused_by_the_command_line_in_one_line_without_expanding",
    "test_a_bad_recipe_fails_before_the_process_group_forms",
    "test_model_info_command_prints_the_breakdown",
    "test_model_info_rejects_a_bad_config_with_the_field_named",
    "test_tokenizer_info_command_over_a_folder",
    "test_train_text_command",
    "test_impossible_vocabulary_is_a_clear_error",
    # a fresh process measuring its memory
    "test_an_npy_claiming_5_6_gib_is_refused_from_its_header_with_memory_bounded",
    "test_tiny_recipe_estimate_matches_the_measured_peak_of_a_training_step",
    # 2 ranks under torch.distributed
    "test_works_inside_torch_distributed_without_lockstep",
}
"""End-to-end tests in modules that are otherwise quick, marked slow by name."""


LONGEST_FILES = ["test_train.py", "test_compilation.py", "test_gpu_check.py", "test_pipeline_memory.py",
                 "test_ray_cluster.py", "test_launch.py", "test_s3_walkthrough.py", "test_data_pipeline.py",
                 "test_data_pipeline_resume.py", "test_evaluation.py", "test_demo.py"]
"""The test files that take a minute or more on 2 cores (`--durations`), longest first. `make test` runs the
files on two pytest-xdist workers in collection order, a file at a time: started first, none of them is left
running alone at the end while the other worker idles."""


def pytest_collection_modifyitems(items):
    for item in items:
        if SLOW_FIXTURES.intersection(item.fixturenames) or getattr(item, "originalname", None) in SLOW_TESTS:
            item.add_marker(pytest.mark.slow)

    with_slow_tests = {item.path.name for item in items if item.get_closest_marker("slow")}

    def file_order(item) -> tuple[int, bool]:
        name = item.path.name
        return (LONGEST_FILES.index(name) if name in LONGEST_FILES else len(LONGEST_FILES),
                name not in with_slow_tests)

    items.sort(key=file_order)  # stable: each file's own tests keep their order


def pytest_collection_finish(session):
    """Once the test modules are imported, most of the heap is torch, DeepSpeed, Ray and MLflow, which live as
    long as the session; each full pass of the collector walked them all again (seconds a pass on 2 cores, a
    sixth of `make test-fast`), so they are frozen as `beit3 train` freezes its own."""
    freeze_imports()


def pytest_unconfigure(config):
    """The interpreter's exit then finds the heap as it would have without the freeze: a whole-suite run left
    frozen to the end was killed by SIGSEGV at exit, after every test had passed."""
    gc.unfreeze()


def model_config(name: str, **overrides) -> ModelConfig:
    """A config from configs/model/, with fields overridden for a test."""
    loaded = load_config(ModelConfig, MODEL_CONFIGS / f"{name}.yaml")
    return loaded.model_copy(update=overrides) if overrides else loaded


@pytest.fixture(scope="session", autouse=True)
def cache_folder(tmp_path_factory) -> Path:
    """Copies of S3 objects go to a folder of the session's, not the user's cache (processes the tests start
    inherit it)."""
    folder = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("BEIT3_CACHE_DIR", str(folder))
        yield folder


@pytest.fixture
def small_decoupled() -> ModelConfig:
    """The released (decoupled) layout at a size that runs in milliseconds."""
    return model_config("base", layers=3, hidden=64, ffn_hidden=128, heads=4, image_size=64, drop_path=0.0)


@pytest.fixture(scope="session")
def s3_endpoint_url():
    with moto_endpoint() as url:
        yield url


@pytest.fixture
def s3_bucket(monkeypatch, s3_endpoint_url) -> str:
    """A fresh bucket on the loopback S3 endpoint, with boto3 pointed at it through the AWS environment."""
    point_boto3_at(monkeypatch, s3_endpoint_url)
    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3").create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def training_data(tmp_path_factory) -> dict:
    """Sample shards made by the real pipeline, with codes that fit the tiny model: built once per session,
    and under pytest-xdist once for all its workers (the first to need them builds them; the others wait)."""
    from beit3.sample_data import build_sample_dataset

    if "PYTEST_XDIST_WORKER" not in os.environ:
        return build_sample_dataset(tmp_path_factory.mktemp("training-data"))
    shared = tmp_path_factory.getbasetemp().parent  # the session's folder, above each worker's own
    with FileLock(shared / "training-data.lock"):
        built = shared / "training-data.json"
        if not built.exists():
            data = build_sample_dataset(shared / "training-data")
            built.write_text(json.dumps({name: str(path) for name, path in data.items()}))
        return {name: Path(path) for name, path in json.loads(built.read_text()).items()}


@pytest.fixture(scope="session")
def mlflow_url(tmp_path_factory) -> str:
    from training_fixtures import mlflow_server

    with mlflow_server(tmp_path_factory.mktemp("mlflow-server")) as url:
        yield url
