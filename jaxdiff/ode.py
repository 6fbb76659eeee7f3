"""ODE solvers for the probability-flow ODE: adaptive Dormand--Prince 5(4); Euler, Heun, RK4.

Every solver integrates ``dy/dt = f(t, y, args)`` from ``t0`` to ``t1`` (forwards or backwards in
time) for a state ``y`` that is any pytree of floating-point arrays, and returns ``(y1, info)``. The
whole solve is one ``lax.while_loop`` (adaptive) or ``lax.scan`` (fixed step), so a caller's
``jax.jit`` compiles it into a single program with no host round-trips; ``t0``, ``t1``, ``rtol`` and
``atol`` may be traced values.

Step-size control (adaptive solver):

* The error of a step is the RMS over *every* element of the state of
  ``err_i / (atol + rtol * max(|y_i|, |y_new_i|))`` (Hairer, Norsett & Wanner, *Solving ODEs I*,
  eq. II.4.11); a step is accepted when that norm is at most 1. A batched state therefore shares one
  step size.
* For an independent step size per example, ``jax.vmap`` the solve with a per-example ``f``::

      y1, info = jax.vmap(lambda y: solve(f, y, t0, t1))(ys)   # info["nfe"] has shape (batch,)

  The loop then runs until the slowest example is done; finished examples are frozen (their results
  and counters no longer change), so each result is what a solve of that example alone would give.

>>> import jax.numpy as jnp
>>> y1, info = solve(lambda t, y, args: -y, jnp.ones(3), 0.0, 1.0, rtol=1e-6, atol=1e-6)
>>> bool(info["success"]), bool(jnp.allclose(y1, jnp.exp(-1.0), rtol=1e-5))
(True, True)
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend import core as jax_core

__all__ = ["solve", "dopri5", "euler", "heun", "rk4", "METHODS", "STATUS", "check_count", "check_tolerance"]

PyTree = Any
VectorField = Callable[[jax.Array, PyTree, Any], PyTree]

# --------------------------------------------------------------------------------------------------
# Dormand--Prince 5(4) tableau (Dormand & Prince 1980; Hairer, Norsett & Wanner, Table II.5.2).
# --------------------------------------------------------------------------------------------------
_C = (0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0)
_A = (
    (),
    (1 / 5,),
    (3 / 40, 9 / 40),
    (44 / 45, -56 / 15, 32 / 9),
    (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
    (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
    (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84),  # = the 5th-order weights (FSAL)
)
# Error weights: 5th-order minus embedded 4th-order weights.
_E = (
    71 / 57600,
    0.0,
    -71 / 16695,
    71 / 1920,
    -17253 / 339200,
    22 / 525,
    -1 / 40,
)

# The tableau as arrays, for the stage loop: row i of _A_TABLE holds stage i's weights (zeros beyond i - 1).
_A_TABLE = np.zeros((7, 7))
for _i, _row in enumerate(_A):
    _A_TABLE[_i, : len(_row)] = _row
_E_ROW = np.asarray(_E)


def _combine_stacked(y: PyTree, h, ks: PyTree, coeffs) -> PyTree:
    """``y + h * sum_j coeffs[j] * ks[j]`` with ``ks`` stacked along a leading stage axis.

    ``coeffs`` is a NumPy row (zero terms are skipped) or a traced one (the stage loop's). The sum is written
    out term by term, elementwise, not as a contraction: a dot product's summation order may change with the
    batch, and an example's steps would then depend on the batch it is solved in.
    """
    static = isinstance(coeffs, np.ndarray)
    terms = [j for j in range(len(coeffs)) if not (static and coeffs[j] == 0.0)]

    def leaf(y_leaf, k_leaf):
        ctype = jnp.promote_types(y_leaf.dtype, jnp.float32)
        acc = sum(jnp.asarray(coeffs[j], ctype) * k_leaf[j].astype(ctype) for j in terms)
        return (y_leaf.astype(ctype) + h.astype(ctype) * acc).astype(y_leaf.dtype)

    return jax.tree.map(leaf, y, ks)


# A vector field of at least this many operations runs the stages of a step in a loop, traced and compiled once:
# compiling six copies of a score network costs seconds to minutes (the digits DDPM++ with its divergence: ~2,450
# operations). A smaller field is unrolled, which runs faster: a stage-loop iteration costs microseconds on a CPU,
# as much as a small field itself. Measured on one CPU core for the likelihood's drift and divergence (~145
# operations, the mixture oracle in 2-D and 16-D and the toy MLP): unrolled stages took 0.65--0.8x the time of the
# loop in refilled slots (64--256) and 0.5x in batch-global stepping, and compiled no slower.
STAGE_LOOP_MIN_OPS = 1000


def _count_ops(jaxpr) -> int:
    return len(jaxpr.eqns) + sum(_count_ops(sub) for sub in jax_core.subjaxprs(jaxpr))


def _field_ops(f, t, y, args) -> int:
    """The number of primitive operations of ``f(t, y, args)``, nested calls included (one abstract trace)."""
    return _count_ops(jax.make_jaxpr(f)(t, y, args).jaxpr)


def _stages(f, t, t_new, y, k1, dt, args) -> PyTree:
    """The seven stages of one Dormand--Prince step, stacked along a new leading axis of every leaf.

    The six evaluations run in a ``fori_loop``, so the vector field is traced and compiled once per
    step, not six times: for a large score network that is most of the program's compile time.
    Stage ``i`` reads only stages ``< i``; the buffer starts at zero each step, so no stale (possibly
    non-finite) value from a rejected step enters a sum, even multiplied by a zero weight.
    """
    ks = jax.tree.map(lambda k: jnp.zeros((7, *k.shape), k.dtype).at[0].set(k), k1)
    a_table = jnp.asarray(_A_TABLE, jnp.float32)
    c = jnp.asarray(_C, jnp.float32)

    def body(i, ks):
        y_stage = _combine_stacked(y, dt, ks, a_table[i])
        # The last two stages sit at c = 1: use the step's end time itself, not t + 1.0 * dt.
        t_stage = jnp.where(c[i] == 1.0, t_new, t + c[i].astype(dt.dtype) * dt)
        k = f(t_stage, y_stage, args)
        return jax.tree.map(lambda buf, v: buf.at[i].set(v.astype(buf.dtype)), ks, k)

    return lax.fori_loop(1, 7, body, ks)


# PI step-size controller (as in Hairer & Wanner's DOPRI5 code):
#   h_new = h * SAFETY * err^-K_I * err_prev^K_P.
_SAFETY = 0.9
_K_I = 0.2 - 0.75 * 0.04  # integral gain, 1/(order + 1) less the proportional correction
_K_P = 0.04  # proportional gain
_MIN_FACTOR = 0.2
_MAX_FACTOR = 10.0

_RUNNING, _DONE, _MAX_STEPS, _STEP_TOO_SMALL, _NONFINITE = 0, 1, 2, 3, 4
# Why a solve ended, as ``info["status"]`` reports it.
STATUS = {_DONE: "done", _MAX_STEPS: "max_steps", _STEP_TOO_SMALL: "step_too_small", _NONFINITE: "nonfinite"}
# Batched mode: an example whose error estimate is non-finite in this many attempts is dropped (each such attempt
# shrinks the shared step five-fold); a field that is not finite at the initial state drops it at once.
_NONFINITE_STRIKES = 3


def _combine(y: PyTree, h, ks: tuple[PyTree, ...], coeffs: tuple[float, ...]) -> PyTree:
    """``y + h * sum_j coeffs[j] * ks[j]``, leaf by leaf, skipping zero coefficients."""
    terms = [(c, k) for c, k in zip(coeffs, ks, strict=False) if c != 0.0]

    def leaf(y_leaf, *k_leaves):
        ctype = jnp.promote_types(y_leaf.dtype, jnp.float32)
        acc = sum(c * k.astype(ctype) for (c, _), k in zip(terms, k_leaves, strict=True))
        return (y_leaf.astype(ctype) + h.astype(ctype) * acc).astype(y_leaf.dtype)

    return jax.tree.map(leaf, y, *(k for _, k in terms))


def _rms_norm(tree: PyTree, live=None) -> jax.Array:
    """RMS over every element of every leaf, in float32.

    With ``live`` (a boolean ``(batch,)`` mask; every leaf then leads with the batch axis) the RMS is over the
    elements of the live examples only, so a dropped (possibly non-finite) example cannot steer the result.
    """
    if live is None:
        leaves = jax.tree.leaves(tree)
        total = sum(jnp.sum(jnp.square(leaf.astype(jnp.float32))) for leaf in leaves)
        count = sum(leaf.size for leaf in leaves)
        return jnp.sqrt(total / count)
    per_example = _example_mean_square(tree)
    count = jnp.maximum(jnp.sum(live), 1)
    return jnp.sqrt(jnp.sum(jnp.where(live, per_example, 0.0)) / count)


def _example_mean_square(tree: PyTree) -> jax.Array:
    """Mean square of each example's elements, ``(batch,)`` in float32 (every leaf leads with the batch axis)."""
    leaves = jax.tree.leaves(tree)
    batch = leaves[0].shape[0]
    total = sum(jnp.sum(jnp.square(leaf.astype(jnp.float32)).reshape(batch, -1), axis=-1) for leaf in leaves)
    return total / (sum(leaf.size for leaf in leaves) // batch)


def _example_finite(tree: PyTree) -> jax.Array:
    """Whether each example's elements are all finite, ``(batch,)`` (every leaf leads with the batch axis)."""
    leaves = jax.tree.leaves(tree)
    batch = leaves[0].shape[0]
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(leaf.reshape(batch, -1)), axis=-1) for leaf in leaves]), axis=0)


