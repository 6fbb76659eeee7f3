"""Random draws of the same kind grouped into one batched draw: a program transformation for initialisers.

A Flax network's ``init`` derives one key per parameter (``fold_in`` of the parameter's path) and draws each
parameter's initial values from it. Under ``jit`` that is one threefry hash per parameter and one per key, each
compiled by XLA as code of its own: for a DDPM++ of 288 parameters, several seconds of compilation for a program
that runs once, most of it spent on hundreds of copies of the same few kernels.

:func:`group_random_draws` traces a function to a jaxpr and evaluates it again equation by equation, but
schedules it by data dependence and, among the equations that are ready together, binds every set of random
draws of the same kind (the same primitive or called function, the same parameters and input shapes) as one
``vmap``-ed draw over the stacked keys. Threefry is a function of the key alone, so the grouped draws produce
the same bits; and with partitionable threefry (JAX's default) draws of different sizes share one, each the
prefix of the largest. The values are bitwise those of the function as written (tested); only the compiled
program is smaller. Equations whose results the outputs do not use are dropped first, and a function with
side effects is evaluated as written.
"""

from __future__ import annotations

import collections
import functools
import itertools
import math
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
from jax.extend import core as jex_core

# Primitives that draw or derive random keys and bits: batching them is exact (threefry hashes each key alone).
_RANDOM_PRIMITIVES = frozenset({"random_bits", "random_fold_in", "random_split", "threefry2x32"})


def _draws_random(eqn: Any) -> bool:
    """Whether ``eqn`` is a random primitive, or a call (a nested ``jit``) of a function that draws."""
    if eqn.primitive.name in _RANDOM_PRIMITIVES:
        return True
    if eqn.primitive.name != "jit":
        return False
    return any(_jaxpr_draws(j) for j in jex_core.jaxprs_in_params(eqn.params))


@functools.lru_cache(maxsize=1024)  # jaxprs hash by identity; a called function's jaxpr is shared by its calls
def _jaxpr_draws(jaxpr: Any) -> bool:
    return any(_draws_random(e) for e in jaxpr.eqns)


def _frozen(value: Any) -> Any:
    try:
        hash(value)
        return value
    except TypeError:
        return ("id", id(value))


def _flatten(jaxpr: Any, scope: int, in_refs: list, items: list, env: dict, scopes: Iterator[int]) -> list:
    """Appends ``jaxpr``'s equations to ``items`` as ``(eqn, in_refs, out_refs)``, calls that draw inlined.

    A reference is a ``Literal`` or a ``(scope, var)`` pair: every inlined copy of a called jaxpr (the same
    function drawn at several shapes or sites shares one jaxpr) gets a scope of its own.
    """
    renamed = dict(zip(jaxpr.invars, in_refs, strict=True))

    def ref(v):
        return v if isinstance(v, jex_core.Literal) else renamed.get(v, (scope, v))

    for eqn in jaxpr.eqns:
        invals = [ref(v) for v in eqn.invars]
        if eqn.primitive.name == "jit" and _draws_random(eqn):
            closed = eqn.params["jaxpr"]
            inner = next(scopes)
            for v, c in zip(closed.jaxpr.constvars, closed.consts, strict=True):
                env[(inner, v)] = c
            outs = _flatten(closed.jaxpr, inner, invals, items, env, scopes)
            dropped = lambda v: isinstance(v, jex_core.DropVar)  # noqa: E731
            renamed.update((v, r) for v, r in zip(eqn.outvars, outs, strict=True) if not dropped(v))
        else:
            items.append((eqn, invals, [(scope, v) for v in eqn.outvars]))
    return [ref(v) for v in jaxpr.outvars]


def _size_bucketed() -> bool:
    # With partitionable threefry (JAX's default since 0.5) element i of ``random_bits(key, shape)`` depends on
    # the key and the flat index i alone, so a draw is the prefix of a longer one, reshaped (tested).
    return bool(jax.config.jax_threefry_partitionable)


def _group_key(eqn: Any) -> tuple:
    avals = tuple((tuple(v.aval.shape), str(v.aval.dtype)) for v in eqn.invars)
    if eqn.primitive.name == "random_bits" and _size_bucketed() and avals[0] == ((), "key<fry>"):
        return ("bits", eqn.params["bit_width"])
    params = tuple(sorted((k, _frozen(v)) for k, v in eqn.params.items()))
    return (eqn.primitive, params, avals)


def _bind(eqn: Any, invals: list) -> list:
    """``eqn`` applied to ``invals``, as ``jax.core.eval_jaxpr`` applies it (custom derivative rules included)."""
    bind_params = eqn.primitive.get_bind_params(eqn.params)
    # A dict in current JAX; ``(subfuns, params)`` in older versions.
    subfuns, params = bind_params if isinstance(bind_params, tuple) else ((), bind_params)
    with eqn.ctx.manager:
        out = eqn.primitive.bind(*subfuns, *invals, **params)
    return out if eqn.primitive.multiple_results else [out]


# Draws of different sizes share one batched draw of the largest size while the bits drawn in vain stay below a
# quarter of the bits used or this many, whichever is more: a few batched draws compile in a fraction of the time
# of one per size, and the transient memory stays near the parameters' own (CIFAR-10 DDPM++: 4 draws, 78.9M
# elements drawn for 61.8M parameters).
_SPARE_BITS = 1 << 22


