"""Continuous batching of adaptive solves: a data set solved a few slots at a time gives, example by example, the
plain per-example solve's result, whatever the slot count, the order and the device count; it costs about the mean
number of steps per example; a failed example is NaN and counted, the others untouched."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from jax.tree_util import Partial

import jaxdiff
from jaxdiff import PerExample, refill
from jaxdiff.likelihood import log_likelihood
from jaxdiff.per_example import unwrap
from jaxdiff.samplers import ode as ode_sampler
from jaxdiff.sde import VPSDE
from tests.helpers import four_component_mixture

SDE = VPSDE()
GM = four_component_mixture()
N = 24
X = GM.sample(jax.random.key(1), N)
KEY = jax.random.key(0)
TOL = dict(rtol=1e-5, atol=1e-5)


def _score(flags, x, t):
    bad = unwrap(flags)[:, None]
    return jnp.where(bad, jnp.nan, GM.score_fn(SDE)(x, t))


def _flagged(bad=()):
    flags = np.zeros((N,), bool)
    flags[list(bad)] = True
    return Partial(_score, PerExample(jnp.asarray(flags)))


@pytest.fixture(scope="module")
def plain():
    """The whole batch at once (one vmapped solve per example): the reference."""
    logp, info = log_likelihood(KEY, GM.score_fn(SDE), SDE, X, **TOL)
    assert int(info["nonfinite"]) == 0
    return np.asarray(logp), info


@pytest.mark.parametrize("slots", [1, 5, 8])
def test_refill_equals_the_plain_per_example_solve(plain, slots):
    logp, info = log_likelihood(KEY, GM.score_fn(SDE), SDE, X, slots=slots, **TOL)
    # Hutchinson probes are the example's own (fold_in(key, example)), whatever slot it runs in.
    np.testing.assert_allclose(logp, plain[0], rtol=0, atol=1e-4)
    np.testing.assert_allclose(info["nfe_per_example"], plain[1]["nfe_per_example"], atol=12)
    # The work: at least each example's own evaluations; the utilisation is their share of it.
    work, util = int(info["evaluations"]), float(info["slot_utilisation"])
    total = int(np.sum(info["nfe_per_example"]))
    assert work >= total and 0 < util <= 1
    np.testing.assert_allclose(util, total / work, rtol=1e-6)


def test_results_follow_the_example_not_its_position(plain):
    # The exact trace has no probes (whose keys follow the position in the batch), so a permuted batch must give
    # the permuted results, whatever slot each example lands in.
    perm = np.random.default_rng(0).permutation(N)
    exact = lambda x, **kw: np.asarray(log_likelihood(KEY, GM.score_fn(SDE), SDE, x, trace="exact", **kw, **TOL)[0])  # noqa: E731
    base = exact(X)
    np.testing.assert_allclose(exact(X[perm], slots=5), base[perm], rtol=0, atol=1e-4)
    np.testing.assert_allclose(exact(X, slots=7), base, rtol=0, atol=1e-4)


def test_refill_isolates_failed_examples():
    bad = (3, 17)
    clean, _ = log_likelihood(KEY, _flagged(), SDE, X, slots=4, trace="exact", **TOL)
    logp, info = log_likelihood(KEY, _flagged(bad), SDE, X, slots=4, trace="exact", **TOL)
    assert np.all(np.isnan(np.asarray(logp)[list(bad)])) and int(info["nonfinite"]) == 2
    others = np.setdiff1d(np.arange(N), bad)
    np.testing.assert_array_equal(np.asarray(logp)[others], np.asarray(clean)[others])


def test_refill_is_cheaper_than_stepping_the_batch_to_its_slowest():
    # Against the plain vmap in batches of the slot count: the examples differ in difficulty (decay rates over two
    # decades, in random order), so a batch pays its slowest example; refilled slots pay about the mean.
    rates = jnp.asarray(np.random.default_rng(0).permutation(np.geomspace(0.3, 30.0, 64)), jnp.float32)
    f = lambda t, y, a: -unwrap(a) * y * (1.0 + jnp.sin(5.0 * t * unwrap(a)))  # noqa: E731
    y0 = jnp.ones((64, 2))
    y, info = jax.jit(lambda y, r: refill.solve_refill(f, y, 0.0, 1.0, slots=8, args=PerExample(r), **TOL))(y0, rates)
    one = lambda y, r: jaxdiff.ode.solve(f, y, 0.0, 1.0, args=PerExample(r), **TOL)  # noqa: E731
    ref, ref_info = jax.vmap(one)(y0, rates)
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=2e-4)  # values below atol are not error-controlled
    plain_cost = sum(int(jnp.max(ref_info["nfe"][i : i + 8])) for i in range(0, 64, 8)) * 8  # batches of 8
    refill_cost = int(info["evaluations"])
    mean_cost = int(jnp.sum(ref_info["nfe"]))
    assert refill_cost < 0.85 * plain_cost, (refill_cost, plain_cost)
    assert refill_cost < 1.35 * mean_cost, (refill_cost, mean_cost)


def test_ode_sampling_and_encoding_with_slots():
    x, info = jaxdiff.sample(KEY, GM.score_fn(SDE), SDE, (N, 2), method="ode", **TOL)
    xs, info_s = jaxdiff.sample(KEY, GM.score_fn(SDE), SDE, (N, 2), method="ode", slots=5, **TOL)
    np.testing.assert_allclose(xs, x, rtol=0, atol=1e-4)
    assert int(info_s["nonfinite"]) == 0 and int(info_s["batched_calls"]) > int(info["batched_calls"])
    z, _ = ode_sampler.encode(GM.score_fn(SDE), SDE, X, **TOL)
    zs, _ = ode_sampler.encode(GM.score_fn(SDE), SDE, X, slots=3, **TOL)
    np.testing.assert_allclose(zs, z, rtol=0, atol=1e-4)


def test_refill_sharded_over_eight_devices(plain):
    # Each device refills its own slots from its share of the data (3 examples each, 2 slots each).
    mesh = jax.make_mesh((8,), ("data",))
    xs = jax.device_put(X, NamedSharding(mesh, P("data")))
    logp, info = log_likelihood(KEY, GM.score_fn(SDE), SDE, xs, slots=2, **TOL)
    assert len(logp.sharding.device_set) == 8
    np.testing.assert_allclose(logp, plain[0], rtol=0, atol=1e-4)
    assert int(info["nonfinite"]) == 0


def test_slots_is_checked():
    with pytest.raises(ValueError, match="slots must be a positive integer of at most 16777216, got 0"):
        log_likelihood(KEY, GM.score_fn(SDE), SDE, X, slots=0)
    # Slots schedule per-example adaptive solves: with shared steps or a fixed-step method they would be ignored.
    with pytest.raises(ValueError, match="slots=4 applies to per-example steps; got per_example_steps=False"):
        log_likelihood(KEY, GM.score_fn(SDE), SDE, X, slots=4, per_example_steps=False)
    with pytest.raises(ValueError, match="slots=4 applies to adaptive per-example solves; got method='rk4'"):
        ode_sampler.ode_sample(KEY, GM.score_fn(SDE), SDE, (N, 2), method="rk4", steps=4, slots=4)


def test_default_slots_follow_the_memory_budget():
    f = lambda t, y, a: -y  # noqa: E731
    y = jnp.zeros((1000,))
    assert refill.default_slots(f, y, None, 10_000) == 4096  # capped
    assert refill.default_slots(f, y, None, 10) == 10  # at most the examples
    # 14 copies of 4 kB of state plus the field's intermediates: a 1 MB budget holds a few slots.
    assert 1 <= refill.default_slots(f, y, None, 10_000, budget_bytes=1 << 20) <= 20


def test_the_per_example_field_is_vmapped_as_one_batched_call():
    # solve_batch vmaps a field of one example over the examples or slots; that vmap is one call of the batched field
    # (the vmap of batch-of-one calls is correct but slower), with unbatched times and states broadcast.
    shapes = []

    def field(t, y, a):
        shapes.append(y.shape)  # at trace time
        return -unwrap(a[0])[:, None] * y * t[:, None] + a[1]

    one = ode_sampler._one_example_field(field)
    y, t, r = jnp.arange(12.0).reshape(4, 3), jnp.linspace(0.0, 1.0, 4), jnp.arange(4.0)
    expected = -r[:, None] * y * t[:, None] + 0.5
    out = jax.vmap(one, in_axes=(0, 0, (PerExample(0), None)))(t, y, (PerExample(r), jnp.float32(0.5)))
    assert shapes[-1] == (4, 3)  # after one trace of the single example (for its output shapes)
    np.testing.assert_allclose(out, expected, rtol=1e-6)
    out = jax.vmap(one, in_axes=(None, 0, (PerExample(0), None)))(t[1], y, (PerExample(r), jnp.float32(0.5)))
    np.testing.assert_allclose(out, -r[:, None] * y * t[1] + 0.5, rtol=1e-6)
    # A shared constant that varies along the mapped axis falls back to the vmap of every example.
    shift = jnp.arange(4.0)
    out = jax.vmap(one, in_axes=(0, 0, (PerExample(0), 0)))(t, y, (PerExample(r), shift))
    np.testing.assert_allclose(out, expected - 0.5 + shift[:, None], rtol=1e-6)