def _select(mask, a: PyTree, b: PyTree) -> PyTree:
    """``a`` where ``mask`` else ``b``, leaf by leaf; a ``(batch,)`` mask selects whole examples."""

    def leaf(u, v):
        m = jnp.reshape(mask, jnp.shape(mask) + (1,) * (u.ndim - jnp.ndim(mask)))
        return jnp.where(m, u, v)

    return jax.tree.map(leaf, a, b)


def _scaled(tree: PyTree, y0: PyTree, y1: PyTree, rtol, atol) -> PyTree:
    """``tree / (atol + rtol * max(|y0|, |y1|))``, leaf by leaf."""
    return jax.tree.map(
        lambda e, a, b: e.astype(jnp.float32) / (atol + rtol * jnp.maximum(jnp.abs(a), jnp.abs(b)).astype(jnp.float32)),
        tree,
        y0,
        y1,
    )


def _time_dtype(*ts):
    return jnp.result_type(float, *(jnp.asarray(t).dtype for t in ts))


def _all_finite(tree: PyTree) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(tree)]))


def _initial_step(f, t0, y0, f0, direction, span, rtol, atol, args, live=None):
    """Hairer's starting step size (Solving ODEs I, Sec. II.4). Costs one NFE.

    Unlike the textbook version, the trial step never leaves ``[t0, t1]``: a vector field need not
    be defined (or finite) outside the interval, e.g. the VE SDE's ``sigma(t)`` overflows for t >> T.
    With ``live`` (batched mode), only the live examples' norms count.
    """
    scale = lambda tree: _scaled(tree, y0, y0, rtol, atol)
    _rms_norm_live = lambda tree: _rms_norm(tree, live)
    d0 = _rms_norm_live(scale(y0))
    d1 = _rms_norm_live(scale(f0))
    h0 = jnp.where((d0 < 1e-5) | (d1 < 1e-5), 1e-6, 0.01 * d0 / d1)
    h0 = jnp.minimum(h0, span)
    y1 = _combine(y0, direction * h0, (f0,), (1.0,))
    f1 = f(t0 + direction * h0, y1, args)
    d2 = _rms_norm_live(scale(jax.tree.map(lambda a, b: a - b, f1, f0))) / h0
    order = 5.0  # order + 1 of the 4th-order error estimate
    h1 = jnp.where(
        jnp.maximum(d1, d2) <= 1e-15,
        jnp.maximum(1e-6, h0 * 1e-3),
        (0.01 / jnp.maximum(d1, d2)) ** (1.0 / order),
    )
    h = jnp.minimum(100.0 * h0, h1)
    h = jnp.where(jnp.isfinite(h), h, h0)
    return jnp.where(jnp.isfinite(h) & (h > 0), h, jnp.minimum(1e-6, span))


