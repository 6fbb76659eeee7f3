"""``group_random_draws``: batched random draws give bitwise the values of the function as written."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff import _grouping
from jaxdiff._grouping import group_random_draws
from jaxdiff.models import NCSNpp


def _draws(key):
    """Many draws of the kinds initialisers make, at shapes that share and do not share a size."""
    keys = [jax.random.fold_in(key, i) for i in range(9)]
    a, b = jax.random.split(keys[8])
    return {
        "uniform": [jax.random.uniform(keys[i], s) for i, s in enumerate([(3, 3, 4, 4), (16, 9), (4, 4), (144,)])],
        "normal": jax.random.normal(keys[4], (5, 7)) * 0.1,
        "truncated": jax.random.truncated_normal(keys[5], -2.0, 2.0, (6, 6)),
        "bernoulli": jax.random.bernoulli(keys[6], 0.3, (50,)),
        "ints": jax.random.randint(keys[7], (3, 11), 0, 100),
        "dependent": jax.random.uniform(jax.random.fold_in(a, 5), (2, 2)) + jax.random.uniform(b, (2, 2)),
        "scaled": [jnp.sqrt(3.0 / n) * jax.random.uniform(keys[i], (n, 4), minval=-1.0) for i, n in enumerate([2, 8])],
        "not_random": jnp.arange(4.0) * 2,
        # functions with custom derivative rules (``custom_jvp_call``) on draws, as a data-dependent init would
        "activated": [jax.nn.relu(jax.random.normal(keys[1], (4,))), jax.nn.silu(jax.random.uniform(keys[2], (3,)))],
        "large": jax.random.uniform(keys[0], (1 << 12, 1 << 10)),  # its own draw: past the spare-bits allowance
    }


def _assert_bitwise(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(la, lb, strict=True):
        assert x.shape == y.shape and x.dtype == y.dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _count(jaxpr, name):
    return sum(e.primitive.name == name for e in jaxpr.eqns)


def _count_deep(jaxpr, name):
    """Equations of primitive ``name``, inside called functions too."""
    inner = (_count_deep(sub, name) for e in jaxpr.eqns for sub in jax.extend.core.jaxprs_in_params(e.params))
    return _count(jaxpr, name) + sum(inner)


@pytest.mark.parametrize("partitionable", [True, False])
def test_grouped_draws_equal_the_draws_as_written(partitionable):
    previous = jax.config.jax_threefry_partitionable
    jax.config.update("jax_threefry_partitionable", partitionable)
    try:
        key = jax.random.key(7)
        expected = jax.jit(_draws)(key)
        grouped = jax.jit(group_random_draws(_draws))(key)
        _assert_bitwise(grouped, expected)
        jaxpr = jax.make_jaxpr(group_random_draws(_draws))(key).jaxpr
        # fold_in of the eight keys at once; the bits by size (partitionable: the large draw, the rest of the
        # first wave, randint's after its split, the dependent one) or by shape
        assert _count(jaxpr, "random_fold_in") == 2  # the eight, then the dependent one
        bits = _count(jaxpr, "random_bits")
        written = _count_deep(jax.make_jaxpr(_draws)(key).jaxpr, "random_bits")
        assert written == 16
        assert (bits <= 4) if partitionable else (bits < written), bits  # by exact shape: two share one
    finally:
        jax.config.update("jax_threefry_partitionable", previous)


def test_raw_uint32_keys_and_effects():
    def raw(key):
        ks = jax.random.split(key, 4)
        return [jax.random.normal(k, (3, 2)) for k in ks]

    key = jax.random.PRNGKey(1)
    _assert_bitwise(jax.jit(group_random_draws(raw))(key), jax.jit(raw)(key))

    seen = []

    def with_effect(key):
        jax.debug.callback(lambda: seen.append(1))
        return raw(key)

    _assert_bitwise(jax.jit(group_random_draws(with_effect))(key), jax.jit(raw)(key))
    assert seen == [1]


def test_network_initialiser_bitwise_with_few_draws():
    model = NCSNpp(nf=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), fir=True, progressive="output_skip")
    x, t = jnp.zeros((1, 8, 8, 1)), jnp.zeros((1,))

    def init(key):
        return model.init({"params": key, "dropout": key}, x, t)

    key = jax.random.key(0)
    fast = dict(xla_backend_optimization_level=0)  # compile time (the values do not depend on it: test_train)
    grouped_values = jax.jit(group_random_draws(init), compiler_options=fast)(key)
    _assert_bitwise(grouped_values, jax.jit(init, compiler_options=fast)(key))
    plain, grouped = jax.make_jaxpr(init)(key).jaxpr, jax.make_jaxpr(group_random_draws(init))(key).jaxpr
    assert _count(plain, "random_fold_in") > 20
    assert _count(grouped, "random_fold_in") == 1
    assert _count(grouped, "random_bits") <= 2
    assert not any(e.primitive.name == "conv_general_dilated" for e in grouped.eqns)  # the forward pass: unused


def test_spare_bits_bound_the_waste():
    sizes = [1 << 20, 1 << 20, 1 << 10, 10]

    def f(key):
        return [jax.random.bits(jax.random.fold_in(key, i), (n,)) for i, n in enumerate(sizes)]

    key = jax.random.key(2)
    _assert_bitwise(jax.jit(group_random_draws(f))(key), jax.jit(f)(key))
    jaxpr = jax.make_jaxpr(group_random_draws(f))(key).jaxpr
    drawn = sum(int(np.prod(e.outvars[0].aval.shape)) for e in jaxpr.eqns if e.primitive.name == "random_bits")
    assert drawn <= sum(sizes) + max(sum(sizes) // 4, _grouping._SPARE_BITS)
