"""CUSUM thresholds calibrated by simulation to a target average run length between false alarms.

ARL0 is the mean number of in-control observations between false alarms of one detector
(restarting from zero after each alarm), so a stationary stream raises about n / ARL0 of them.

Method: simulate many independent in-control streams through the very code the monitors run,
count threshold crossings at a grid of thresholds, and solve log(crossing rate) = a + b * h,
fitted by Poisson-weighted least squares near the target, for the rate 1 / ARL0. "In control"
includes the reference's own sampling error: each simulated stream draws its true bin
distribution from Dirichlet(count * p + 1/2) around the profile's frequencies p, so a profile
built from few rows gets the higher threshold it needs. Where ARL0 lies beyond what the budget
can observe (e.g. Bonferroni-scaled targets), the threshold is extrapolated along the
exponential tail ARL ~ C * exp(theta * h), which holds for likelihood-ratio CUSUMs. A nearly
constant feature, which almost never crosses even a low threshold, gets h = ln(ARL0), the
conservative bound that holds because exp(W) is a mean-one martingale when nothing drifts.

The inputs of one calibration are (rounded, sorted bin frequencies, reference size, ARL0,
settings, seed): bins are exchangeable for these statistics, so every 10-quantile-bin numeric
feature shares one run. `feature_key` / `bernoulli_key` name them with a stable hash, under which
`banditgate profile` stores thresholds in reference.json (a monitor given them simulates
nothing). Within a process each key is calibrated once: the first caller runs the simulation and
concurrent callers of the same key wait for its result (a per-key future; `functools.lru_cache`
would run a concurrent miss once per thread).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping
from concurrent.futures import Future

import numpy as np

from banditgate.drift.adaptive import AdaptiveIncrements, EstimatorSettings, smoothed
from banditgate.drift.cusum import count_crossings

Source = Callable[[int], np.ndarray]  # rows -> increments [rows, streams]
Factory = Callable[[np.random.Generator, int], Source]  # (rng, streams) -> fresh source

PILOT_STREAMS, PILOT_LENGTH = 20, 10_000
MAIN_STREAMS, MAIN_LENGTH = 50, 80_000
CHUNK_ROWS = 2048
MIN_CROSSINGS = 20
CAP_CROSSINGS = 3000
METHOD = "banditgate.calibration/1"
"""Names the simulation method in every key: a change to how thresholds are computed (the
constants above, the estimator, the fit) must change this, so stored thresholds are recomputed."""
MEMO_SIZE = 256
"""Keys whose thresholds a process keeps (each a float; older ones are forgotten first)."""


class CalibrationError(ValueError):
    """A calibration target or input is out of range; one line saying which."""

    user_facing = True


def _crossing_counts(factory: Factory, rng: np.random.Generator, thresholds: np.ndarray,
                     streams: int, length: int) -> tuple[np.ndarray, np.ndarray]:
    """Crossings and observations per threshold. A threshold stops once it has CAP_CROSSINGS
    (low thresholds cross constantly; more of them add cost, not precision)."""
    source = factory(rng, streams)
    states = np.zeros((thresholds.size, streams))
    counts = np.zeros(thresholds.size)
    observations = np.zeros(thresholds.size)
    for start in range(0, length, CHUNK_ROWS):
        increments = source(min(CHUNK_ROWS, length - start))
        for index, threshold in enumerate(thresholds):
            if counts[index] >= CAP_CROSSINGS:
                continue
            states[index], crossed = count_crossings(increments, states[index], float(threshold))
            counts[index] += crossed
            observations[index] += increments.size
    return counts, observations


def _solve(thresholds: np.ndarray, counts: np.ndarray, observations: np.ndarray, arl0: float) -> float:
    """Threshold where the fitted log crossing rate equals log(1 / arl0)."""
    usable = counts >= MIN_CROSSINGS
    if usable.sum() < 2:
        raise CalibrationError("too few simulated false alarms to calibrate (is ARL0 below 10?)")
    heights, rates = thresholds[usable], np.log(counts[usable] / observations[usable])
    target = -math.log(arl0)
    # local fit: the three usable thresholds nearest the target rate (the curve bends at low h)
    nearest = np.argsort(np.abs(rates - target))[:3]
    weights = counts[usable][nearest]
    slope, intercept = np.polyfit(heights[nearest], rates[nearest], 1, w=np.sqrt(weights))
    if not slope < 0:
        raise CalibrationError("simulated false-alarm rate does not fall with the threshold")
    return float((target - intercept) / slope)


def calibrate(factory: Factory, arl0: float, seed: int, scale: float = 0.5) -> float:
    """Threshold giving `arl0` for the increments `factory` produces. `scale` is the grid step,
    about the increments' typical size. Raises CalibrationError for arl0 < 10."""
    if not arl0 >= 10:
        raise CalibrationError(f"arl0 must be at least 10 observations, got {arl0}")
    rng = np.random.default_rng(seed)
    pilot_grid = np.arange(1, 25) * scale
    pilot, pilot_observations = _crossing_counts(factory, rng, pilot_grid, PILOT_STREAMS, PILOT_LENGTH)
    try:
        guess = _solve(pilot_grid, pilot, pilot_observations, arl0)
        # main grid: from where crossings are plentiful (rate ~ 1/2000) up past the guess
        low = _solve(pilot_grid, pilot, pilot_observations, min(arl0, 2000.0))
        grid = np.arange(max(scale, low - scale), guess + 2.5 * scale, scale)
        counts, observations = _crossing_counts(factory, rng, grid, MAIN_STREAMS, MAIN_LENGTH)
        return _solve(grid, counts, observations, arl0)
    except CalibrationError:
        # a nearly constant feature hardly ever crosses anything: fall back on the martingale
        # bound (exp of the statistic is a mean-one martingale without drift), ARL0 >= e^h
        return math.log(arl0)