def dopri5(
    f: VectorField,
    y0: PyTree,
    t0,
    t1,
    *,
    rtol=1e-5,
    atol=1e-5,
    max_steps: int = 4096,
    dt0=None,
    args=None,
    stage_loop: bool | None = None,
    batched: bool = False,
) -> tuple[PyTree, dict]:
    """Adaptive Dormand--Prince 5(4) with FSAL, PI step-size control and automatic first step.

    Args:
      f: vector field ``f(t, y, args)`` returning a pytree shaped like ``y``.
      y0: initial state at ``t0`` (pytree of float arrays).
      t0: initial time.
      t1: final time; ``t1 < t0`` integrates backwards.
      rtol: relative tolerance.
      atol: absolute tolerance.
      max_steps: most steps (accepted + rejected) before giving up; the solve then stops where it
        is and reports ``success=False``.
      dt0: first step size (its magnitude); ``None`` picks it automatically (one extra NFE).
      args: passed through to ``f``.
      stage_loop: run the six stages of a step in a ``fori_loop``, so ``f`` is compiled once per step
        rather than six times (``True``: far less compile time for a network), or unrolled (``False``:
        faster per step for a cheap ``f``). ``None`` chooses by the size of ``f``: a loop from
        ``STAGE_LOOP_MIN_OPS`` primitive operations up. The results are the same either way.
      batched: every leaf of ``y`` leads with a batch axis of independent problems that share one step
        size. The error norm is then the RMS over the examples still running; an example whose field is
        not finite at an accepted state, or whose error estimate stays non-finite while the step shrinks,
        is dropped: frozen where it was, reported in ``info["success"]`` (one flag per example), and no
        longer able to steer the step of the others.

    Returns:
      ``(y1, info)`` with ``y1`` the state at ``info["t_final"]`` (``t1`` on success) and ``info``
      holding ``nfe`` (vector-field evaluations), ``steps`` (attempted), ``accepted``,
      ``rejected``, ``success``, ``status`` (a code of :data:`STATUS`) and ``t_final``. A failed solve
      returns the state where it stopped: check ``success`` (the samplers and the likelihood turn a
      failed example into NaN).
    """
    if stage_loop is None:
        stage_loop = _field_ops(f, jnp.asarray(t0, _time_dtype(t0, t1)), y0, args) >= STAGE_LOOP_MIN_OPS
    problem = _Problem(f, t0, t1, rtol, atol, max_steps, stage_loop, batched)
    carry, nfe0 = _start(problem, y0, args, dt0)
    carry = lax.while_loop(lambda c: c.status == _RUNNING, lambda c: _attempt(problem, args, c), carry)
    return carry.y, _info(problem, carry, nfe0)


