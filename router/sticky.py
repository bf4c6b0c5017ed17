"""Sticky assignment: the same unit always gets the same arm, by stable weighted hashing (pure).

Weighted rendezvous hashing: unit u goes to the arm k minimising ``-ln(h(u, k)) / share_k``
where h(u, k) is a uniform number in (0, 1) made from stable 64-bit hashes of the unit id and of
the arm's *name*. Over units, P(arm k) = share_k exactly (a race of exponential clocks), so the
logged propensity is the share. Adding an arm (anywhere, not only at the end) moves a unit only
if the new arm wins its race; removing or renaming one moves only its own units; reordering moves
nobody. Hashes are blake2b (not Python's salted ``hash``), so every replica and every restart
agrees.

>>> arms = arm_hashes(["a", "b"])
>>> first = rendezvous(unit_hashes(["user-1", "user-2"]), arms, np.array([0.5, 0.5]))
>>> bool(np.all(first == rendezvous(unit_hashes(["user-1", "user-2"]), arms, np.array([0.5, 0.5]))))
True
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np

_MULTIPLIER_1 = np.uint64(0xBF58476D1CE4E5B9)
_MULTIPLIER_2 = np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _stable_hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")


def unit_hashes(unit_ids: Sequence[str]) -> np.ndarray:
    """64-bit stable hashes of unit ids (uint64 array)."""
    return np.fromiter((_stable_hash(unit) for unit in unit_ids), dtype=np.uint64, count=len(unit_ids))


def arm_hashes(arm_names: Sequence[str]) -> np.ndarray:
    """64-bit stable hashes of arm names, salted so they differ from unit hashes of equal text."""
    return np.fromiter((_stable_hash("arm\x00" + name) for name in arm_names), dtype=np.uint64,
                       count=len(arm_names))


def mix64(values: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser on a uint64 array: a cheap, well-mixed bijection (wraps mod 2**64)."""
    mixed = np.asarray(values, dtype=np.uint64) + _GOLDEN
    mixed = (mixed ^ (mixed >> np.uint64(30))) * _MULTIPLIER_1
    mixed = (mixed ^ (mixed >> np.uint64(27))) * _MULTIPLIER_2
    return mixed ^ (mixed >> np.uint64(31))


def to_unit_interval(values: np.ndarray) -> np.ndarray:
    """Uniform floats in the open interval (0, 1) from uint64 hashes (53 bits kept)."""
    return ((values >> np.uint64(11)).astype(np.float64) + 0.5) * (1.0 / 9007199254740992.0)


def rendezvous(units: np.ndarray, arms: np.ndarray, shares: np.ndarray) -> np.ndarray:
    """Arm index per unit (int64, shape of `units`); arms with share 0 are never chosen.

    Raises ValueError if no share is positive.
    """
    shares = np.asarray(shares, dtype=np.float64)
    if not np.any(shares > 0):
        raise ValueError("rendezvous needs at least one arm with a positive share")
    uniform = to_unit_interval(mix64(units[:, None] ^ mix64(arms)[None, :]))
    with np.errstate(divide="ignore"):
        scores = -np.log(uniform) / shares[None, :]
    return np.argmin(scores, axis=1).astype(np.int64)
