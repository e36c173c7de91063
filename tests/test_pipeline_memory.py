"""Text builds at scale: a compressed corpus file is read as a stream and written part by part, so the memory of the
process building it does not grow with the file; the parts are those an in-memory build cuts; a shard whose
workers keep dying fails the build in one line instead of being retried without end."""

import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import ray
import webdataset
import zstandard

import beit3.data_pipeline.processing as processing
from beit3.config import validate_config
from beit3.data_pipeline.config import DataConfig
from beit3.data_pipeline.job import ShardWorkerDied, build, summary_table
from beit3.data_pipeline.processing import ShardWork, finish_shard, prepare_text, read_documents
from beit3.data_pipeline.sources import ShardPlan, TextFile, plan_shards
from beit3.data_pipeline.storage import open_storage
from beit3.tokenizers.text_training import train_text_tokenizer

from memory_probe import PEAK_SOURCE

WORD_COUNT, WORD_LETTERS = 2000, 8
"""A vocabulary of random 8-letter words, each one SentencePiece piece: text that compresses about 5x (like
prose) and tokenizes fast (one piece per 9 bytes), so 200 MB builds in seconds."""


def words() -> list[bytes]:
    rng = np.random.default_rng(0)
    letters = rng.integers(ord("a"), ord("z") + 1, size=(WORD_COUNT, WORD_LETTERS), dtype=np.uint8)
    return [row.tobytes() for row in letters]


