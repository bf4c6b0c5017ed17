"""The admission gate's verdict: a new version's measured cost against the incumbent's (pure).

Before a new version may shadow, one gateway benchmarks it beside the arm it would replace
(gateway/admission.py: one child process, the same rows, interleaved runs). What it measures per
model is a :class:`ModelFigures`; :func:`judge` compares the candidate's with the incumbent's
under the route's ``rollout.admission`` budgets and returns an :class:`AdmissionResult`, which
the rollout record keeps (router.lineup) and ``banditgate rollout status`` prints
(:func:`table`).

Ratios are candidate / incumbent, with each figure raised to a floor first (``latency_floor_ms``,
``memory_floor_mb``): below the floor a difference is measurement noise (a 20 µs model against
a 30 µs one, 300 kB against 500 kB) and decides nothing. Throughput's ratio is the candidate's
rows/s over the incumbent's (the floor applied to the time per batch).

>>> from banditgate.config import Admission
>>> light = ModelFigures(p50_ms=1.0, p99_ms=1.2, batch_p50_ms=10, batch_p99_ms=12, rows_per_s=3200,
...                      memory_mb=40, size_mb=20)
>>> heavy = ModelFigures(p50_ms=3.0, p99_ms=3.6, batch_p50_ms=30, batch_p99_ms=36, rows_per_s=1070,
...                      memory_mb=80, size_mb=40)
>>> result = judge(heavy, light, Admission(max_latency_p99_ratio=2.0, max_memory_ratio=1.5), batch=32)
>>> result.admitted, [check.name for check in result.checks if not check.ok]
(False, ['latency_p99_batch1', 'latency_p99_max_batch', 'memory', 'throughput'])
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace

from banditgate.config import Admission
from banditgate.jsontypes import JSONObject

MAX_REASON_CHARS = 300
"""A verdict's reason is one line of at most this many characters (it goes into alerts and logs)."""
MAX_PROBLEMS_LISTED = 5
"""At most this many output problems are kept, then ``and N more``."""

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]+")
_MORE = re.compile(r"and (\d+) more")


def clean(text: object, limit: int = MAX_REASON_CHARS) -> str:
    """`text` as one printable line of at most `limit` characters: control characters (newlines,
    escapes a model's tensor names or an error message may carry) become a space, the rest cut
    with an ellipsis."""
    line = _CONTROL.sub(" ", str(text)).strip()
    return line if len(line) <= limit else line[:limit - 1] + "…"


def bounded(items: Sequence[str], most: int = MAX_PROBLEMS_LISTED) -> list[str]:
    """The first `most` of `items`, cleaned, then ``and N more`` when there were more."""
    items = list(items)
    more = 0
    tail = _MORE.fullmatch(items[-1]) if items else None
    if tail is not None:  # already bounded once: the count carries over
        more, items = int(tail.group(1)), items[:-1]
    more += max(0, len(items) - most)
    return [clean(item, 120) for item in items[:most]] + ([f"and {more} more"] if more else [])


class AdmissionError(ValueError):
    """Stored or measured admission figures are not valid; one line."""

    user_facing = True


def percentile(samples: Sequence[float], q: float) -> float:
    """The `q` quantile (0..1) of `samples`, linearly interpolated between order statistics (as
    numpy's default). Raises AdmissionError for no samples, a non-finite one or q outside [0, 1]."""
    if not 0.0 <= q <= 1.0:
        raise AdmissionError(f"quantile must be within [0, 1], got {q}")
    if not samples:
        raise AdmissionError("no samples")
    ordered = sorted(float(s) for s in samples)
    if not all(math.isfinite(s) for s in ordered):
        raise AdmissionError("a sample is not a finite number")
    position = q * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


