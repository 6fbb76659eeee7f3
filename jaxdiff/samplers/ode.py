"""Probability-flow ODE sampler and encoder (Song et al., ICLR 2021, Sec. 4.3 and eq. 13).

Every SDE ``dx = f(x, t) dt + g(t) dW`` has a deterministic ODE with the same marginals ``p_t``:

    dx/dt = f~(x, t) = f(x, t) - 1/2 g(t)^2 grad_x log p_t(x).                       (eq. 13)

Integrating it from a prior draw at ``T`` down to ``eps`` samples the model (:func:`ode_sample`,
:func:`decode`); integrating it from data at ``eps`` up to ``T`` gives the data's latent code
(:func:`encode`), a bijection the paper uses for likelihoods and latent manipulation.

Step sizes are chosen per example by default: each example is an independent ODE solve (the
solver is ``jax.vmap``-ed over the batch), so an example's result does not depend on the rest of
its batch or on how the batch is split over devices, and one hard example cannot loosen the error
control of another. (XLA may round differently in programs compiled for different batch sizes;
an adaptive solver can turn such a rounding difference into a different step sequence, so results
across batch sizes agree to the solver's tolerance, and bit for bit for a given compiled program.)

``per_example_steps=False`` shares one step size over the whole batch (an RMS error norm over every
element, as a single ``solve_ivp`` on the flattened batch would do).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec
from jaxtyping import Array, Float, PRNGKeyArray

from jaxdiff import ode, refill
from jaxdiff.per_example import PerExample, is_per_example
from jaxdiff.samplers import _common as C
from jaxdiff.sde import SDE

__all__ = ["ode_sample", "decode", "encode", "probability_flow_drift", "solve_batch", "match_batch_sharding"]

PyTree = Any


def probability_flow_drift(score_fn: C.ScoreFn, sde: SDE, x: Array, t: Array) -> Array:
    """The probability-flow drift ``f(x, t) - g(t)^2 score(x, t) / 2`` (eq. 13), in float32.

    ``t`` has shape ``(batch,)``; the score may compute in any dtype, the rest is float32. The SDE computes it
    (:meth:`jaxdiff.sde.SDE.probability_flow_drift`), in a finite form where ``f`` and ``g`` are not finite.
    """
    x = x.astype(jnp.float32)
    return sde.probability_flow_drift(lambda y, s: C.evaluate_score(score_fn, y, s), x, t)


def match_batch_sharding(tree: PyTree, like: Array) -> PyTree:
    """Gives every leaf of ``tree`` the batch-axis sharding of ``like`` under an explicit mesh.

    Arrays made inside a jitted function (per-example keys, probes, zeros) are unsharded; with
    ``jax.sharding.AxisType.Explicit`` meshes ``jax.vmap`` and elementwise ops need their batch axis
    sharded like the data's. A no-op for unsharded data and automatic (GSPMD) sharding.
    """
    sharding = jax.typeof(like).sharding
    spec = tuple(sharding.spec)
    if not spec or spec[0] is None:
        return tree
    target = NamedSharding(sharding.mesh, PartitionSpec(spec[0]))
    return jax.tree.map(lambda leaf: jax.sharding.reshard(leaf, target), tree)


def solve_batch(
    vector_field: Callable[[Array, PyTree, PyTree], PyTree],
    y0: PyTree,
    t0: float,
    t1: float,
    *,
    args: PyTree = None,
    per_example_steps: bool = True,
    method: str = "dopri5",
    steps: int | None = None,
    slots: int | None = None,
    **solver_kwargs,
) -> tuple[PyTree, dict]:
    """Solves a batch of ODEs whose vector field is written for a batch.

    Args:
      vector_field: ``vector_field(t, y, args)`` with ``t`` of shape ``(batch,)`` and ``y`` and
        ``args`` pytrees whose leaves lead with the batch axis.
      y0: initial state at ``t0``.
      t0: initial time.
      t1: final time.
      args: constants of the vector field, or ``None``: leaves under a :class:`jaxdiff.PerExample` node lead
        with the batch axis and are split with it (Hutchinson probes, class labels inside a score function);
        the others (network parameters) are shared by every example.
      per_example_steps: one adaptive solve per example (``jax.vmap``) if true, otherwise one solve
        of the whole batch with a shared step size.
      method: a method of :func:`jaxdiff.ode.solve`.
      steps: number of steps of a fixed-step method.
      slots: adaptive per-example steps only: solve this many examples at a time, a finished example's slot
        taking the next one (:func:`jaxdiff.refill.solve_refill`), so the batch costs about the mean number of
        steps per example rather than the largest. ``None`` chooses by memory
        (:func:`jaxdiff.refill.default_slots`) and solves the whole batch at once where it fits. Per device when
        the batch is sharded.
      **solver_kwargs: ``rtol``, ``atol``, ``max_steps`` of the adaptive solver.

    Returns:
      ``(y1, info)``: ``info["nfe"]`` counts batched evaluations of ``vector_field`` (the slowest
      example's count when the whole batch steps at once; ``info["batched_calls"]`` is the same count,
      ``info["evaluations"]`` the example evaluations made (the work) and ``info["slot_utilisation"]`` the
      fraction of them that advanced a solve);
      ``info["nfe_per_example"]``, ``info["steps"]``, ``info["success"]`` and ``info["status"]`` (a code of
      :data:`jaxdiff.ode.STATUS`) are per example. An example whose solve failed (step limit, step-size
      underflow, a non-finite field) is NaN in ``y1``.
    """
    first = jax.tree.leaves(y0)[0]
    batch = first.shape[0]
    C.check_per_example_leaves(args, batch, "args")
    y0 = match_batch_sharding(y0, first)
    args = jax.tree.map(
        lambda n: PerExample(match_batch_sharding(n.value, first)) if is_per_example(n) else n,
        args,
        is_leaf=is_per_example,
    )
    if per_example_steps:
        one = _one_example_field(vector_field)
        # Split the per-example constants with the batch; the shared ones go to every example whole.
        split = lambda on, off: jax.tree.map(lambda n: on if is_per_example(n) else off, args, is_leaf=is_per_example)
        sharding = jax.typeof(first).sharding
        spec = tuple(sharding.spec)
        sharded = bool(spec) and spec[0] is not None
        local = batch // (sharding.mesh.shape[spec[0]] if sharded else 1)
        use_slots = None
        if method in ode.ADAPTIVE:
            if slots is None:
                one_y, one_args = _one_example(y0), _first_example(args)
                auto = refill.default_slots(one, one_y, one_args, local)
                use_slots = auto if auto < local else None
            else:
                use_slots = min(ode.check_count(slots, "slots"), local)

        def solve_all(y, a):
            if use_slots is not None:
                y1, info = refill.solve_refill(one, y, t0, t1, slots=use_slots, args=a, **solver_kwargs)
            else:
                solve_one = lambda y, a: ode.solve(one, y, t0, t1, method=method, steps=steps, args=a, **solver_kwargs)
                y1, info = jax.vmap(solve_one, in_axes=(0, split(0, None)))(y, a)
                calls = jnp.max(info["nfe"])
                # Every example is evaluated until the slowest is done.
                info = {**info, "batched_calls": calls, "evaluations": calls * info["nfe"].shape[0]}
            # Per-device counts travel as arrays of one element, so that a sharded solve can concatenate them.
            info = {k: v for k, v in info.items() if k != "slot_utilisation"}
            for name in ("batched_calls", "evaluations"):
                info[name] = jnp.reshape(info[name], (1,))
            return y1, info

        if sharded:
            # Batch sharded over an explicit mesh: each device solves its own examples (and stops
            # when they are done); the solves are independent, so no communication is needed.
            solve_all = jax.shard_map(
                solve_all,
                mesh=sharding.mesh,
                in_specs=(PartitionSpec(spec[0]), split(PartitionSpec(spec[0]), PartitionSpec())),
                out_specs=PartitionSpec(spec[0]),
                check_vma=False,
            )
        y1, info = solve_all(y0, args)
        batched_calls = jnp.max(info.pop("batched_calls"))
        evaluations = jnp.sum(info.pop("evaluations"))
        utilisation = jnp.sum(info["nfe"]) / evaluations.astype(jnp.float32)
    else:
        # One step size for the batch; an example that goes non-finite is dropped from the error control.
        batched = lambda t, y, a: vector_field(jnp.full((batch,), t), y, a)
        y1, info = ode.solve(batched, y0, t0, t1, method=method, steps=steps, args=args, batched=True, **solver_kwargs)
        info = jax.tree.map(lambda a: jnp.broadcast_to(a, (batch,)), info)
        batched_calls, utilisation = jnp.max(info["nfe"]), jnp.float32(1.0)
        evaluations = batched_calls * batch
    # A solve that did not finish (step limit, step size underflow, a non-finite field) has no result: its
    # example comes back as NaN, which the callers count in info["nonfinite"]; the other examples are untouched.
    success = info["success"]
    y1 = ode._select(success, y1, jax.tree.map(lambda leaf: jnp.full_like(leaf, jnp.nan), y1))
    out = {
        "nfe": batched_calls,
        "nfe_per_example": info["nfe"],
        "steps": info["steps"],
        "success": success,
        "status": info["status"],
        "batched_calls": batched_calls,
        "evaluations": evaluations,
        "slot_utilisation": utilisation,
    }
    return y1, out


def _one_example_field(vector_field: Callable) -> Callable:
    """``vector_field`` (written for a batch) as the field of one example, whose ``jax.vmap`` is the batched call.

    The per-example solvers ``vmap`` a field of one example over the examples (or the slots). The plain ``vmap`` of
    a batch-of-one call is correct but slow: for the mixture's drift and divergence it measured 1.7--1.9x the time of
    calling ``vector_field`` on the batch itself, and that time is most of a per-example solve. So the ``vmap`` of
    this function *is* that batched call (``jax.custom_batching.custom_vmap``): the times, states and per-example
    constants go in with their batch axis (broadcast where a value is the same for every example), the shared
    constants whole.
    """
    expand = lambda tree: jax.tree.map(lambda leaf: leaf[None], tree)

    def one(t, y, a):
        # Each example sees its own slice of the per-example constants, as a batch of one.
        a = jax.tree.map(lambda n: PerExample(expand(n.value)) if is_per_example(n) else n, a, is_leaf=is_per_example)
        out = vector_field(jnp.reshape(t, (1,)), expand(y), a)
        return jax.tree.map(lambda leaf: leaf[0], out)

    field = jax.custom_batching.custom_vmap(one)

    @field.def_vmap
    def _batched(axis_size, in_batched, t, y, a):
        t_batched, y_batched, a_batched = in_batched
        grow = lambda tree, flags: jax.tree.map(
            lambda leaf, b: leaf if b else jnp.broadcast_to(leaf, (axis_size, *jnp.shape(leaf))), tree, flags
        )
        nodes, treedef = jax.tree.flatten(a, is_leaf=is_per_example)
        flags = treedef.flatten_up_to(a_batched)
        if any(not is_per_example(n) and any(jax.tree.leaves(b)) for n, b in zip(nodes, flags, strict=True)):
            # A shared constant that varies along this axis (an outer vmap): the plain vmap of every example.
            out = jax.vmap(one)(grow(t, t_batched), grow(y, y_batched), grow(a, a_batched))
        else:
            nodes = [
                PerExample(grow(n.value, b.value)) if is_per_example(n) else n
                for n, b in zip(nodes, flags, strict=True)
            ]
            out = vector_field(grow(t, t_batched), grow(y, y_batched), treedef.unflatten(nodes))
        return out, jax.tree.map(lambda _: True, out)

    return field


def _one_example(tree):
    """The shapes of one example of ``tree`` (leaves leading with the batch axis), for an abstract trace."""
    return jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape[1:], leaf.dtype), tree)


def _first_example(args):
    """``args`` with each ``PerExample`` node describing one example (for an abstract trace of ``one``)."""
    return jax.tree.map(
        lambda n: PerExample(_one_example(n.value)) if is_per_example(n) else n,
        args,
        is_leaf=is_per_example,
    )


def _flow(score_fn, sde, x, t0, t1, options):
    method, steps, rtol, atol, max_steps, per_example, slots = options
    # The score function travels as an argument, so that its per-example leaves (labels) are split with the batch.
    field = lambda t, y, sf: probability_flow_drift(sf, sde, y, t)
    kwargs = {} if method not in ode.ADAPTIVE else {"rtol": rtol, "atol": atol, "max_steps": max_steps}
    return solve_batch(
        field,
        x.astype(jnp.float32),
        t0,
        t1,
        args=score_fn,
        per_example_steps=per_example,
        method=method,
        steps=steps,
        slots=slots,
        **kwargs,
    )


def _check_options(sde, eps, method, steps, rtol, atol, max_steps, per_example_steps, slots=None):
    """Validates the solver options; returns ``eps`` and the static ``options`` tuple of the jitted solves."""
    C.check_sde(sde)
    eps = C.check_eps(eps, sde)
    if method not in ode.METHODS:
        raise ValueError(f"unknown ODE method {method!r}; choose from {sorted(ode.METHODS)}")
    if method in ode.ADAPTIVE:
        if steps is not None:
            raise ValueError(f"steps is for fixed-step methods; {method!r} chooses its own steps")
    else:
        steps = C.check_steps(steps)
    rtol = ode.check_tolerance(rtol, "rtol")
    atol = ode.check_tolerance(atol, "atol")
    max_steps = C.check_steps(max_steps, "max_steps")
    slots = None if slots is None else C.check_steps(slots, "slots")
    if slots is not None and not (per_example_steps and method in ode.ADAPTIVE):
        raise ValueError(
            f"slots={slots} applies to adaptive per-example solves; got method={method!r}, "
            f"per_example_steps={per_example_steps!r}"
        )
    return eps, (method, steps, rtol, atol, max_steps, bool(per_example_steps), slots)


_STATIC = ("sde", "shape", "eps", "options", "denoise")


@functools.partial(jax.jit, static_argnames=_STATIC)
def _sample(key, score_fn, sde, shape, eps, options, denoise):
    keys = C.example_keys(key, shape[0])
    z = C.prior_sample(keys, sde, shape[1:])
    return _decode(score_fn, sde, z, eps, options, denoise)


@functools.partial(jax.jit, static_argnames=("sde", "eps", "options", "denoise"))
def _decode_jit(score_fn, sde, z, eps, options, denoise):
    return _decode(score_fn, sde, z, eps, options, denoise)


def _decode(score_fn, sde, z, eps, options, denoise):
    x, info = _flow(score_fn, sde, z, sde.T, eps, options)
    nfe = info.pop("nfe")
    return C.finish_sampling(score_fn, sde, x, jnp.float32(eps), nfe, denoise, **info)


@functools.partial(jax.jit, static_argnames=("sde", "eps", "options"))
def _encode(score_fn, sde, x, eps, options):
    z, info = _flow(score_fn, sde, x, eps, sde.T, options)
    nfe = info.pop("nfe")
    return C.finish(z, nfe, **info)


def ode_sample(
    key: PRNGKeyArray,
    score_fn: C.ScoreFn,
    sde: SDE,
    shape: tuple[int, ...],
    *,
    steps: int | None = None,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    eps: float = 1e-3,
    method: str = "dopri5",
    denoise: bool = False,
    per_example_steps: bool = True,
    max_steps: int = 4096,
    slots: int | None = None,
) -> tuple[Float[Array, "batch ..."], dict]:
    """Samples by integrating the probability-flow ODE (eq. 13) from the prior at ``T`` to ``eps``.

    Args:
      key: PRNG key; example ``i`` draws its prior sample from ``fold_in(key, i)``.
      score_fn: ``score_fn(x, t)`` with ``t`` of shape ``(batch,)``.
      sde: the forward SDE.
      shape: ``(batch, *event_shape)``.
      steps: number of uniform steps of a fixed-step ``method``; ``None`` for ``"dopri5"``.
      rtol: relative tolerance of the adaptive solver.
      atol: absolute tolerance of the adaptive solver.
      eps: the time the ODE stops at (the paper uses ``1e-3`` for sampling).
      method: ``"dopri5"`` (adaptive, default), ``"euler"``, ``"heun"`` or ``"rk4"``.
      denoise: finish with Tweedie's formula ``E[x_0 | x_eps]`` (one more score evaluation).
      per_example_steps: independent step sizes per example (default) or one for the batch.
      max_steps: step limit of the adaptive solver; an example that reaches it is NaN, counted in
        ``info["nonfinite"]``, and ``info["success"]`` is false for it.
      slots: examples solved at once by the adaptive solver, a finished one's slot taking the next
        (see :func:`solve_batch`); ``None`` chooses by memory.

    Returns:
      ``(x, info)``: samples of ``shape`` in float32; ``info`` has ``nfe`` (batched score
      evaluations), ``nfe_per_example``, ``steps``, ``success``, ``status``, ``batched_calls``,
      ``slot_utilisation`` and ``nonfinite`` (failed examples, NaN in ``x``).

    >>> from jaxdiff import GaussianMixture, VPSDE
    >>> sde, gm = VPSDE(), GaussianMixture.grid()
    >>> x, info = ode_sample(jax.random.key(0), gm.score_fn(sde), sde, (16, 2), rtol=1e-3, atol=1e-3)
    >>> x.shape, bool(info["success"].all())
    ((16, 2), True)
    """
    shape = C.check_shape(shape)
    eps, options = _check_options(sde, eps, method, steps, rtol, atol, max_steps, per_example_steps, slots)
    return _sample(key, C.as_partial(score_fn), sde, shape, eps, options, bool(denoise))


def decode(
    score_fn: C.ScoreFn,
    sde: SDE,
    z: Float[Array, "batch ..."],
    *,
    steps: int | None = None,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    eps: float = 1e-3,
    method: str = "dopri5",
    denoise: bool = False,
    per_example_steps: bool = True,
    max_steps: int = 4096,
    slots: int | None = None,
) -> tuple[Float[Array, "batch ..."], dict]:
    """Maps latents ``z`` at time ``T`` to data at ``eps`` along the probability-flow ODE.

    The inverse of :func:`encode`; :func:`ode_sample` is ``decode`` of a prior draw. Arguments and
    ``info`` as in :func:`ode_sample`.
    """
    eps, options = _check_options(sde, eps, method, steps, rtol, atol, max_steps, per_example_steps, slots)
    return _decode_jit(C.as_partial(score_fn), sde, jnp.asarray(z), eps, options, bool(denoise))


def encode(
    score_fn: C.ScoreFn,
    sde: SDE,
    x: Float[Array, "batch ..."],
    *,
    steps: int | None = None,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    eps: float = 1e-3,
    method: str = "dopri5",
    per_example_steps: bool = True,
    max_steps: int = 4096,
    slots: int | None = None,
) -> tuple[Float[Array, "batch ..."], dict]:
    """Maps data ``x`` at time ``eps`` to latents at ``T`` along the probability-flow ODE.

    Args:
      score_fn: ``score_fn(x, t)`` with ``t`` of shape ``(batch,)``.
      sde: the forward SDE.
      x: data, ``(batch, *event_shape)``.
      steps: number of uniform steps of a fixed-step ``method``; ``None`` for ``"dopri5"``.
      rtol: relative tolerance of the adaptive solver.
      atol: absolute tolerance of the adaptive solver.
      eps: the time the data sits at.
      method: ``"dopri5"`` (adaptive, default), ``"euler"``, ``"heun"`` or ``"rk4"``.
      per_example_steps: independent step sizes per example (default) or one for the batch.
      max_steps: step limit of the adaptive solver.
      slots: see :func:`ode_sample`.

    Returns:
      ``(z, info)`` with ``info`` as in :func:`ode_sample`.

    >>> from jaxdiff import GaussianMixture, VPSDE
    >>> sde, gm = VPSDE(), GaussianMixture.grid()
    >>> z, info = encode(gm.score_fn(sde), sde, gm.sample(jax.random.key(0), 4), rtol=1e-3, atol=1e-3)
    >>> z.shape
    (4, 2)
    """
    eps, options = _check_options(sde, eps, method, steps, rtol, atol, max_steps, per_example_steps, slots)
    return _encode(C.as_partial(score_fn), sde, jnp.asarray(x), eps, options)
