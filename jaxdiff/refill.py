"""Continuous batching for adaptive per-example ODE solves: finished slots take the next example.

Solving a data set with one adaptive solve per example (the likelihood of a test set, ODE sampling, encoding) under
``jax.vmap`` runs every batch until its slowest example is done, evaluating the finished ones for nothing: a batch
costs the *largest* number of steps in it. Here a fixed number of *slots* stays on the device; each slot integrates
one example with its own step size, error control and FSAL stage (the algorithm of :func:`jaxdiff.ode.dopri5`,
attempt for attempt), and when an example finishes, its result is written to the output and the next example is
loaded into its slot, inside one compiled ``lax.while_loop``. A data set then costs about the *mean* number of
steps per example.

Each loop iteration is one step attempt of every busy slot: six batched evaluations of the vector field over the
slots. Examples are loaded ``load_width`` at a time into idle slots, with two batched evaluations over just those
examples (the first stage and Hairer's first-step estimate), so a load costs two evaluations per example, as in a
plain solve. An example's steps do not depend on the slot it runs in, on the slot count or on the other examples:
results equal those of a plain per-example solve to float rounding.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from jaxdiff import ode
from jaxdiff.per_example import PerExample, is_per_example

__all__ = ["solve_refill", "default_slots"]

PyTree = Any


def _per_example_values(args):
    """The values of the ``PerExample`` nodes of ``args`` (``None`` in place of every other leaf)."""
    return jax.tree.map(lambda n: n.value if is_per_example(n) else None, args, is_leaf=is_per_example)


def _join_args(args, per):
    """``args`` with each ``PerExample`` node's value replaced by the matching subtree of ``per``."""
    leaves, treedef = jax.tree.flatten(args, is_leaf=is_per_example)
    per_leaves = treedef.flatten_up_to(per)
    joined = [PerExample(v) if is_per_example(n) else n for n, v in zip(leaves, per_leaves, strict=True)]
    return treedef.unflatten(joined)


def _take(tree, index):
    return jax.tree.map(lambda leaf: jnp.take(leaf, index, axis=0, mode="clip"), tree)


def _bytes(tree) -> int:
    return sum(math.prod(leaf.shape) * jnp.dtype(leaf.dtype).itemsize for leaf in jax.tree.leaves(tree))


def _jaxpr_bytes(jaxpr) -> int:
    total = 0
    for eqn in jaxpr.eqns:
        for var in eqn.outvars:
            aval = var.aval
            if hasattr(aval, "shape") and hasattr(aval, "dtype"):
                total += math.prod(aval.shape) * jnp.dtype(aval.dtype).itemsize
    return total + sum(_jaxpr_bytes(sub) for sub in jax.extend.core.subjaxprs(jaxpr))