@dataclass(frozen=True, slots=True)
class ModelFigures:
    """What the benchmark measured for one model version (milliseconds, rows/s, MB)."""

    p50_ms: float
    p99_ms: float
    """At batch 1."""
    batch_p50_ms: float
    batch_p99_ms: float
    """At the max batch."""
    rows_per_s: float
    """At the max batch."""
    memory_mb: float
    """Resident memory added by loading it (session + warm-up run)."""
    size_mb: float
    """Model file size."""
    problems: tuple[str, ...] = ()
    """What is wrong with its outputs on the benchmark rows (shape, dtype, NaN), one line each."""

    def __post_init__(self) -> None:
        for name in ("p50_ms", "p99_ms", "batch_p50_ms", "batch_p99_ms", "rows_per_s", "memory_mb", "size_mb"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise AdmissionError(f"figure {name} must be a finite number, got {value!r}")

    @classmethod
    def from_samples(cls, batch1_ms: Sequence[float], batch_ms: Sequence[float], batch: int, memory_mb: float,
                     size_mb: float, problems: Sequence[str] = ()) -> ModelFigures:
        """Figures from timed runs (ms each) at batch 1 and at `batch` rows."""
        if batch < 1:
            raise AdmissionError(f"batch must be at least 1, got {batch}")
        total_s = sum(batch_ms) / 1000.0
        return cls(p50_ms=percentile(batch1_ms, 0.5), p99_ms=percentile(batch1_ms, 0.99),
                   batch_p50_ms=percentile(batch_ms, 0.5), batch_p99_ms=percentile(batch_ms, 0.99),
                   rows_per_s=batch * len(batch_ms) / max(total_s, 1e-9),
                   memory_mb=max(0.0, float(memory_mb)), size_mb=float(size_mb), problems=tuple(problems))

    def to_dict(self) -> JSONObject:
        out: JSONObject = {k: round(v, 4) if isinstance(v, float) else v for k, v in asdict(self).items()
                           if k != "problems"}
        out["problems"] = list(self.problems)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> ModelFigures:
        try:
            problems = data.get("problems") or []
            if not isinstance(problems, list):
                raise AdmissionError("problems must be a list")
            return cls(**{name: _number(data[name]) for name in (
                "p50_ms", "p99_ms", "batch_p50_ms", "batch_p99_ms", "rows_per_s", "memory_mb", "size_mb")},
                problems=tuple(str(p) for p in problems))
        except KeyError as exc:
            raise AdmissionError(f"admission figures lack {exc.args[0]!r}") from None


def _number(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise AdmissionError(f"admission figure {value!r} is not a number")
    return float(value)


@dataclass(frozen=True, slots=True)
class Check:
    """One budget: the measured ratio (or value) against its limit."""

    name: str
    value: float
    limit: float
    ok: bool
    detail: str

    def to_dict(self) -> JSONObject:
        return {"name": self.name, "value": round(self.value, 4), "limit": self.limit, "ok": self.ok,
                "detail": self.detail}


@dataclass(frozen=True, slots=True)
class AdmissionResult:
    """The gate's verdict with the figures behind it (kept in the rollout record)."""

    admitted: bool
    reason: str
    """One line: why admitted or refused."""
    candidate: ModelFigures | None
    incumbent: ModelFigures | None
    checks: tuple[Check, ...] = ()
    batch: int = 1
    rows_source: str = ""
    """Where the benchmark rows came from (``reference.json of m v4``, ``synthetic``)."""
    seconds: float = 0.0
    """How long the benchmark took."""

    def to_dict(self) -> JSONObject:
        return {"admitted": self.admitted, "reason": self.reason,
                "candidate": self.candidate.to_dict() if self.candidate is not None else None,
                "incumbent": self.incumbent.to_dict() if self.incumbent is not None else None,
                "checks": [check.to_dict() for check in self.checks], "batch": self.batch,
                "rows_source": self.rows_source, "seconds": round(self.seconds, 3)}

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> AdmissionResult:
        """Inverse of to_dict. Raises AdmissionError for a document that is not a result."""
        try:
            checks_raw = data.get("checks") or []
            if not isinstance(checks_raw, list):
                raise AdmissionError("checks must be a list")
            checks = tuple(Check(str(c["name"]), _number(c["value"]), _number(c["limit"]), bool(c["ok"]),
                                 str(c.get("detail", ""))) for c in checks_raw)
            candidate, incumbent = data.get("candidate"), data.get("incumbent")
            batch = data.get("batch", 1)
            return cls(admitted=bool(data["admitted"]), reason=str(data["reason"]),
                       candidate=ModelFigures.from_dict(candidate) if isinstance(candidate, Mapping) else None,
                       incumbent=ModelFigures.from_dict(incumbent) if isinstance(incumbent, Mapping) else None,
                       checks=checks, batch=int(_number(batch)), rows_source=str(data.get("rows_source", "")),
                       seconds=_number(data.get("seconds", 0.0)))
        except (KeyError, TypeError) as exc:
            raise AdmissionError(f"stored admission result is not valid: {exc}") from None


def _ratio(candidate: float, incumbent: float, floor: float) -> float:
    return max(candidate, floor) / max(incumbent, floor, 1e-12)


def judge(candidate: ModelFigures, incumbent: ModelFigures, budget: Admission, batch: int,
          rows_source: str = "", seconds: float = 0.0) -> AdmissionResult:
    """Compare the candidate's figures with the incumbent's under `budget`; admitted when every
    check holds and its outputs have no problem."""
    floor_ms, floor_mb = budget.latency_floor_ms, budget.memory_floor_mb
    checks = []
    for name, c, i in (("latency_p99_batch1", candidate.p99_ms, incumbent.p99_ms),
                       ("latency_p99_max_batch", candidate.batch_p99_ms, incumbent.batch_p99_ms)):
        ratio = _ratio(c, i, floor_ms)
        checks.append(Check(name, ratio, budget.max_latency_p99_ratio, ratio <= budget.max_latency_p99_ratio,
                            f"p99 {c:.3f} ms vs {i:.3f} ms"))
    ratio = _ratio(candidate.memory_mb, incumbent.memory_mb, floor_mb)
    checks.append(Check("memory", ratio, budget.max_memory_ratio, ratio <= budget.max_memory_ratio,
                        f"{candidate.memory_mb:.1f} MB vs {incumbent.memory_mb:.1f} MB added by loading"))
    # rows/s from time per batch, with the floor on that time
    candidate_s = max(batch / max(candidate.rows_per_s, 1e-12) * 1000.0, floor_ms)
    incumbent_s = max(batch / max(incumbent.rows_per_s, 1e-12) * 1000.0, floor_ms)
    ratio = incumbent_s / candidate_s
    checks.append(Check("throughput", ratio, budget.min_throughput_ratio, ratio >= budget.min_throughput_ratio,
                        f"{candidate.rows_per_s:.0f} vs {incumbent.rows_per_s:.0f} rows/s at batch {batch}"))
    if budget.max_size_mb is not None:
        checks.append(Check("size", candidate.size_mb, budget.max_size_mb, candidate.size_mb <= budget.max_size_mb,
                            f"file {candidate.size_mb:.1f} MB"))
    failed = [check for check in checks if not check.ok]
    if candidate.problems:
        reason = "refused at admission: outputs " + "; ".join(bounded(candidate.problems))
    elif failed:
        reason = "refused at admission: " + "; ".join(
            f"{c.name} {c.value:.2f} {'<' if c.name == 'throughput' else '>'} {c.limit:g} ({c.detail})" for c in failed)
    else:
        reason = "admitted: " + ", ".join(f"{c.name} {c.value:.2f}" for c in checks)
    candidate = replace(candidate, problems=tuple(bounded(candidate.problems)))
    return AdmissionResult(admitted=not failed and not candidate.problems, reason=clean(reason), candidate=candidate,
                           incumbent=incumbent, checks=tuple(checks), batch=batch, rows_source=rows_source,
                           seconds=seconds)


def failed(reason: str, seconds: float = 0.0) -> AdmissionResult:
    """The verdict when the benchmark could not measure the candidate (it does not load, the
    benchmark outlived its time bound, died, ...): refused, with the reason."""
    return AdmissionResult(admitted=False, reason=clean(f"refused at admission: {reason}"), candidate=None,
                           incumbent=None, seconds=seconds)


def output_problems(candidate: Mapping[str, tuple[str, tuple[int, ...], int]],
                    incumbent: Mapping[str, tuple[str, tuple[int, ...], int]]) -> list[str]:
    """What is wrong with the candidate's outputs on the benchmark rows, given per output name
    (dtype, shape of one row, count of NaN or infinite values) for both models: an output the
    incumbent has and it lacks, another dtype or row shape, any non-finite value."""
    problems: list[str] = []
    for name, (dtype, shape, _) in sorted(incumbent.items()):
        label = clean(name, 60)
        if name not in candidate:
            problems.append(f"{label} missing")
            continue
        c_dtype, c_shape, _ = candidate[name]
        if c_dtype != dtype:
            problems.append(f"{label} dtype {c_dtype}, incumbent {dtype}")
        if tuple(c_shape) != tuple(shape):
            problems.append(f"{label} row shape {list(c_shape)}, incumbent {list(shape)}")
    for name, (_, _, nonfinite) in sorted(candidate.items()):
        if nonfinite:
            problems.append(f"{clean(name, 60)} has {nonfinite} NaN or infinite values")
    return bounded(problems)


def table(result: Mapping[str, object]) -> list[str]:
    """`banditgate rollout status` lines for a stored result (figures side by side, then checks)."""
    try:
        parsed = AdmissionResult.from_dict(result)
    except AdmissionError as exc:
        return [f"admission result unreadable: {exc}"]
    lines = [f"admission: {parsed.reason}"]
    manual = result.get("manual")
    if isinstance(manual, Mapping) and manual.get("measured"):
        lines.append(f"  (the benchmark's verdict was: {clean(manual['measured'])})")
    if parsed.candidate is None or parsed.incumbent is None:
        return lines
    c, i = parsed.candidate, parsed.incumbent
    rows = [("p50 ms (batch 1)", c.p50_ms, i.p50_ms), ("p99 ms (batch 1)", c.p99_ms, i.p99_ms),
            (f"p50 ms (batch {parsed.batch})", c.batch_p50_ms, i.batch_p50_ms),
            (f"p99 ms (batch {parsed.batch})", c.batch_p99_ms, i.batch_p99_ms),
            (f"rows/s (batch {parsed.batch})", c.rows_per_s, i.rows_per_s),
            ("memory added MB", c.memory_mb, i.memory_mb), ("file MB", c.size_mb, i.size_mb)]
    lines.append(f"  {'figure':<22} {'candidate':>12} {'incumbent':>12} {'ratio':>8}")
    for label, cv, iv in rows:
        ratio = f"{cv / iv:.2f}" if iv > 0 else "-"
        lines.append(f"  {label:<22} {cv:>12.3f} {iv:>12.3f} {ratio:>8}")
    for check in parsed.checks:
        sign = ">=" if check.name == "throughput" else "<="
        lines.append(f"  {'ok  ' if check.ok else 'OVER'} {check.name}: {check.value:.2f} (budget {sign} {check.limit:g})")
    for problem in c.problems:
        lines.append(f"  OUTPUT {problem}")
    lines.append(f"  rows: {parsed.rows_source or '-'}; benchmark {parsed.seconds:.1f} s")
    return lines
