"""DPM-Solver++ multistep in data prediction (Lu et al. 2022, "DPM-Solver++", sec. 4 and Algorithm 2).

With ``lambda = log(alpha / sigma)`` (half the SDE's ``log_snr``) as the time variable, the probability-flow
ODE in data prediction ``x0(x, lambda)`` has the exact solution (eq. 9 of the paper)

    x_s = sigma(s) / sigma(t) x_t + sigma(s) int_{lambda_t}^{lambda_s} e^lambda x0(x_lambda, lambda) d lambda.

The linear part is integrated exactly; ``x0`` is expanded in a Taylor series about ``lambda_t`` whose
derivatives come from the ``x0`` predictions of the previous steps. With ``h = lambda_s - lambda_t`` and
``x0_0, x0_1, x0_2`` the predictions at the current and the two previous grid points, one step is

* order 1 (DDIM, DPM-Solver++1): ``x_s = sigma_s / sigma_t x_t - alpha_s (e^{-h} - 1) x0_0``;
* order 2 (2M, Algorithm 2): the same with ``x0_0`` replaced by ``D = (1 + 1/(2r)) x0_0 - 1/(2r) x0_1``,
  ``r = h_prev / h``;
* order 3 (3M): ``x_s = sigma_s / sigma_t x_t + alpha_s [phi_1 x0_0 + phi_2 D1 + phi_3 D2]`` with the
  integrals ``phi_1 = 1 - e^{-h}``, ``phi_2 = (h - 1 + e^{-h}) / h``, ``phi_3 = (h^2/2 - h + 1 - e^{-h}) / h^2`` of
  ``e^{u - h}`` against ``1, u / h, u^2 / (2 h^2)`` on ``[0, h]``, and ``D1 ~ h x0'``, ``D2 ~ h^2 x0''``
  from divided differences of the three predictions on the non-uniform grid.

Two third-order updates, by name (``variant=``):

* ``"published"`` (the default): the third-order step of the original DPM-Solver code
  (``multistep_dpm_solver_third_update``), also that of diffusers and of k-diffusion's ``sample_dpmpp_3m_sde``
  at ``eta = 0`` (whose warm-up step and final steps differ). Its second difference is
  ``D2 = (d1_0 - d1_1) / (r0 + r1) ~ h^2 x0'' / 2``, half of what the Taylor integral above calls for, so the
  ``x0''`` term carries half its weight. Its order is 2 (the slope measured on the oracle at 40--160 steps is
  2.3), yet at 20--40 steps it is the more accurate one. Use it to compare with numbers produced elsewhere.
* ``"taylor"``: ``D2 = 2 (d1_0 - d1_1) / (r0 + r1) ~ h^2 x0''``, the exact weight ``phi_3``; order 3 (measured
  2.9--3.0 at 40--320 steps).

Orders 1 and 2 (the warm-up and the lowered final steps) are the same in both. Median (90th-percentile)
distance of a sample to the exact probability-flow ODE solution from the same prior draw, 2-D Gaussian mixture
of the benchmarks (``"easy"``), VP, log-SNR grid, ``eps = 1e-3``, 10k samples; the reference solution (Taylor
variant, 4000 steps) is within a median 3.4e-6 of adaptive Dormand--Prince at ``rtol = atol = 1e-6``
(``python benchmarks/samplers.py --dpm3m``):

    ======  ===================  ===================  =================================
    steps   "taylor"             "published"          note
    ======  ===================  ===================  =================================
    10      0.041   (0.097)      0.055   (0.098)      default ``lower_order_final``
    10      0.078   (0.116)      0.023   (0.051)      ``lower_order_final=False``
    20      0.020   (0.044)      0.0067  (0.038)
    40      0.0022  (0.0086)     0.0012  (0.0090)
    80      2.2e-4  (9.7e-4)     3.7e-4  (1.5e-3)
    ======  ===================  ===================  =================================

One score evaluation per step. The first steps have no history and warm up with orders 1, 2, ...; with
``lower_order_final`` and fewer than 15 steps the last steps drop back to orders ``..., 2, 1``, which the
paper finds more stable with few steps (sec. 5 and appendix). The predictions of the two previous steps
live in the ``lax.scan`` carry as fixed-size buffers.

Choosing the grid: the truncation error sits where ``x0`` changes fastest along the flow, at noise levels
``sigma / alpha`` comparable to the scales of the data. The log-SNR grid spreads its steps evenly over
``[lambda(T), lambda(eps)]``, a range much of which (``sigma / alpha`` far above or below the data's scales)
needs few steps; on the 2-D Gaussian mixture of the tests (components of std 0.5, 4 apart, VP), 20 steps of
2M widen each component by about 5% and the ``"quadratic"`` grid, which puts more of its steps at medium
noise, by about 3.5%; 40 log-SNR steps bring it under 2%. At 100k samples, where the sliced-KS noise floor is
about 0.003, no 20-step grid of 2M matches Euler--Maruyama at 500 steps (0.0030): the best reaches 0.0038
(``python benchmarks/samplers.py --target --n 100000``).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, PRNGKeyArray

from jaxdiff.samplers import _common as C
from jaxdiff.samplers.schedules import check_schedule, time_steps
from jaxdiff.sde import SDE

__all__ = ["VARIANTS", "dpm_solver_pp_sample", "step_orders"]

# The weight of the second-derivative term of the third-order update, by name (see the module docstring).
VARIANTS = {"published": 0.5, "taylor": 1.0}

# Fewer steps than this and lower_order_final lowers the order of the last steps (Lu et al. 2022).
LOWER_ORDER_FINAL_BELOW = 15


def step_orders(steps: int, order: int, lower_order_final: bool = True) -> np.ndarray:
    """The order of each of the ``steps`` multistep updates: warm-up, then ``order``, then (optionally) lower.

    >>> step_orders(5, 3).tolist()
    [1, 2, 3, 2, 1]
    """
    i = np.arange(steps)
    orders = np.minimum(order, i + 1)
    if lower_order_final and steps < LOWER_ORDER_FINAL_BELOW:
        orders = np.minimum(orders, steps - i)
    return orders.astype(np.int32)


def _update(order_index, x, m, lam, i, ratio_sigma, alpha_s, d2_weight):
    """``x_s`` from ``x_t`` and the predictions ``m = (x0_0, x0_1, x0_2)``, for multistep order ``order_index + 1``.

    ``d2_weight`` scales the second-derivative term of order 3: 1 for ``"taylor"``, 1/2 for ``"published"``.
    """
    h = lam[i + 1] - lam[i]
    phi_1 = -jnp.expm1(-h)  # 1 - e^{-h}

    def first(_):
        return ratio_sigma * x + alpha_s * phi_1 * m[0]

    def second(_):
        # Algorithm 2: D = (1 + 1/(2r)) x0_0 - 1/(2r) x0_1, r = h_{i-1} / h_i.
        r = (lam[i] - lam[i - 1]) / h
        d = m[0] + (m[0] - m[1]) / (2.0 * r)
        return ratio_sigma * x + alpha_s * phi_1 * d

    def third(_):
        r0 = (lam[i] - lam[i - 1]) / h
        r1 = (lam[i - 1] - lam[i - 2]) / h
        d1_0 = (m[0] - m[1]) / r0  # ~ h x0' at the midpoint of the last interval
        d1_1 = (m[1] - m[2]) / r1  # ~ h x0' at the midpoint of the one before
        d1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)  # ~ h x0'(lambda_t)
        d2 = 2.0 / (r0 + r1) * (d1_0 - d1_1)  # ~ h^2 x0''(lambda_t)
        h_plus_em1 = h + jnp.expm1(-h)  # h - 1 + e^{-h}
        phi_2 = h_plus_em1 / h
        phi_3 = (0.5 * h**2 - h_plus_em1) / h**2
        return ratio_sigma * x + alpha_s * (phi_1 * m[0] + phi_2 * d1 + d2_weight * phi_3 * d2)

    return jax.lax.switch(order_index, (first, second, third), None)


@partial(
    jax.jit,
    static_argnames=("sde", "shape", "steps", "order", "variant", "time_schedule", "lower_order_final", "denoise"),
)
def _dpm_solver_pp(key, score_fn, sde, shape, steps, order, variant, time_schedule, eps, lower_order_final, denoise):
    keys = C.example_keys(key, shape[0])
    x = C.prior_sample(keys, sde, shape[1:])
    ts = time_steps(sde, steps, eps, time_schedule)
    lam = 0.5 * sde.log_snr(ts)  # lambda = log(alpha / sigma)
    alphas, sigmas = sde.alpha(ts), sde.sigma(ts)
    orders = jnp.asarray(step_orders(steps, order, lower_order_final))
    d2_weight = VARIANTS[variant]

    def body(carry, inputs):
        x, history = carry  # history: x0 predictions of the two previous steps, newest first
        i, step_order = inputs
        # The SDE's own data prediction: finite at t = T where alpha(T) = 0 (RectifiedFlow).
        x0, _ = sde.data_prediction(lambda y, u: C.evaluate_score(score_fn, y, u), x, ts[i])
        m = (x0, history[0], history[1])
        x = _update(step_order - 1, x, m, lam, i, sigmas[i + 1] / sigmas[i], alphas[i + 1], d2_weight)
        return (x, jnp.stack([x0, history[0]])), None

    history = jnp.zeros((2, *shape), jnp.float32)
    (x, _), _ = jax.lax.scan(body, (x, history), (jnp.arange(steps), orders))
    nfe = steps
    return C.finish_sampling(score_fn, sde, x, ts[-1], nfe, denoise)


def dpm_solver_pp_sample(
    key: PRNGKeyArray,
    score_fn: Callable[[Array, Array], Array],
    sde: SDE,
    shape: tuple[int, ...],
    *,
    steps: int | None = None,
    order: int = 2,
    variant: str = "published",
    time_schedule: str = "logsnr",
    eps: float = 1e-3,
    lower_order_final: bool = True,
    denoise: bool = False,
) -> tuple[Float[Array, "batch ..."], dict]:
    """DPM-Solver++ multistep sampling (Lu et al. 2022, Algorithm 2 for ``order=2``; 3M for ``order=3``).

    A deterministic solver of the probability-flow ODE, started from a prior draw: the same map from noise
    to data as :func:`jaxdiff.samplers.ode.ode_sample`, in far fewer score evaluations. ``order=1`` is DDIM
    with ``eta = 0`` (:func:`jaxdiff.samplers.ddim.ddim_sample`) on the same grid.

    Args:
      key: PRNG key; example ``i``'s prior draw comes from ``fold_in(key, i)`` only.
      score_fn: ``score_fn(x, t)`` with ``t`` of shape ``(batch,)``.
      sde: the forward SDE (VP, sub-VP, VE, cosine VP).
      shape: ``(batch, *event_shape)`` of the samples.
      steps: number of solver steps (default 20); one score evaluation each.
      order: 1, 2 or 3.
      variant: the third-order update (``order=3`` only; orders 1 and 2 are the same in both).
        ``"published"`` (default) is DPM-Solver++(3M) as in the original DPM-Solver code, diffusers and
        k-diffusion, whose second-derivative term is half the Taylor integral's (order about 2, smaller errors
        at 10--20 steps); ``"taylor"`` weights it with the exact Taylor integral (order 3). See the module
        docstring for the measured errors of both.
      time_schedule: ``"logsnr"`` (uniform in ``lambda``, the paper's choice), ``"uniform"`` or
        ``"quadratic"`` (see :func:`jaxdiff.samplers.schedules.time_steps`).
      eps: final time.
      lower_order_final: with fewer than 15 steps, lower the order of the final steps to ``..., 2, 1``.
      denoise: finish with Tweedie's ``x0`` prediction at ``eps`` (one more score evaluation).

    Returns:
      ``(samples, info)``: ``info["nfe"]`` is ``steps + denoise``; ``info["nonfinite"]`` counts samples with a
      NaN or infinity.

    >>> from jaxdiff import GaussianMixture, VPSDE
    >>> sde = VPSDE()
    >>> gm = GaussianMixture.grid()
    >>> x, info = dpm_solver_pp_sample(jax.random.key(0), gm.score_fn(sde), sde, (16, 2), steps=20, order=2)
    >>> int(info["nfe"])
    20
    """
    C.check_sde(sde)
    shape = C.check_shape(shape)
    steps = C.check_steps(20 if steps is None else steps)
    if order not in (1, 2, 3) or isinstance(order, bool):
        raise ValueError(f"DPM-Solver++ order must be 1, 2 or 3, got {order!r}")
    if not isinstance(variant, str) or variant not in VARIANTS:
        raise ValueError(f"DPM-Solver++ variant must be one of {', '.join(map(repr, VARIANTS))}, got {variant!r}")
    check_schedule(time_schedule)
    eps = C.check_eps(eps, sde)
    if eps == 0:
        raise ValueError("DPM-Solver++ needs eps > 0: its time variable, the log-SNR, is infinite at t = 0")
    if time_schedule == "logsnr" and not np.isfinite(sde.log_snr_at_T()):
        raise ValueError(
            f"DPM-Solver++ time_schedule='logsnr' needs a finite log-SNR at T; {type(sde).__name__}'s is -inf at "
            f"T={sde.T} (alpha(T) = 0): use time_schedule='uniform' or 'quadratic'"
        )
    return _dpm_solver_pp(
        key,
        C.as_partial(score_fn),
        sde,
        shape,
        steps,
        int(order),
        variant,
        time_schedule,
        jnp.float32(eps),
        bool(lower_order_final),
        bool(denoise),
    )
