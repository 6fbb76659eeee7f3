"""Likelihoods through the probability-flow ODE, checked against the Gaussian-mixture oracle's exact density."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from jax.tree_util import Partial

from jaxdiff import VESDE, VPSDE, GaussianMixture, PerExample, SubVPSDE
from jaxdiff.likelihood import bits_per_dim, log_likelihood, uniform_dequantize
from jaxdiff.per_example import unwrap

SDES = {"vp": VPSDE(), "subvp": SubVPSDE(), "ve": VESDE()}
EPS = 1e-5


def mixture(dim: int) -> GaussianMixture:
    if dim == 2:
        return GaussianMixture.grid(2, spacing=4.0, std=0.5)
    rng = np.random.default_rng(0)
    a = rng.normal(size=(3, dim, dim)) / np.sqrt(dim)
    covs = 0.3 * a @ np.swapaxes(a, -1, -2) + 0.1 * np.eye(dim)  # anisotropic, well conditioned
    return GaussianMixture([0.5, 0.3, 0.2], 0.7 * rng.normal(size=(3, dim)), covs)


CASES = [
    (2, "vp"),
    (2, "subvp"),
    (2, "ve"),
    (16, "vp"),
    pytest.param(16, "subvp", marks=pytest.mark.slow),
    pytest.param(16, "ve", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("dim,name", CASES)
def test_exact_trace_matches_the_oracle(dim, name):
    sde, gm = SDES[name], mixture(dim)
    x = gm.at_time(EPS, sde).sample(jax.random.key(0), 512)
    logp, info = log_likelihood(jax.random.key(1), gm.score_fn(sde), sde, x, trace="exact", eps=EPS)
    assert logp.shape == (512,)
    assert bool(np.all(info["success"])) and int(info["nonfinite"]) == 0
    # What the ODE computes exactly: it transports p_eps (not p_0) to p_T, so the target is the
    # eps-marginal's log-density; and it evaluates the prior where p_T belongs, so the target carries
    # the (known, method-inherent) gap log p_T(z) - log prior(z) at the computed latent z. That gap is
    # ~0.005 nats per point for VP and ~0.02 for VE (the prior N(0, sigma_max^2) ignores the data's
    # mean and spread): it would hide solver errors, so it is taken out; what remains is the solver's.
    z = info["z"]
    prior_gap = gm.marginal_log_prob(z, sde.T, sde) - sde.prior_logp(z)
    target = gm.marginal_log_prob(x, EPS, sde) - prior_gap
    err = np.abs(np.asarray(logp) - np.asarray(target))
    assert err.mean() < 1e-3, err.mean()  # 10x tighter than 0.01 nats
    assert err.max() < 1e-2, err.max()
    # And against the exact log p_0 itself, all approximations included, within 0.01 nats on average
    # for VP (the mean of the prior gap over the data is tiny; per point it is not).
    if name != "ve":
        np.testing.assert_allclose(np.mean(logp), np.mean(gm.log_prob(x)), rtol=0, atol=1e-2)


@pytest.mark.parametrize("noise", ["rademacher", "gaussian"])
def test_hutchinson_is_unbiased(noise):
    sde, gm = SDES["vp"], mixture(2)
    score_fn = gm.score_fn(sde)
    # 16 points, each repeated 32 times: every copy gets its own probe (example keys differ).
    points = gm.sample(jax.random.key(2), 16)
    x = jnp.repeat(points, 32, axis=0)
    exact, _ = log_likelihood(jax.random.key(3), score_fn, sde, points, trace="exact", eps=EPS)
    est, info = log_likelihood(jax.random.key(3), score_fn, sde, x, noise=noise, eps=EPS)
    est = np.asarray(est, np.float64).reshape(16, 32)
    diff = est - np.asarray(exact, np.float64)[:, None]
    # The estimates vary (the probe matters) ...
    assert diff.std() > 1e-3
    # ... but their mean is the exact value, within 4 standard errors (plus the solver's 1e-3).
    se = diff.std() / math.sqrt(diff.size)
    assert abs(diff.mean()) < 4 * se + 1e-3, (diff.mean(), se)
    assert int(info["nfe"]) > 0


@pytest.mark.slow
def test_more_probes_less_variance():
    sde, gm = SDES["vp"], mixture(2)
    x = jnp.repeat(gm.sample(jax.random.key(2), 1), 256, axis=0)
    one, _ = log_likelihood(jax.random.key(4), gm.score_fn(sde), sde, x, num_probes=1, eps=EPS)
    four, _ = log_likelihood(jax.random.key(4), gm.score_fn(sde), sde, x, num_probes=4, eps=EPS)
    ratio = float(np.var(four) / np.var(one))
    assert 0.15 < ratio < 0.4, ratio  # 1/4 in expectation


def gaussian_model(dim, std):
    return GaussianMixture([1.0], np.zeros((1, dim)), std**2 * np.eye(dim)[None])


def gaussian_logp(y, var):
    y = np.asarray(y, np.float64)
    return -0.5 * y.shape[-1] * np.log(2 * np.pi * var) - 0.5 * np.sum(y**2, -1) / var


def closed_form_bpd(sde, y, std, z):
    """-log2 p_eps(y) / D for y ~ N(0, std^2 I) under VP, plus the known prior gap at the latent z.

    p_t = N(0, (alpha^2 std^2 + sigma^2) I); the ODE evaluates N(0, I) at z where p_T belongs,
    which shifts log p by log N(z; 0, I) - log p_T(z) (up to 1.5e-4 bits here).
    """
    var = lambda t: float(sde.alpha(t)) ** 2 * std**2 + float(sde.sigma(t)) ** 2
    logp = gaussian_logp(y, var(EPS)) - gaussian_logp(z, var(sde.T)) + gaussian_logp(z, 1.0)
    return -logp / (y.shape[-1] * np.log(2))


@pytest.mark.parametrize("centered", [True, False])
def test_bits_per_dim_closed_form(centered):
    # Model: y ~ N(0, s^2 I) in the model's data space, under VP; p_eps = N(0, (a^2 s^2 + sigma^2) I).
    sde, dim, s = SDES["vp"], 8, 0.3
    gm = gaussian_model(dim, s)
    x01 = jax.random.uniform(jax.random.key(5), (64, dim))  # data in [0, 1]
    bpd, info = bits_per_dim(jax.random.key(6), gm.score_fn(sde), sde, x01, centered=centered, trace="exact")
    y = np.asarray(2 * x01 - 1 if centered else x01, np.float64)
    # 8 bits for the 256 bins of [0, 1], one less when [0, 1] is stretched to [-1, 1].
    expected = closed_form_bpd(sde, y, s, info["z"]) + (7.0 if centered else 8.0)
    np.testing.assert_allclose(bpd, expected, rtol=0, atol=1e-4)
    assert int(info["nfe"]) > 0


def test_bits_per_dim_dequantizes_8bit_data():
    sde, dim, s = SDES["vp"], 8, 0.3
    gm = gaussian_model(dim, s)
    key = jax.random.key(7)
    x = jax.random.randint(jax.random.key(8), (32, dim), 0, 256).astype(jnp.uint8)
    bpd, info = bits_per_dim(key, gm.score_fn(sde), sde, x, trace="exact")
    x01 = uniform_dequantize(key, x)
    assert bool(jnp.all((x01 >= x.astype(jnp.float32) / 256) & (x01 < (x.astype(jnp.float32) + 1) / 256)))
    expected = closed_form_bpd(sde, 2 * x01 - 1, s, info["z"]) + 7.0
    np.testing.assert_allclose(bpd, expected, rtol=0, atol=1e-4)
    with pytest.raises(ValueError, match="integer"):
        bits_per_dim(key, gm.score_fn(sde), sde, x01, dequantize=True)


def test_same_key_same_estimates_across_batches_and_devices():
    sde, gm = SDES["ve"], mixture(2)
    score_fn = gm.score_fn(sde)
    key = jax.random.key(9)
    x = gm.sample(jax.random.key(10), 16)
    logp16, info16 = log_likelihood(key, score_fn, sde, x, eps=EPS)
    again, _ = log_likelihood(key, score_fn, sde, x, eps=EPS)
    np.testing.assert_array_equal(again, logp16)
    # The first 8 of 16 are the batch of 8 (same probes). Programs compiled for different batch
    # sizes may round differently, which adaptive stepping amplifies at most to the solver tolerance.
    logp8, _ = log_likelihood(key, score_fn, sde, x[:8], eps=EPS)
    np.testing.assert_allclose(logp8, logp16[:8], rtol=0, atol=1e-3)
    # Eight devices, one 1-D mesh, the batch split two examples per device: same estimates.
    mesh = jax.make_mesh((8,), ("data",))
    x_sharded = jax.device_put(x, NamedSharding(mesh, P("data")))
    logp_sharded, info_sharded = log_likelihood(key, score_fn, sde, x_sharded, eps=EPS)
    assert len(logp_sharded.sharding.device_set) == 8
    np.testing.assert_allclose(logp_sharded, logp16, rtol=0, atol=1e-3)
    np.testing.assert_allclose(info_sharded["nfe_per_example"], info16["nfe_per_example"], rtol=0, atol=12)
    # A different key gives different probes and estimates.
    other, _ = log_likelihood(jax.random.key(11), score_fn, sde, x, eps=EPS)
    assert not np.allclose(other, logp16, rtol=0, atol=1e-3)


def test_argument_errors():
    sde, gm = SDES["vp"], mixture(2)
    x = jnp.zeros((2, 2))
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="trace"):
        log_likelihood(key, gm.score_fn(sde), sde, x, trace="hutch")
    with pytest.raises(ValueError, match="noise"):
        log_likelihood(key, gm.score_fn(sde), sde, x, noise="normal")
    with pytest.raises(ValueError, match="num_probes"):
        log_likelihood(key, gm.score_fn(sde), sde, x, num_probes=0)
    with pytest.raises(ValueError, match="eps"):
        log_likelihood(key, gm.score_fn(sde), sde, x, eps=1.5)


def _class_gaussian_score(means, sigma0, sde, x, t):
    """Exact score of N(alpha m_y, (alpha^2 s0^2 + sigma^2) I), one mean per example (a class-conditional oracle)."""
    means = unwrap(means)
    alpha, sigma = sde.alpha(t)[:, None], sde.sigma(t)[:, None]
    return -(x - alpha * means) / (alpha**2 * sigma0**2 + sigma**2)


def test_per_example_labels_inside_the_score_follow_the_batch():
    # A class-conditional score carries one label (here: a class mean) per example. Per-example solves must hand
    # each example its own label: exact answers, the same for any batch size and on eight devices.
    sde, sigma0 = VPSDE(), 0.5
    classes = jnp.array([[-2.0, 0.0], [2.0, 1.0], [0.0, -3.0]])
    labels = jnp.arange(16) % 3
    means = classes[labels]
    x = means + sigma0 * jax.random.normal(jax.random.key(0), (16, 2))
    score_fn = Partial(_class_gaussian_score, PerExample(means), sigma0, sde)
    var = sde.alpha(EPS) ** 2 * sigma0**2 + sde.sigma(EPS) ** 2
    exact = jnp.sum(jax.scipy.stats.norm.logpdf(x, sde.alpha(EPS) * means, jnp.sqrt(var)), axis=-1)
    key = jax.random.key(1)
    logp, info = log_likelihood(key, score_fn, sde, x, trace="exact", eps=EPS)
    assert np.all(np.asarray(info["success"]))
    # The prior N(0, I) stands in for p_T = N(alpha_T m_y, ...); that gap at the latent is the same for any solver.
    var_T = sde.alpha(sde.T) ** 2 * sigma0**2 + sde.sigma(sde.T) ** 2
    p_T = jnp.sum(jax.scipy.stats.norm.logpdf(info["z"], sde.alpha(sde.T) * means, jnp.sqrt(var_T)), axis=-1)
    np.testing.assert_allclose(logp, exact - (p_T - info["prior_logp"]), atol=2e-3)
    shared, _ = log_likelihood(key, score_fn, sde, x, trace="exact", eps=EPS, per_example_steps=False)
    np.testing.assert_allclose(shared, logp, atol=1e-3)
    first5 = Partial(_class_gaussian_score, PerExample(means[:5]), sigma0, sde)
    logp5, _ = log_likelihood(key, first5, sde, x[:5], trace="exact", eps=EPS)
    np.testing.assert_allclose(logp5, logp[:5], rtol=0, atol=1e-4)
    mesh = jax.make_mesh((8,), ("data",))
    put = lambda a: jax.device_put(a, NamedSharding(mesh, P("data")))  # noqa: E731
    sharded = Partial(_class_gaussian_score, PerExample(put(means)), sigma0, sde)
    logp_sharded, _ = log_likelihood(key, sharded, sde, put(x), trace="exact", eps=EPS)
    assert len(logp_sharded.sharding.device_set) == 8
    np.testing.assert_allclose(logp_sharded, logp, rtol=0, atol=1e-4)


def test_per_example_likelihood_of_a_class_conditional_network():
    # make_score_fn marks its labels per-example, so the default per-example steps work for a conditional model
    # and give each example the likelihood of its own label.
    from jaxdiff.models import MLP
    from jaxdiff.parameterization import make_score_fn

    sde = VPSDE()
    model = MLP(hidden_sizes=(16, 16), embedding_size=8, num_classes=3)
    y = jnp.arange(6) % 3
    params = model.init(jax.random.key(0), jnp.zeros((6, 2)), jnp.zeros((6,)), y)["params"]
    x = jax.random.normal(jax.random.key(1), (6, 2))
    key = jax.random.key(2)
    # This small random network's flow is stiff; a tight tolerance keeps batch-dependent rounding (amplified by
    # the adaptive steps) well below the check.
    tol = dict(trace="exact", rtol=1e-6, atol=1e-6)
    logp, _ = log_likelihood(key, make_score_fn(model, params, sde, y=y), sde, x, **tol)
    for i in (0, 4):
        one, _ = log_likelihood(key, make_score_fn(model, params, sde, y=y[i : i + 1]), sde, x[i : i + 1], **tol)
        np.testing.assert_allclose(one[0], logp[i], rtol=0, atol=1e-4)
    swapped, _ = log_likelihood(key, make_score_fn(model, params, sde, y=(y + 1) % 3), sde, x, **tol)
    assert not np.allclose(swapped, logp, atol=1e-3)