def _round_significant(value: float, digits: int = 2) -> int:
    if value <= 0:
        return 0
    magnitude = 10 ** max(0, math.floor(math.log10(value)) - digits + 1)
    return round(value / magnitude) * magnitude


def _bucket(probability: float) -> float:
    # relative rounding, 2^(1/2) steps (about +-19%): thresholds depend mostly on how many bins
    # there are and little on their exact shares, so near-identical profiles share one simulation
    if probability < 1e-4:
        return 0.0
    return float(2.0 ** (round(2.0 * math.log2(probability)) / 2.0))


class _Memo:
    """Thresholds by key, computed once per key per process; thread-safe. A concurrent miss waits
    for the computation already running (a Future per key) instead of starting its own. Failed
    computations are not kept (the next caller tries again). At most MEMO_SIZE keys are kept."""

    def __init__(self, size: int = MEMO_SIZE) -> None:
        self._size = size
        self._lock = threading.Lock()
        self._futures: OrderedDict[str, Future[float]] = OrderedDict()
        self.computed = 0
        """Simulations run by this process (each key at most once while it is remembered)."""

    def get(self, key: str, compute: Callable[[], float]) -> float:
        with self._lock:
            future = self._futures.get(key)
            owner = future is None
            if future is None:
                future = self._futures[key] = Future()
                while len(self._futures) > self._size:
                    self._futures.popitem(last=False)
            else:
                self._futures.move_to_end(key)
        if not owner:
            return future.result()
        try:
            value = compute()
        except BaseException as exc:
            with self._lock:
                if self._futures.get(key) is future:
                    del self._futures[key]
            future.set_exception(exc)
            raise
        with self._lock:
            self.computed += 1
        future.set_result(value)
        return value

    def clear(self) -> None:
        with self._lock:
            self._futures.clear()
            self.computed = 0


_memo = _Memo()


def calibrations_run() -> int:
    """Simulations this process has run (tests count them: a stored threshold runs none)."""
    return _memo.computed


def clear_memo() -> None:
    """Forget every threshold this process calibrated (tests)."""
    _memo.clear()


def _key(kind: str, inputs: Mapping[str, object]) -> str:
    """A stable name for exactly the inputs of one calibration (sha256 of canonical JSON)."""
    document = json.dumps({"method": METHOD, "kind": kind, **inputs}, sort_keys=True, separators=(",", ":"),
                          allow_nan=False)
    return f"{kind}:{hashlib.sha256(document.encode()).hexdigest()[:32]}"


def _feature_inputs(probabilities: np.ndarray, reference_count: int, arl0: float, settings: EstimatorSettings,
                    seed: int) -> tuple[tuple[float, ...], int, float, EstimatorSettings, int]:
    frequencies = np.sort([_bucket(p) for p in np.asarray(probabilities, dtype=float)])
    total = frequencies.sum()
    if not total > 0:
        raise CalibrationError("bin probabilities sum to zero")
    return (tuple((frequencies / total).round(6).tolist()), _round_significant(reference_count), float(arl0),
            settings, int(seed))


