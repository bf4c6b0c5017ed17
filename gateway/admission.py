"""The admission gate's benchmark: a new model version against the incumbent, before it may shadow.

A route with ``rollout.admission`` starts each new version at the ``admission`` stage
(router.rollout). Every gateway sees it there at its next refresh; the one that wins the
version's lease in Redis (router.rollout_store ``claim_admission``, SET NX PX; a replica that
dies mid-run frees it after ``timeout_s`` + 30 s) runs the benchmark, the others wait. So it
runs once per version, and never again once its verdict is in the rollout record (a restart
finds the stage moved on).

The benchmark runs in a **child process** (``python -m gateway.admission``, the spec as JSON on
stdin, the figures as JSON on stdout): its own ONNX Runtime sessions with ``admission.threads``
intra-op threads, nothing shared with the gateway's inference pool or event loop, at niceness
``admission.nice`` (the serving threads win the CPU), resting between runs so it keeps at most
``admission.busy_fraction`` of one core busy, and killed after ``admission.timeout_s`` (a thread
could not be killed). A model that crashes ONNX Runtime takes the child down, not the gateway.
What is not the candidate's fault - the child dying or killed, no JSON answer, the incumbent
failing, a candidate file still being copied, a timeout - gives no verdict (:class:`NoVerdict`):
tried again with backoff (``retry_delay_s``), a log line and ``banditgate_admission_retries_total``
per episode; the third timeout refuses. A file over ``max_size_mb`` is refused on ``stat()``.
Its resident memory is the candidate's and the incumbent's alone, so the memory it adds per
model can be read from the process's RSS.

In the child, on the same rows for both models (sampled from the candidate's - else the
incumbent's - ``reference.json`` feature profile, else synthetic rows from the model's input
metadata, clipped to ``config.yaml`` ranges; a fixed seed):

1. load the incumbent once and drop it (ONNX Runtime's process-wide set-up is not charged to
   either model), then load the incumbent and then the candidate through the gateway's own
   loader (gateway.models.onnx_runtime), each warmed up with one batch at the max batch size,
   reading RSS before and after each (free heap returned to the system first, glibc's
   ``malloc_trim``): the memory each adds;
2. ``samples`` runs at batch 1 and ``batch_samples`` at the max batch, the two models alternating
   (which one goes first alternates too), each timed as the CPU time it took (all of the child's
   threads: with ``admission.threads`` 1, the default, that is the run's latency on a core of its
   own). Not wall time: the child runs niced and rests between runs on purpose, so its wall clock
   would measure its priority and its neighbours rather than the model;
3. both models' outputs on the max-batch rows: dtype, shape of one row, NaN or infinite values.

The parent turns the figures into the verdict (router.rollout_admission.judge, pure) and writes
it with its transition (to ``shadow`` or ``refused``) by compare-and-set.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from banditgate.config import Admission, Config, Route
from banditgate.drift.reference import FeatureProfile
from banditgate.jsontypes import JSONObject
from gateway.models.onnx_runtime import OnnxModel
from gateway.models.repository import ModelRepository
from router.lineup import RolloutRecord
from router.rollout import RolloutError, admission_transition
from router.rollout_admission import (
    AdmissionError,
    AdmissionResult,
    Check,
    ModelFigures,
    clean,
    failed,
    judge,
    output_problems,
)
from router.rollout_store import RolloutStore

if TYPE_CHECKING:  # the child process needs no metrics (nor prometheus_client's import)
    from gateway.metrics import GatewayMetrics

log = logging.getLogger("banditgate.admission")

LEASE_MARGIN_MS = 30_000
"""The lease outlives the benchmark's time bound by this (the verdict is written after it)."""
CLAIM_RETRY_S = 5.0
"""A replica that lost the lease looks again this often (the winner may die)."""
SEED = 20_261_207
RETRY_FIRST_S = 5.0
RETRY_MAX_S = 300.0
"""A run without a verdict (not the candidate's fault) is tried again after 5 s, 10 s, ... at most 5 min."""
TIMEOUTS_REFUSE = 3
"""A version whose benchmark outlives ``timeout_s`` this many times is refused."""


# ---------------------------------------------------------------------------------------------
# rows


