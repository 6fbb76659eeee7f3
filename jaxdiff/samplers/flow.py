"""The rectified-flow sampler: Euler's method on the probability-flow ODE, on a uniform time grid.

Flow matching (Lipman et al. 2023) and rectified flow (Liu et al. 2023) sample by integrating the learned
velocity ``dx/dt = v(x, t)`` from the prior at ``t = 1`` to the data at ``t = 0``; the standard sampler of
Stable Diffusion 3 and Flux (Esser et al. 2024) is Euler's method on a uniform grid,

    x_{t_{i+1}} = x_{t_i} + (t_{i+1} - t_i) v(x_{t_i}, t_i),        t_i = T - i (T - eps) / steps.

Here ``v`` is the probability-flow drift of the SDE (Song et al. 2021, eq. 13), which for
:class:`jaxdiff.sde.RectifiedFlow` is the velocity ``E[eps - x_0 | x_t]``, finite and exact at ``t = 1`` (see
:meth:`jaxdiff.sde.RectifiedFlow.probability_flow_drift`); for any other SDE it is Euler on that SDE's
probability-flow ODE. For the linear path one Euler step from ``t`` to ``s`` equals the deterministic DDIM step
(``x_s = (1 - s) x0 + s eps`` with the predictions at ``t``), so this sampler and ``ddim`` with ``eta = 0`` on the
uniform grid agree to rounding. The grid never evaluates the velocity at ``eps`` itself, so ``eps = 0`` (the
default) integrates all the way to the data.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from jaxdiff.samplers import _common as C
from jaxdiff.samplers.ode import probability_flow_drift
from jaxdiff.sde import SDE

__all__ = ["flow_euler_sample"]


@partial(jax.jit, static_argnames=("sde", "shape", "steps"))
def _flow_euler(key, score_fn, sde, shape, steps, eps):
    keys = C.example_keys(key, shape[0])
    x = C.prior_sample(keys, sde, shape[1:]).astype(jnp.float32)
    ts = C.time_grid(sde, steps, eps)

    def body(x, i):
        t, s = ts[i], ts[i + 1]
        v = probability_flow_drift(score_fn, sde, x, jnp.full((shape[0],), t, jnp.float32))
        return x + (s - t) * v, None

    x, _ = jax.lax.scan(body, x, jnp.arange(steps))
    return C.finish(x, steps)


def flow_euler_sample(
    key: PRNGKeyArray,
    score_fn: Callable[[Array, Array], Array],
    sde: SDE,
    shape: tuple[int, ...],
    *,
    steps: int | None = None,
    eps: float = 0.0,
) -> tuple[Float[Array, "batch ..."], dict]:
    """Euler's method on the probability-flow ODE from ``T`` to ``eps``, uniform in ``t`` (rectified flow).

    Args:
      key: PRNG key; example ``i``'s prior draw comes from ``fold_in(key, i)`` only.
      score_fn: ``score_fn(x, t)`` with ``t`` of shape ``(batch,)``; for a velocity network,
        :func:`jaxdiff.parameterization.make_score_fn` with ``parameterization="velocity"``.
      sde: the forward SDE, usually :class:`jaxdiff.sde.RectifiedFlow`.
      shape: ``(batch, *event_shape)`` of the samples.
      steps: number of Euler steps (default 50); one velocity evaluation each (the one at ``t = 1`` is a
        forward-mode derivative of the score in ``t``, see :class:`jaxdiff.sde.RectifiedFlow`).
      eps: final time; ``0`` reaches the data (no evaluation happens at ``eps``).

    Returns:
      ``(samples, info)``: ``info["nfe"]`` is ``steps``; ``info["nonfinite"]`` counts samples with a NaN or
      infinity.

    >>> from jaxdiff import GaussianMixture, RectifiedFlow
    >>> sde, gm = RectifiedFlow(), GaussianMixture.grid()
    >>> x, info = flow_euler_sample(jax.random.key(0), gm.score_fn(sde), sde, (16, 2), steps=20)
    >>> int(info["nfe"]), int(info["nonfinite"])
    (20, 0)
    """
    C.check_sde(sde)
    shape = C.check_shape(shape)
    steps = C.check_steps(50 if steps is None else steps)
    eps = C.check_eps(eps, sde)
    return _flow_euler(key, C.as_partial(score_fn), sde, shape, steps, jnp.float32(eps))