class _Problem:
    """The constants of a Dormand--Prince solve: field, interval, tolerances, limits and mode (not a pytree)."""

    def __init__(self, f, t0, t1, rtol, atol, max_steps, stage_loop, batched):
        self.f, self.max_steps, self.stage_loop, self.batched = f, max_steps, stage_loop, batched
        self.tdtype = _time_dtype(t0, t1)
        self.t0 = jnp.asarray(t0, self.tdtype)
        self.t1 = jnp.asarray(t1, self.tdtype)
        self.rtol = jnp.asarray(rtol, jnp.float32)
        self.atol = jnp.asarray(atol, jnp.float32)
        self.direction = jnp.where(self.t1 >= self.t0, 1.0, -1.0).astype(self.tdtype)
        self.span = jnp.abs(self.t1 - self.t0)


class _Carry(NamedTuple):
    """The state of a solve between step attempts (one example, or a batch sharing the steps when batched)."""

    t: jax.Array
    y: PyTree
    k1: PyTree  # f(t, y): FSAL, the next step's first stage
    h: jax.Array  # the next step size to try
    err_prev: jax.Array
    last_rejected: jax.Array
    steps: jax.Array
    accepted: jax.Array
    rejected: jax.Array
    status: jax.Array
    live: jax.Array  # batched mode: the examples still running, (batch,); True otherwise
    strikes: jax.Array  # batched mode: non-finite attempts per example
    t_stop: jax.Array  # batched mode: where each dropped example stopped
    h_good: jax.Array  # the last step size accepted


