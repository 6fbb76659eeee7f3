"""Training objectives: denoising score matching in continuous time, and the DDPM and SMLD discrete losses.

All losses are per example (shape ``(batch,)``); the mean over the batch is taken last, in
:func:`make_loss_fn`. With ``x_t = alpha(t) x_0 + sigma(t) z`` the kernel's score is
``grad log p_{0t}(x_t | x_0) = -z / sigma(t)``, so denoising score matching (Song et al., ICLR 2021, eq. 7) is

    L(theta) = E_t E_{x_0} E_z [ lambda(t) || s_theta(x_t, t) + z / sigma(t) ||^2 ],   t ~ U[eps, T].

* ``lambda(t) = sigma(t)^2`` (the default, as in the paper's experiments): ``|| sigma s_theta + z ||^2``, the
  noise-prediction error of DDPM for an eps-parameterized network.
* ``lambda(t) = g(t)^2`` (likelihood weighting, Song, Durkan, Murray & Ermon, NeurIPS 2021, Theorem 1): the
  loss bounds the negative log-likelihood. Its integrand is heavy-tailed near ``t = 0``; importance sampling
  ``t`` with density ``q(t) ∝ g(t)^2 / sigma(t)^2`` removes the ``g^2 / sigma^2`` factor. For every linear SDE
  ``g(t)^2 / sigma(t)^2 = -d log_snr / dt`` (from ``g^2 = d sigma^2/dt - 2 f sigma^2`` and
  ``f = d log alpha / dt``), so ``q`` is uniform in the log-SNR and its inverse CDF is closed form through
  ``sde.t_from_log_snr``; the estimator ``Z / (T - eps) || sigma s_theta + z ||^2`` with
  ``Z = log_snr(eps) - log_snr(T)`` has the same expectation as uniform-``t`` likelihood weighting.

Conditional flow matching (Lipman et al., ICLR 2023) on the linear path of :class:`~jaxdiff.sde.RectifiedFlow`
(Liu et al., ICLR 2023) regresses a velocity network on the velocity of the path, ``d x_t / dt = eps - x_0``:

    L(theta) = E_t E_{x_0} E_eps || u_theta(x_t, t) - (eps - x_0) ||^2,
    t ~ U(0, 1]  or  t = sigmoid(m + s n), n ~ N(0, 1)  (logit-normal, Esser et al. 2024, sec. 3.1).

Its minimiser is ``u(x, t) = E[eps - x_0 | x_t = x]``, the probability-flow velocity. In terms of the noise
prediction: ``x = alpha x_0 + sigma eps`` fixes ``x``, so an error ``d`` in ``eps`` is an error ``-sigma d / alpha``
in ``x_0`` and ``(alpha + sigma) d / alpha`` in ``u``; the flow-matching loss is the eps-loss weighted by

    ((alpha + sigma) / alpha)^2 = 1 / (1 - t)^2 = (1 + exp(-lambda / 2))^2        (lambda = log-SNR),

which grows without bound towards the noise end ``t = 1``, where the eps-loss weighting (``lambda = sigma^2``
above) gives every ``t`` weight 1. :func:`flow_matching_loss` states it for any SDE; only on the linear path is
``eps - x_0`` the velocity of the path.

The discrete losses train on the ``N``-level grids of the reference code: DDPM's ``L_simple`` (Ho et al., 2020,
eq. 14) on ``sqrt(alphas_cumprod)``, ``sqrt(1 - alphas_cumprod)`` and SMLD's ``sigma_i^2``-weighted
denoising score matching (Song & Ermon, 2019, eq. 6) on ``sde.discrete_sigmas``. Level ``i`` is time
``t_i = i T / (N - 1)``, the time at which the samplers' grid index (``floor(t (N - 1) / T)``) is ``i``.

>>> from jaxdiff.models import MLP
>>> from jaxdiff.sde import VPSDE
>>> model = MLP(hidden_sizes=(16,), embedding_type="positional")
>>> params = model.init(jax.random.key(0), jnp.zeros((1, 2)), jnp.zeros((1,)))["params"]
>>> loss_fn = make_loss_fn(VPSDE(), model, parameterization="eps")
>>> loss, aux = loss_fn(params, jax.random.key(1), {"x": jnp.zeros((8, 2))})
>>> aux["losses"].shape
(8,)
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from jaxdiff.parameterization import Parameterization, ScoreModel, as_parameterization
from jaxdiff.sde import SDE, VESDE, VPSDE, batch_broadcast

__all__ = [
    "TIME_SAMPLINGS",
    "dsm_loss",
    "flow_matching_loss",
    "flow_matching_time",
    "ddpm_loss",
    "smld_loss",
    "importance_time",
    "importance_normalizer",
    "make_loss_fn",
]

PyTree = Any
OBJECTIVES = ("dsm", "flow_matching")
ScoreFn = Callable[[Array, Array], Array]
DiscreteFn = Callable[[Array, Array, Array, Array], Array]


def _reduce(sq: Array, reduce_mean: bool) -> Array:
    """Sum (or mean) of a per-example squared error over every non-batch dimension."""
    sq = jnp.reshape(sq, (sq.shape[0], -1))
    return jnp.mean(sq, axis=-1) if reduce_mean else jnp.sum(sq, axis=-1)


# ----------------------------------------------------------------------------------------------------------
# Importance sampling of t for likelihood weighting
# ----------------------------------------------------------------------------------------------------------
def _check_finite_log_snr_at_T(sde: SDE) -> None:
    if not math.isfinite(sde.log_snr_at_T()):
        raise ValueError(
            f"importance_sampling draws t uniformly in the log-SNR, which is -inf at T={sde.T} for "
            f"{type(sde).__name__} (alpha(T) = 0): the density has no normaliser; use importance_sampling=False"
        )


def importance_normalizer(sde: SDE, eps: float) -> Array:
    """``Z = int_eps^T g(t)^2 / sigma(t)^2 dt = log_snr(eps) - log_snr(T)``."""
    return sde.log_snr(jnp.float32(eps)) - sde.log_snr(jnp.float32(sde.T))


def importance_time(u: Float[Array, " b"], sde: SDE, eps: float) -> Float[Array, " b"]:
    """Inverse CDF of ``q(t) ∝ g(t)^2 / sigma(t)^2`` on ``[eps, T]`` at ``u`` in ``[0, 1]``.

    ``q`` is uniform in the log-SNR ``lambda``: ``lambda(t) = lambda(eps) - u (lambda(eps) - lambda(T))``.
    """
    lam_lo, lam_hi = sde.log_snr(jnp.float32(sde.T)), sde.log_snr(jnp.float32(eps))
    t = sde.t_from_log_snr(lam_hi - u * (lam_hi - lam_lo))
    return jnp.clip(t, eps, sde.T)


# ----------------------------------------------------------------------------------------------------------
# Continuous-time denoising score matching (eq. 7)
# ----------------------------------------------------------------------------------------------------------
def dsm_loss(
    key: Array,
    score_fn: ScoreFn,
    sde: SDE,
    x0: Float[Array, " b *d"],
    *,
    likelihood_weighting: bool = False,
    importance_sampling: bool = False,
    reduce_mean: bool = False,
    eps: float = 1e-5,
) -> Float[Array, " b"]:
    """Per-example denoising score matching loss (Song et al., ICLR 2021, eq. 7).

    Args:
      key: PRNG key (for ``t`` and the noise).
      score_fn: ``score_fn(x, t)`` with ``t`` of shape ``(batch,)``.
      sde: the forward SDE.
      x0: a batch of data.
      likelihood_weighting: ``lambda(t) = g(t)^2`` instead of ``sigma(t)^2``.
      importance_sampling: draw ``t`` from ``q(t) ∝ g^2 / sigma^2`` and reweight (needs likelihood weighting).
      reduce_mean: average the squared error over dimensions instead of summing it.
      eps: lower bound of ``t``.

    Returns:
      The losses, shape ``(batch,)``.
    """
    if importance_sampling and not likelihood_weighting:
        raise ValueError("importance_sampling applies to likelihood_weighting=True only")
    if not 0.0 < eps < sde.T:
        raise ValueError(f"eps must lie in (0, T={sde.T}), got {eps}")
    if importance_sampling:
        _check_finite_log_snr_at_T(sde)
    k_t, k_z = jax.random.split(key)
    b = x0.shape[0]
    u = jax.random.uniform(k_t, (b,), jnp.float32)
    t = importance_time(u, sde, eps) if importance_sampling else eps + u * (sde.T - eps)
    z = jax.random.normal(k_z, x0.shape, x0.dtype)
    alpha, sigma = sde.alpha(t), sde.sigma(t)
    xt = batch_broadcast(alpha, x0) * x0 + batch_broadcast(sigma, x0) * z  # p_{0t}(x_t | x_0), eq. 29
    score = score_fn(xt, t)
    if not likelihood_weighting:
        # lambda = sigma^2:  sigma^2 || s + z / sigma ||^2 = || sigma s + z ||^2.
        return _reduce(jnp.square(batch_broadcast(sigma, x0) * score + z), reduce_mean)
    if importance_sampling:
        # g^2 || s + z / sigma ||^2 * (1 / (T - eps)) / q(t)  =  Z / (T - eps) || sigma s + z ||^2.
        scale = importance_normalizer(sde, eps) / (sde.T - eps)
        return scale * _reduce(jnp.square(batch_broadcast(sigma, x0) * score + z), reduce_mean)
    g2 = sde.sde(jnp.zeros_like(x0), t)[1] ** 2
    return g2 * _reduce(jnp.square(score + z / batch_broadcast(sigma, x0)), reduce_mean)


# ----------------------------------------------------------------------------------------------------------
# Conditional flow matching (Lipman et al. 2023) on the linear path
# ----------------------------------------------------------------------------------------------------------
TIME_SAMPLINGS = ("uniform", "logit_normal")


def _check_time_sampling(time_sampling, logit_mean, logit_std) -> None:
    if time_sampling not in TIME_SAMPLINGS:
        raise ValueError(f"unknown time_sampling {time_sampling!r}; valid: {', '.join(map(repr, TIME_SAMPLINGS))}")
    real = lambda v: isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)
    if not real(logit_mean):
        raise ValueError(f"logit_mean must be a finite number, got {logit_mean!r}")
    if not (real(logit_std) and logit_std > 0):
        raise ValueError(f"logit_std must be a finite positive number, got {logit_std!r}")


def flow_matching_time(
    key: Array, n: int, sde: SDE, time_sampling: str = "uniform", logit_mean: float = 0.0, logit_std: float = 1.0
) -> Float[Array, " n"]:
    """``n`` training times: uniform on ``(0, T]``, or logit-normal ``T sigmoid(m + s n)`` (Esser et al. 2024, eq. 19).

    The uniform times exclude ``t = 0``, where a ``'fourier'`` noise embedding (``log sigma(t)``) is ``-inf``.

    The logit-normal density ``pi(t) = 1 / (s sqrt(2 pi)) 1 / (t (1 - t)) exp(-(logit t - m)^2 / (2 s^2))`` (for
    ``T = 1``) puts more weight on intermediate times; SD3 trains with ``m = 0, s = 1``.
    """
    if time_sampling == "uniform":
        return sde.T * (1.0 - jax.random.uniform(key, (n,), jnp.float32))
    return sde.T * jax.nn.sigmoid(logit_mean + logit_std * jax.random.normal(key, (n,), jnp.float32))


def flow_matching_loss(
    key: Array,
    velocity_fn: ScoreFn,
    sde: SDE,
    x0: Float[Array, " b *d"],
    *,
    time_sampling: str = "uniform",
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    reduce_mean: bool = False,
) -> Float[Array, " b"]:
    """Per-example conditional flow-matching loss ``|| u_theta(x_t, t) - (eps - x_0) ||^2`` (Lipman et al. 2023).

    With :class:`~jaxdiff.sde.RectifiedFlow`, ``x_t = (1 - t) x_0 + t eps`` and ``eps - x_0`` is its velocity
    (rectified flow, Liu et al. 2023). Equal, per example, to the eps-prediction error weighted by
    ``((alpha + sigma) / alpha)^2`` (module docstring).

    Args:
      key: PRNG key; ``t`` comes from the first key of ``jax.random.split(key)``, the noise from the second.
      velocity_fn: ``velocity_fn(x, t)``, the predicted ``eps - x_0``, with ``t`` of shape ``(batch,)``.
      sde: the path (usually :class:`~jaxdiff.sde.RectifiedFlow`).
      x0: a batch of data.
      time_sampling: ``"uniform"`` on ``(0, T]`` or ``"logit_normal"`` (:func:`flow_matching_time`).
      logit_mean: location ``m`` of the logit-normal.
      logit_std: scale ``s`` of the logit-normal.
      reduce_mean: average the squared error over dimensions instead of summing it.

    Returns:
      The losses, shape ``(batch,)``.
    """
    _check_time_sampling(time_sampling, logit_mean, logit_std)
    k_t, k_z = jax.random.split(key)
    t = flow_matching_time(k_t, x0.shape[0], sde, time_sampling, logit_mean, logit_std)
    z = jax.random.normal(k_z, x0.shape, x0.dtype)
    xt = batch_broadcast(sde.alpha(t), x0) * x0 + batch_broadcast(sde.sigma(t), x0) * z  # p_{0t}(x_t | x_0)
    return _reduce(jnp.square(velocity_fn(xt, t) - (z - x0)), reduce_mean)


# ----------------------------------------------------------------------------------------------------------
# Discrete losses: DDPM (eps prediction) and SMLD / NCSN (sigma^2-weighted DSM)
# ----------------------------------------------------------------------------------------------------------
def _level_time(i: Array, sde: SDE) -> Array:
    return i.astype(jnp.float32) * (sde.T / max(sde.N - 1, 1))


def ddpm_loss(
    key: Array, eps_fn: DiscreteFn, sde: VPSDE, x0: Float[Array, " b *d"], *, reduce_mean: bool = False
) -> Float[Array, " b"]:
    """Per-example DDPM loss ``|| eps - eps_theta(x_i, i) ||^2`` (Ho et al., 2020, eq. 14).

    Args:
      key: PRNG key.
      eps_fn: ``eps_fn(x, t, alpha, sigma)``, the noise prediction at level time ``t`` for the discrete
        coefficients ``alpha = sqrt(alphas_cumprod[i])``, ``sigma = sqrt(1 - alphas_cumprod[i])``.
      sde: a :class:`~jaxdiff.sde.VPSDE` (its ``discrete_betas``).
      x0: a batch of data.
      reduce_mean: average over dimensions instead of summing.
    """
    if not isinstance(sde, VPSDE):
        raise TypeError(f"the DDPM loss needs a VPSDE, got {type(sde).__name__}")
    k_i, k_z = jax.random.split(key)
    i = jax.random.randint(k_i, (x0.shape[0],), 0, sde.N)
    alphas_cumprod = jnp.cumprod(1.0 - sde.discrete_betas)
    alpha, sigma = jnp.sqrt(alphas_cumprod[i]), jnp.sqrt(1.0 - alphas_cumprod[i])
    z = jax.random.normal(k_z, x0.shape, x0.dtype)
    xt = batch_broadcast(alpha, x0) * x0 + batch_broadcast(sigma, x0) * z  # Ho et al., eq. 4
    return _reduce(jnp.square(eps_fn(xt, _level_time(i, sde), alpha, sigma) - z), reduce_mean)


def smld_loss(
    key: Array, score_fn: DiscreteFn, sde: VESDE, x0: Float[Array, " b *d"], *, reduce_mean: bool = False
) -> Float[Array, " b"]:
    """Per-example SMLD/NCSN loss ``sigma_i^2 || s_theta(x, sigma_i) + z / sigma_i ||^2`` (Song & Ermon, 2019).

    Args:
      key: PRNG key.
      score_fn: ``score_fn(x, t, alpha, sigma)`` at level time ``t`` with ``alpha = 1``, ``sigma = sigma_i``.
      sde: a :class:`~jaxdiff.sde.VESDE` (its ``discrete_sigmas``).
      x0: a batch of data.
      reduce_mean: average over dimensions instead of summing.
    """
    if not isinstance(sde, VESDE):
        raise TypeError(f"the SMLD loss needs a VESDE, got {type(sde).__name__}")
    k_i, k_z = jax.random.split(key)
    i = jax.random.randint(k_i, (x0.shape[0],), 0, sde.N)
    sigma = sde.discrete_sigmas[i]
    z = jax.random.normal(k_z, x0.shape, x0.dtype)
    sig = batch_broadcast(sigma, x0)
    score = score_fn(x0 + sig * z, _level_time(i, sde), jnp.ones_like(sigma), sigma)
    return _reduce(jnp.square(sig * score + z), reduce_mean)


# ----------------------------------------------------------------------------------------------------------
# The factory
# ----------------------------------------------------------------------------------------------------------
def _check_batch(batch, needs_label: bool) -> None:
    """A training batch is a mapping with ``"x"`` (and ``"label"`` for a class-conditional model)."""
    if not isinstance(batch, Mapping):
        raise ValueError(f"batch must be a dict with an 'x' array, got {type(batch).__name__}")
    if "x" not in batch:
        raise ValueError(f"batch must have an 'x' entry (the data), got keys {sorted(batch)}")
    if needs_label and "label" not in batch:
        raise ValueError(f"the model is class-conditional: batch needs a 'label' entry, got keys {sorted(batch)}")


def make_loss_fn(
    sde: SDE,
    model: nn.Module,
    *,
    parameterization: str | Parameterization = "eps",
    continuous: bool = True,
    likelihood_weighting: bool = False,
    importance_sampling: bool = False,
    reduce_mean: bool = False,
    eps: float = 1e-5,
    train: bool = True,
    label_dropout: float = 0.0,
    objective: str = "dsm",
    time_sampling: str = "uniform",
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    **parameterization_kwargs,
) -> Callable[[PyTree, Array, dict], tuple[Array, dict]]:
    """Builds ``loss_fn(params, key, batch) -> (loss, aux)`` for a network, an SDE and a parameterization.

    Args:
      sde: the forward SDE.
      model: the Flax score network.
      parameterization: what the network outputs (see :mod:`jaxdiff.parameterization`).
      continuous: continuous-time DSM (:func:`dsm_loss`); else the discrete loss of the SDE, DDPM for
        :class:`~jaxdiff.sde.VPSDE` and SMLD for :class:`~jaxdiff.sde.VESDE`.
      likelihood_weighting: ``lambda(t) = g(t)^2`` (continuous only).
      importance_sampling: importance-sampled ``t`` for likelihood weighting.
      reduce_mean: mean instead of sum over the data dimensions.
      eps: smallest time of the continuous loss.
      train: run the network in training mode (dropout).
      label_dropout: for a class-conditional model, the probability of replacing a label by the null class
        ``model.num_classes`` (classifier-free guidance training).
      objective: ``"dsm"`` (denoising score matching or the discrete losses, above) or ``"flow_matching"``
        (:func:`flow_matching_loss`: the network's prediction of ``eps - x_0``, whatever its parameterization,
        regressed on ``eps - x_0``; with ``parameterization="velocity"`` that is the network's raw output).
      time_sampling: ``"uniform"`` or ``"logit_normal"`` (flow matching only).
      logit_mean: location of the logit-normal times (flow matching only).
      logit_std: scale of the logit-normal times (flow matching only).
      **parameterization_kwargs: ``embedding_type``, ``scale_by_sigma``, ``sigma_data``.

    Returns:
      ``loss_fn(params, key, batch)`` with ``batch = {"x": ..., "label": ...}``, returning the batch mean
      and ``{"losses": (batch,)}``.
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; valid: {', '.join(map(repr, OBJECTIVES))}")
    if objective == "flow_matching":
        if not continuous or likelihood_weighting or importance_sampling:
            raise ValueError(
                "objective='flow_matching' is a continuous-time loss with its own weighting: it takes neither "
                f"continuous=False, likelihood_weighting nor importance_sampling (got continuous={continuous}, "
                f"likelihood_weighting={likelihood_weighting}, importance_sampling={importance_sampling})"
            )
        _check_time_sampling(time_sampling, logit_mean, logit_std)
    elif time_sampling != "uniform":
        raise ValueError(f"time_sampling applies to objective='flow_matching' only, got {time_sampling!r}")
    if not continuous:
        if likelihood_weighting or importance_sampling:
            raise ValueError("likelihood weighting applies to the continuous loss only")
        if not isinstance(sde, (VPSDE, VESDE)):
            raise ValueError(f"discrete losses exist for VPSDE (DDPM) and VESDE (SMLD), got {type(sde).__name__}")
    if importance_sampling and not likelihood_weighting:
        raise ValueError("importance_sampling applies to likelihood_weighting=True only")
    if importance_sampling:
        _check_finite_log_snr_at_T(sde)
    if not 0.0 <= label_dropout < 1.0:
        raise ValueError(f"label_dropout must be in [0, 1), got {label_dropout}")
    score_model = ScoreModel(model, sde, as_parameterization(parameterization, model, **parameterization_kwargs))
    num_classes = getattr(model, "num_classes", None)

    def loss_fn(params: PyTree, key: Array, batch: dict) -> tuple[Array, dict]:
        _check_batch(batch, num_classes is not None)
        x0 = batch["x"]
        k_loss, k_drop, k_label = jax.random.split(key, 3)
        y = None
        if num_classes is not None:
            y = batch["label"]
            if label_dropout > 0:
                drop = jax.random.bernoulli(k_label, label_dropout, y.shape)
                y = jnp.where(drop, num_classes, y)

        def predict(x, t, alpha=None, sigma=None, target="score"):
            return score_model.predict(
                params, x, t, target=target, y=y, train=train, key=k_drop, alpha=alpha, sigma=sigma
            )

        if objective == "flow_matching":
            losses = flow_matching_loss(
                k_loss,
                lambda x, t: predict(x, t, target="velocity"),
                sde,
                x0,
                time_sampling=time_sampling,
                logit_mean=logit_mean,
                logit_std=logit_std,
                reduce_mean=reduce_mean,
            )
        elif continuous:
            losses = dsm_loss(
                k_loss,
                predict,
                sde,
                x0,
                likelihood_weighting=likelihood_weighting,
                importance_sampling=importance_sampling,
                reduce_mean=reduce_mean,
                eps=eps,
            )
        elif isinstance(sde, VPSDE):
            eps_fn = lambda x, t, a, s: predict(x, t, a, s, target="eps")
            losses = ddpm_loss(k_loss, eps_fn, sde, x0, reduce_mean=reduce_mean)
        else:
            losses = smld_loss(k_loss, predict, sde, x0, reduce_mean=reduce_mean)
        return jnp.mean(losses), {"losses": losses}

    return loss_fn