def _bind_bits(members: list, read: Callable) -> list:
    """``random_bits`` of one bit width at any shapes, as prefixes of a few batched draws (sizes bucketed)."""
    sizes = [math.prod(eqn.params["shape"]) for eqn, _, _ in members]
    order = sorted(range(len(members)), key=lambda j: -sizes[j])
    buckets: list = []
    for j in order:
        if buckets:
            bucket = buckets[-1]
            drawn = (len(bucket) + 1) * sizes[bucket[0]]
            used = sum(sizes[i] for i in bucket) + sizes[j]
            if drawn - used <= max(used // 4, _SPARE_BITS):
                bucket.append(j)
                continue
        buckets.append([j])
    outputs: list = [None] * len(members)
    for bucket in buckets:
        eqn0 = members[bucket[0]][0]
        longest = eqn0.replace(params=dict(eqn0.params, shape=(sizes[bucket[0]],)))
        keys = jnp.stack([read(members[j][1][0]) for j in bucket])
        bits = jax.vmap(lambda k, eqn=longest: _bind(eqn, [k])[0])(keys)
        for row, j in enumerate(bucket):
            outputs[j] = [bits[row, : sizes[j]].reshape(members[j][0].params["shape"])]
    return outputs


def _same(a: Any, b: Any) -> bool:
    return a is b or (isinstance(a, tuple) and isinstance(b, tuple) and a == b)


def _bind_group(key: tuple, members: list, read: Callable) -> list:
    """The outputs of ``members`` (equations of one group), computed by one batched bind."""
    first = members[0][0]
    if len(members) == 1:
        return [_bind(first, [read(r) for r in members[0][1]])]
    if key[0] == "bits":
        return _bind_bits(members, read)
    refs0 = members[0][1]
    shared = [all(_same(refs[k], refs0[k]) for _, refs, _ in members) for k in range(len(refs0))]
    batched = [
        read(r) if s else jnp.stack([read(refs[k]) for _, refs, _ in members])
        for k, (r, s) in enumerate(zip(refs0, shared, strict=True))
    ]
    outs = jax.vmap(lambda *a: _bind(first, a), in_axes=[None if s else 0 for s in shared])(*batched)
    return [[o[j] for o in outs] for j in range(len(members))]


def _eval_grouped(jaxpr: Any, consts: list, args: list) -> list:
    env: dict = {(0, v): c for v, c in zip(jaxpr.constvars, consts, strict=True)}
    env.update(((0, v), a) for v, a in zip(jaxpr.invars, args, strict=True))
    items: list = []
    out_refs = _flatten(jaxpr, 0, [(0, v) for v in jaxpr.invars], items, env, itertools.count(1))

    def read(r):
        return r.val if isinstance(r, jex_core.Literal) else env[r]

    # Only what the outputs use (the network's forward pass in an initialiser is not).
    live = {r for r in out_refs if not isinstance(r, jex_core.Literal)}
    kept = []
    for item in reversed(items):
        if any(r in live for r in item[2]):
            kept.append(item)
            live.update(r for r in item[1] if not isinstance(r, jex_core.Literal))
    kept.reverse()

    producer = {r: i for i, (_, _, outs) in enumerate(kept) for r in outs}
    consumers = collections.defaultdict(list)
    waiting = []
    for i, (_, ins, _) in enumerate(kept):
        deps = {producer[r] for r in ins if not isinstance(r, jex_core.Literal) and r in producer}
        waiting.append(len(deps))
        for d in deps:
            consumers[d].append(i)

    ready = [i for i, n in enumerate(waiting) if n == 0]
    while ready:
        groups: dict = {}
        for i in ready:
            eqn, ins, outs = kept[i]
            if eqn.primitive.name in _RANDOM_PRIMITIVES:
                groups.setdefault(_group_key(eqn), []).append(kept[i])
            else:
                env.update(zip(outs, _bind(eqn, [read(r) for r in ins]), strict=True))
        for key, members in groups.items():
            for (_, _, outs), values in zip(members, _bind_group(key, members, read), strict=True):
                env.update(zip(outs, values, strict=True))
        following = []
        for i in ready:
            for c in consumers[i]:
                waiting[c] -= 1
                if waiting[c] == 0:
                    following.append(c)
        ready = sorted(following)
    return [read(r) for r in out_refs]


def group_random_draws(fn: Callable) -> Callable:
    """``fn`` with its random draws of the same kind batched (see the module's docstring); same values.

    Meant for functions run once under ``jit``, such as a network's initialiser, whose compile time is
    dominated by many small draws. A function with side effects is returned evaluated as written.
    """

    @functools.wraps(fn)
    def grouped(*args, **kwargs):
        closed, out_shape = jax.make_jaxpr(functools.partial(fn, **kwargs), return_shape=True)(*args)
        flat_args = jax.tree.leaves(args)
        if closed.jaxpr.effects:
            flat_out = jex_core.jaxpr_as_fun(closed)(*flat_args)
        else:
            flat_out = _eval_grouped(closed.jaxpr, list(closed.consts), flat_args)
        return jax.tree.unflatten(jax.tree.structure(out_shape), flat_out)

    return grouped
