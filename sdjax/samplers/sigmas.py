"""Noise levels in the variance-exploding form x = x0 + sigma eps (Karras et al. 2022, arXiv:2206.00364), the
parameterisation of the k-diffusion-style samplers, and the few formulas they share.

sigma_t = sqrt((1 - alphas_cumprod[t]) / alphas_cumprod[t]); the VP sample the model sees is x / sqrt(sigma^2 + 1).
Host-side helpers take and return numpy; :func:`to_d` and :func:`ancestral_step` work on JAX or numpy values.
"""

from __future__ import annotations

import numpy as np


def karras_sigmas(sigma_min: float, sigma_max: float, num_steps: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. 2022 eq. 5: float64 (num_steps,) sigmas from sigma_max down to sigma_min."""
    ramp = np.linspace(0, 1, num_steps)
    # float() so that numpy float32 scalars do not pull the ramp down to float32.
    min_inv_rho, max_inv_rho = float(sigma_min) ** (1 / rho), float(sigma_max) ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def all_sigmas(alphas_cumprod: np.ndarray) -> np.ndarray:
    """sigma_t for every training timestep t = 0..T-1 (ascending), same dtype as ``alphas_cumprod``."""
    return ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5


def timesteps_from_sigmas(sigmas: np.ndarray, alphas_cumprod: np.ndarray) -> np.ndarray:
    """Fractional training timesteps whose sigma matches ``sigmas`` (log-sigma interpolation, diffusers'
    ``_sigma_to_t``). sigmas: (N,); alphas_cumprod: float32 (T,). Returns float64 (N,)."""
    log_sigmas = np.log(all_sigmas(alphas_cumprod))
    log_sigma = np.log(np.maximum(np.asarray(sigmas), 1e-10))
    dists = log_sigma - log_sigmas[:, None]
    low = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=len(log_sigmas) - 2)
    w = np.clip((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[low + 1]), 0, 1)
    return (1 - w) * low + w * (low + 1)


def vp_scales(sigmas: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(alpha_t, sigma_t) of the VP sample x = alpha_t x0 + sigma_t eps at VE level sigma (float64)."""
    sigmas = np.asarray(sigmas, np.float64)
    alpha = 1 / np.sqrt(sigmas**2 + 1)
    return alpha, sigmas * alpha


def input_scaling(sigmas: np.ndarray) -> np.ndarray:
    """c_in = 1 / sqrt(sigma^2 + 1): what diffusers' sigma schedulers' ``scale_model_input`` multiplies by."""
    return 1 / np.sqrt(np.asarray(sigmas, np.float64) ** 2 + 1)


def to_d(x, sigma, denoised):
    """Karras ODE derivative dx/dsigma = (x - D(x; sigma)) / sigma."""
    return (x - denoised) / sigma


def ancestral_step(sigma_from, sigma_to):
    """(sigma_down, sigma_up) of an ancestral step (k-diffusion ``get_ancestral_step``, eta = 1): the
    deterministic target level and the std of the fresh noise, with sigma_down^2 + sigma_up^2 = sigma_to^2."""
    sigma_up = (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5
    sigma_down = (sigma_to**2 - sigma_up**2).clip(min=0.0) ** 0.5  # numpy or JAX arrays
    return sigma_down, sigma_up
