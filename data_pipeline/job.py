"""`beit3 data build`: the Ray Data job that turns the configured sources into shards and a manifest.

One row per planned shard flows through the stages: prepare (read, validate, resize, choose views; tokenize and
pack text) -> visual codes (an actor pool, one GPU per actor when the cluster has GPUs) -> write (the tar, or
its parts when it exceeds the sample or byte target, to storage). The driver adds each planned shard's files to
the manifest once all are stored (saving it every twentieth of progress and at the end). Planned shards already
in the manifest are skipped, so a re-run after an interruption finishes the job with the same result as an
uninterrupted run.

Faults during a run: a worker process that dies (killed, out of memory, node lost) has its map task retried up to
`ray.max_task_retries` times (a tokenizer actor is restarted up to `ray.max_actor_restarts` times), and since a
shard's bytes depend only on its plan, the retry stores the same tar. Ray's own defaults retry without limit, so
a shard that runs its worker out of memory every time would loop forever; past the bound the build fails with
one line naming the shard, its inputs and the settings that shrink it. Exceptions raised by the stages are not
retried: storage errors are retried by the storage layer (see `storage`), one that outlasts those retries fails
the job, and a re-run finishes it. Bad input is not such an exception: every sample and file is read inside an
error boundary that counts it (see `processing`); an exception that does stop the job names the planned shard and
its input files.
tests/test_pipeline_faults.py kills a worker running a map task and cuts the S3 endpoint off mid-run.

Before any work, `preflight` checks that the output can be written and that every tokenizer file the config
names can be read, so a misspelt bucket, a missing key, refused credentials or a wrong endpoint fail in
seconds with one line. A storage error raised inside a Ray task or actor reaches the caller as that same error,
not as Ray's wrapping of it.
"""

import json
import logging
import os
import pickle
import re
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import ray
import torch
from tqdm import tqdm

from .config import DataConfig, RaySettings
from .holdout import is_validation_name
from .manifest import Manifest, load_or_start
from .processing import add_codes, finish_shard, prepare_images, prepare_pairs, prepare_text
from .sources import plan_shards
from .storage import (
    STORAGE_FAILURES,
    MissingObject,
    StorageError,
    StoreUnusable,
    check_usable,
    local_copy,
    open_storage,
)


