"""How the data build's cost and memory grow with the input: `beit3 data build` at three input sizes per kind.

Kinds and sizes: text (line-per-document .txt of 10 MB, 100 MB and 1 GB, and a .jsonl.zst of 1 GB uncompressed),
class-folder images (200, 2,000 and 20,000 JPEGs of 160x120), and image-text pairs (200, 2,000 and 20,000
500x375 JPEGs with captions in downloader-layout tars of 10,000 pairs each). The inputs are generated once and
kept under `--work`. Each build runs the real command in a fresh process with the visual tokenizer stage off and
every other setting at its default; the build's process tree (the command, Ray's services and its workers) is
sampled every 0.5 s for resident memory.

Reported per build: wall time of the command (Ray start-up included), the cost per sample (per token for text)
with and without the command's fixed cost (a build of one sample of the same kind), the largest peak of a worker
on one shard per stage (the build's own summary, VmHWM), the largest worker process seen (VmHWM, with its private
anonymous memory beside), the command's own process, and the whole tree's peak (sum of RSS; sum of PSS, which
counts shared pages once). Input sizes are as stored (compressed for .zst); text costs are per token written.

    python benchmarks/pipeline_scale.py [--quick] [--kinds text images pairs] [--work DIR]
"""

import argparse
import io
import json
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import psutil
import yaml
import zstandard
from PIL import Image

from beit3.tokenizers.text import BOS, EOS, PAD
from beit3.tokenizers.text_training import train_text_tokenizer
from synthetic_inputs import synthetic_jpegs

REPOSITORY = Path(__file__).resolve().parent.parent
MB = 10**6
MIB = 2**20
WORD_COUNT, WORD_LETTERS, WORDS_PER_LINE = 2000, 8, 40
"""Text is lines of 40 random 8-letter words from a vocabulary of 2,000: it compresses about 4x with zstd, like
prose, and a SentencePiece model trained on the vocabulary tokenizes it in about 4 pieces a word."""
PAIRS_PER_TAR = 10_000
"""Pairs per input tar, as image downloaders write them."""
SAMPLE_INTERVAL = 0.5
"""Seconds between samples of the build's process tree."""
WORKER_LIMIT, JOB_LIMIT = 2**30, 4 * 2**30
"""The goals: a worker at most 1 GiB, the whole job at most 4 GiB, at default settings."""
COST_TOLERANCE = 0.2
"""The goal: the cost per sample from the middle size up stays within 20%."""


@dataclass(frozen=True)
class Case:
    kind: str
    series: str
    size: int
    """MB of text, or images, or pairs."""

    @property
    def name(self) -> str:
        unit = "MB" if self.kind == "text" else ""
        return f"{self.series}-{self.size}{unit}"


def cases(kinds: list[str], quick: bool) -> list[Case]:
    chosen = []
    if "text" in kinds:
        chosen += [Case("text", "txt", size) for size in (10, 100, 1000)] + [Case("text", "jsonl.zst", 1000)]
    if "images" in kinds:
        chosen += [Case("images", "class-folder", size) for size in (200, 2000, 20_000)]
    if "pairs" in kinds:
        chosen += [Case("pairs", "pair-tar", size) for size in (200, 2000, 20_000)]
    if quick:
        smallest = {kind: sorted({c.size for c in chosen if c.kind == kind})[:2] for kind in kinds}
        chosen = [c for c in chosen if c.size in smallest[c.kind] and c.series != "jsonl.zst"]
    return chosen


# --- inputs, made once and kept under the work folder ---------------------------------------------------------


def vocabulary() -> np.ndarray:
    """[WORD_COUNT, WORD_LETTERS + 1] bytes: each word followed by a space."""
    rng = np.random.default_rng(0)
    words = np.full((WORD_COUNT, WORD_LETTERS + 1), ord(" "), dtype=np.uint8)
    words[:, :WORD_LETTERS] = rng.integers(ord("a"), ord("z") + 1, size=(WORD_COUNT, WORD_LETTERS))
    return words