def _start(p: _Problem, y0: PyTree, args, dt0=None) -> tuple[_Carry, int]:
    """The state before the first step: ``f(t0, y0)`` and the first step size; returns it with the NFE spent."""
    f0 = p.f(p.t0, y0, args)
    live0 = _example_finite(f0) & _example_finite(y0) if p.batched else None
    if dt0 is None:
        h = _initial_step(p.f, p.t0, y0, f0, p.direction, p.span, p.rtol, p.atol, args, live0).astype(p.tdtype)
        nfe0 = 2
    else:
        h = jnp.abs(jnp.asarray(dt0, p.tdtype))
        nfe0 = 1
    h = jnp.minimum(h, p.span)
    zero = jnp.zeros((), jnp.int32)
    if p.batched:
        status = jnp.where(jnp.any(live0), _RUNNING, _NONFINITE)
        live, strikes, t_stop = live0, jnp.zeros(live0.shape, jnp.int32), jnp.full(live0.shape, p.t0)
    else:
        # A field that is not finite at the initial state cannot be integrated by any step size.
        status = jnp.where(_all_finite(f0) & _all_finite(y0), _RUNNING, _NONFINITE)
        live, strikes, t_stop = jnp.bool_(True), zero, p.t0
    status = jnp.where(p.span == 0, _DONE, jnp.where(p.max_steps <= 0, _MAX_STEPS, status))
    err0, rejected0 = jnp.float32(1e-4), jnp.bool_(False)
    carry = _Carry(p.t0, y0, f0, h, err0, rejected0, zero, zero, zero, status, live, strikes, t_stop, h)
    return carry, nfe0


def _attempt(p: _Problem, args, c: _Carry) -> _Carry:
    """One step attempt: six stages, the error estimate, acceptance and the next step size (PI control)."""
    remaining = jnp.abs(p.t1 - c.t)
    # Stretch the step by up to 1% rather than leave a sliver at the end (as in Hairer's code).
    last = 1.01 * c.h >= remaining
    h_used = jnp.where(last, remaining, c.h)
    dt = p.direction * h_used
    t_new = jnp.where(last, p.t1, c.t + dt)
    y, k1 = c.y, c.k1
    if p.stage_loop:
        ks = _stages(p.f, c.t, t_new, y, k1, dt, args)
        y_new = _combine_stacked(y, dt, ks, _A_TABLE[6])
        err = _combine_stacked(jax.tree.map(jnp.zeros_like, y), dt, ks, _E_ROW)
        k_last = jax.tree.map(lambda k: k[6], ks)
    else:
        ks = [k1]
        for i in range(1, 7):
            y_stage = _combine(y, dt, tuple(ks), _A[i])
            t_stage = t_new if _C[i] == 1.0 else c.t + _C[i] * dt
            ks.append(p.f(t_stage, y_stage, args))
        y_new = y_stage  # the last stage is evaluated at the 5th-order solution (FSAL)
        err = _combine(jax.tree.map(jnp.zeros_like, y), dt, tuple(ks), _E)
        k_last = ks[6]
    scaled_err = _scaled(err, y, y_new, p.rtol, p.atol)
    live = c.live
    if p.batched:
        # Each example's error; the examples still running steer the step, the others are ignored.
        example_err = _example_mean_square(scaled_err)
        bad = live & ~jnp.isfinite(example_err)
        ok = ~jnp.any(bad)
        err_norm = _rms_norm(scaled_err, live & ~bad)
    else:
        err_norm = _rms_norm(scaled_err)
        ok = jnp.isfinite(err_norm)
    accept = ok & (err_norm <= 1.0)

    # PI control on acceptance; pure I control (and never growth) after a rejection.
    safe_err = jnp.maximum(err_norm, 1e-10)
    factor_acc = _SAFETY * safe_err**-_K_I * c.err_prev**_K_P
    factor_acc = jnp.clip(factor_acc, _MIN_FACTOR, _MAX_FACTOR)
    factor_acc = jnp.where(c.last_rejected, jnp.minimum(factor_acc, 1.0), factor_acc)
    factor_rej = jnp.maximum(_MIN_FACTOR, _SAFETY * safe_err**-0.2)
    factor_rej = jnp.where(ok, jnp.minimum(factor_rej, 1.0), _MIN_FACTOR)
    h_next = (h_used * jnp.where(accept, factor_acc, factor_rej)).astype(p.tdtype)

    t_out = jnp.where(accept, t_new, c.t)
    moved = accept & live if p.batched else accept
    y_out = _select(moved, y_new, y)
    k1_out = _select(moved, k_last, k1)  # FSAL: f(t_new, y_new) is the next step's first stage
    err_prev = jnp.where(accept, jnp.maximum(err_norm, 1e-4), c.err_prev)
    steps = c.steps + 1
    accepted = c.accepted + accept.astype(jnp.int32)
    rejected = c.rejected + (~accept).astype(jnp.int32)
    done = accept & last
    too_small = (~done) & ((t_out + p.direction * h_next == t_out) | ~jnp.isfinite(h_next))
    strikes, t_stop, h_good = c.strikes, c.t_stop, c.h_good
    if p.batched:
        # Drop the examples that were non-finite in several attempts, or are when the step can shrink no
        # further; the others go on from the last step size that every live example accepted.
        strikes = strikes + bad.astype(jnp.int32)
        drop = (bad & (strikes >= _NONFINITE_STRIKES)) | (live & too_small & (strikes > 0))
        t_stop = jnp.where(drop, c.t, t_stop)
        live = live & ~drop
        dropped = jnp.any(drop)
        too_small = too_small & ~dropped
        h_next = jnp.where(dropped, h_good, h_next)
    h_good = jnp.where(accept, h_used, h_good).astype(p.tdtype)
    status = jnp.where(steps >= p.max_steps, _MAX_STEPS, _RUNNING)
    status = jnp.where(done, _DONE, jnp.where(too_small, jnp.where(ok, _STEP_TOO_SMALL, _NONFINITE), status))
    if p.batched:
        status = jnp.where(jnp.any(live), status, _NONFINITE)
    return _Carry(
        t_out,
        y_out,
        k1_out,
        h_next,
        err_prev,
        ~accept,
        steps,
        accepted,
        rejected,
        status,
        live,
        strikes,
        t_stop,
        h_good,
    )