def _sample_feature(profile: FeatureProfile, rows: int, rng: np.random.Generator) -> np.ndarray:
    """Values of one numeric feature drawn from its reference bins (missing values left out: they
    would make both models' outputs NaN and tell nothing)."""
    probabilities = np.asarray(profile.probabilities, dtype=float)
    if probabilities.sum() <= 0:
        return np.zeros(rows)
    probabilities = probabilities / probabilities.sum()
    edges = np.asarray(profile.edges, dtype=float)
    bins = rng.choice(len(probabilities), size=rows, p=probabilities)
    if edges.size == 0:
        return np.zeros(rows)
    width = float(np.diff(edges).mean()) if edges.size > 1 else 1.0
    low = np.concatenate([[edges[0] - width], edges])
    high = np.concatenate([edges, [edges[-1] + width]])
    return rng.uniform(low[bins], high[bins])


def benchmark_rows(model: OnnxModel, rows: int, reference: Path | None, seed: int = SEED
                   ) -> tuple[dict[str, np.ndarray], str]:
    """`rows` rows for `model`'s inputs and where they came from: a single 2-D numeric input whose
    width matches the reference profile's numeric features is sampled from the profile; anything
    else is synthetic (standard normal floats, 0/1 integers, empty strings), within ranges."""
    rng = np.random.default_rng(seed)
    feeds: dict[str, np.ndarray] = {}
    source = "synthetic rows from the model's input metadata"
    profile = None
    if reference is not None and reference.is_file():
        from banditgate.drift.reference import ProfileError, ReferenceProfile

        try:
            profile = ReferenceProfile.load(reference)
        except ProfileError as exc:
            log.warning("admission rows: %s unusable (%s); synthetic rows instead", reference, exc)
    specs = model.inputs
    if (profile is not None and len(specs) == 1 and len(specs[0].shape) == 2
            and specs[0].shape[1] == len(profile.features) and specs[0].dtype.kind == "f"
            and all(f.kind == "numeric" for f in profile.features)):
        columns = [_sample_feature(feature, rows, rng) for feature in profile.features]
        feeds[specs[0].name] = np.stack(columns, axis=1).astype(specs[0].dtype)
        source = f"sampled from {reference.parent.parent.name} v{reference.parent.name} reference.json" \
            if reference is not None else source
    else:
        for spec in specs:
            shape = (rows, *[d or 1 for d in spec.shape[1:]])
            if spec.dtype.kind == "f":
                feeds[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
            elif spec.dtype.kind in "iu":
                feeds[spec.name] = rng.integers(0, 2, size=shape).astype(spec.dtype)
            elif spec.dtype.kind == "b":
                feeds[spec.name] = rng.random(shape) < 0.5
            else:
                feeds[spec.name] = np.full(shape, "", dtype=object)
    for name, (low, high) in model.ranges.items():
        if name in feeds:
            feeds[name] = np.clip(feeds[name], low, high).astype(feeds[name].dtype)
    return feeds, source


# ---------------------------------------------------------------------------------------------
# the child process


def _rss_mb() -> float:
    """This process's resident memory now (MB); Linux /proc, else the peak from getrusage."""
    try:
        with open("/proc/self/statm") as handle:
            pages = int(handle.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _trim() -> None:
    """Return free heap to the system (glibc), so RSS counts what is in use."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _summaries(outputs: Mapping[str, np.ndarray]) -> dict[str, tuple[str, tuple[int, ...], int]]:
    out = {}
    for name, value in outputs.items():
        array = np.asarray(value)
        nonfinite = int(np.count_nonzero(~np.isfinite(array))) if array.dtype.kind in "fc" else 0
        out[name] = (str(array.dtype), tuple(int(d) for d in array.shape[1:]), nonfinite)
    return out


def _signature(model: OnnxModel) -> list[tuple[str, str, list[int | None]]]:
    # names cleaned: they come from the model file and end up in the reason, alerts and logs
    return [(clean(spec.name, 60), str(spec.dtype), list(spec.shape)) for spec in model.inputs]


def _slice(feeds: Mapping[str, np.ndarray], start: int, rows: int) -> dict[str, np.ndarray]:
    return {name: value[start:start + rows] for name, value in feeds.items()}


SETTLE_S = 30.0
"""A candidate file changed this recently (or since the parent looked) is still being copied: a
load error then is no verdict on the model, it is tried again."""


def _unsettled(spec: JSONObject) -> str | None:
    """Why the candidate's file may still be arriving (None when it has been stable)."""
    seen = spec["candidate"]
    try:
        now = Path(str(seen["path"])).stat()
    except OSError:
        return "its file is not there (yet)"
    if (now.st_size, now.st_mtime_ns) != (seen.get("size"), seen.get("mtime_ns")):
        return "its file changed while the benchmark started (still being copied?)"
    if time.time() - now.st_mtime < SETTLE_S:
        return f"its file changed less than {SETTLE_S:g} s ago (still being copied?)"
    return None


def _first_line(exc: BaseException) -> str:
    return clean((str(exc).splitlines() or [type(exc).__name__])[0], 200)


def measure(spec: JSONObject) -> JSONObject:
    """The benchmark (run in the child): figures for both models, or ``{"error", "who", "refuse"}``
    where ``who`` is ``candidate`` or ``incumbent`` and ``refuse`` says whether the error is the
    candidate's own (a verdict) rather than the infrastructure's (no verdict, tried again)."""
    at = {"who": "incumbent"}
    try:
        return _measure(spec, at)
    except Exception as exc:  # noqa: BLE001 - anything unforeseen is no verdict, but says whose step failed
        return {"error": f"{type(exc).__name__}: {_first_line(exc)}", "who": at["who"], "refuse": False}


def _measure(spec: JSONObject, at: dict[str, str]) -> JSONObject:
    from banditgate.config import ModelsConfig
    from gateway.errors import ModelError
    from gateway.models.model_config import load_model_config

    began = time.perf_counter()
    settings = ModelsConfig(providers=list(spec["providers"]), intra_op_threads=int(spec["threads"]),
                            inter_op_threads=1, graph_optimization=spec["graph_optimization"], warmup_rows=0)
    batch, rest = int(spec["max_batch"]), 1.0 / float(spec["busy_fraction"]) - 1.0

    def load(who: str) -> OnnxModel:
        at["who"] = who
        path = Path(spec[who]["path"])
        config = load_model_config(path.parent.parent)
        return OnnxModel.load(path, spec[who]["model"], int(spec[who]["version"]), config, settings)

    def infrastructure(who: str, error: str) -> JSONObject:
        return {"error": error, "who": who, "refuse": False}

    def candidates_own(error: str) -> JSONObject:
        return {"error": error, "who": "candidate", "refuse": True}

    try:
        primer = load("incumbent")
    except ModelError as exc:
        return infrastructure("incumbent", f"it does not load: {_first_line(exc)}")
    references = [Path(p) for p in spec["references"]]
    reference = next((p for p in references if p.is_file()), None)
    feeds, source = benchmark_rows(primer, batch, reference)
    try:
        primer.run(feeds)
    except Exception as exc:  # noqa: BLE001 - ONNX Runtime raises several types; the incumbent is at fault
        return infrastructure("incumbent", f"it fails on the benchmark rows: {_first_line(exc)}")
    del primer
    _trim()
    models: dict[str, OnnxModel] = {}
    memory: dict[str, float] = {}
    first: dict[str, dict[str, np.ndarray]] = {}
    for who in ("incumbent", "candidate"):
        before = _rss_mb()
        try:
            model = load(who)
        except ModelError as exc:
            if who == "incumbent":
                return infrastructure(who, f"it does not load: {_first_line(exc)}")
            arriving = _unsettled(spec)
            if arriving is not None:  # a half-copied file: no verdict on the model yet
                return infrastructure(who, f"{arriving}: {_first_line(exc)}")
            return candidates_own(f"it does not load: {_first_line(exc)}")
        if who == "candidate" and _signature(model) != _signature(models["incumbent"]):
            return candidates_own(f"it cannot serve the same requests: its inputs {_signature(model)} differ "
                                  f"from the incumbent's {_signature(models['incumbent'])}")
        try:
            first[who] = model.run(feeds)  # the warm-up at the max batch: its buffers are part of its cost
        except Exception as exc:  # noqa: BLE001 - ONNX Runtime raises several types for a failed run
            if who == "incumbent":
                return infrastructure(who, f"it fails on the benchmark rows: {_first_line(exc)}")
            return candidates_own(f"it fails on the benchmark rows: {_first_line(exc)}")
        _trim()
        memory[who] = _rss_mb() - before
        models[who] = model
    timings: dict[str, dict[int, list[float]]] = {"incumbent": {1: [], batch: []}, "candidate": {1: [], batch: []}}
    order = ("incumbent", "candidate")
    for rows, count in ((1, int(spec["samples"])), (batch, int(spec["batch_samples"]))):
        for index in range(count):
            inputs = _slice(feeds, index % batch, 1) if rows == 1 else feeds
            busy = 0.0
            for who in (order if index % 2 == 0 else order[::-1]):
                at["who"] = who
                started, cpu = time.perf_counter(), time.process_time()
                try:
                    models[who].run(inputs)
                except Exception as exc:  # noqa: BLE001 - ONNX Runtime raises several types for a failed run
                    if who == "incumbent":
                        return infrastructure(who, f"it fails on {rows}-row runs: {_first_line(exc)}")
                    return candidates_own(f"it fails on {rows}-row runs: {_first_line(exc)}")
                busy += time.perf_counter() - started
                # CPU time, not wall time: this process runs niced and rests on purpose, so its
                # wall clock would measure its priority and the neighbours, not the model
                timings[who][rows].append((time.process_time() - cpu) * 1000.0)
            if rest > 0:
                time.sleep(busy * rest)  # the benchmark's share of a core stays at busy_fraction
    at["who"] = "candidate"
    summaries = {who: _summaries(first[who]) for who in order}
    figures = {}
    for who in order:
        problems = output_problems(summaries["candidate"], summaries["incumbent"]) if who == "candidate" else []
        figures[who] = ModelFigures.from_samples(timings[who][1], timings[who][batch], batch, memory[who],
                                                 Path(spec[who]["path"]).stat().st_size / 2**20, problems).to_dict()
    return {"figures": figures, "rows_source": source, "seconds": time.perf_counter() - began,
            "outputs": {who: {clean(k, 60): [v[0], list(v[1]), v[2]] for k, v in summaries[who].items()}
                        for who in order}}


def main() -> int:
    """``python -m gateway.admission``: the spec on stdin, one JSON object on stdout."""
    try:
        spec = json.loads(sys.stdin.read())
    except ValueError as exc:
        spec, result = None, {"error": f"unreadable spec: {exc}", "who": "incumbent", "refuse": False}
    if isinstance(spec, dict):
        result = measure(spec)
    elif spec is not None:
        result = {"error": "the spec is not a JSON object", "who": "incumbent", "refuse": False}
    sys.stdout.write(json.dumps(result))
    sys.stdout.flush()
    return 0


# ---------------------------------------------------------------------------------------------
# the parent: one benchmark


def benchmark_spec(config: Config, route: Route, record: RolloutRecord, repository: ModelRepository) -> JSONObject:
    """The child's spec for `record`'s candidate against the arm it replaces. Raises RolloutError
    when the replaced arm is not pinned to a version (a rollout route pins it)."""
    admission = _budget(route)
    state = record.state
    incumbent = next((arm for arm in record.base if arm.name == state.replaces), None)
    if incumbent is None or not isinstance(incumbent.version, int):
        raise RolloutError(f"route {route.name}: the replaced arm {state.replaces} has no pinned version to compare with")
    candidate_path = repository.version_path(state.model, state.version)
    incumbent_path = repository.version_path(incumbent.model, incumbent.version)
    return {"candidate": {"path": str(candidate_path), "model": state.model, "version": state.version},
            "incumbent": {"path": str(incumbent_path), "model": incumbent.model, "version": incumbent.version},
            "references": [str(candidate_path.parent / "reference.json"), str(incumbent_path.parent / "reference.json")],
            "max_batch": admission.max_batch or config.batching.max_batch_size, "samples": admission.samples,
            "batch_samples": admission.batch_samples, "threads": admission.threads,
            "busy_fraction": admission.busy_fraction, "nice": admission.nice,
            "providers": config.models.providers, "graph_optimization": config.models.graph_optimization}


_BOOTSTRAP = """
import contextlib, os, runpy, sys
# lowest claim on the CPU before anything else runs (the imports too): niced, and SCHED_BATCH
# (a batch task never preempts a waking serving thread)
with contextlib.suppress(OSError, AttributeError):
    os.nice(int(sys.argv[1]))
with contextlib.suppress(OSError, AttributeError):
    os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
runpy.run_module("gateway.admission", run_name="__main__", alter_sys=True)
"""
"""The child's first lines (``python -c``): lower its priority, then run this module."""


def _budget(route: Route) -> Admission:
    if route.rollout is None or route.rollout.admission is None:
        raise RolloutError(f"route {route.name} has no rollout.admission configuration")
    return route.rollout.admission


def _child_env() -> dict[str, str]:
    """The gateway's environment, with this package's folder first on the path (a gateway started
    from a source tree without PYTHONPATH imports the same code in the child)."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([root, *([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])])
    return env


class NoVerdict(RolloutError):
    """The benchmark could not judge the candidate for a reason that is not the candidate's (the
    child died or was killed, wrote no result, the incumbent failed, the candidate's file is still
    arriving, the run outlived its time bound under load): tried again later, never a refusal."""

    def __init__(self, message: str, timed_out: bool = False) -> None:
        super().__init__(message)
        self.timed_out = timed_out


STDOUT_LIMIT = 4 * 2**20
"""The child's answer is a few kB; more than this is not read (no verdict)."""
STDERR_TAIL = 4096
"""Only the tail of the child's stderr is kept (a traceback's last line says what went wrong)."""


async def _read_bounded(stream: asyncio.StreamReader | None, limit: int, tail: bool) -> tuple[bytes, bool]:
    """Everything `stream` gives until EOF, keeping at most `limit` bytes: the first (tail False)
    or the last (tail True). Returns them and whether more came."""
    kept, over = b"", False
    if stream is None:
        return kept, over
    while chunk := await stream.read(65_536):
        kept += chunk
        if len(kept) > limit:
            over = True
            kept = kept[-limit:] if tail else kept[:limit]
    return kept, over


def _kill(process: asyncio.subprocess.Process) -> None:
    with contextlib.suppress(ProcessLookupError):
        process.kill()


def size_refusal(spec: JSONObject, budget: Admission) -> AdmissionResult | None:
    """A candidate file over ``max_size_mb`` is refused on its size alone (no child loads a
    multi-GB file to find that out). Raises NoVerdict when the file is not there (yet); records
    its size and mtime in `spec` (the child tells a half-copied file from a broken model by them)."""
    try:
        stat = Path(str(spec["candidate"]["path"])).stat()
    except OSError as exc:
        raise NoVerdict(f"the candidate's file is not readable (yet): {exc.strerror or exc}") from None
    spec["candidate"]["size"] = stat.st_size
    spec["candidate"]["mtime_ns"] = stat.st_mtime_ns
    size_mb = stat.st_size / 2**20
    if budget.max_size_mb is None or size_mb <= budget.max_size_mb:
        return None
    check = Check("size", size_mb, budget.max_size_mb, False, f"file {size_mb:.1f} MB")
    return AdmissionResult(admitted=False, reason=clean(f"refused at admission: size {size_mb:.2f} > "
                                                        f"{budget.max_size_mb:g} (file {size_mb:.1f} MB)"),
                           candidate=None, incumbent=None, checks=(check,))


async def run_benchmark(spec: JSONObject, budget: Admission, on_start: Callable[[int], None] | None = None
                        ) -> AdmissionResult:
    """Run the child on `spec` within `budget.timeout_s` and judge its figures. A refusal comes
    only from a measured verdict, the candidate's own failures (it does not load from a stable
    file, fails on the rows, has other inputs, bad outputs) or its file size; everything else
    raises NoVerdict (``timed_out`` set when the time bound ran out) to be tried again."""
    began = time.monotonic()
    refused = size_refusal(spec, budget)
    if refused is not None:
        return refused
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _BOOTSTRAP, str(int(spec.get("nice", 0))), stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=_child_env())
    if on_start is not None:
        on_start(process.pid)

    async def talk() -> tuple[tuple[bytes, bool], tuple[bytes, bool]]:
        assert process.stdin is not None  # noqa: S101 - a pipe was asked for
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # a child that died at once
            process.stdin.write(json.dumps(dict(spec)).encode())
            await process.stdin.drain()
            process.stdin.close()
        answer = await asyncio.gather(_read_bounded(process.stdout, STDOUT_LIMIT, tail=False),
                                      _read_bounded(process.stderr, STDERR_TAIL, tail=True))
        await process.wait()
        return answer

    try:
        (stdout, too_much), (stderr, _) = await asyncio.wait_for(talk(), timeout=budget.timeout_s)
    except TimeoutError:
        _kill(process)
        await process.wait()
        raise NoVerdict(f"the benchmark did not finish within timeout_s {budget.timeout_s:g} s (killed)",
                        timed_out=True) from None
    except asyncio.CancelledError:
        _kill(process)
        with contextlib.suppress(Exception):
            await asyncio.shield(process.wait())
        raise
    seconds = time.monotonic() - began
    code = process.returncode
    if code != 0:
        last = stderr.decode(errors="replace").strip().splitlines()[-1:] or [""]
        how = f"killed by signal {-code}" if code is not None and code < 0 else f"exit code {code}"
        raise NoVerdict(clean(f"the benchmark process died ({how}) {last[0]}"))
    if too_much:
        raise NoVerdict(f"the benchmark process wrote more than {STDOUT_LIMIT} bytes")
    try:
        answer = json.loads(stdout)
    except ValueError:
        answer = None
    if not isinstance(answer, dict):
        raise NoVerdict("the benchmark process wrote no result (no JSON object)")
    if "error" in answer:
        who = answer.get("who") if answer.get("who") in ("candidate", "incumbent") else "benchmark"
        if who == "candidate" and answer.get("refuse") is True:
            return failed(f"the candidate: {answer['error']}", seconds)
        raise NoVerdict(clean(f"the {who} could not be benchmarked: {answer['error']}"))
    try:
        figures = answer["figures"]
        candidate = ModelFigures.from_dict(figures["candidate"])
        incumbent = ModelFigures.from_dict(figures["incumbent"])
    except (AdmissionError, KeyError, TypeError) as exc:
        raise NoVerdict(clean(f"the benchmark's figures are unusable: {exc}")) from None
    return judge(candidate, incumbent, budget, int(spec["max_batch"]), str(answer.get("rows_source", "")), seconds)