def default_slots(f: Callable, y_one: PyTree, args_one, n: int, *, budget_bytes: int | None = None) -> int:
    """A slot count that fits a memory budget, at most ``n`` (and at most 4096).

    ``y_one`` and ``args_one`` describe one example (arrays or :class:`jax.ShapeDtypeStruct`). One slot holds the
    solver state (about 14 copies of an example: stages, error, candidates) and the vector
    field's intermediate values, counted from one abstract trace of ``f`` for one example (every intermediate, an
    upper bound of what is live at once). The budget is a quarter of the device's memory where the device reports
    it (accelerators), else 1 GiB.
    """
    t = jax.ShapeDtypeStruct((), jnp.float32)
    jaxpr = jax.make_jaxpr(f)(t, y_one, args_one).jaxpr
    per_slot = 14 * _bytes(y_one) + 2 * _jaxpr_bytes(jaxpr)
    if budget_bytes is None:
        budget_bytes = 1 << 30
        try:
            stats = jax.devices()[0].memory_stats() or {}
            if stats.get("bytes_limit"):
                budget_bytes = int(stats["bytes_limit"]) // 4
        except Exception:  # a backend without memory statistics
            pass
    return int(max(1, min(n, 4096, budget_bytes // max(per_slot, 1))))


def solve_refill(
    f: Callable[[jax.Array, PyTree, Any], PyTree],
    y0: PyTree,
    t0,
    t1,
    *,
    slots: int,
    args: PyTree = None,
    rtol=1e-5,
    atol=1e-5,
    max_steps: int = 4096,
    stage_loop: bool | None = None,
    load_width: int | None = None,
) -> tuple[PyTree, dict]:
    """Solves ``N`` independent ODEs ``dy/dt = f(t, y, args)`` with ``slots`` adaptive Dormand--Prince solves at a time.

    Args:
      f: the vector field of *one* example: ``t`` a scalar, ``y`` one example's state (no batch axis); it is
        ``jax.vmap``-ed over the slots, so a network inside is called once per stage for all of them.
      y0: initial states, every leaf leading with the example axis ``N``.
      t0: initial time (shared).
      t1: final time (shared).
      slots: examples solved at once (at most ``N``).
      args: constants of ``f``: under a :class:`jaxdiff.PerExample` node they lead with ``N`` and each example gets
        its own slice (keys and probes stay tied to the example, whatever slot it runs in); the rest is shared.
      rtol: relative tolerance.
      atol: absolute tolerance.
      max_steps: step attempts per example.
      stage_loop: see :func:`jaxdiff.ode.dopri5`.
      load_width: examples loaded at once into idle slots (two calls of this width: the first stage and the first
        step size); a load waits until that many slots are idle. ``None``: ``slots / 16``, rounded up.

    Returns:
      ``(y1, info)``: ``y1`` shaped like ``y0``; ``info`` has per-example ``nfe`` (evaluations of the example),
      ``steps``, ``success``, ``status`` and ``t_final``, and ``batched_calls`` (vmapped calls of ``f``, of ``slots``
      or ``load_width`` examples), ``evaluations`` (the example evaluations those calls made: the work) and
      ``slot_utilisation`` (the fraction of them that advanced an example).
    """
    n = jax.tree.leaves(y0)[0].shape[0]
    slots = min(ode.check_count(slots, "slots"), n)
    rtol = ode.check_tolerance(rtol, "rtol")
    atol = ode.check_tolerance(atol, "atol")
    max_steps = ode.check_count(max_steps, "max_steps")
    per = _per_example_values(args)
    example = lambda i: (_take(y0, i), _take(per, i))
    t_dtype = jnp.result_type(float, jnp.asarray(t0).dtype, jnp.asarray(t1).dtype)
    if stage_loop is None:
        y_one, per_one = jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape[1:], leaf.dtype), (y0, per))
        t_one = jax.ShapeDtypeStruct((), t_dtype)
        stage_loop = ode._field_ops(f, t_one, y_one, _join_args(args, per_one)) >= ode.STAGE_LOOP_MIN_OPS
    problem = ode._Problem(f, t0, t1, rtol, atol, max_steps, stage_loop, False)

    # Each slot sees the shared constants whole and its own example's slice of the per-example ones.
    def start(y, per_slot):
        carry, _ = ode._start(problem, y, _join_args(args, per_slot))
        return carry

    def attempt(carry, per_slot):
        return ode._attempt(problem, _join_args(args, per_slot), carry)

    start_all = jax.vmap(start)
    attempt_all = jax.vmap(attempt)
    width = load_width or max(1, math.ceil(slots / 16))
    width = min(ode.check_count(width, "load_width"), slots)

    idx = jnp.arange(slots, dtype=jnp.int32)
    y_slots, per_slots = example(idx)
    carry = start_all(y_slots, per_slots)
    out = {
        "y": jax.tree.map(jnp.zeros_like, y0),
        "steps": jnp.zeros((n,), jnp.int32),
        "status": jnp.full((n,), ode._RUNNING, jnp.int32),
        "t_final": jnp.zeros((n,), carry.t.dtype),
    }
    # Counters: batched calls, and the example evaluations they made (the work).
    state = (carry, per_slots, idx, jnp.int32(slots), out, jnp.int32(2), jnp.int32(2 * slots))

    def cond(state):
        _, _, idx, next_i, *_ = state
        return jnp.any(idx >= 0) | (next_i < n)

    def wants_load(idx, next_i):
        remaining = n - next_i
        return (remaining > 0) & (jnp.sum(idx < 0) >= jnp.minimum(width, remaining))

    def load(state):
        # The next `width` examples into the first `width` idle slots: their first stage and first step size in two
        # calls of `width` examples each, so a load costs two evaluations per example and nothing for the others.
        carry, per_slots, idx, next_i, calls, work = state
        slot_ids = jnp.nonzero(idx < 0, size=width, fill_value=slots)[0]
        examples = next_i + jnp.arange(width, dtype=jnp.int32)
        valid = (slot_ids < slots) & (examples < n)
        y_new, per_new = example(jnp.where(valid, examples, 0))
        fresh = start_all(y_new, per_new)
        target = jnp.where(valid, slot_ids, slots)  # out of range: dropped
        put = lambda old, new: jax.tree.map(lambda a, b: a.at[target].set(b, mode="drop"), old, new)
        carry, per_slots = put(carry, fresh), put(per_slots, per_new)
        idx = idx.at[target].set(examples, mode="drop")
        next_i = next_i + jnp.sum(valid).astype(jnp.int32)
        return carry, per_slots, idx, next_i, calls + 2, work + 2 * width

    def body(state):
        carry, per_slots, idx, next_i, out, calls, work = state
        busy = (idx >= 0) & (carry.status == ode._RUNNING)
        # One step attempt of every busy slot (six batched calls); the others keep their state.
        carry = lax.cond(
            jnp.any(busy),
            lambda c: ode._select(busy, attempt_all(c, per_slots), c),
            lambda c: c,
            carry,
        )
        calls = calls + jnp.where(jnp.any(busy), 6, 0)
        work = work + jnp.where(jnp.any(busy), 6 * slots, 0)
        # Finished examples go to the output; their slots fall idle.
        finished = (idx >= 0) & (carry.status != ode._RUNNING)
        where = jnp.where(finished, idx, n)  # out of range: dropped
        out = {
            "y": jax.tree.map(lambda o, v: o.at[where].set(v, mode="drop"), out["y"], carry.y),
            "steps": out["steps"].at[where].set(carry.steps, mode="drop"),
            "status": out["status"].at[where].set(carry.status, mode="drop"),
            "t_final": out["t_final"].at[where].set(carry.t, mode="drop"),
        }
        idx = jnp.where(finished, -1, idx)
        # Refill while a full load of idle slots (or every remaining example) is waiting.
        carry, per_slots, idx, next_i, calls, work = lax.while_loop(
            lambda st: wants_load(st[2], st[3]), load, (carry, per_slots, idx, next_i, calls, work)
        )
        return carry, per_slots, idx, next_i, out, calls, work

    _, _, _, _, out, calls, work = lax.while_loop(cond, body, state)
    nfe = 2 + 6 * out["steps"]
    info = {
        "nfe": nfe,
        "steps": out["steps"],
        "success": out["status"] == ode._DONE,
        "status": out["status"],
        "t_final": out["t_final"],
        "batched_calls": calls,
        "evaluations": work,
        "slot_utilisation": jnp.sum(nfe) / work.astype(jnp.float32),
    }
    return out["y"], info
