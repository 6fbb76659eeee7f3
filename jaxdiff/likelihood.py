"""Exact likelihoods through the probability-flow ODE (Song et al., ICLR 2021, Sec. 4.3, App. D.2).

Along the probability-flow ODE ``dx/dt = f~(x, t)`` (eq. 13) the log-density obeys the instantaneous
change of variables (Chen et al., 2018):

    d log p_t(x_t) / dt = -div f~(x_t, t),

so, integrating the data ``x`` at ``eps`` up to ``T`` together with the divergence (eqs. 39-40),

    log p_eps(x) = log p_T(x_T) + int_eps^T div f~(x_t, t) dt,

with the prior ``p_T`` standing in for the true ``p_T``. The divergence is computed exactly, as the
trace of the Jacobian from forward-mode products with the ``D`` basis vectors, or estimated without
bias by Hutchinson--Skilling, ``div f~ = E[v^T (df~/dx) v]`` with Rademacher or Gaussian probes ``v``
held fixed over the solve (eq. 40). The state ``(x, int div)`` is integrated with the library's
Dormand--Prince solver inside one compiled program; each example gets its own step sizes.

Randomness is per example: example ``i`` takes its probes from ``fold_in(fold_in(key, i), 2)`` and its
dequantisation noise from ``fold_in(fold_in(key, i), 3)``, so the estimates do not depend on the batch
size or on how the batch is split over devices.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, PRNGKeyArray, Real

from jaxdiff.ode import check_tolerance
from jaxdiff.per_example import PerExample
from jaxdiff.samplers import _common as C
from jaxdiff.samplers.ode import match_batch_sharding, probability_flow_drift, solve_batch
from jaxdiff.sde import SDE

__all__ = ["log_likelihood", "bits_per_dim", "uniform_dequantize", "TRACES", "NOISES"]

PROBE_STREAM = 2  # fold_in tags beside _common's prior (0) and step (1) streams
DEQUANT_STREAM = 3
TRACES = ("hutchinson", "exact")
NOISES = ("rademacher", "gaussian")


def _drift_and_divergence(score_fn, sde, x, t, probes):
    """``f~(x, t)`` and its divergence, per example, from one forward-mode pass per tangent.

    ``probes`` is ``None`` for the exact trace (tangents: the basis vectors, shared by the batch),
    or ``(batch, num_probes, *event)`` for Hutchinson's estimate.
    """
    fn = lambda y: probability_flow_drift(score_fn, sde, y, t)
    batch, event = x.shape[0], x.shape[1:]
    dim = math.prod(event)
    if probes is None:
        tangents = jnp.broadcast_to(jnp.eye(dim, dtype=jnp.float32).reshape(dim, 1, *event), (dim, *x.shape))
    else:
        tangents = jnp.moveaxis(probes, 1, 0)  # (num_probes, batch, *event)
    # The primal does not depend on the tangent, so vmap evaluates the score once.
    drift, jv = jax.vmap(lambda v: jax.jvp(fn, (x,), (v,)), out_axes=(None, 0))(tangents)
    jv = jv.reshape(jv.shape[0], batch, dim)
    if probes is None:
        div = jnp.einsum("jbj->b", jv)  # sum_j (J e_j)_j
    else:
        div = jnp.mean(jnp.einsum("pbd,pbd->pb", tangents.reshape(jv.shape), jv), axis=0)
    return drift, div


def _probes(keys, noise, num_probes, event):
    def one(k):
        k = jax.random.fold_in(k, PROBE_STREAM)
        if noise == "rademacher":
            return jax.random.rademacher(k, (num_probes, *event), dtype=jnp.float32)
        return jax.random.normal(k, (num_probes, *event), jnp.float32)

    return jax.vmap(one)(keys)


def _log_likelihood(key, score_fn, sde, x, trace, noise, num_probes, eps, options):
    rtol, atol, max_steps, per_example, slots = options
    x = x.astype(jnp.float32)
    batch = x.shape[0]
    probes = None
    if trace == "hutchinson":
        probes = _probes(C.example_keys(key, batch), noise, num_probes, x.shape[1:])

    def field(t, y, args):
        probes, score_fn = args
        return _drift_and_divergence(score_fn, sde, y[0], t, None if probes is None else probes.value)

    y0 = (x, jnp.zeros((batch,), jnp.float32))
    # The probes and any per-example leaves of the score function (labels) are split with the batch when every
    # example takes its own steps.
    args = (None if probes is None else PerExample(probes), score_fn)
    (z, delta), info = solve_batch(
        field,
        y0,
        eps,
        sde.T,
        args=args,
        per_example_steps=per_example,
        rtol=rtol,
        atol=atol,
        max_steps=max_steps,
        slots=slots,
    )
    prior_logp = sde.prior_logp(z)
    logp = prior_logp + delta  # eq. 39: log p_eps(x) = log p_T(x_T) + int div f~ dt
    nfe = info.pop("nfe")
    _, info = C.finish(logp[:, None], nfe, **info, z=z, prior_logp=prior_logp, delta_logp=delta)
    return logp, info


_STATIC = ("sde", "trace", "noise", "num_probes", "eps", "options")
_log_likelihood_jit = jax.jit(_log_likelihood, static_argnames=_STATIC)


def _check(sde, trace, noise, num_probes, eps, rtol, atol, max_steps, per_example_steps, slots):
    C.check_sde(sde)
    eps = C.check_eps(eps, sde)
    if trace not in TRACES:
        raise ValueError(f"trace must be one of {TRACES}, got {trace!r}")
    if noise not in NOISES:
        raise ValueError(f"noise must be one of {NOISES}, got {noise!r}")
    num_probes = C.check_steps(num_probes, "num_probes")
    max_steps = C.check_steps(max_steps, "max_steps")
    rtol = check_tolerance(rtol, "rtol")
    atol = check_tolerance(atol, "atol")
    slots = None if slots is None else C.check_steps(slots, "slots")
    if slots is not None and not per_example_steps:
        raise ValueError(f"slots={slots} applies to per-example steps; got per_example_steps={per_example_steps!r}")
    return eps, num_probes, (rtol, atol, max_steps, bool(per_example_steps), slots)


def log_likelihood(
    key: PRNGKeyArray,
    score_fn: C.ScoreFn,
    sde: SDE,
    x: Float[Array, "batch ..."],
    *,
    trace: str = "hutchinson",
    noise: str = "rademacher",
    num_probes: int = 1,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    eps: float = 1e-5,
    per_example_steps: bool = True,
    max_steps: int = 4096,
    slots: int | None = None,
) -> tuple[Float[Array, " batch"], dict]:
    """Per-example ``log p_eps(x)`` in nats through the probability-flow ODE (eqs. 39-40).

    Args:
      key: PRNG key for the Hutchinson probes (unused by the exact trace).
      score_fn: ``score_fn(x, t)`` with ``t`` of shape ``(batch,)``; may compute in any dtype.
      sde: the forward SDE.
      x: data at time ``eps``, ``(batch, *event_shape)``.
      trace: ``"exact"`` (``D`` forward-mode products per evaluation; small ``D``) or
        ``"hutchinson"`` (``num_probes`` products; unbiased).
      noise: Hutchinson probes, ``"rademacher"`` or ``"gaussian"``.
      num_probes: Hutchinson probes per example, averaged (fixed over the solve).
      rtol: relative tolerance of the Dormand--Prince solver.
      atol: absolute tolerance.
      eps: the time the data sits at (the paper uses ``1e-5``).
      per_example_steps: independent step sizes per example (default) or one for the batch.
      max_steps: step limit of the solver; an example that reaches it gets ``logp = NaN``, counted in
        ``info["nonfinite"]`` (``info["success"]`` says which solves finished).
      slots: examples solved at once, a finished example's slot taking the next, so a data set costs about the
        mean number of steps per example (:func:`jaxdiff.refill.solve_refill`); ``None`` chooses by memory and
        solves the whole batch at once where it fits. Results do not depend on it (to float rounding).

    Returns:
      ``(logp, info)``: ``logp`` of shape ``(batch,)``, the log-density of the ``eps``-marginal
      under the model with the prior standing in for ``p_T``; NaN for an example whose solve failed. ``info``
      holds ``nfe`` (batched evaluations of drift and divergence), ``nfe_per_example``, ``steps``, ``success``,
      ``status``, ``batched_calls``, ``slot_utilisation``, ``nonfinite`` (failed examples), the latents ``z``
      at ``T``, ``prior_logp`` and ``delta_logp`` (the integral).

    >>> from jaxdiff import GaussianMixture, VPSDE
    >>> sde, gm = VPSDE(), GaussianMixture.grid()
    >>> x = gm.sample(jax.random.key(0), 4)
    >>> logp, info = log_likelihood(jax.random.key(1), gm.score_fn(sde), sde, x, trace="exact")
    >>> bool(jnp.allclose(logp, gm.log_prob(x), atol=0.05))
    True
    """
    eps, num_probes, options = _check(
        sde, trace, noise, num_probes, eps, rtol, atol, max_steps, per_example_steps, slots
    )
    x = C.check_data(x)
    C.check_score_fn(score_fn, tuple(x.shape))
    return _log_likelihood_jit(key, C.as_partial(score_fn), sde, jnp.asarray(x), trace, noise, num_probes, eps, options)


def uniform_dequantize(key: PRNGKeyArray, x: Real[Array, "batch ..."]) -> Float[Array, "batch ..."]:
    """Uniform dequantisation of 8-bit data to ``[0, 1]``: ``(x + u) / 256``, ``u ~ U[0, 1)``.

    Example ``i`` draws ``u`` from ``fold_in(fold_in(key, i), 3)``, the stream :func:`bits_per_dim`
    uses.
    """
    keys = C.example_keys(key, x.shape[0])
    u = jax.vmap(lambda k: jax.random.uniform(jax.random.fold_in(k, DEQUANT_STREAM), x.shape[1:]))(keys)
    return (x.astype(jnp.float32) + match_batch_sharding(u, x)) / 256.0


def _check_image_data(x) -> Array:
    """8-bit data for :func:`bits_per_dim`: integers in ``{0, ..., 255}`` or floats in ``[0, 1]``, a non-empty batch.

    The values are checked when ``x`` is concrete (not under a caller's ``jit``): data in ``0..255`` given as
    floats, or already centred to ``[-1, 1]``, would otherwise give a finite, wrong bits/dim.
    """
    if not hasattr(x, "dtype"):
        x = np.asarray(x)
    if x.ndim < 2:
        raise ValueError(f"x must have shape (batch, *event_shape), got {tuple(x.shape)}")
    if x.shape[0] == 0 or math.prod(x.shape[1:]) == 0:
        raise ValueError(f"x is empty (shape {tuple(x.shape)}); bits/dim needs at least one example of one dimension")
    is_int = jnp.issubdtype(x.dtype, jnp.integer)
    if not (is_int or jnp.issubdtype(x.dtype, jnp.floating)):
        raise ValueError(f"x must be integer data in {{0, ..., 255}} or floats in [0, 1], got dtype {x.dtype}")
    if isinstance(x, jax.core.Tracer):
        return x
    lo, hi = (float(v) for v in jax.device_get((jnp.min(x), jnp.max(x))))
    if is_int and not (0 <= lo and hi <= 255):
        raise ValueError(f"integer x must be 8-bit data in {{0, ..., 255}}, got values in [{lo:g}, {hi:g}]")
    if not is_int and not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError("x contains NaN or infinite values; bits/dim needs data in [0, 1]")
    if not is_int and not (0.0 <= lo and hi <= 1.0):
        hint = (
            " (8-bit values as floats? pass integers, e.g. x.astype(np.uint8))"
            if hi > 1.0
            else " (already centred? pass data in [0, 1]; centered=True maps it to [-1, 1])"
        )
        raise ValueError(f"float x must lie in [0, 1], got values in [{lo:g}, {hi:g}]{hint}")
    return x


@functools.partial(jax.jit, static_argnames=(*_STATIC, "centered", "dequantize"))
def _bits_per_dim(key, score_fn, sde, x, trace, noise, num_probes, eps, options, centered, dequantize):
    if dequantize:
        x01 = uniform_dequantize(key, x)
    elif jnp.issubdtype(x.dtype, jnp.integer):
        x01 = x.astype(jnp.float32) / 255.0
    else:
        x01 = x.astype(jnp.float32)
    y = 2.0 * x01 - 1.0 if centered else x01
    logp, info = _log_likelihood(key, score_fn, sde, y, trace, noise, num_probes, eps, options)
    dim = math.prod(x.shape[1:])
    # A density on [0, 1]^D assigns each of the 256^D bins of width 1/256 about p(x) / 256^D, i.e.
    # 8 bits per dimension more than -log2 p(x) / D; the map y = 2 x - 1 changes log p by D log 2,
    # one bit per dimension. Hence the reference's offset 7 - inverse_scaler(-1): 7 centred, 8 not.
    offset = 7.0 if centered else 8.0
    bpd = -logp / (dim * math.log(2.0)) + offset
    return bpd, info


def bits_per_dim(
    key: PRNGKeyArray,
    score_fn: C.ScoreFn,
    sde: SDE,
    x: Real[Array, "batch ..."],
    *,
    centered: bool = True,
    dequantize: bool | None = None,
    trace: str = "hutchinson",
    noise: str = "rademacher",
    num_probes: int = 1,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    eps: float = 1e-5,
    per_example_steps: bool = True,
    max_steps: int = 4096,
    slots: int | None = None,
) -> tuple[Float[Array, " batch"], dict]:
    """Bits per dimension of 8-bit data, as in the paper's Table 2 (and score_sde's evaluation).

    Args:
      key: PRNG key (dequantisation noise and Hutchinson probes).
      score_fn: ``score_fn(x, t)`` of a model trained on data in ``[-1, 1]`` (``centered``) or
        ``[0, 1]``.
      sde: the forward SDE.
      x: integer data in ``{0, ..., 255}`` or float data already in ``[0, 1]``.
      centered: the model's data range is ``[-1, 1]`` (data scaled by ``2 x - 1``) if true,
        otherwise ``[0, 1]``.
      dequantize: add uniform noise to integer data, ``(x + u) / 256`` (the default for integer
        data); if false, integer data is mapped to ``x / 255``. Float data is used as given.
      trace: see :func:`log_likelihood`.
      noise: see :func:`log_likelihood`.
      num_probes: see :func:`log_likelihood`.
      rtol: see :func:`log_likelihood`.
      atol: see :func:`log_likelihood`.
      eps: see :func:`log_likelihood`.
      per_example_steps: see :func:`log_likelihood`.
      max_steps: see :func:`log_likelihood`.
      slots: see :func:`log_likelihood`.

    Returns:
      ``(bpd, info)``: ``bpd = -log p(y) / (D log 2) + 7`` (``+ 8`` if not ``centered``) per
      example, and ``info`` as in :func:`log_likelihood`.
    """
    x = _check_image_data(x)
    is_int = jnp.issubdtype(x.dtype, jnp.integer)
    if dequantize is None:
        dequantize = bool(is_int)
    if dequantize and not is_int:
        raise ValueError("dequantize=True needs integer data in {0, ..., 255}; float data is used as given")
    eps, num_probes, options = _check(
        sde, trace, noise, num_probes, eps, rtol, atol, max_steps, per_example_steps, slots
    )
    C.check_score_fn(score_fn, tuple(x.shape))
    return _bits_per_dim(
        key,
        C.as_partial(score_fn),
        sde,
        x,
        trace,
        noise,
        num_probes,
        eps,
        options,
        bool(centered),
        bool(dequantize),
    )