def _reset_peak_memory() -> None:
    """Start this process's peak resident size (VmHWM) afresh: a Ray worker runs many tasks."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
    except OSError:  # not Linux, or not permitted: the peak then covers the worker's earlier tasks too
        pass


def _peak_memory() -> int:
    """This process's peak resident bytes since the last reset (0 where /proc does not tell)."""
    try:
        with open("/proc/self/status") as status:
            return next((int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:")), 0)
    except OSError:
        return 0


def _with_stage(row: dict, stage: str) -> str:
    """The row's record of the stages it has been through (JSON: per stage, the worker's peak resident bytes and
    the Ray node it ran on) with this stage's added."""
    record = {"peak": _peak_memory(), "node": ray.get_runtime_context().get_node_id()}
    return json.dumps({**json.loads(row.get("stages", "{}")), stage: record})


@ray.remote(num_cpus=0)
class _Attempts:
    """Which planned shards each stage has started, and how often: when retries run out after worker deaths,
    the shard tried most is the one that killed its workers. Also the most shards in flight at once (prepare
    started, not all stored yet), which the object store budget (`ray.object_store_*`) bounds."""

    def __init__(self):
        self.counts: Counter = Counter()
        self.inputs: dict[str, str] = {}
        self.in_flight: set[str] = set()
        self.most_in_flight = 0

    def start(self, stage: str, shard: str, inputs: str) -> None:
        self.counts[(stage, shard)] += 1
        self.inputs[shard] = inputs
        if stage == "prepare":
            self.in_flight.add(shard)
            self.most_in_flight = max(self.most_in_flight, len(self.in_flight))

    def stored(self, shard: str) -> None:
        self.in_flight.discard(shard)

    def most_shards_in_flight(self) -> int:
        return self.most_in_flight

    def started(self) -> list[tuple[str, str, str, int]]:
        """(stage, shard, inputs, attempts), most attempted first."""
        return [(stage, shard, self.inputs[shard], count) for (stage, shard), count in self.counts.most_common()]


def _prepare(row: dict, config_json: str, attempts=None) -> dict:
    """The prepare stage of one planned shard (a text shard also writes its tars, part by part, as they fill),
    recorded with `attempts` (an `_Attempts`) when given; an error that stops it (bad samples and files do not)
    names the shard and its inputs."""
    _reset_peak_memory()
    config = DataConfig.model_validate_json(config_json)
    plan = pickle.loads(row["plan"])
    if attempts is not None:  # recorded before any work that may kill the worker
        ray.get(attempts.start.remote("prepare", plan.name, plan.inputs))
    try:
        if plan.kind == "text":
            work = prepare_text(plan, config, open_storage(config.output))
        else:
            work = {"image": prepare_images, "pair": prepare_pairs}[plan.kind](plan, config)
    except Exception as error:
        error.add_note(f"while preparing {plan.name} from {plan.inputs}")
        raise
    return {"work": pickle.dumps(work), "stages": _with_stage(row, "prepare")}


class _VisualCodes:
    """An actor holding one visual tokenizer, on the GPU Ray gave it or on the CPU."""

    def __init__(self, config_json: str):
        settings = DataConfig.model_validate_json(config_json).visual_tokenizer
        if settings.checkpoint:
            settings = settings.model_copy(update={"checkpoint": local_copy(settings.checkpoint)})
        from beit3.tokenizers.visual import build_visual_tokenizer  # here: prepare and write workers never load timm

        self.tokenizer, _ = build_visual_tokenizer(settings)
        if torch.cuda.is_available():
            self.tokenizer = self.tokenizer.cuda()

    def __call__(self, row: dict) -> dict:
        _reset_peak_memory()
        work = add_codes(pickle.loads(row["work"]), self.tokenizer)
        return {"work": pickle.dumps(work), "stages": _with_stage(row, "visual codes")}


def _write(row: dict, config_json: str, attempts=None) -> dict:
    """Store the planned shard's tars (each atomically) that the prepare stage has not; the driver lists them
    once all are stored. `attempts` (an `_Attempts`), when given, learns that the shard is no longer in flight."""
    _reset_peak_memory()
    config = DataConfig.model_validate_json(config_json)
    work = pickle.loads(row["work"])
    parts = finish_shard(work, config)
    storage = open_storage(config.output)
    for data, entry in parts:
        if data:
            storage.write_atomic(entry["name"], data)
    if attempts is not None:
        ray.get(attempts.stored.remote(work.plan.name))
    return {"entries": json.dumps([entry for _, entry in parts]), "stages": _with_stage(row, "write")}


class ShardWorkerDied(ChildProcessError):
    """Worker processes died building one planned shard more often than the retry settings allow."""


@dataclass
class BuildResult:
    manifest: Manifest
    shards_built: int
    shards_skipped: int
    seconds: float
    peak_memory: dict[str, int] = field(default_factory=dict)
    """Per stage, the largest peak resident bytes of a worker process running it on one shard of this run."""
    shards_per_node: dict[str, dict[str, int]] = field(default_factory=dict)
    """Per stage, how many planned shards of this run each Ray node (by node id) ran it on."""
    most_shards_in_flight: int = 0
    """The most planned shards of this run in flight at once: prepare started, not all stored yet."""


def preflight(config: DataConfig) -> None:
    """Fail in seconds, before any listing or work, when the output cannot be written, an input's store cannot
    be reached or a tokenizer file the config names cannot be read; the error names the config field."""
    check_usable("output", config.output, "write")
    for index, source in enumerate(config.sources):
        for field, value in source.model_dump(mode="json").items():
            for url in value if isinstance(value, list) else [value]:
                if isinstance(url, str) and url.startswith("s3://"):
                    check_usable(f"sources[{index}].{field}", url, "read_folder")
    if config.text_tokenizer:
        check_usable("text_tokenizer", config.text_tokenizer, "read_file")
    if config.visual_tokenizer is not None and config.visual_tokenizer.checkpoint:
        check_usable("visual_tokenizer.checkpoint", config.visual_tokenizer.checkpoint, "read_file")


STORAGE_FAILURE_LINE = re.compile(r"(MissingObject|StorageError|StoreUnusable): (.+)")
FAILURE_TYPES = {"MissingObject": MissingObject, "StorageError": StorageError, "StoreUnusable": StoreUnusable}


def _causes(error: BaseException) -> Iterator[BaseException]:
    """The exception and, transitively, its causes, contexts and the `cause` Ray attaches to a task's error."""
    pending, seen = [error], set()
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        pending += [current.__cause__, current.__context__, getattr(current, "cause", None)]


def storage_failure(error: BaseException) -> BaseException | None:
    """The storage error behind an exception Ray raised for a task or actor: found in its causes, or, for an
    actor whose constructor failed (Ray passes on only the text), in the traceback text it carries."""
    cause = next((cause for cause in _causes(error) if isinstance(cause, STORAGE_FAILURES)
                  and not isinstance(cause, ray.exceptions.RayError)), None)
    if cause is not None:
        return cause
    found = STORAGE_FAILURE_LINE.findall(str(error))
    if found:
        kind, message = found[-1]
        return FAILURE_TYPES[kind.rpartition(".")[2]](message.strip())
    return None


def build(config: DataConfig, ray_address: str | None = None, progress: bool = True) -> BuildResult:
    """Build (or finish building) the shards and manifest a config describes."""
    start = time.perf_counter()
    preflight(config)
    storage = open_storage(config.output)
    manifest = load_or_start(storage, config)
    plans = plan_shards(config)
    todo = [plan for plan in plans if not manifest.is_done(plan.name, storage)]
    figures: dict = {}
    if todo:
        try:
            figures = _run(config, todo, manifest, storage, ray_address or config.ray.address, progress)
        except Exception as error:
            failure = storage_failure(error)
            if failure is None:
                raise
            raise failure from None
    manifest.save(storage)
    return BuildResult(manifest, len(todo), len(plans) - len(todo), time.perf_counter() - start, **figures)


WORKER_DEATHS = (ray.exceptions.WorkerCrashedError, ray.exceptions.OutOfMemoryError, ray.exceptions.ActorDiedError,
                 ray.exceptions.NodeDiedError)
"""What Ray raises for a task or actor whose process died, once its retries are spent."""
SHRINK_SETTINGS = {"text": "shard_bytes (a text worker holds one part)",
                   "image": "samples_per_shard or shard_bytes", "pair": "samples_per_shard or shard_bytes"}
"""What makes a planned shard's worker smaller, by kind."""


def _worker_death(error: BaseException) -> BaseException | None:
    """The worker death behind an exception Ray Data raised, found in its causes."""
    return next((cause for cause in _causes(error) if isinstance(cause, WORKER_DEATHS)), None)


def _death_message(death: BaseException, started: list, done: set[str], config: DataConfig) -> str:
    """One line: the shard whose workers died (the one tried most of those not finished), its inputs, what
    killed them, and the settings to lower."""
    unfinished = [(stage, shard, inputs, count) for stage, shard, inputs, count in started if shard not in done]
    cause = "out of memory" if isinstance(death, ray.exceptions.OutOfMemoryError) else type(death).__name__
    if not unfinished:
        return (f"a Ray worker died ({cause}) before its shard began, on every attempt ray.max_task_retries "
                f"({config.ray.max_task_retries}) allows")
    stage, shard, inputs, count = unfinished[0]
    kind = shard.removeprefix("val-").split("-")[0]
    return (f"{stage} of {shard} from {inputs}: its worker died ({cause}) on {count} attempt"
            f"{'s' if count > 1 else ''} (ray.max_task_retries {config.ray.max_task_retries}); if it ran out of "
            f"memory, lower {SHRINK_SETTINGS.get(kind, 'samples_per_shard')}, or set ray.memory_per_task so that "
            "fewer tasks run at once")


def _progress_bars(todo, progress: bool) -> dict[str, tqdm]:
    """A bar per kind: its planned shards done of those to build, samples/s and the time left."""
    planned = Counter(plan.kind for plan in todo)
    return {kind: tqdm(total=count, desc=f"{kind} shards", unit="shard", position=position, disable=not progress,
                       dynamic_ncols=True) for position, (kind, count) in enumerate(sorted(planned.items()))}


def _limit_blocks_in_flight(context: ray.data.DataContext, settings: RaySettings) -> None:
    """Bound the bytes the stages hold between them (a planned shard's prepared samples and tokenizer views, then
    its coded samples), so that a slow stage (the tokenizer actors, or writes to slow storage) holds the stages
    before it back instead of letting their output pile up in the object store or spill to disk. Ray Data starts
    no task whose output would take its stage past its share of the budget. Each block is one planned shard
    (one row per block, one block per task), so `target_max_block_size` does not apply."""
    context.override_object_store_memory_limit_fraction = settings.object_store_fraction
    if settings.object_store_bytes is not None:
        limits = context.execution_options.resource_limits
        context.execution_options.resource_limits = limits.copy(object_store_memory=settings.object_store_bytes)


def _run(config, todo, manifest, storage, address, progress) -> dict:
    """Run the stages over the planned shards still to build, listing each in the manifest once stored; returns
    `BuildResult`'s figures of the run: per stage the largest peak resident bytes on one shard and the shards
    each node ran, and the most shards in flight at once."""
    started_here = not ray.is_initialized()
    if started_here:
        # Ray retries a task killed for memory by its own budget (without limit by default), not max_retries; it
        # can be set only on an instance started here.
        local = address is None and "RAY_ADDRESS" not in os.environ
        ray.init(address=address, include_dashboard=False, log_to_driver=False,
                 _system_config={"task_oom_retries": config.ray.max_task_retries} if local else None)
    peaks: dict[str, int] = {}
    nodes: dict[str, Counter] = {}
    try:
        ray.data.DataContext.get_current().enable_progress_bars = progress
        logging.getLogger("ray.data").setLevel(logging.INFO if progress else logging.WARNING)
        config_json = config.model_dump_json()
        attempts = _Attempts.remote()
        rows = [{"plan": pickle.dumps(plan)} for plan in todo]
        retries: dict = {"max_retries": config.ray.max_task_retries}
        if config.ray.memory_per_task:
            retries["memory"] = config.ray.memory_per_task
        dataset = ray.data.from_items(rows, override_num_blocks=len(rows))
        _limit_blocks_in_flight(dataset.context, config.ray)  # this dataset's own copy of the context
        dataset = dataset.map(_prepare, fn_kwargs={"config_json": config_json, "attempts": attempts}, **retries)
        if config.visual_tokenizer is not None:
            gpus = config.ray.gpus_per_tokenizer_actor
            if gpus is None:
                gpus = 1 if ray.cluster_resources().get("GPU", 0) > 0 else 0
            pool = ray.data.ActorPoolStrategy(size=config.ray.tokenizer_actors,
                                              max_tasks_in_flight_per_actor=config.ray.tokenizer_tasks_in_flight)
            dataset = dataset.map(_VisualCodes, fn_constructor_kwargs={"config_json": config_json}, compute=pool,
                                  num_gpus=gpus,
                                  max_restarts=config.ray.max_actor_restarts,
                                  max_task_retries=config.ray.max_task_retries)
        dataset = dataset.map(_write, fn_kwargs={"config_json": config_json, "attempts": attempts},
                              **retries)  # alike: fused with prepare
        unsaved, done, bars = 0, set(), _progress_bars(todo, progress)
        samples, start = Counter(), time.perf_counter()
        try:
            for row in dataset.iter_rows():
                entries = json.loads(row["entries"])
                manifest.add(entries)
                done.add(entries[0]["shard"])
                for stage, record in json.loads(row["stages"]).items():
                    peaks[stage] = max(peaks.get(stage, 0), record["peak"])
                    nodes.setdefault(stage, Counter())[record["node"]] += 1
                unsaved += 1
                # Rewriting the whole manifest after every shard would cost quadratic bytes on a long job;
                # saving after a twentieth more keeps the total linear. Unsaved shards are simply redone.
                if unsaved >= max(1, len(manifest.shards) // 20):
                    manifest.save(storage)
                    unsaved = 0
                kind = entries[0]["kind"]
                samples[kind] += sum(entry["samples"] for entry in entries)
                bars[kind].set_postfix_str(f"{samples[kind] / (time.perf_counter() - start):,.0f} samples/s",
                                           refresh=False)
                bars[kind].update()
        except Exception as error:
            death = _worker_death(error)
            if death is None:
                raise
            raise ShardWorkerDied(_death_message(death, ray.get(attempts.started.remote()), done, config)) from None
        finally:
            for bar in bars.values():
                bar.close()
            manifest.save(storage)
        most_in_flight = ray.get(attempts.most_shards_in_flight.remote())
    finally:
        if started_here:
            ray.shutdown()
    return {"peak_memory": peaks, "shards_per_node": {stage: dict(counts) for stage, counts in nodes.items()},
            "most_shards_in_flight": most_in_flight}


def summary_table(result: BuildResult) -> str:
    """Written, held-out and skipped samples per source, how each source's visual codes spread over the codebook,
    and throughput, for the end of a run."""
    totals = result.manifest.totals()
    written = sum(t["written"] + t.get("validation", 0) for t in totals.values())
    lines = [f"{'source':<20}{'written':>10}{'held out':>10}  skipped (reason: count)"]
    for source, counts in totals.items():
        reasons = ", ".join(f"{r}: {n}" for r, n in sorted(counts["skipped"].items())) or "-"
        repaired = ", ".join(f"{r}: {n}" for r, n in sorted(counts["repaired"].items()))
        lines.append(f"{source:<20}{counts['written']:>10}{counts.get('validation', 0):>10}  {reasons}"
                     + (f"  (repaired {repaired})" if repaired else ""))
    if usage := result.manifest.code_usage():
        lines.append(f"{'visual codes':<20}{'used':>10}{'perplexity':>12}{'top code':>10}")
        lines += [f"{source:<20}{codes['codes_used']:>10}{codes['perplexity']:>12.1f}{codes['top_code_share']:>10.2%}"
                  for source, codes in usage.items()]
    files = [entry["name"] for entry in result.manifest.shards.values() if entry["samples"]]
    held_out_files = sum(map(is_validation_name, files))
    planned = result.shards_built + result.shards_skipped
    lines.append(f"{len(files)} shard files ({held_out_files} held out) for {planned} planned shards "
                 f"({result.shards_built} built now, {result.shards_skipped} already done), {written:,} samples, "
                 f"{result.seconds:.1f}s, {written / max(result.seconds, 1e-9):.1f} samples/s")
    if result.peak_memory:
        lines.append("peak memory of a worker on one shard: " + ", ".join(
            f"{stage} {peak / 2**20:,.0f} MiB" for stage, peak in result.peak_memory.items()))
    if result.shards_per_node:
        lines.append("planned shards per Ray node (id prefix): " + "; ".join(
            f"{stage} " + ", ".join(f"{node[:8]} {count}" for node, count in sorted(counts.items()))
            for stage, counts in result.shards_per_node.items()))
    if most := result.most_shards_in_flight:
        lines.append(f"at most {most} planned shard{'s' if most > 1 else ''} in flight at once (prepare started, "
                     "not yet stored)")
    return "\n".join(lines)


def view_passes(result: BuildResult, config: DataConfig) -> list[str]:
    """How often the planned run (`planned_use`) will see each stored view, per kind, with a warning past
    `max_passes_per_view`; nothing for a kind without planned draws or samples."""
    planned = config.planned_use
    lines = []
    for kind, draws in (("image", planned.image_samples), ("pair", planned.pair_samples)):
        samples = sum(entry["samples"] for entry in result.manifest.shards.values()
                      if entry["kind"] == kind and not is_validation_name(entry["name"]))
        if not draws or not samples:
            continue
        views = config.image.views_per_image
        per_view = draws / samples / views
        lines.append(f"{kind}: {samples:,} samples x {views} stored views; {draws:,} planned draws make "
                     f"{draws / samples:.1f} passes, {per_view:.1f} per view")
        if per_view > planned.max_passes_per_view:
            lines.append(f"warning: {kind}: each stored view would be seen {per_view:.1f} times (more than "
                         f"{planned.max_passes_per_view:g}): crop augmentation is in effect reduced; raise "
                         "image.views_per_image or add data")
    return lines
