"""The fresh noise a stochastic sampler draws at an evaluation, per image and reproducible.

Image i's noise comes only from its own key (``rng`` of shape (B,); one key for the whole batch also works), so
an image is the same whatever the batch it is in and however the batch is split over devices.

* :meth:`StepNoise.normal`: N(0, 1) from ``fold_in(key, evaluation index)`` (ancestral samplers, DDPM, LCM...).
* :meth:`StepNoise.brownian`: the normalised increment (W(s) - W(t)) / sqrt(|s - t|) of one Brownian motion W per
  image, the noise DPM-Solver-SDE (``DPMSolverSDEScheduler``, k-diffusion ``sample_dpmpp_sde``) is defined with:
  its two sub-steps over [sigma_next, sigma] and [sigma_mid, sigma] see correlated noise, as the SDE requires.

The reference draws W from ``torchsde.BrownianInterval`` (a tree refined at the queried times, seeded per batch).
sdjax builds W by recursive bisection of [0, sigma_top] (sigma_top: the schedule's largest level): W(sigma_top) ~
N(0, sigma_top), each midpoint from the Brownian bridge between its interval's ends with a key folded from its
parent's, down to leaves ~1e-6 wide (24 levels), linear in between; the plan locates each queried level's leaf on
the host (:func:`brownian_rows`). W(t) is a function of (key, t) only, so every
query, in any order, from any plan of the same schedule, sees the same path; the increments have the law of
Brownian motion (exactly at the dyadic points; variance short by at most a leaf's width in between). Bitwise
equality with torch's noise is impossible (different generators and tree); the distribution is the same.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

BROWNIAN_STREAM = 0x7FFFFFFF  # fold_in tag of the Brownian path; evaluation indices use 0, 1, 2, ...
_LEAF = 2.0**-20  # largest leaf width of the tree (~1e-6)
_MAX_DEPTH = 24  # leaf indices stay exact in the plan's float32 rows


def is_zero(eta) -> bool:
    """Whether ``eta`` is a concrete Python zero: an "eta" sampler then draws no noise at all (a traced eta
    always draws, so that changing eta reuses the compiled program)."""
    return isinstance(eta, (int, float)) and eta == 0


def brownian_depth(sigma_top: float) -> int:
    """Bisection depth of the Brownian tree over [0, sigma_top]: leaves <= 2^-20 wide where 24 levels allow
    (SD's sigma_top 14.6: 24 levels, leaves 8.7e-7 wide)."""
    return max(1, min(_MAX_DEPTH, math.ceil(math.log2(sigma_top / _LEAF))))


def brownian_rows(name: str, sigmas, sigma_top: float) -> dict[str, np.ndarray]:
    """Plan rows for querying W at ``sigmas`` (host side, float64): ``name`` (the level), ``name_leaf`` (the
    index of the tree leaf holding it) and ``name_frac`` (its position in the leaf). Locating the leaf on the host
    keeps W(sigma) independent of how a compiled program rounds sigma / sigma_top."""
    depth = brownian_depth(sigma_top)
    u = np.clip(np.asarray(sigmas, np.float64) / sigma_top, 0.0, 1.0) * 2**depth
    leaf = np.minimum(np.floor(u), 2**depth - 1)
    return {name: np.asarray(sigmas, np.float64), f"{name}_leaf": leaf, f"{name}_frac": u - leaf}


def _brownian_path(key, leaf, frac, top: float, depth: int, shape: tuple[int, ...]) -> jnp.ndarray:
    """W at position ``frac`` of leaf ``leaf`` of the Brownian motion on [0, top] (W(0) = 0) given by ``key``."""
    w_top = math.sqrt(top) * jax.random.normal(jax.random.fold_in(key, 0), shape)

    def bisect(level, carry):
        w_lo, w_hi, node = carry
        width = top * jnp.exp2(-level.astype(jnp.float32))  # of the interval being split
        w_mid = (w_lo + w_hi) / 2 + jnp.sqrt(width) / 2 * jax.random.normal(node, shape)
        right = (leaf >> (depth - 1 - level)) & 1
        return jnp.where(right, w_mid, w_lo), jnp.where(right, w_hi, w_mid), jax.random.fold_in(node, right)

    w_lo, w_hi, _ = jax.lax.fori_loop(0, depth, bisect, (jnp.zeros(shape), w_top, jax.random.fold_in(key, 1)))
    return w_lo + frac * (w_hi - w_lo)


class StepNoise:
    """The noise of one evaluation. Nothing is drawn until a step asks: a deterministic step compiles no RNG.

    rng: a PRNG key, or (B,) keys (one per image); index: the evaluation index (int32, traced); shape: the
    latents' (B, H, W, C); sigma_top: the Brownian path's interval end (the plan's ``brownian_top`` constant).
    """

    def __init__(self, rng: jax.Array, index: jnp.ndarray, shape: tuple[int, ...], sigma_top: float | None = None):
        self.rng, self.index, self.shape, self.sigma_top = rng, index, shape, sigma_top

    def _per_image(self, fn):
        if self.rng.shape == ():
            return fn(self.rng, self.shape)
        return jax.vmap(lambda key: fn(key, self.shape[1:]))(self.rng)

    def normal(self) -> jnp.ndarray:
        """Standard-normal float32 (B, H, W, C) for this evaluation."""
        return self._per_image(
            lambda key, shape: jax.random.normal(jax.random.fold_in(key, self.index), shape, jnp.float32)
        )

    def brownian(self, row: dict, start: str, end: str) -> jnp.ndarray:
        """(W(s_end) - W(s_start)) / sqrt(|s_end - s_start|): standard normal, float32 (B, H, W, C), 0 where the
        two levels are equal. ``start`` and ``end`` name levels of ``row`` made by :func:`brownian_rows`."""
        top, depth = self.sigma_top, brownian_depth(self.sigma_top)

        def increment(key, shape):
            key = jax.random.fold_in(key, BROWNIAN_STREAM)
            w = [_brownian_path(key, row[f"{n}_leaf"].astype(jnp.int32), row[f"{n}_frac"], top, depth, shape)
                 for n in (start, end)]  # fmt: skip
            return w[1] - w[0]

        delta = jnp.abs(row[end] - row[start])
        return self._per_image(increment) * jnp.where(delta > 0, jax.lax.rsqrt(jnp.maximum(delta, 1e-30)), 0.0)
