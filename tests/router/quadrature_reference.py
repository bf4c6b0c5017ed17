"""The per-arm-grid quadrature router.thompson used before its shared grid: the tests' reference.

Independent of the shared-grid code (each arm's own sinh-spaced nodes around its posterior,
O(arms^3) work), so agreement between the two is evidence for both. Used with 2001 nodes per arm.
"""

from __future__ import annotations

import numpy as np

from router.thompson import BetaPosterior, StudentTPosterior

_BOUNDARY_STEPS = np.geomspace(1e-9, 0.05, 24)


def _log_density(posterior: BetaPosterior | StudentTPosterior, x: np.ndarray) -> np.ndarray:
    if isinstance(posterior, BetaPosterior):
        a, b = posterior.alpha[..., None] - 1.0, posterior.beta[..., None] - 1.0
        return a * np.log(np.maximum(x, 1e-300)) + b * np.log(np.maximum(1.0 - x, 1e-300))
    z = (x - posterior.loc[..., None]) / posterior.scale[..., None]
    dof = posterior.dof[..., None]
    return -0.5 * (dof + 1.0) * np.log1p(z * z / dof) - np.log(posterior.scale[..., None])


def reference_probability_best(posterior: BetaPosterior | StudentTPosterior, nodes_per_arm: int = 2001,
                               span: float = 7.0) -> np.ndarray:
    """P(each arm's draw is the largest) for a 1-D posterior, on per-arm grids."""
    loc, scale = posterior.location_scale()
    arms = loc.shape[-1]
    if arms == 1:
        return np.ones(1)
    low, high = posterior.support()
    grid = (loc[:, None] + scale[:, None] * np.sinh(np.linspace(-span, span, nodes_per_arm))).ravel()
    if np.isfinite(low) and np.isfinite(high):
        width = high - low
        grid = np.clip(np.concatenate([grid, np.linspace(low, high, 33), low + width * _BOUNDARY_STEPS,
                                       high - width * _BOUNDARY_STEPS]), low, high)
    grid = np.sort(grid)
    log_density = _log_density(posterior, grid[None, :])
    density = np.exp(log_density - log_density.max(axis=-1, keepdims=True))
    width = np.diff(grid)[None, :]
    cdf = np.concatenate([np.zeros((arms, 1)), np.cumsum(0.5 * (density[:, 1:] + density[:, :-1]) * width, axis=-1)],
                         axis=-1)
    density, cdf = density / cdf[:, -1:], cdf / cdf[:, -1:]
    best = np.empty(arms)
    for arm in range(arms):
        others = np.prod(np.delete(cdf, arm, axis=0), axis=0)
        integrand = density[arm] * others
        best[arm] = np.sum(0.5 * (integrand[1:] + integrand[:-1]) * width[0])
    return best / best.sum()
