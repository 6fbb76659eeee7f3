"""Conventions shared by every sampler.

* A sampler is ``sample(key, score_fn, sde, shape, *, steps, ...) -> (x, info)``; ``info["nfe"]`` counts score
  evaluations; ``info["nonfinite"]`` counts examples whose output is not finite.
* Randomness is per example: example ``i`` draws everything from ``fold_in(key, i)``, and step ``n`` of it
  from ``fold_in(fold_in(key, i), n)``. The same key therefore gives the same samples whatever the batch
  size and however the batch is split over devices.
* ``score_fn`` crosses the ``jax.jit`` boundary as a :class:`jax.tree_util.Partial`: arrays bound in it
  (network parameters, mixture weights) are traced arguments, not baked-in constants.
* Schedule and solver arithmetic run in float32 whatever dtype the network computes in.
"""

from __future__ import annotations

import math
import numbers
import weakref
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.tree_util import Partial

from jaxdiff.ode import check_count
from jaxdiff.per_example import is_per_example
from jaxdiff.sde import SDE

Array = jax.Array
ScoreFn = Callable[[Array, Array], Array]

# Stream tags for fold_in, so that prior draws and step draws never share a key.
PRIOR_STREAM = 0
STEP_STREAM = 1


def as_partial(fn: Callable) -> Partial:
    """Wraps a callable as a pytree so it can be a (non-static) argument of a jitted function."""
    if isinstance(fn, Partial):
        return fn
    if not callable(fn):
        raise TypeError(f"score_fn must be callable, got {type(fn).__name__}")
    return Partial(fn)


def check_shape(shape: Sequence[int]) -> tuple[int, ...]:
    """Validates a sample shape ``(batch, ...)``."""
    try:
        if any(isinstance(s, (bool, np.bool_)) or not isinstance(s, numbers.Integral) for s in shape):
            raise TypeError
        shape = tuple(int(s) for s in shape)
    except (TypeError, ValueError) as err:
        raise ValueError(f"shape must be a tuple of ints (batch, ...), got {shape!r}") from err
    if len(shape) < 2 or any(s < 1 for s in shape):
        raise ValueError(f"shape must be (batch, *event_shape) with positive sizes, got {shape}")
    return shape


# Score functions already checked, with the input shapes they passed for: tracing a network costs more
# than a small compiled solve, so a function is traced for the check once per shape, not on every call.
_CHECKED_SCORE_FNS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def check_score_fn(score_fn, shape: tuple[int, ...]) -> None:
    """Traces ``score_fn`` once on abstract inputs (no compilation) and checks it returns the shape of ``x``.

    A function that passed for ``shape`` is remembered (weakly, so it can still be freed) and not traced again.
    """
    if not callable(score_fn):
        raise TypeError(f"score_fn must be callable, got {type(score_fn).__name__}")
    shape = tuple(shape)
    check_per_example_leaves(score_fn, shape[0])
    try:
        if shape in _CHECKED_SCORE_FNS.get(score_fn, ()):
            return
    except TypeError:  # neither hashable nor weakly referenceable: check every time
        pass
    x = jax.ShapeDtypeStruct(shape, jnp.float32)
    t = jax.ShapeDtypeStruct(shape[:1], jnp.float32)
    try:
        out = jax.eval_shape(score_fn, x, t)
    except TypeError as err:
        raise TypeError(f"score_fn must be callable as score_fn(x, t) with t of shape (batch,): {err}") from err
    out_shape = getattr(out, "shape", None)
    if out_shape != tuple(shape):
        raise ValueError(
            f"score_fn returned shape {out_shape} for x of shape {tuple(shape)}; the score must have the shape of x"
        )
    if not jnp.issubdtype(out.dtype, jnp.floating):
        raise ValueError(f"score_fn returned dtype {out.dtype}; the score must be floating point")
    try:
        _CHECKED_SCORE_FNS.setdefault(score_fn, set()).add(shape)
    except TypeError:
        pass


def check_per_example_leaves(tree, batch: int, name: str = "score_fn") -> None:
    """Every :class:`jaxdiff.PerExample` array in ``tree`` (labels bound in a score function) leads with ``batch``.

    Checked before tracing: labels of another batch size would otherwise broadcast, or fail deep in a network.
    """
    for node in jax.tree.leaves(tree, is_leaf=is_per_example):
        if is_per_example(node):
            for leaf in jax.tree.leaves(node.value):
                if jnp.shape(leaf)[:1] != (batch,):
                    raise ValueError(
                        f"{name} holds per-example data (labels) of shape {jnp.shape(leaf)}, which must lead with the "
                        f"batch size {batch}"
                    )


def check_data(x, name: str = "x") -> Array:
    """Validates a batch of data ``(batch, ...)`` of floating dtype."""
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        x = jnp.asarray(x)
    if x.ndim < 2 or x.shape[0] < 1:
        raise ValueError(f"{name} must have shape (batch, *event_shape), got {tuple(x.shape)}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(
            f"{name} must be floating point, got {x.dtype}; convert it (for 8-bit images use bits_per_dim, "
            "which dequantises)"
        )
    return x


def check_sde(sde) -> None:
    if not isinstance(sde, SDE):
        raise TypeError(f"sde must be a jaxdiff.sde.SDE (VPSDE, SubVPSDE, VESDE, ...), got {type(sde)}")


