"""Time grids of the few-step samplers, and the data prediction they are written in.

A few-step sampler visits ``steps + 1`` times ``T = t_0 > t_1 > ... > t_steps = eps``. Where those times sit
matters as much as the solver's order: the probability-flow ODE is smooth in the log-SNR
``lambda(t) = log(alpha(t)^2 / sigma(t)^2)`` but stiff in ``t`` near ``0`` for VP, so DPM-Solver spaces its
steps uniformly in ``lambda`` (Lu et al. 2022, sec. 3.3) and EDM in ``sigma^(1/rho)`` (Karras et al. 2022,
eq. 5). Every grid here is a small pure function of the SDE, computed in float32 inside the sampler's jit.

Data prediction: with ``x_t = alpha(t) x_0 + sigma(t) eps``, Tweedie's formula gives the denoiser

    x0(x_t, t) = E[x_0 | x_t] = (x_t + sigma(t)^2 score(x_t, t)) / alpha(t),   eps(x_t, t) = -sigma(t) score,

the parameterisation DDIM, DPM-Solver++ and EDM are all written in.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxdiff.samplers import _common as C
from jaxdiff.sde import SDE, batch_broadcast

Array = jax.Array

__all__ = ["TIME_SCHEDULES", "time_steps", "karras_sigmas", "sigma_edm", "t_from_sigma_edm", "data_prediction"]

TIME_SCHEDULES = ("uniform", "quadratic", "logsnr")


def check_schedule(time_schedule) -> str:
    """Validates a ``time_schedule`` name."""
    if time_schedule not in TIME_SCHEDULES:
        raise ValueError(f"unknown time_schedule {time_schedule!r}; valid: {', '.join(map(repr, TIME_SCHEDULES))}")
    return time_schedule


def time_steps(sde: SDE, steps: int, eps, time_schedule: str = "uniform") -> Array:
    """``steps + 1`` decreasing times from ``sde.T`` to ``eps``, shape ``(steps + 1,)``.

    Args:
      sde: the forward SDE.
      steps: number of intervals.
      eps: the last time.
      time_schedule: ``"uniform"`` in ``t``; ``"quadratic"``, uniform in ``sqrt(t)`` (denser near ``eps``,
        as DDIM's quadratic skip, Song et al. 2021, appendix D.3, and DPM-Solver's ``time_quadratic``);
        ``"logsnr"``, uniform in ``lambda(t)`` between ``lambda(T)`` and ``lambda(eps)`` (Lu et al. 2022).

    Returns:
      The grid in float32; its end points are exactly ``T`` and ``eps``.

    >>> from jaxdiff import VPSDE
    >>> ts = time_steps(VPSDE(), 10, 1e-3, "logsnr")
    """
    check_schedule(time_schedule)
    eps = jnp.asarray(eps, jnp.float32)
    T = jnp.float32(sde.T)
    u = jnp.linspace(0.0, 1.0, steps + 1, dtype=jnp.float32)
    if time_schedule == "uniform":
        ts = jnp.linspace(T, eps, steps + 1, dtype=jnp.float32)  # the grid of the SDE samplers in pc.py
    elif time_schedule == "quadratic":
        ts = (jnp.sqrt(T) + u * (jnp.sqrt(eps) - jnp.sqrt(T))) ** 2
    else:
        lam_T, lam_eps = sde.log_snr(T), sde.log_snr(eps)
        ts = sde.t_from_log_snr(lam_T + u * (lam_eps - lam_T))
    return ts.at[0].set(T).at[-1].set(eps)


def sigma_edm(sde: SDE, t: Array) -> Array:
    """The noise level of the scaled variable ``x / alpha``: ``sigma(t) / alpha(t) = exp(-lambda(t) / 2)``."""
    return jnp.exp(-0.5 * sde.log_snr(t))


def t_from_sigma_edm(sde: SDE, sigma: Array) -> Array:
    """Inverse of :func:`sigma_edm`, through the SDE's ``t_from_log_snr``."""
    return sde.t_from_log_snr(-2.0 * jnp.log(sigma))


def karras_sigmas(steps: int, sigma_min, sigma_max, rho: float = 7.0) -> Array:
    """EDM's noise levels (Karras et al. 2022, eq. 5), ``steps + 1`` of them from ``sigma_max`` to ``sigma_min``.

    ``sigma_i = (sigma_max^(1/rho) + i / steps (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho``. Unlike EDM's
    grid, which appends ``sigma = 0``, this one ends at ``sigma_min > 0``: the SDE is only defined for
    ``t >= eps``.

    >>> sigmas = karras_sigmas(18, 0.002, 80.0)
    """
    u = jnp.linspace(0.0, 1.0, steps + 1, dtype=jnp.float32)
    lo = jnp.asarray(sigma_min, jnp.float32) ** (1.0 / rho)
    hi = jnp.asarray(sigma_max, jnp.float32) ** (1.0 / rho)
    sigmas = (hi + u * (lo - hi)) ** rho
    return sigmas.at[0].set(sigma_max).at[-1].set(sigma_min)


def data_prediction(score_fn: C.ScoreFn, sde: SDE, x: Array, t) -> Array:
    """Tweedie's denoiser ``x0(x_t, t) = (x_t + sigma(t)^2 score(x_t, t)) / alpha(t)``: one score evaluation.

    ``t`` is a scalar (the same time for the whole batch) or per example, shape ``(batch,)``.
    """
    tb = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (x.shape[0],))
    score = C.evaluate_score(score_fn, x, tb)
    alpha = batch_broadcast(sde.alpha(tb), x)
    sigma = batch_broadcast(sde.sigma(tb), x)
    return (x + sigma**2 * score) / alpha
