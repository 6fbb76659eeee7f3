"""Reverse-SDE samplers run on the oracle's exact score must reproduce the mixture."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdiff
from jaxdiff.samplers import pc
from jaxdiff.sde import VESDE, VPSDE, SubVPSDE
from tests.helpers import assert_matches_mixture, component_masses, four_component_mixture

SDES = {"vp": VPSDE(), "subvp": SubVPSDE(), "ve": VESDE()}
N_SAMPLES = 10_000

# method, options, expected NFE as a function of steps
CASES = {
    "euler_maruyama": (dict(steps=500), 501),
    "reverse_diffusion": (dict(steps=500), 501),
    "ancestral": (dict(steps=500), 501),
    "pc": (dict(steps=500, predictor="reverse_diffusion", corrector="langevin", snr=0.16), 1001),
    "pc_em_langevin": (dict(steps=500, predictor="euler_maruyama", corrector="langevin"), 1001),
}


@pytest.mark.parametrize("sde_name", list(SDES))
@pytest.mark.parametrize("case", list(CASES))
def test_sampler_reproduces_mixture(sde_name, case):
    sde = SDES[sde_name]
    gm = four_component_mixture()
    options, nfe = CASES[case]
    method = "pc" if case.startswith("pc") else case
    x, info = jaxdiff.sample(jax.random.key(0), gm.score_fn(sde), sde, (N_SAMPLES, 2), method=method, **options)
    assert x.shape == (N_SAMPLES, 2) and x.dtype == jnp.float32
    assert int(info["nfe"]) == nfe
    assert int(info["nonfinite"]) == 0
    assert_matches_mixture(gm, x)


@pytest.mark.parametrize("sde_name", list(SDES))
def test_annealed_langevin(sde_name):
    # Annealed Langevin dynamics has no predictor: the chain must track p_t by MCMC alone, and at small
    # noise levels its step (proportional to sigma(t)^2) is too short to relax. It puts the right mass on
    # every component, but its covariance keeps a bias of a few per cent at any affordable number of steps
    # (too small for VP and sub-VP, whose targets expand as t falls; too large for VE, whose targets shrink).
    # That bias is the method's, not the implementation's; the tolerance below allows it and no more.
    sde = SDES[sde_name]
    gm = four_component_mixture()
    x, info = jaxdiff.sample(
        jax.random.key(0),
        gm.score_fn(sde),
        sde,
        (N_SAMPLES, 2),
        method="annealed_langevin",
        steps=1000,
        corrector_steps=2,
    )
    assert int(info["nfe"]) == 2001
    np.testing.assert_allclose(component_masses(gm, x), gm.weights, atol=0.02)
    if sde_name == "subvp":
        # Sub-VP's sigma(t) ~ B(t) is so small near t = 0 that the chain freezes while alpha(t) < 1: the
        # samples stay shrunk towards the origin by ~15 per cent. Only the masses are right.
        return
    np.testing.assert_allclose(x.mean(0), gm.mean(), atol=0.12)
    np.testing.assert_allclose(jnp.cov(x.T), gm.covariance(), rtol=0.08, atol=0.1)


def test_a_wrong_score_is_caught():
    # The acceptance check must fail for a sampler fed a subtly wrong score (score scaled by 0.8).
    sde = VPSDE()
    gm = four_component_mixture()
    exact = gm.score_fn(sde)
    x, _ = jaxdiff.sample(
        jax.random.key(0), lambda x, t: 0.8 * exact(x, t), sde, (N_SAMPLES, 2), method="ancestral", steps=200
    )
    with pytest.raises(AssertionError):
        assert_matches_mixture(gm, x)


@pytest.mark.parametrize("method", ["euler_maruyama", "reverse_diffusion", "ancestral", "annealed_langevin"])
def test_samples_do_not_depend_on_batch_size(method):
    sde = VESDE()
    score_fn = four_component_mixture().score_fn(sde)
    key = jax.random.key(7)
    a, _ = jaxdiff.sample(key, score_fn, sde, (8, 2), method=method, steps=20)
    b, _ = jaxdiff.sample(key, score_fn, sde, (16, 2), method=method, steps=20)
    c, _ = jaxdiff.sample(key, score_fn, sde, (8, 2), method=method, steps=20)
    np.testing.assert_array_equal(a, c)
    np.testing.assert_allclose(a, b[:8], rtol=1e-6, atol=1e-6)
    d, _ = jaxdiff.sample(jax.random.key(8), score_fn, sde, (8, 2), method=method, steps=20)
    assert not np.allclose(a, d)


def test_works_on_images_and_counts_nfe():
    sde = VPSDE()
    score_fn = lambda x, t: -x  # exact score of N(0, I) under VP  # noqa: E731
    x, info = jaxdiff.sample(jax.random.key(0), score_fn, sde, (4, 8, 8, 3), method="pc", steps=7, corrector_steps=2)
    assert x.shape == (4, 8, 8, 3)
    assert int(info["nfe"]) == 7 * 3 + 1
    x, info = jaxdiff.sample(jax.random.key(0), score_fn, sde, (4, 8, 8, 3), method="pc", steps=7, denoise=False)
    assert int(info["nfe"]) == 14


def test_nonfinite_outputs_are_reported():
    sde = VPSDE()
    bad = lambda x, t: jnp.where(x[:, :1] > 0, jnp.nan, -x)  # noqa: E731
    x, info = jaxdiff.sample(jax.random.key(0), bad, sde, (64, 2), method="ancestral", steps=5)
    assert 0 < int(info["nonfinite"]) <= 64


def test_jitted_once_across_calls_with_new_parameters():
    sde = VPSDE()
    before = pc._pc._cache_size()
    for spacing in (3.0, 4.0, 5.0):
        gm = jaxdiff.GaussianMixture.grid(2, spacing, 0.5)
        jaxdiff.sample(jax.random.key(0), gm.score_fn(sde), sde, (8, 2), method="pc", steps=3)
    assert pc._pc._cache_size() == before + 1


def test_ancestral_equals_ddpm_on_the_training_grid():
    # With steps == N and uniform grid, one ancestral step of the VP SDE is DDPM's update with the
    # posterior variance: x_{i-1} = (x_i + beta_i s) / sqrt(1 - beta_i) + sqrt(beta~_i) z.
    sde = VPSDE()
    x = jax.random.normal(jax.random.key(0), (5, 2))
    z = jax.random.normal(jax.random.key(1), (5, 2))
    t, s = jnp.float32(0.6), jnp.float32(0.599)
    score_fn = lambda x, t: -x  # noqa: E731
    out, mean = pc.ancestral_predictor(sde, score_fn, x, t, s, z)
    beta = 1 - (sde.alpha(t) / sde.alpha(s)) ** 2
    np.testing.assert_allclose(mean, (x - beta * x) / jnp.sqrt(1 - beta), rtol=1e-5)
    var = beta * sde.sigma(s) ** 2 / sde.sigma(t) ** 2
    np.testing.assert_allclose(out - mean, jnp.sqrt(var) * z, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(method="nope"), "unknown sampling method 'nope'; valid: euler_maruyama"),
        (dict(method="pc", predictor="heun"), "unknown predictor 'heun'; valid: 'euler_maruyama'"),
        (dict(method="pc", corrector="hmc"), "unknown corrector 'hmc'; valid: 'langevin'"),
        (dict(method="pc", predictor=None, corrector=None), "cannot both be None"),
        (dict(method="ancestral", snr=0.1), "unknown option\\(s\\) 'snr' for method 'ancestral'; valid: eps"),
        (dict(method="pc", steps=0), "steps must be a positive integer"),
        (dict(method="pc", eps=2.0), "eps must satisfy"),
        (dict(method="pc", snr=-1.0), "snr must be positive"),
        (dict(method="pc", shape=(3,)), "shape must be"),
    ],
)
def test_bad_arguments_raise_clear_errors(kwargs, message):
    sde = VPSDE()
    shape = kwargs.pop("shape", (4, 2))
    with pytest.raises(ValueError, match=message):
        jaxdiff.sample(jax.random.key(0), four_component_mixture().score_fn(sde), sde, shape, **kwargs)


def test_sde_type_is_checked():
    with pytest.raises(TypeError, match="sde must be a jaxdiff.sde.SDE"):
        jaxdiff.sample(jax.random.key(0), lambda x, t: x, "vp", (4, 2))


@pytest.mark.parametrize("method", ["pc", "ancestral", "ddim", "dpm_solver++", "heun", "ode"])
def test_sharded_batch_gives_the_same_samples(method):
    # The batch split over 8 devices (tests/conftest.py provides 8 virtual CPU devices) gives the samples a
    # single device gives: every example draws from its own fold_in(key, i).
    from jax.sharding import NamedSharding, PartitionSpec

    from jaxdiff.parallel import make_mesh

    if method not in jaxdiff.samplers.available_methods():
        pytest.skip(f"{method} not available")
    sde = VPSDE()
    score_fn = four_component_mixture().score_fn(sde)
    opts = dict(rtol=1e-4, atol=1e-4) if method == "ode" else dict(steps=8)
    mesh = make_mesh()
    sharding = NamedSharding(mesh, PartitionSpec("data"))
    run = lambda k: jaxdiff.sample(k, score_fn, sde, (32, 2), method=method, **opts)[0]  # noqa: E731
    single = run(jax.random.key(3))
    sharded = jax.jit(run, out_shardings=sharding)(jax.random.key(3))
    assert sharded.sharding.num_devices == 8
    # Fixed-step samplers agree to float rounding; the adaptive ODE solver turns rounding differences between
    # the two compiled programs into differences of the order of its tolerance (1e-4 here).
    tol = 5e-3 if method == "ode" else 1e-5
    np.testing.assert_allclose(sharded, single, rtol=tol, atol=tol)