def text_lines(count: int, rng: np.random.Generator, words: np.ndarray) -> np.ndarray:
    """[count, line bytes]: lines of random words, the last space of each line left out (the caller ends it)."""
    picked = words[rng.integers(0, WORD_COUNT, size=(count, WORDS_PER_LINE))]
    return picked.reshape(count, -1)[:, :-1]


def write_text(path: Path, megabytes: int, jsonl: bool) -> None:
    """`megabytes` of line-per-document text (or JSON lines of it), written 64 MB at a time; .zst compresses it
    in frames as written."""
    rng, words = np.random.default_rng(1), vocabulary()
    prefix, suffix = (b'{"text": "', b'"}\n') if jsonl else (b"", b"\n")
    line_bytes = len(prefix) + WORDS_PER_LINE * (WORD_LETTERS + 1) - 1 + len(suffix)
    lines_left = megabytes * MB // line_bytes
    compressor = zstandard.ZstdCompressor(level=3) if path.suffix == ".zst" else None
    with path.open("wb") as handle:
        while lines_left:
            count = min(lines_left, 64 * MB // line_bytes)
            body = text_lines(count, rng, words)
            rows = np.empty((count, line_bytes), dtype=np.uint8)
            rows[:, : len(prefix)] = np.frombuffer(prefix, dtype=np.uint8)
            rows[:, len(prefix) : line_bytes - len(suffix)] = body
            rows[:, line_bytes - len(suffix) :] = np.frombuffer(suffix, dtype=np.uint8)
            data = rows.tobytes()
            handle.write(compressor.compress(data) if compressor else data)
            lines_left -= count


def small_jpegs(count: int) -> list[bytes]:
    """`count` distinct 160x120 JPEGs: colour waves with noise."""
    rng = np.random.default_rng(2)
    x, y = np.meshgrid(np.linspace(0, 1, 160), np.linspace(0, 1, 120))
    encoded = []
    for _ in range(count):
        pixels = np.stack([np.sin(x * 7 + y * 3 + p) for p in rng.random(3) * 6], axis=-1) * 100 + 128
        pixels += rng.normal(0, 12, pixels.shape)
        buffer = io.BytesIO()
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buffer, format="JPEG", quality=90)
        encoded.append(buffer.getvalue())
    return encoded


def write_images(folder: Path, count: int) -> None:
    """`count` class-folder JPEGs over 10 classes, from a pool of 500 distinct ones."""
    pool = small_jpegs(min(count, 500))
    for index in range(count):
        path = folder / f"n{index % 10:08d}" / f"{index:06d}.JPEG"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(pool[index % len(pool)])


