"""The probability-flow ODE sampler and encoder, checked on the Gaussian-mixture oracle's exact score."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.tree_util import Partial

from jaxdiff import VESDE, VPSDE, GaussianMixture, PerExample, SubVPSDE
from jaxdiff.per_example import unwrap
from jaxdiff.samplers.ode import decode, encode, ode_sample

MIXTURE = GaussianMixture.grid(2, spacing=4.0, std=0.5)  # weights 0.1, 0.2, 0.3, 0.4
SDES = {"vp": VPSDE(), "subvp": SubVPSDE(), "ve": VESDE()}
EPS = 1e-3


@pytest.mark.parametrize("name", list(SDES))
def test_samples_follow_the_mixture(name):
    sde = SDES[name]
    n = 10_000
    x, info = ode_sample(jax.random.key(0), MIXTURE.score_fn(sde), sde, (n, 2), eps=EPS)
    x = np.asarray(x, np.float64)
    assert x.shape == (n, 2)
    assert bool(np.all(info["success"]))
    assert int(info["nonfinite"]) == 0
    # 10,000 examples are more than the default slots: refilled slots, whose batched calls are the cost.
    assert int(info["nfe"]) == int(info["batched_calls"]) >= int(np.max(info["nfe_per_example"]))
    assert int(info["evaluations"]) >= int(np.sum(info["nfe_per_example"]))

    # Per-component mass: the binomial standard error is at most 0.005, so 2 points is 4 s.e.
    labels = np.asarray(MIXTURE.responsibilities(jnp.asarray(x)).argmax(-1))
    mass = np.bincount(labels, minlength=4) / n
    np.testing.assert_allclose(mass, MIXTURE.weights, rtol=0, atol=0.02)

    # The ODE stops at eps, so the samples follow p_eps (components widened by sigma(eps)).
    target = MIXTURE.at_time(EPS, sde)
    mean, cov = np.asarray(target.mean()), np.asarray(target.covariance())
    centred = x - x.mean(0)
    se_mean = x.std(0) / np.sqrt(n)
    np.testing.assert_allclose(x.mean(0), mean, rtol=0, atol=5 * se_mean.max())
    products = centred[:, :, None] * centred[:, None, :]
    se_cov = products.reshape(n, -1).std(0).reshape(2, 2) / np.sqrt(n)
    assert np.all(np.abs(products.mean(0) - cov) < 5 * se_cov), (products.mean(0), cov, se_cov)


@pytest.mark.parametrize("name", ["vp", pytest.param("ve", marks=pytest.mark.slow)])
def test_encode_decode_round_trip(name):
    sde = SDES[name]
    score_fn = MIXTURE.score_fn(sde)
    x0 = MIXTURE.sample(jax.random.key(1), 64)
    tol = 1e-6
    z, info_enc = encode(score_fn, sde, x0, rtol=tol, atol=tol, eps=EPS)
    x1, info_dec = decode(score_fn, sde, z, rtol=tol, atol=tol, eps=EPS)
    assert bool(np.all(info_enc["success"])) and bool(np.all(info_dec["success"]))
    # The latent is on the prior's scale, far from the data.
    assert float(jnp.std(z)) > 0.5 * sde.prior_std
    np.testing.assert_allclose(x1, x0, rtol=0, atol=5e-5)


@pytest.mark.slow
def test_encoded_data_follow_the_prior():
    sde = SDES["vp"]
    n = 2000
    x = MIXTURE.at_time(EPS, sde).sample(jax.random.key(2), n)
    z, _ = encode(MIXTURE.score_fn(sde), sde, x, rtol=1e-4, atol=1e-4, eps=EPS)
    z = np.asarray(z, np.float64)
    # p_T differs from N(0, I) by a mean shift alpha(T) |m| < 0.02: within Monte-Carlo error here.
    np.testing.assert_allclose(z.mean(0), 0.0, rtol=0, atol=5 / np.sqrt(n))
    np.testing.assert_allclose(np.cov(z.T), np.eye(2), rtol=0, atol=5 * np.sqrt(2 / n))


def test_same_key_same_samples_whatever_the_batch():
    sde = SDES["vp"]
    score_fn = MIXTURE.score_fn(sde)
    key = jax.random.key(3)
    x8, info8 = ode_sample(key, score_fn, sde, (8, 2))
    x8_again, _ = ode_sample(key, score_fn, sde, (8, 2))
    x16, info16 = ode_sample(key, score_fn, sde, (16, 2))
    np.testing.assert_array_equal(x8, x8_again)
    # Per-example step sizes: the first 8 of 16 are the batch of 8. XLA's code for the two batch
    # sizes may round differently, and step-size control can amplify that to the solver tolerance
    # (1e-5), but no further.
    np.testing.assert_allclose(x16[:8], x8, rtol=0, atol=1e-4)
    np.testing.assert_allclose(info16["nfe_per_example"][:8], info8["nfe_per_example"], atol=12)
    x_other, _ = ode_sample(jax.random.key(4), score_fn, sde, (8, 2))
    assert not np.allclose(x_other, x8, rtol=0, atol=1e-3)


def test_shared_step_size_agrees_within_tolerance():
    sde = SDES["vp"]
    score_fn = MIXTURE.score_fn(sde)
    key = jax.random.key(3)
    x_each, _ = ode_sample(key, score_fn, sde, (8, 2))
    x_shared, info_shared = ode_sample(key, score_fn, sde, (8, 2), per_example_steps=False)
    np.testing.assert_allclose(x_shared, x_each, rtol=0, atol=1e-4)
    assert len(set(np.asarray(info_shared["nfe_per_example"]).tolist())) == 1


def test_fixed_step_method_approaches_the_adaptive_solution():
    sde = SDES["vp"]
    score_fn = MIXTURE.score_fn(sde)
    key = jax.random.key(3)
    x_ref, _ = ode_sample(key, score_fn, sde, (8, 2))
    x, info = ode_sample(key, score_fn, sde, (8, 2), method="rk4", steps=200)
    assert int(info["nfe"]) == 4 * 200
    np.testing.assert_allclose(x, x_ref, rtol=0, atol=1e-3)


def test_denoise_costs_one_evaluation():
    sde = SDES["vp"]
    score_fn = MIXTURE.score_fn(sde)
    key = jax.random.key(7)
    x, info = ode_sample(key, score_fn, sde, (8, 2))
    xd, info_d = ode_sample(key, score_fn, sde, (8, 2), denoise=True)
    assert int(info_d["nfe"]) == int(info["nfe"]) + 1
    # Tweedie's step at eps = 1e-3 moves points by about sigma(eps)^2 |score| ~ 1e-4 |x - m| / 0.25.
    np.testing.assert_allclose(xd, x, rtol=0, atol=1e-2)
    assert not np.array_equal(xd, x)


def test_max_steps_failure_is_reported():
    sde = SDES["vp"]
    _, info = ode_sample(jax.random.key(8), MIXTURE.score_fn(sde), sde, (4, 2), max_steps=3)
    assert not bool(np.any(info["success"]))
    np.testing.assert_array_equal(info["steps"], 3)


def test_argument_errors():
    sde = SDES["vp"]
    score_fn = MIXTURE.score_fn(sde)
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="fixed-step"):
        ode_sample(key, score_fn, sde, (4, 2), steps=10)
    with pytest.raises(ValueError, match="steps"):
        ode_sample(key, score_fn, sde, (4, 2), method="rk4")
    with pytest.raises(ValueError, match="unknown ODE method"):
        ode_sample(key, score_fn, sde, (4, 2), method="rk45")
    with pytest.raises(ValueError, match="eps"):
        ode_sample(key, score_fn, sde, (4, 2), eps=2.0)
    with pytest.raises(ValueError, match="shape"):
        ode_sample(key, score_fn, sde, (4,))


def _class_gaussian_score(means, sigma0, sde, x, t):
    """Exact score of the class-conditional marginal N(alpha m_y, (alpha^2 s0^2 + sigma^2) I), m_y per example."""
    alpha, sigma = sde.alpha(t)[:, None], sde.sigma(t)[:, None]
    return -(x - alpha * unwrap(means)) / (alpha**2 * sigma0**2 + sigma**2)


def test_per_example_labels_inside_the_score_follow_the_batch():
    # Each example takes its own steps (vmap over examples) and must see its own label, here a class mean.
    sde, sigma0 = VPSDE(), 0.3
    classes = jnp.array([[-2.0, 0.0], [2.0, 1.0]])
    y = jnp.arange(2000) % 2
    score_for = lambda labels: Partial(_class_gaussian_score, PerExample(classes[labels]), sigma0, sde)  # noqa: E731
    x, info = ode_sample(jax.random.key(0), score_for(y), sde, (2000, 2), eps=EPS, rtol=1e-4, atol=1e-4)
    assert bool(np.all(info["success"]))
    for c in range(2):
        xc = np.asarray(x)[np.asarray(y) == c]
        np.testing.assert_allclose(xc.mean(0), classes[c], atol=0.05)  # 3 standard errors: 0.02
        np.testing.assert_allclose(xc.std(0), sigma0, atol=0.03)
    x5, _ = ode_sample(jax.random.key(0), score_for(y[:5]), sde, (5, 2), eps=EPS, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(x5, x[:5], rtol=0, atol=1e-4)