def _info(p: _Problem, c: _Carry, nfe0) -> dict:
    success = c.status == _DONE
    t, status = c.t, c.status
    if p.batched:
        success = success & c.live
        t = jnp.where(c.live, c.t, c.t_stop)
        status = jnp.where(c.live, c.status, _NONFINITE)
    return {
        "nfe": nfe0 + 6 * c.steps,
        "steps": c.steps,
        "accepted": c.accepted,
        "rejected": c.rejected,
        "success": success,
        "status": status,
        "t_final": t,
    }


# --------------------------------------------------------------------------------------------------
# Fixed-step Runge--Kutta methods.
# --------------------------------------------------------------------------------------------------
def _euler_step(f, t, y, dt, args):
    return _combine(y, dt, (f(t, y, args),), (1.0,))


def _heun_step(f, t, y, dt, args):
    k1 = f(t, y, args)
    k2 = f(t + dt, _combine(y, dt, (k1,), (1.0,)), args)
    return _combine(y, dt, (k1, k2), (0.5, 0.5))


def _rk4_step(f, t, y, dt, args):
    k1 = f(t, y, args)
    k2 = f(t + 0.5 * dt, _combine(y, dt, (k1,), (0.5,)), args)
    k3 = f(t + 0.5 * dt, _combine(y, dt, (k2,), (0.5,)), args)
    k4 = f(t + dt, _combine(y, dt, (k3,), (1.0,)), args)
    return _combine(y, dt, (k1, k2, k3, k4), (1 / 6, 1 / 3, 1 / 3, 1 / 6))


def _fixed(step_fn, stages: int):
    def solver(f: VectorField, y0: PyTree, t0, t1, *, steps: int, args=None, batched: bool = False):
        steps = check_count(steps, "steps")
        tdtype = _time_dtype(t0, t1)
        ts = jnp.linspace(jnp.asarray(t0, tdtype), jnp.asarray(t1, tdtype), steps + 1)

        def body(y, t_pair):
            t, t_next = t_pair[0], t_pair[1]
            return step_fn(f, t, y, t_next - t, args), None

        y1, _ = lax.scan(body, y0, jnp.stack([ts[:-1], ts[1:]], axis=-1))
        n = jnp.asarray(steps, jnp.int32)
        success = _example_finite(y1) if batched else _all_finite(y1)
        info = {
            "nfe": stages * n,
            "steps": n,
            "accepted": n,
            "rejected": jnp.zeros((), jnp.int32),
            "success": success,
            "status": jnp.where(success, _DONE, _NONFINITE),
            "t_final": ts[-1],
        }
        return y1, info

    return solver


euler = _fixed(_euler_step, 1)
euler.__name__ = euler.__qualname__ = "euler"
euler.__doc__ = """Explicit Euler (order 1): ``steps`` uniform steps, one NFE each."""
heun = _fixed(_heun_step, 2)
heun.__name__ = heun.__qualname__ = "heun"
heun.__doc__ = """Heun's method (explicit trapezoidal rule, order 2); two NFE per step."""
rk4 = _fixed(_rk4_step, 4)
rk4.__name__ = rk4.__qualname__ = "rk4"
rk4.__doc__ = """Classical fourth-order Runge--Kutta; four NFE per step. See :func:`solve`."""