def write_corpus(path: Path, megabytes: int, seed: int = 1) -> None:
    """A .txt.zst of lines of 40 random words, about `megabytes` decompressed, written a frame per 8 MB."""
    rng, vocabulary = np.random.default_rng(seed), words()
    compressor = zstandard.ZstdCompressor(level=1)
    line_bytes = 40 * (WORD_LETTERS + 1)
    with path.open("wb") as handle:
        for _ in range(max(1, megabytes * 2**20 // (8 * 2**20))):
            lines = rng.integers(0, WORD_COUNT, size=(min(megabytes * 2**20, 8 * 2**20) // line_bytes, 40))
            text = b"\n".join(b" ".join(vocabulary[i] for i in line) for line in lines.tolist())
            handle.write(compressor.compress(text + b"\n"))


@pytest.fixture(scope="module")
def spm(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("spm")
    corpus = root / "words.txt"
    corpus.write_bytes(b"\n".join(b" ".join(words()[i : i + 40]) for i in range(0, WORD_COUNT, 40)) * 4)
    return train_text_tokenizer([corpus], root / "spm", vocab_size=WORD_COUNT + 200, num_threads=1,
                                model_type="bpe").model_path


def text_config(corpus: Path, output: Path, spm: Path, **overrides) -> DataConfig:
    raw = {"name": "scale", "output": str(output), "visual_tokenizer": None, "text_tokenizer": str(spm),
           "sources": [{"kind": "text", "name": "corpus", "paths": [str(corpus)]}], "shard_bytes": 4 * 2**20,
           **overrides}
    return validate_config(DataConfig, raw, "memory test")


MEASURE = PEAK_SOURCE + """
import json, sys
from beit3.config import validate_config
from beit3.data_pipeline.config import DataConfig
from beit3.data_pipeline.processing import load_text_tokenizer, prepare_text
from beit3.data_pipeline.sources import plan_shards
from beit3.data_pipeline.storage import open_storage

config = validate_config(DataConfig, json.loads(sys.argv[1]), "memory test")
(plan,) = plan_shards(config)
load_text_tokenizer(config.text_tokenizer)  # loaded once per worker, before its first shard
reset_peak()
start = peak_kib()
work = prepare_text(plan, config, open_storage(config.output))
print(json.dumps({"peak_above_start": (peak_kib() - start) * 1024, "parts": len(work.parts),
                  "segments": sum(entry["samples"] for _, entry in work.parts)}))
"""


def build_peak(config: DataConfig) -> dict:
    """The prepare stage of the config's one text shard, run by a fresh process as a worker runs it: its peak
    resident bytes above where it started (VmHWM), and the parts it stored."""
    result = subprocess.run([sys.executable, "-c", MEASURE, config.model_dump_json()], capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.splitlines()[-1])


@pytest.mark.slow  # 200 MB of text tokenized: about half a minute on two cores
def test_the_peak_memory_of_a_compressed_text_build_does_not_grow_with_the_file(spm, tmp_path):
    peaks = {}
    for megabytes in (20, 200):
        corpus = tmp_path / f"corpus-{megabytes}.txt.zst"
        write_corpus(corpus, megabytes)
        config = text_config(corpus, tmp_path / f"out-{megabytes}", spm)
        peaks[megabytes] = build_peak(config)
        corpus.unlink()
    small, large = peaks[20], peaks[200]
    print({size: f"{peak['peak_above_start'] / 2**20:.0f} MiB, {peak['parts']} parts" for size, peak in peaks.items()})
    assert large["segments"] > 9 * small["segments"] and large["parts"] > 9 * small["parts"] > 9
    assert large["peak_above_start"] < small["peak_above_start"] + 24 * 2**20, peaks


@pytest.mark.slow  # 16 MB of text tokenized twice: about 20 s on two shared cores
def test_a_text_worker_never_holds_a_parts_entries_and_its_tar_together(spm, tmp_path):
    """Parts are spooled to local disk as their entries come and stored from there in blocks: a part of 26 MB
    costs a worker no more than parts of 1 MiB do, neither its entries, nor its tar, nor its bytes."""
    corpus = tmp_path / "corpus.txt.zst"
    write_corpus(corpus, 16)
    small, large = (build_peak(text_config(corpus, tmp_path / f"out-{size}", spm, shard_bytes=size))
                    for size in (2**20, 64 * 2**20))
    part_bytes = (tmp_path / "out-67108864" / "text-000000.tar").stat().st_size
    print({"1 MiB parts": small, "64 MiB parts": large, "part bytes": part_bytes})
    assert small["parts"] > 10 and large["parts"] == 1 and large["segments"] == small["segments"]
    assert part_bytes > 16 * 2**20
    assert large["peak_above_start"] < small["peak_above_start"] + 8 * 2**20, (small, large)


def test_streamed_parts_are_the_parts_of_an_in_memory_build(spm, tmp_path):
    """Stored while reading, or cut by finish_shard from every entry at once: the same files, byte for byte, and
    the same manifest entries; held-out documents go to their own parts either way."""
    corpus = tmp_path / "corpus.txt.zst"
    write_corpus(corpus, 2)
    config = text_config(corpus, tmp_path / "out", spm, shard_bytes=2**17,
                         sources=[{"kind": "text", "name": "corpus", "paths": [str(corpus)],
                                   "validation": {"fraction": 0.2}}])
    (plan,) = plan_shards(config)
    in_memory = finish_shard(prepare_text(plan, config), config)
    storage = open_storage(config.output)
    streamed = finish_shard(prepare_text(plan, config, storage), config)
    assert [entry for _, entry in streamed] == [entry for _, entry in in_memory]
    assert len(in_memory) > 4 and any(entry["name"].startswith("val-text-") for _, entry in in_memory)
    for data, entry in in_memory:
        assert storage.read_bytes(entry["name"]) == data, entry["name"]


def test_compressed_streams_read_across_chunk_boundaries(tmp_path, monkeypatch):
    """Reads of a few bytes at a time give the documents of one whole read: gzip members and zstd frames split
    anywhere, zero padding after the last gzip member, and a cut in the last member still counted."""
    import gzip

    documents = [f"document number {n} with some words" for n in range(3000)]
    text = ("\n".join(documents) + "\n").encode()
    half = len(text) // 2
    files = {"a.txt.gz": gzip.compress(text[:half]) + gzip.compress(text[half:]) + bytes(1000),
             "b.txt.zst": zstandard.ZstdCompressor().compress(text[:half])
             + zstandard.ZstdCompressor().compress(text[half:]),
             "c.txt.gz": gzip.compress(text)[:-10]}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)

    def read(name):
        work = ShardWork(ShardPlan("text", 0, ()))
        return read_documents(TextFile("corpus", str(tmp_path), name, 0), "text", "line", work), dict(work.skipped)

    whole = {name: read(name) for name in files}
    monkeypatch.setattr(processing, "READ_BYTES", 997)
    for name in files:
        assert read(name) == whole[name], name
    assert whole["a.txt.gz"] == (documents, {}) and whole["b.txt.zst"] == (documents, {})
    assert whole["c.txt.gz"][1] == {("corpus", "truncated_compressed_file"): 1}


def test_a_compressed_file_past_the_expansion_ratio_is_skipped_whole(spm, tmp_path):
    corpus = tmp_path / "repeated.txt.zst"
    corpus.write_bytes(zstandard.ZstdCompressor().compress(b"the same line again\n" * 100_000))
    work = ShardWork(ShardPlan("text", 0, ()))
    assert read_documents(TextFile("corpus", str(tmp_path), corpus.name, 0), "text", "line", work) == []
    assert work.skipped == {("corpus", "decompressed_too_large"): 1}
    work = ShardWork(ShardPlan("text", 0, ()))
    kept = read_documents(TextFile("corpus", str(tmp_path), corpus.name, 0), "text", "line", work,
                          max_compression_ratio=1e6)
    assert len(kept) == 100_000 and not work.skipped


MAP_TASK_TITLE = "ray::Map("


def kill_map_workers_once_writing(first_part: Path, stop) -> int:
    """SIGKILL the Ray worker of this driver running a map task each time it has stored a fresh `first_part`
    (well into its work, where a worker running out of memory dies), until `stop()`; how many were killed."""
    killed, written = 0, None
    while not stop():
        try:
            stored = first_part.stat().st_ino
        except FileNotFoundError:
            stored = None
        if stored is not None and stored != written:
            for process in psutil.Process(os.getpid()).children(recursive=True):
                try:
                    if " ".join(process.cmdline()).startswith(MAP_TASK_TITLE):
                        process.kill()
                        killed, written = killed + 1, stored
                except psutil.Error:
                    continue
        time.sleep(0.02)
    return killed


@pytest.mark.slow  # a Ray build whose workers are killed
def test_a_shard_whose_workers_keep_dying_fails_the_build_in_one_line(spm, tmp_path):
    import threading

    corpus = tmp_path / "corpus.txt.zst"
    write_corpus(corpus, 24)
    config = text_config(corpus, tmp_path / "out", spm, ray={"max_task_retries": 1})
    finished, kills = threading.Event(), []
    killer = threading.Thread(target=lambda: kills.append(
        kill_map_workers_once_writing(tmp_path / "out" / "text-000000.tar", finished.is_set)), daemon=True)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        killer.start()
        with pytest.raises(ShardWorkerDied) as failure:
            build(config, progress=False)
    finally:
        finished.set()
        killer.join(30)
        ray.shutdown()
    message = str(failure.value)
    assert "\n" not in message and kills[0] >= 2
    assert message.startswith(f"prepare of text-000000.tar from {corpus}: its worker died"), message
    assert "2 attempts" in message and "ray.max_task_retries 1" in message and "lower shard_bytes" in message


@pytest.mark.slow  # a Ray build
def test_a_build_reports_each_stage_peak_memory_and_its_text_parts(spm, tmp_path):
    corpus = tmp_path / "corpus.txt.zst"
    write_corpus(corpus, 8)
    config = text_config(corpus, tmp_path / "out", spm, shard_bytes=2**20)
    result = build(config, progress=False)
    assert set(result.peak_memory) == {"prepare", "write"} and result.peak_memory["prepare"] > 50 * 2**20
    assert "peak memory of a worker on one shard: prepare" in summary_table(result)
    names = sorted(entry["name"] for entry in result.manifest.shards.values())
    assert {"text-000000.tar", "text-000000-001.tar"} <= set(names) and len(names) > 3
    segments = sum(len(np.load(io.BytesIO(sample["ids.npy"]))) for name in names
                   for sample in webdataset.WebDataset(str(tmp_path / "out" / name), shardshuffle=False))
    assert segments == result.manifest.totals()["corpus"]["written"]