def tar_member(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime = len(data), 0
    archive.addfile(info, io.BytesIO(data))


def write_pairs(folder: Path, count: int) -> None:
    """`count` pairs in the downloader layout (`{key}.jpg`, `.txt`, `.json`), PAIRS_PER_TAR to a tar; the images
    come from a pool of 256 distinct 500x375 JPEGs (about 70 KB each)."""
    pool, rng, words = synthetic_jpegs(min(count, 256)), np.random.default_rng(3), vocabulary()
    folder.mkdir(parents=True)
    for first in range(0, count, PAIRS_PER_TAR):
        with tarfile.open(folder / f"{first // PAIRS_PER_TAR:05d}.tar", "w", format=tarfile.USTAR_FORMAT) as archive:
            for index in range(first, min(first + PAIRS_PER_TAR, count)):
                key = f"{index:09d}"
                caption = text_lines(1, rng, words)[0, : 12 * (WORD_LETTERS + 1) - 1].tobytes()
                tar_member(archive, f"{key}.jpg", pool[index % len(pool)])
                tar_member(archive, f"{key}.txt", caption)
                tar_member(archive, f"{key}.json", json.dumps({"key": key, "caption": caption.decode()}).encode())


def text_tokenizer(work: Path) -> Path:
    """A SentencePiece model trained once on the vocabulary (as the pipeline's memory test does)."""
    model = work / "spm.model"
    if not model.exists():
        corpus = work / "spm-corpus.txt"
        corpus.write_bytes(b"\n".join(bytes(row) for row in text_lines(2000, np.random.default_rng(4), vocabulary())))
        train_text_tokenizer([corpus], work / "spm", vocab_size=WORD_COUNT + 200, num_threads=1, model_type="bpe")
    return model


def source_for(kind: str, folder: Path, text_file: str) -> dict:
    """The config of a source of the kind whose inputs lie in `folder`."""
    return {"text": {"kind": "text", "name": "corpus", "paths": [str(folder / text_file)]},
            "images": {"kind": "imagenet", "name": "images", "path": str(folder / "imagenet")},
            "pairs": {"kind": "pairs_webdataset", "name": "pairs", "path": str(folder / "pairs")}}[kind]


def made_once(folder: Path, make) -> None:
    """Run `make(folder)` unless an earlier run finished making it."""
    done = folder / ".complete"
    if not done.exists():
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        print(f"making {folder}", flush=True)
        make(folder)
        done.touch()


def make_inputs(case: Case, work: Path) -> tuple[dict, int]:
    """The case's source (config form) and the bytes of its input, made on first use."""
    folder, text_file = work / "inputs" / case.name, f"corpus.{case.series}"
    made_once(folder, {"text": lambda f: write_text(f / text_file, case.size, jsonl=case.series.startswith("jsonl")),
                       "images": lambda f: write_images(f / "imagenet", case.size),
                       "pairs": lambda f: write_pairs(f / "pairs", case.size)}[case.kind])
    return source_for(case.kind, folder, text_file), sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def one_sample_source(kind: str, work: Path) -> dict:
    """A source of one sample of the kind: its build takes the fixed cost of any build (the process, Ray's
    start-up and shut-down, planning, the manifest)."""
    folder = work / "inputs" / f"one-{kind}"
    made_once(folder, {"text": lambda f: (f / "corpus.txt").write_bytes(b"a single short document\n"),
                       "images": lambda f: write_images(f / "imagenet", 1),
                       "pairs": lambda f: write_pairs(f / "pairs", 1)}[kind])
    return source_for(kind, folder, "corpus.txt")


# --- measuring one build ---------------------------------------------------------------------------------------


def proc_kib(pid: int, file: str, field_name: str) -> int:
    try:
        with open(f"/proc/{pid}/{file}") as handle:
            return next((int(line.split()[1]) for line in handle if line.startswith(field_name)), 0)
    except (OSError, ValueError):
        return 0


@dataclass
class TreeMemory:
    """Peaks of the build's process tree, in bytes, from samples every SAMPLE_INTERVAL seconds."""

    total_rss: int = 0
    total_pss: int = 0
    command: int = 0
    worker: int = 0
    worker_private: int = 0
    """The largest anonymous (private, not file-backed) resident memory of a worker: what its work allocates."""
    by_process: dict[int, tuple[str, int]] = field(default_factory=dict)
    """Per process id: its name (a Ray worker's, what it ran last but idling) and its peak resident bytes."""


class TreeSampler(threading.Thread):
    """Samples the resident memory of a process and all its descendants until stopped."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.root, self.peaks, self.stopping = psutil.Process(pid), TreeMemory(), threading.Event()

    def run(self) -> None:
        while not self.stopping.wait(SAMPLE_INTERVAL):
            try:
                processes = [self.root, *self.root.children(recursive=True)]
            except psutil.Error:
                return
            total_rss = total_pss = 0
            for process in processes:
                rss = proc_kib(process.pid, "status", "VmRSS:") * 1024
                peak = max(rss, proc_kib(process.pid, "status", "VmHWM:") * 1024)
                total_rss += rss
                name, seen = self.peaks.by_process.get(process.pid, ("", 0))
                current = self.process_name(process)
                self.peaks.by_process[process.pid] = (name if current == "ray::IDLE" and name else current,
                                                      max(seen, rss))
                total_pss += proc_kib(process.pid, "smaps_rollup", "Pss:") * 1024
                if process.pid == self.root.pid:
                    self.peaks.command = max(self.peaks.command, peak)
                elif self.is_worker(process):
                    self.peaks.worker = max(self.peaks.worker, peak)
                    self.peaks.worker_private = max(self.peaks.worker_private,
                                                    proc_kib(process.pid, "status", "RssAnon:") * 1024)
            self.peaks.total_rss = max(self.peaks.total_rss, total_rss)
            self.peaks.total_pss = max(self.peaks.total_pss, total_pss)

    @staticmethod
    def process_name(process: psutil.Process) -> str:
        try:
            command = process.cmdline()
            name = command[0] if command[0].startswith("ray::") else Path(command[0]).name
            if name.startswith("python") and len(command) > 1:
                name = " ".join(command[1:3])[:60]
            return name
        except (psutil.Error, IndexError):
            return "?"

    @staticmethod
    def is_worker(process: psutil.Process) -> bool:
        try:
            return process.cmdline()[0].startswith("ray::")
        except (psutil.Error, IndexError):
            return False


@dataclass
class Measured:
    case: str
    kind: str
    input_bytes: int
    samples: int
    units: int
    """Samples, or tokens for text: what the cost is per."""
    wall: float
    stage_peaks: dict[str, int]
    memory: TreeMemory
    fixed_wall: float = 0.0

    @property
    def cost(self) -> float:
        """Seconds per unit, Ray start-up included."""
        return self.wall / self.units

    @property
    def marginal_cost(self) -> float:
        """Seconds per unit past the fixed cost of a build."""
        return max(self.wall - self.fixed_wall, 0.0) / self.units


SUMMARY_SAMPLES = re.compile(r"([\d,]+) samples, [\d.]+s, ")
SUMMARY_PEAKS = re.compile(r"peak memory of a worker on one shard: (.*)")


def build(source: dict, work: Path, spm: Path, label: str) -> tuple[float, int, dict[str, int], TreeMemory, Path]:
    """Run `beit3 data build` on one source: its wall time, samples written, per-stage worker peaks, the
    process tree's peaks and the output folder."""
    output = work / "outputs" / label
    shutil.rmtree(output, ignore_errors=True)
    config = {"name": f"scale-{label}", "output": str(output), "visual_tokenizer": None, "sources": [source]}
    if source["kind"] != "imagenet":
        config["text_tokenizer"] = str(spm)
    config_path = work / "configs" / f"{label}.yaml"
    config_path.parent.mkdir(parents=True, exist_ok=True)
    config_path.write_text(yaml.safe_dump(config))
    start = time.perf_counter()
    command = subprocess.Popen([sys.executable, "-m", "beit3.cli", "data", "build", "--config", str(config_path),
                                "--quiet"], cwd=REPOSITORY, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    sampler = TreeSampler(command.pid)
    sampler.start()
    out, _ = command.communicate()
    wall = time.perf_counter() - start
    sampler.stopping.set()
    sampler.join()
    if command.returncode != 0:
        raise RuntimeError(f"{label}: the build failed:\n{out[-4000:]}")
    samples = int(SUMMARY_SAMPLES.search(out).group(1).replace(",", ""))
    peaks = {}
    if found := SUMMARY_PEAKS.search(out):
        for part in found.group(1).split(", "):
            stage, mib = part.rsplit(" ", 2)[0], part.rsplit(" ", 2)[1]
            peaks[stage] = int(float(mib.replace(",", "")) * MIB)
    print("  " + next(line for line in out.splitlines() if line.startswith(source["name"])), flush=True)
    return wall, samples, peaks, sampler.peaks, output


def text_tokens(output: Path) -> int:
    """Document tokens in a text build's shards: every id but padding, segment starts and document ends."""
    tokens = 0
    for shard in sorted(output.glob("*.tar")):
        with tarfile.open(shard) as archive:
            for member in archive:
                if member.name.endswith(".ids.npy"):
                    ids = np.load(io.BytesIO(archive.extractfile(member).read()))
                    tokens += int(np.count_nonzero((ids != PAD) & (ids != BOS) & (ids != EOS)))
    return tokens


def measure(case: Case, work: Path, spm: Path, fixed_wall: float) -> Measured:
    source, input_bytes = make_inputs(case, work)
    print(f"building {case.name} ({input_bytes / MB:,.0f} MB of input)", flush=True)
    wall, samples, peaks, memory, output = build(source, work, spm, case.name)
    units = text_tokens(output) if case.kind == "text" else samples
    shutil.rmtree(output)
    measured = Measured(case.name, case.kind, input_bytes, samples, units, wall, peaks, memory, fixed_wall)
    print(f"  {wall:.1f}s, {samples:,} samples, {units:,} units, tree peak {memory.total_pss / MIB:,.0f} MiB PSS; "
          "processes (peak MiB): " + ", ".join(f"{name} {peak / MIB:,.0f}" for name, peak in sorted(
              memory.by_process.values(), key=lambda item: -item[1])), flush=True)
    return measured


# --- report ------------------------------------------------------------------------------------------------------


def unit_cost(measured: Measured, marginal: bool = False) -> str:
    seconds = measured.marginal_cost if marginal else measured.cost
    return f"{seconds * 1e9:,.0f} ns/token" if measured.kind == "text" else f"{seconds * 1e3:,.2f} ms/sample"


def rate(measured: Measured) -> str:
    per_second = measured.units / measured.wall
    return f"{per_second / 1e6:,.2f} M tokens/s" if measured.kind == "text" else f"{per_second:,.0f} samples/s"


def mib(value: int) -> str:
    return f"{value / MIB:,.0f}"


def table(results: list[Measured]) -> str:
    lines = ["| input | input MB | samples (text: segments) | wall s | rate | cost/unit | past fixed cost | worker peak per stage, MiB "
             "(summary) | largest worker MiB (private) | command MiB | job total MiB, sum RSS / sum PSS |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for m in results:
        stages = ", ".join(f"{stage} {mib(peak)}" for stage, peak in m.stage_peaks.items()) or "-"
        lines.append(f"| {m.case} | {m.input_bytes / MB:,.0f} | {m.samples:,} | {m.wall:,.1f} | {rate(m)} | "
                     f"{unit_cost(m)} | {unit_cost(m, marginal=True)} | {stages} | "
                     f"{mib(m.memory.worker)} ({mib(m.memory.worker_private)}) | "
                     f"{mib(m.memory.command)} | {mib(m.memory.total_rss)} / {mib(m.memory.total_pss)} |")
    return "\n".join(lines)


TOP_INPUTS = ("jsonl.zst-1000MB", "txt-1000MB", "pair-tar-20000", "class-folder-20000")


def goals(results: list[Measured]) -> list[str]:
    """The goals, checked on what was measured."""
    lines = []
    by_series: dict[str, list[Measured]] = {}
    for m in results:
        by_series.setdefault(m.case.rsplit("-", 1)[0], []).append(m)
    for series, measured in by_series.items():
        if len(measured) < 3:
            continue
        middle, top = measured[1], measured[-1]
        for label, marginal in (("wall", False), ("past the fixed cost", True)):
            a, b = (middle.marginal_cost, top.marginal_cost) if marginal else (middle.cost, top.cost)
            change = b / a - 1
            verdict = "met" if abs(change) <= COST_TOLERANCE else "NOT met: " + (
                "it grows" if change > 0 else "it falls (a fixed cost, or fewer shards than cores, at the middle size)")
            lines.append(f"{series}: cost per unit ({label}) from {middle.case} to {top.case}: {change:+.0%} "
                         f"(goal within {COST_TOLERANCE:.0%}: {verdict})")
    for m in results:
        if m.case not in TOP_INPUTS:
            continue
        worker = max([m.memory.worker, *m.stage_peaks.values()])
        lines.append(f"{m.case}: largest worker {mib(worker)} MiB ({'met' if worker <= WORKER_LIMIT else 'NOT met'}"
                     f", goal 1,024), job {mib(m.memory.total_pss)} MiB PSS / {mib(m.memory.total_rss)} MiB RSS "
                     f"({'met' if m.memory.total_pss <= JOB_LIMIT else 'NOT met'} on PSS, "
                     f"{'met' if m.memory.total_rss <= JOB_LIMIT else 'NOT met'} on RSS, goal 4,096)")
    return lines


def plot(results: list[Measured], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (cost_axes, memory_axes) = plt.subplots(1, 2, figsize=(12, 4.8))
    series: dict[str, list[Measured]] = {}
    for m in results:
        series.setdefault(m.case.rsplit("-", 1)[0], []).append(m)
    for index, (name, measured) in enumerate(series.items()):
        colour, text = f"C{index}", measured[0].kind == "text"
        per = 1e6 if text else 1e3
        unit = "M tokens" if text else "1,000 samples"
        sizes = [m.input_bytes / MB for m in measured]
        cost_axes.plot(sizes, [m.cost * per for m in measured], "o-", color=colour, label=f"{name}: s per {unit}")
        marginal = [(size, m.marginal_cost * per) for size, m in zip(sizes, measured) if m.marginal_cost > 0]
        cost_axes.plot(*zip(*marginal), "s:", color=colour, label=f"{name}: past the fixed cost")
        memory_axes.plot(sizes, [m.memory.total_pss / MIB for m in measured], "o-", color=colour,
                         label=f"{name}: job (sum of PSS)")
        memory_axes.plot(sizes, [max([m.memory.worker, *m.stage_peaks.values()]) / MIB for m in measured], "^--",
                         color=colour, label=f"{name}: largest worker")
        memory_axes.plot(sizes, [m.memory.command / MIB for m in measured], "v:", color=colour,
                         label=f"{name}: driver (the command)")
    cost_axes.set(xscale="log", yscale="log", xlabel="input size (MB, compressed for .zst)", ylabel="seconds per unit",
                  title="cost per sample (text: per token); solid: wall, dotted: past the fixed cost")
    memory_axes.axhline(JOB_LIMIT / MIB, color="grey", lw=0.8)
    memory_axes.axhline(WORKER_LIMIT / MIB, color="grey", lw=0.8, ls="--")
    memory_axes.set(xscale="log", xlabel="input size (MB, compressed for .zst)", ylabel="peak resident memory (MiB)",
                    ylim=(0, 1.6 * JOB_LIMIT / MIB),
                    title="peak memory (grey: goals, job 4 GiB, worker 1 GiB)")
    cost_axes.legend(fontsize=7)
    memory_axes.legend(fontsize=6, ncol=2, loc="upper left")
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the two smaller sizes of each kind only")
    parser.add_argument("--kinds", nargs="+", choices=("text", "images", "pairs"), default=["text", "images", "pairs"])
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "beit3-pipeline-scale",
                        help="where inputs are generated once and kept, and builds write")
    parser.add_argument("--plot", type=Path, default=Path(__file__).with_suffix(".png"))
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    spm = text_tokenizer(args.work)
    results = []
    started = time.time()
    for kind in args.kinds:
        fixed_wall = build(one_sample_source(kind, args.work), args.work, spm, f"one-{kind}")[0]
        print(f"{kind}: a build of one sample takes {fixed_wall:.1f}s", flush=True)
        for case in cases([kind], args.quick):
            results.append(measure(case, args.work, spm, fixed_wall))
            (args.work / "results.json").write_text(json.dumps([asdict(m) for m in results], indent=1))
    load = psutil.getloadavg()
    print(f"\npipeline_scale: {len(results)} builds in {time.time() - started:,.0f}s on {psutil.cpu_count()} cores, "
          f"load average now {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (1 / 5 / 15 min); fixed cost per kind: "
          + ", ".join(f"{m.kind} {m.fixed_wall:.1f}s" for m in {m.kind: m for m in results}.values()))
    print(table(results))
    print("\n".join(["", *goals(results)]))
    plot(results, args.plot)
    print(f"plot: {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
