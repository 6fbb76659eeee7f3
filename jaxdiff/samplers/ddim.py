"""Denoising diffusion implicit models (DDIM; Song, Meng & Ermon, ICLR 2021), for any SDE of :mod:`jaxdiff.sde`.

DDIM's generative step (eq. 12 of the paper), written with the SDE's ``alpha`` and ``sigma`` instead of
``sqrt(alpha_bar)`` and ``sqrt(1 - alpha_bar)``, moves ``x_t`` to ``x_s`` (``s < t``) as

    x_s = alpha(s) x0 + sqrt(sigma(s)^2 - c^2) eps_hat + c z,          z ~ N(0, I),
    x0 = (x_t + sigma(t)^2 score) / alpha(t),   eps_hat = -sigma(t) score,
    c = eta sqrt(v sigma(s)^2 / sigma(t)^2),    v = sigma(t)^2 - (alpha(t) / alpha(s))^2 sigma(s)^2   (eq. 16)

where ``v`` is the variance of the forward transition ``p(x_t | x_s)``. ``eta = 0`` is the deterministic DDIM
sampler, a first-order solver of the probability-flow ODE (the exponential-integrator step of DPM-Solver-1);
``eta = 1`` draws from the posterior ``q(x_s | x_t, x_0 = x0)``, which is exactly the ancestral step of
:func:`jaxdiff.samplers.pc.ancestral_sample` (DDPM for VP, SMLD for VE). Values in between interpolate. The
marginals of the forward process are the same for every ``eta`` (Theorem 1), so every ``eta`` targets the
same distribution.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from jaxdiff.samplers import _common as C
from jaxdiff.samplers.schedules import check_schedule, time_steps
from jaxdiff.sde import SDE

__all__ = ["ddim_sample", "ddim_step"]


def ddim_step(sde: SDE, score: Array, x: Array, t, s, eta, z: Array | None, x0: Array | None = None) -> Array:
    """One generalised DDIM step from ``t`` to ``s < t`` given the score at ``(x, t)`` (eq. 12).

    Args:
      sde: the forward SDE.
      score: ``score(x, t)``, shape of ``x``.
      x: the current state at time ``t``.
      t: current time (scalar).
      s: next time (scalar).
      eta: interpolates between the deterministic (``0``) and the ancestral (``1``) step.
      z: standard normal noise of the shape of ``x``, or ``None`` when ``eta == 0``.
      x0: the data prediction at ``(x, t)`` if known (:meth:`jaxdiff.sde.SDE.data_prediction`, finite where
        ``alpha(t) = 0``); by default Tweedie's formula from ``score``.

    Returns:
      ``x_s``.
    """
    alpha_t, sigma_t = sde.alpha(t), sde.sigma(t)
    alpha_s, sigma_s = sde.alpha(s), sde.sigma(s)
    if x0 is None:
        x0 = (x + sigma_t**2 * score) / alpha_t
    eps_hat = -sigma_t * score
    if z is None:
        return alpha_s * x0 + sigma_s * eps_hat
    _, v = sde.transition(t, s)
    c = eta * jnp.sqrt(v) * sigma_s / sigma_t  # eq. 16: the posterior std times eta
    return alpha_s * x0 + jnp.sqrt(jnp.maximum(sigma_s**2 - c**2, 0.0)) * eps_hat + c * z


@partial(jax.jit, static_argnames=("sde", "shape", "steps", "stochastic", "time_schedule", "denoise"))
def _ddim(key, score_fn, sde, shape, steps, eta, stochastic, eps, time_schedule, denoise):
    event = shape[1:]
    keys = C.example_keys(key, shape[0])
    x = C.prior_sample(keys, sde, event)
    ts = time_steps(sde, steps, eps, time_schedule)

    def body(x, i):
        t, s = ts[i], ts[i + 1]
        # The SDE's own data prediction: finite at t = T where alpha(T) = 0 (RectifiedFlow).
        x0, score = sde.data_prediction(lambda y, u: C.evaluate_score(score_fn, y, u), x, t)
        # The same noise stream as pc.py: step i of example j draws from fold_in(step_keys(keys, i)[j], 0).
        z = C.per_example_normal(C.step_keys(keys, i), 0, event) if stochastic else None
        return ddim_step(sde, score, x, t, s, eta, z, x0=x0), None

    x, _ = jax.lax.scan(body, x, jnp.arange(steps))
    nfe = steps
    return C.finish_sampling(score_fn, sde, x, ts[-1], nfe, denoise)


def ddim_sample(
    key: PRNGKeyArray,
    score_fn: Callable[[Array, Array], Array],
    sde: SDE,
    shape: tuple[int, ...],
    *,
    steps: int | None = None,
    eta: float = 0.0,
    eps: float = 1e-3,
    time_schedule: str = "uniform",
    denoise: bool = False,
) -> tuple[Float[Array, "batch ..."], dict]:
    """DDIM sampling (Song, Meng & Ermon 2021, eq. 12) on the SDE's ``alpha``/``sigma``; VP, sub-VP and VE.

    Args:
      key: PRNG key; example ``i`` draws from ``fold_in(key, i)`` only (prior and, for ``eta > 0``, the noise of
        every step, the same streams as :func:`jaxdiff.samplers.pc.pc_sample`).
      score_fn: ``score_fn(x, t)`` with ``t`` of shape ``(batch,)``.
      sde: the forward SDE.
      shape: ``(batch, *event_shape)`` of the samples.
      steps: number of DDIM steps from ``T`` to ``eps`` (default 50); one score evaluation each.
      eta: stochasticity, ``0`` (deterministic DDIM) to ``1`` (ancestral sampling; eq. 16).
      eps: final time.
      time_schedule: ``"uniform"``, ``"quadratic"`` or ``"logsnr"`` (see
        :func:`jaxdiff.samplers.schedules.time_steps`).
      denoise: finish with Tweedie's ``x0`` prediction at ``eps`` (one more score evaluation).

    Returns:
      ``(samples, info)``: ``info["nfe"]`` is ``steps + denoise``; ``info["nonfinite"]`` counts samples with a
      NaN or infinity.

    >>> from jaxdiff import GaussianMixture, VPSDE
    >>> sde = VPSDE()
    >>> gm = GaussianMixture.grid()
    >>> x, info = ddim_sample(jax.random.key(0), gm.score_fn(sde), sde, (16, 2), steps=50)
    >>> int(info["nfe"])
    50
    """
    C.check_sde(sde)
    shape = C.check_shape(shape)
    steps = C.check_steps(50 if steps is None else steps)
    if not (isinstance(eta, (int, float)) and 0 <= eta <= 1):
        raise ValueError(f"eta must be in [0, 1] (0: DDIM, 1: ancestral sampling), got {eta!r}")
    eps = C.check_eps(eps, sde)
    check_schedule(time_schedule)
    if eps == 0 and time_schedule == "logsnr":
        raise ValueError("time_schedule='logsnr' needs eps > 0: the log-SNR is infinite at t = 0")
    if time_schedule == "logsnr":
        if not math.isfinite(sde.log_snr_at_T()):
            raise ValueError(
                f"DDIM time_schedule='logsnr' needs a finite log-SNR at T; {type(sde).__name__}'s is -inf at "
                f"T={sde.T} (alpha(T) = 0): use time_schedule='uniform' or 'quadratic'"
            )
    return _ddim(
        key,
        C.as_partial(score_fn),
        sde,
        shape,
        steps,
        jnp.float32(eta),
        eta != 0,
        jnp.float32(eps),
        time_schedule,
        bool(denoise),
    )
