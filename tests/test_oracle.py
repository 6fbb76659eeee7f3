"""The Gaussian-mixture oracle: closed-form score vs autodiff, densities vs scipy, sampling."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from jaxdiff.oracle import GaussianMixture
from jaxdiff.sde import VESDE, VPSDE, CosineVPSDE, SubVPSDE

SDES = [VPSDE(), SubVPSDE(), VESDE(), CosineVPSDE()]
IDS = ["vp", "subvp", "ve", "cosine"]


def full_cov_mixture(d=5, k=3, seed=0):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(k, d, d)) * 0.5
    covs = a @ np.swapaxes(a, -1, -2) + 0.1 * np.eye(d)
    return GaussianMixture(rng.uniform(0.5, 2.0, k), rng.normal(size=(k, d)) * 3, covs)


@pytest.mark.parametrize("sde", SDES, ids=IDS)
@pytest.mark.parametrize("dim", [2, 5])
def test_score_equals_gradient_of_marginal_log_prob(sde, dim):
    gm = full_cov_mixture(d=dim)
    x = jax.random.normal(jax.random.key(0), (16, dim)) * 3
    t = jnp.linspace(0.01, 0.95 * sde.T, 16)
    auto = jax.grad(lambda x: gm.marginal_log_prob(x, t, sde).sum())(x)
    np.testing.assert_allclose(gm.score(x, t, sde), auto, rtol=1e-4, atol=1e-4)


def test_log_prob_matches_scipy():
    gm = full_cov_mixture(d=4)
    x = np.asarray(jax.random.normal(jax.random.key(1), (10, 4)) * 3)
    dens = sum(
        w * scipy.stats.multivariate_normal(m, c).pdf(x)
        for w, m, c in zip(np.asarray(gm.weights), np.asarray(gm.means), np.asarray(gm.covs), strict=True)
    )
    np.testing.assert_allclose(gm.log_prob(jnp.asarray(x)), np.log(dens), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("sde", SDES, ids=IDS)
def test_marginal_is_the_law_of_the_perturbed_data(sde):
    # x_t = alpha x_0 + sigma eps has the density marginal_log_prob: compare the moments of p_t computed
    # by at_time() with those of perturbed exact samples.
    gm = full_cov_mixture(d=2)
    t = 0.3 * sde.T
    x0 = gm.sample(jax.random.key(2), 200_000)
    xt = sde.alpha(t) * x0 + sde.sigma(t) * jax.random.normal(jax.random.key(3), x0.shape)
    pt = gm.at_time(t, sde)
    np.testing.assert_allclose(xt.mean(0), pt.mean(), atol=0.03)
    np.testing.assert_allclose(jnp.cov(xt.T), pt.covariance(), rtol=0.03, atol=0.03)
    # and at_time's log-density is marginal_log_prob
    y = xt[:32]
    np.testing.assert_allclose(pt.log_prob(y), gm.marginal_log_prob(y, jnp.full((32,), t), sde), rtol=1e-4)


def test_sampling_moments_and_labels():
    gm = GaussianMixture.grid(2, spacing=4.0, std=0.5)
    x, labels = gm.sample(jax.random.key(0), 100_000, return_labels=True)
    np.testing.assert_allclose(np.bincount(np.asarray(labels)) / 1e5, gm.weights, atol=0.005)
    np.testing.assert_allclose(x.mean(0), gm.mean(), atol=0.03)
    np.testing.assert_allclose(jnp.cov(x.T), gm.covariance(), rtol=0.02, atol=0.02)
    assert np.mean(np.asarray(gm.responsibilities(x).argmax(-1)) == np.asarray(labels)) > 0.999


def test_event_shaped_inputs_are_flattened():
    gm = full_cov_mixture(d=4)
    x = jax.random.normal(jax.random.key(0), (3, 2, 2))
    s = gm.score(x, jnp.full((3,), 0.5), VPSDE())
    assert s.shape == x.shape
    np.testing.assert_allclose(s.reshape(3, 4), gm.score(x.reshape(3, 4), jnp.full((3,), 0.5), VPSDE()), rtol=1e-6)
    with pytest.raises(ValueError, match="3 dimensions per example, the mixture has 4"):
        gm.log_prob(jnp.ones((2, 3)))


def test_score_fn_is_a_pytree_and_does_not_recompile():
    sde = VPSDE()
    traces = []

    @jax.jit
    def apply(score_fn, x):
        traces.append(1)
        return score_fn(x, jnp.full((x.shape[0],), 0.5))

    x = jnp.ones((4, 2))
    a = apply(GaussianMixture.grid(2, 4.0, 0.5).score_fn(sde), x)
    b = apply(GaussianMixture.grid(2, 3.0, 0.7).score_fn(sde), x)
    assert len(traces) == 1
    assert not np.allclose(a, b)


@pytest.mark.parametrize(
    "args, message",
    [
        (([1.0], [[0.0, 0.0]], [[[1.0, 0.0], [0.0, -1.0]]]), "positive definite"),
        (([1.0, 1.0], [[0.0, 0.0]], [[[1.0, 0.0], [0.0, 1.0]]]), "inconsistent mixture shapes"),
        (([-1.0], [[0.0, 0.0]], [[[1.0, 0.0], [0.0, 1.0]]]), "non-negative"),
        (([1.0], [[0.0, 0.0]], [[[1.0, 0.5], [0.0, 1.0]]]), "symmetric"),
        (([1.0], [0.0, 0.0], [[1.0, 0.0], [0.0, 1.0]]), "expected weights"),
    ],
)
def test_invalid_mixtures(args, message):
    with pytest.raises(ValueError, match=message):
        GaussianMixture(*args)


def test_sliced_ks_noise_floor_and_sensitivity():
    gm = GaussianMixture.grid(2, spacing=4.0, std=0.5)
    n = 10_000
    exact = [gm.sliced_ks(gm.sample(jax.random.key(s), n)) for s in range(3)]
    # Known noise floor: E[KS] ~ 0.87 / sqrt(n) for exact samples.
    assert 0.4 / np.sqrt(n) < np.mean(exact) < 1.3 / np.sqrt(n)
    shrunk = gm.sample(jax.random.key(0), n) * 0.95
    assert gm.sliced_ks(shrunk) > 2 * max(exact)
    assert np.isnan(gm.sliced_ks(np.full((4, 2), np.nan)))