# ---------------------------------------------------------------------------------------------
# the parent: which replica runs it, and the verdict


def retry_delay_s(episodes: int) -> float:
    """Wait before trying a version again after `episodes` (1, 2, ...) runs without a verdict:
    RETRY_FIRST_S doubling per episode, at most RETRY_MAX_S."""
    return min(RETRY_FIRST_S * 2.0 ** max(0, min(episodes, 32) - 1), RETRY_MAX_S)


class AdmissionRunner:
    """Benchmarks versions at the admission stage, one task per (route, version), lease-guarded.

    Its per-version state (next claim, episodes without a verdict, timeouts, results, child pids)
    is kept only while the version is at the admission stage: pruned when the stage moves on."""

    def __init__(self, config: Config, repository: ModelRepository, store: RolloutStore,
                 routes: Mapping[str, Route], clock: Callable[[], float] = time.time,
                 metrics: GatewayMetrics | None = None) -> None:
        self.config = config
        self.repository = repository
        self.store = store
        self.routes = routes
        self.clock = clock
        self.metrics = metrics
        self.tasks: dict[tuple[str, int], asyncio.Task[AdmissionResult | None]] = {}
        self._next_claim: dict[tuple[str, int], float] = {}
        self._episodes: dict[tuple[str, int], int] = {}
        """Runs without a verdict per version (the backoff's exponent)."""
        self._timeouts: dict[tuple[str, int], int] = {}
        self.results: dict[tuple[str, int], AdmissionResult] = {}
        """Verdicts this replica wrote, while the version is at admission (for logs and tests)."""
        self.child_pids: dict[tuple[str, int], list[int]] = {}
        self.children_started = 0
        """Benchmark child processes this replica started, ever (for tests)."""
        self.verdicts_written = 0
        """Verdicts this replica wrote, ever (for tests)."""

    def _prune(self, name: str, keep: int | None) -> None:
        """Forget the route's versions other than `keep` (the one at admission, if any)."""
        for table in (self._next_claim, self._episodes, self._timeouts, self.results, self.child_pids):
            for key in [k for k in table if k[0] == name and k[1] != keep]:
                del table[key]
        self.tasks = {k: t for k, t in self.tasks.items() if not t.done() or (k[0] != name or k[1] == keep)}

    def consider(self, name: str, record: RolloutRecord | None) -> None:
        """Start benchmarking `record`'s version if it waits at the admission gate and this replica
        is not already on it (the lease decides between replicas, inside the task)."""
        if record is None or record.state.stage != "admission":
            self._prune(name, None)
            return
        self._prune(name, record.state.version)
        key = (name, record.state.version)
        task = self.tasks.get(key)
        if task is not None and not task.done():
            return
        if time.monotonic() < self._next_claim.get(key, 0.0):
            return
        self._next_claim[key] = time.monotonic() + CLAIM_RETRY_S
        self.tasks[key] = asyncio.get_running_loop().create_task(self._admit(name, record),
                                                                 name=f"admission {name} v{record.state.version}")

    async def _admit(self, name: str, seen: RolloutRecord) -> AdmissionResult | None:
        try:
            return await self._admit_once(name, seen)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - Redis away, a file gone: looked at again next refresh
            log.warning("admission: route %s version %d not decided yet: %s: %s", name, seen.state.version,
                        type(exc).__name__, exc)
            return None

    def _started(self, key: tuple[str, int]) -> Callable[[int], None]:
        def note(pid: int) -> None:
            self.children_started += 1
            self.child_pids.setdefault(key, []).append(pid)
        return note

    def _no_verdict(self, key: tuple[str, int], exc: RolloutError) -> AdmissionResult | None:
        """One episode without a verdict: backoff, a log line and a count; after TIMEOUTS_REFUSE
        timeouts the version is refused (it does not finish within its bound even when retried)."""
        name, version = key
        timed_out = isinstance(exc, NoVerdict) and exc.timed_out
        if timed_out:
            self._timeouts[key] = self._timeouts.get(key, 0) + 1
            if self._timeouts[key] >= TIMEOUTS_REFUSE:
                return failed(f"admission benchmark timed out {self._timeouts[key]} times")
        episodes = self._episodes[key] = self._episodes.get(key, 0) + 1
        delay = retry_delay_s(episodes)
        self._next_claim[key] = time.monotonic() + delay
        if self.metrics is not None:
            self.metrics.admission_retries.labels(name, "timeout" if timed_out else "infrastructure").inc()
        log.warning("admission: route %s version %d: no verdict (%s); tried again in %.0f s (episode %d%s)", name,
                    version, exc, delay, episodes,
                    f", timeout {self._timeouts[key]} of {TIMEOUTS_REFUSE}" if timed_out else "")
        return None

    async def _admit_once(self, name: str, seen: RolloutRecord) -> AdmissionResult | None:
        route = self.routes[name]
        budget = _budget(route)
        version = seen.state.version
        key = (name, version)
        token = await self.store.claim_admission(name, version, int(budget.timeout_s * 1000) + LEASE_MARGIN_MS)
        if token is None:
            return None  # another replica benchmarks it
        try:
            record = await self.store.read(name)
            # the verdict may be in already (another replica finished, an operator admitted it)
            if record is None or record.state.stage != "admission" or record.state.version != version:
                return None
            log.info("admission: route %s, benchmarking %s (version %d) against %s in a child process "
                     "(max %.0f s)", name, record.state.candidate_arm, version, record.state.replaces,
                     budget.timeout_s)
            try:
                spec = benchmark_spec(self.config, route, record, self.repository)
                result: AdmissionResult | None = await run_benchmark(spec, budget, on_start=self._started(key))
            except RolloutError as exc:  # NoVerdict, or the replaced arm unpinned: not the candidate's fault
                result = self._no_verdict(key, exc)
            if result is None:
                return None
            assert route.rollout is not None  # noqa: S101 - _budget checked it
            transition = admission_transition(record.state, result.admitted, result.reason, route.rollout,
                                              self.clock(), result.to_dict())
            if await self.store.decide_admission(record, transition, result.to_dict()):
                self.results[key] = result
                self.verdicts_written += 1
                level = logging.INFO if result.admitted else logging.WARNING
                log.log(level, "admission: route %s %s (version %d) %s (benchmark %.1f s)", name,
                        record.state.candidate_arm, version, result.reason, result.seconds)
            return result
        finally:
            with contextlib.suppress(Exception):
                await self.store.release_admission(name, token)

    async def close(self) -> None:
        """Cancel running benchmarks (their child processes are killed)."""
        tasks = [task for task in self.tasks.values() if not task.done()]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


if __name__ == "__main__":
    sys.exit(main())