def example_keys(key: Array, batch: int) -> Array:
    """One key per example: ``fold_in(key, i)`` for ``i < batch``."""
    return jax.vmap(jax.random.fold_in, (None, 0))(key, jnp.arange(batch))


def per_example_normal(keys: Array, tag, event_shape: tuple[int, ...]) -> Array:
    """A standard normal of shape ``(batch, *event_shape)``, example ``i`` drawn from ``fold_in(keys[i], tag)``."""
    return jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, tag), event_shape))(keys)


def prior_sample(keys: Array, sde: SDE, event_shape: tuple[int, ...]) -> Array:
    """Per-example draw from the SDE's prior."""
    return jax.vmap(lambda k: sde.prior_sampling(jax.random.fold_in(k, PRIOR_STREAM), (1, *event_shape))[0])(keys)


def step_keys(keys: Array, step) -> Array:
    """Per-example keys of time step ``step`` (an int or traced int)."""
    return jax.vmap(lambda k: jax.random.fold_in(jax.random.fold_in(k, STEP_STREAM), step))(keys)


def time_grid(sde: SDE, steps: int, eps: float) -> Array:
    """``steps + 1`` times from ``T`` down to ``eps`` (uniform in ``t``)."""
    return jnp.linspace(sde.T, eps, steps + 1, dtype=jnp.float32)


def evaluate_score(score_fn: ScoreFn, x: Array, t: Array) -> Array:
    """Calls the score at a per-example time and returns it in float32."""
    tb = jnp.full((x.shape[0],), t, jnp.float32) if jnp.ndim(t) == 0 else t
    return score_fn(x, tb).astype(jnp.float32)


def finish(x: Array, nfe, **extra) -> tuple[Array, dict]:
    """Packs a sampler's output with its ``info`` dict."""
    flat = jnp.reshape(x, (x.shape[0], -1))
    nonfinite = jnp.sum(~jnp.all(jnp.isfinite(flat), axis=-1))
    info = {"nfe": jnp.asarray(nfe, jnp.int32), "nonfinite": nonfinite, **extra}
    return x, info


def tweedie_denoise(score_fn, sde: SDE, x: Array, t) -> Array:
    """Tweedie's formula ``E[x_0 | x_t] = (x_t + sigma(t)^2 score(x_t, t)) / alpha(t)``: one score evaluation."""
    score = evaluate_score(score_fn, x, jnp.full((x.shape[0],), t, jnp.float32))
    return (x + sde.sigma(t) ** 2 * score) / sde.alpha(t)


def finish_sampling(score_fn: ScoreFn, sde: SDE, x: Array, t_end, nfe, denoise: bool, **extra) -> tuple[Array, dict]:
    """Optionally applies :func:`tweedie_denoise` at the final time (one more evaluation), then :func:`finish`."""
    if denoise:
        x = tweedie_denoise(score_fn, sde, x, t_end)
        nfe = nfe + 1
    return finish(x, nfe, **extra)


def check_steps(steps, name: str = "steps") -> int:
    """A positive Python or NumPy integer of at most :data:`jaxdiff.ode.MAX_COUNT`, as an ``int``."""
    return check_count(steps, name)


def is_real(value) -> bool:
    """A real scalar given as a Python or NumPy number (not a bool, not an array of more than one element)."""
    if isinstance(value, (bool, np.bool_)):
        return False
    if isinstance(value, numbers.Real):
        return True
    return isinstance(value, (np.ndarray, jax.Array)) and value.shape == () and jnp.issubdtype(value.dtype, jnp.number)


def check_real(value, name: str, *, low=None, high=None, low_open: bool = False, high_open: bool = False) -> float:
    """A finite real Python or NumPy scalar in ``[low, high]`` (open ends as asked), as a ``float``.

    Raises ``ValueError`` naming ``name``, the value and the valid range otherwise.
    """
    v = float(value) if is_real(value) and not isinstance(value, jax.core.Tracer) else math.nan
    ok = math.isfinite(v)
    if ok and low is not None:
        ok = v > low if low_open else v >= low
    if ok and high is not None:
        ok = v < high if high_open else v <= high
    if not ok:
        bounds = []
        if low is not None:
            bounds.append(f"{'>' if low_open else '>='} {low}")
        if high is not None:
            bounds.append(f"{'<' if high_open else '<='} {high}")
        valid = f" {' and '.join(bounds)}" if bounds else ""
        raise ValueError(f"{name} must be a finite number{valid}, got {value!r}")
    return v


def check_reverse_sde(sde: SDE, predictor: str) -> None:
    """Refuses a reverse-SDE predictor where the SDE is singular at ``T`` (``alpha(T) = 0``: the rectified-flow path).

    Its drift and diffusion are infinite there, so the first step would be NaN, or finite and wrong.
    """
    if not math.isfinite(sde.log_snr_at_T()):
        raise ValueError(
            f"predictor {predictor!r} steps the reverse-time SDE, which is singular at T={sde.T} for "
            f"{type(sde).__name__} (alpha(T) = 0); use 'flow_euler', 'ode', 'ddim', 'dpm_solver++' "
            "(time_schedule='uniform') or 'heun' (sigma_max=...), or predictor=None"
        )


def check_eps(eps, sde: SDE) -> float:
    if not (is_real(eps) and math.isfinite(float(eps)) and 0 <= float(eps) < sde.T):
        raise ValueError(f"eps must satisfy 0 <= eps < T={sde.T}, got {eps!r}")
    return float(eps)