METHODS = {"dopri5": dopri5, "euler": euler, "heun": heun, "rk4": rk4}
ADAPTIVE = frozenset({"dopri5"})


def solve(
    f: VectorField,
    y0: PyTree,
    t0,
    t1,
    *,
    method: str = "dopri5",
    rtol=1e-5,
    atol=1e-5,
    max_steps: int = 4096,
    steps: int | None = None,
    dt0=None,
    args=None,
    stage_loop: bool | None = None,
    batched: bool = False,
) -> tuple[PyTree, dict]:
    """Integrates ``dy/dt = f(t, y, args)`` from ``t0`` to ``t1``.

    Args:
      f: vector field ``f(t, y, args)``; ``t`` is a scalar, ``y`` a pytree like ``y0``.
      y0: initial state (pytree of float arrays).
      t0: initial time.
      t1: final time (``t1 < t0`` integrates backwards).
      method: ``"dopri5"`` (adaptive) or a fixed-step ``"euler"``, ``"heun"``, ``"rk4"``.
      rtol: relative tolerance (adaptive only).
      atol: absolute tolerance (adaptive only).
      max_steps: step limit of the adaptive solver; exceeding it gives ``info["success"] == False``.
      steps: number of uniform steps (fixed-step methods only, required there).
      dt0: first step of the adaptive solver; ``None`` for automatic selection.
      args: passed through to ``f``.
      stage_loop: adaptive only: the stages of a step in a loop or unrolled (see :func:`dopri5`).
      batched: every leaf of ``y`` leads with a batch axis of independent problems sharing the steps;
        ``info["success"]`` is then per example, and a non-finite example cannot steer the step size of the
        others (see :func:`dopri5`).

    Returns:
      ``(y1, info)``; ``info`` has ``nfe``, ``steps``, ``accepted``, ``rejected``, ``success``,
      ``status`` and ``t_final``. Tolerances given as Python or NumPy numbers are checked here (positive and
      finite); traced ones are the caller's to check.

    >>> import jax.numpy as jnp
    >>> f = lambda t, y, args: {"x": y["x"] * t}
    >>> y1, info = solve(f, {"x": jnp.ones(2)}, 0.0, 1.0, method="rk4", steps=8)
    >>> int(info["nfe"])
    32
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {sorted(METHODS)}")
    if method in ADAPTIVE:
        if steps is not None:
            raise ValueError(f"steps is for fixed-step methods; {method!r} chooses its own steps")
        rtol = check_tolerance(rtol, "rtol")
        atol = check_tolerance(atol, "atol")
        max_steps = check_count(max_steps, "max_steps")
        return dopri5(
            f,
            y0,
            t0,
            t1,
            rtol=rtol,
            atol=atol,
            max_steps=max_steps,
            dt0=dt0,
            args=args,
            stage_loop=stage_loop,
            batched=batched,
        )
    if steps is None:
        raise ValueError(f"method {method!r} needs steps (the number of uniform steps)")
    return METHODS[method](f, y0, t0, t1, steps=steps, args=args, batched=batched)


# The largest step count a solver or sampler takes: step indices and NFE counters are int32, and a time grid of
# more points than this cannot be resolved in float32 anyway (steps shorter than its spacing near t = 1).
MAX_COUNT = 2**24


def check_count(value, name: str = "steps", *, maximum: int = MAX_COUNT) -> int:
    """A positive integer (a Python or NumPy integer) of at most ``maximum``, returned as an ``int``."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    value = int(value)
    if not 1 <= value <= maximum:
        raise ValueError(f"{name} must be a positive integer of at most {maximum}, got {value}")
    return value


def check_tolerance(value, name: str):
    """A solver tolerance: a positive finite Python or NumPy number (returned as a ``float``), or a traced value."""
    if isinstance(value, jax.core.Tracer):
        return value
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (numbers.Real, np.ndarray, jax.Array)):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    if np.ndim(value) != 0:
        raise ValueError(f"{name} must be a scalar, got an array of shape {np.shape(value)}")
    v = float(value)
    if not (math.isfinite(v) and v > 0):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return v