def feature_key(probabilities: np.ndarray, reference_count: int, arl0: float, settings: EstimatorSettings,
                seed: int = 0) -> str:
    """The key of `feature_threshold`'s calibration for these arguments: equal keys, equal
    thresholds. Raises CalibrationError for probabilities that sum to zero."""
    frequencies, count, arl0, settings, seed = _feature_inputs(probabilities, reference_count, arl0, settings, seed)
    return _key("feature", {"frequencies": list(frequencies), "reference_count": count, "arl0": arl0,
                            "settings": dataclasses.asdict(settings), "seed": seed})


def feature_threshold(probabilities: np.ndarray, reference_count: int, arl0: float,
                      settings: EstimatorSettings, seed: int = 0,
                      stored: Mapping[str, float] | None = None) -> float:
    """Threshold for one feature's adaptive CUSUM. probabilities: its reference bin frequencies
    (value bins then missing, summing to 1); reference_count: rows the profile was built from.
    stored: thresholds by `feature_key` (from reference.json); a hit simulates nothing. Otherwise
    calibrated once per key per process. Raises CalibrationError for arl0 < 10 or probabilities
    that sum to zero."""
    inputs = _feature_inputs(probabilities, reference_count, arl0, settings, seed)
    key = feature_key(probabilities, reference_count, arl0, settings, seed)
    if stored is not None and _usable(stored.get(key)):
        return float(stored[key])
    return _memo.get(key, lambda: _feature_threshold(*inputs))


def _usable(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def _feature_threshold(frequencies: tuple[float, ...], reference_count: int, arl0: float,
                       settings: EstimatorSettings, seed: int) -> float:
    frequencies_array = np.asarray(frequencies)
    reference = smoothed(frequencies_array, reference_count)
    concentration = frequencies_array * reference_count + 0.5

    def factory(rng: np.random.Generator, streams: int) -> Source:
        truth = rng.dirichlet(concentration, size=streams)
        cumulative = np.cumsum(truth, axis=1)
        estimator = AdaptiveIncrements(np.tile(reference, (streams, 1)), settings)
        last = frequencies_array.size - 1

        def source(rows: int) -> np.ndarray:
            uniforms = rng.random((rows, streams))
            bins = np.column_stack([np.searchsorted(cumulative[s], uniforms[:, s]) for s in range(streams)])
            return estimator.increments(np.minimum(bins, last))
        return source

    return calibrate(factory, arl0, seed)


def _bernoulli_inputs(p0: float, p1: float, arl0: float, reference_count: int | None,
                      seed: int) -> tuple[float, float, float, int | None, int]:
    ratio = p1 / p0
    rounded = min(_bucket(p0), 1.0 / ratio - 1e-9, 0.999)
    count = _round_significant(reference_count) if reference_count else None
    return rounded, float(ratio), float(arl0), count, int(seed)


def bernoulli_key(p0: float, p1: float, arl0: float, reference_count: int | None = None, seed: int = 0) -> str:
    """The key of `bernoulli_threshold`'s calibration for these arguments."""
    rounded, ratio, arl0, count, seed = _bernoulli_inputs(p0, p1, arl0, reference_count, seed)
    return _key("bernoulli", {"p0": rounded, "ratio": ratio, "arl0": arl0, "reference_count": count, "seed": seed})


def bernoulli_threshold(p0: float, p1: float, arl0: float, reference_count: int | None = None,
                        seed: int = 0) -> float:
    """Threshold for a Bernoulli CUSUM of p0 -> p1 (log-likelihood-ratio increments). With
    reference_count, p0 was estimated from that many observations and the simulated in-control
    rate is drawn from Beta(count * p0 + 1/2, count * (1 - p0) + 1/2). p0 and p1 are bucketed
    like bin frequencies (about +-19%) for the key; their ratio is kept. Calibrated once per key
    per process."""
    inputs = _bernoulli_inputs(p0, p1, arl0, reference_count, seed)
    return _memo.get(bernoulli_key(p0, p1, arl0, reference_count, seed), lambda: _bernoulli_threshold(*inputs))


def _bernoulli_threshold(p0: float, ratio: float, arl0: float, reference_count: int | None, seed: int) -> float:
    p1 = p0 * ratio
    up, down = math.log(ratio), math.log((1 - p1) / (1 - p0))

    def factory(rng: np.random.Generator, streams: int) -> Source:
        if reference_count:
            rates = rng.beta(reference_count * p0 + 0.5, reference_count * (1 - p0) + 0.5, size=streams)
        else:
            rates = np.full(streams, p0)

        def source(rows: int) -> np.ndarray:
            return np.where(rng.random((rows, streams)) < rates, up, down)
        return source

    return calibrate(factory, arl0, seed, scale=max(0.25, min(1.0, up)))
