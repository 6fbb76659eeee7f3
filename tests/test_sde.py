"""SDEs against exact answers: Monte-Carlo marginals, autodiff identities, scipy densities."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from jaxdiff.sde import VESDE, VPSDE, CosineVPSDE, RectifiedFlow, SubVPSDE

SDES = [VPSDE(), SubVPSDE(), VESDE(), CosineVPSDE()]
IDS = ["vp", "subvp", "ve", "cosine"]
# With the linear path of flow matching, whose f and g blow up at t = 1 (Euler--Maruyama on its forward SDE is not
# the test of its kernel: the first test keeps to the four diffusions; tests/test_flow.py has the path's own).
WITH_FLOW, WITH_FLOW_IDS = SDES + [RectifiedFlow()], IDS + ["rf"]


@pytest.mark.parametrize("sde", SDES, ids=IDS)
def test_marginal_prob_matches_simulated_forward_process(sde):
    # Simulate x_{i+1} = x_i + f + G z with the SDE's own discretisation, from a fixed x_0, and compare
    # the empirical mean and std at three times with marginal_prob.
    n_paths, x0 = 20_000, 1.5
    x = jnp.full((n_paths, 1), x0)
    ts = jnp.linspace(0.0, sde.T, sde.N + 1)[:-1]

    def step(x, inp):
        t, key = inp
        f, g = sde.discretize(x, jnp.full((n_paths,), t))
        return x + f + g[:, None] * jax.random.normal(key, x.shape), x

    keys = jax.random.split(jax.random.key(0), sde.N)
    x_final, path = jax.lax.scan(step, x, (ts, keys))
    path = jnp.concatenate([path, x_final[None]], 0)
    for i in (sde.N // 4, sde.N // 2, sde.N):
        t = jnp.full((1,), i * sde.T / sde.N)
        mean, std = sde.marginal_prob(jnp.full((1, 1), x0), t)
        emp = np.asarray(path[i, :, 0])
        se = float(std[0]) / np.sqrt(n_paths)
        # Monte-Carlo error plus the O(1/N) discretisation error of the grid.
        np.testing.assert_allclose(emp.mean(), float(mean[0, 0]), atol=5 * se + 0.01)
        np.testing.assert_allclose(emp.std(), float(std[0]), rtol=0.03, atol=0.005)


@pytest.mark.parametrize("sde", WITH_FLOW, ids=WITH_FLOW_IDS)
def test_kernel_solves_the_moment_odes(sde):
    # For dx = f(t) x dt + g(t) dW: d log alpha / dt = f(t) and d sigma^2 / dt = 2 f(t) sigma^2 + g(t)^2.
    t = jnp.array([0.05, 0.2, 0.5, 0.8])
    f = jax.vmap(lambda s: sde.sde(jnp.ones((1, 1)), s[None])[0][0, 0])(t)
    g = sde.sde(jnp.ones((4, 1)), t)[1]
    dlog_alpha = jax.vmap(jax.grad(lambda s: jnp.log(sde.alpha(s))))(t)
    dvar = jax.vmap(jax.grad(lambda s: sde.sigma(s) ** 2))(t)
    np.testing.assert_allclose(dlog_alpha, f, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(dvar, 2 * f * sde.sigma(t) ** 2 + g**2, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("sde", WITH_FLOW, ids=WITH_FLOW_IDS)
def test_log_snr_inverse(sde):
    t = jnp.linspace(0.01, sde.T * 0.99, 17)
    lam = sde.log_snr(t)
    np.testing.assert_allclose(lam, jnp.log(sde.alpha(t) ** 2 / sde.sigma(t) ** 2), rtol=1e-4, atol=1e-4)
    assert np.all(np.diff(np.asarray(lam)) < 0), "log-SNR must decrease in t"
    np.testing.assert_allclose(sde.t_from_log_snr(lam), t, rtol=1e-4, atol=2e-5)


def test_kernel_identities():
    t = jnp.linspace(0.0, 1.0, 11)
    vp, sub = VPSDE(), SubVPSDE()
    np.testing.assert_allclose(vp.alpha(t) ** 2 + vp.sigma(t) ** 2, 1.0, rtol=0, atol=1e-6)
    np.testing.assert_allclose(sub.sigma(t), 1.0 - sub.alpha(t) ** 2, rtol=0, atol=1e-6)
    assert np.all(np.asarray(sub.sigma(t)) <= np.asarray(vp.sigma(t)) + 1e-7)
    ve = VESDE(sigma_min=0.01, sigma_max=50.0)
    np.testing.assert_allclose(ve.sigma(jnp.array([0.0, 1.0])), [0.01, 50.0], rtol=1e-5)


@pytest.mark.parametrize("sde", WITH_FLOW, ids=WITH_FLOW_IDS)
def test_prior_logp_matches_scipy(sde):
    z = jax.random.normal(jax.random.key(1), (5, 3, 2)) * 2.0
    expected = scipy.stats.norm.logpdf(np.asarray(z), scale=sde.prior_std).reshape(5, -1).sum(-1)
    np.testing.assert_allclose(sde.prior_logp(z), expected, rtol=1e-5, atol=1e-4)
    samples = sde.prior_sampling(jax.random.key(2), (20_000, 1))
    np.testing.assert_allclose(np.std(samples), sde.prior_std, rtol=0.03)


@pytest.mark.parametrize("sde", WITH_FLOW, ids=WITH_FLOW_IDS)
def test_transition_composes_with_marginal(sde):
    # sigma(t)^2 = a^2 sigma(s)^2 + v and alpha(t) = a alpha(s).
    t, s = jnp.array([0.7, 0.3]), jnp.array([0.2, 0.1])
    a, v = sde.transition(t, s)
    np.testing.assert_allclose(a * sde.alpha(s), sde.alpha(t), rtol=1e-5)
    np.testing.assert_allclose(a**2 * sde.sigma(s) ** 2 + v, sde.sigma(t) ** 2, rtol=1e-5)


def test_discretisations_match_reference_definitions():
    vp = VPSDE(N=100)
    x = jnp.ones((2, 3))
    f, g = vp.discretize(x, jnp.array([0.0, 1.0]))
    betas = np.linspace(0.1 / 100, 20 / 100, 100)
    np.testing.assert_allclose(g, np.sqrt(betas[[0, 99]]), rtol=1e-6)
    np.testing.assert_allclose(f[:, 0], np.sqrt(1 - betas[[0, 99]]) - 1, rtol=1e-4, atol=1e-7)
    ve = VESDE(N=10)
    _, g = ve.discretize(x, jnp.array([0.0, 1.0]))
    sig = np.exp(np.linspace(np.log(0.01), np.log(50.0), 10))
    np.testing.assert_allclose(g, [sig[0], np.sqrt(sig[9] ** 2 - sig[8] ** 2)], rtol=1e-5)


@pytest.mark.parametrize("sde", WITH_FLOW, ids=WITH_FLOW_IDS)
def test_reverse_sde_and_probability_flow(sde):
    x = jax.random.normal(jax.random.key(0), (3, 2))
    t = jnp.array([0.1, 0.5, 0.9])
    score_fn = lambda x, t: -x  # noqa: E731
    f, g = sde.sde(x, t)
    drift, diff = sde.reverse(score_fn).sde(x, t)
    np.testing.assert_allclose(drift, f + g[:, None] ** 2 * x, rtol=1e-6)
    np.testing.assert_allclose(diff, g, rtol=1e-6)
    drift, diff = sde.reverse(score_fn, probability_flow=True).sde(x, t)
    # rtol 2e-6: for the flow, the reference f + g^2 x / 2 = (-1 + t) x / (1 - t) cancels 10-fold at t = 0.9.
    np.testing.assert_allclose(drift, f + 0.5 * g[:, None] ** 2 * x, rtol=2e-6)
    np.testing.assert_allclose(diff, 0.0)


def test_sdes_are_static_pytrees_usable_under_jit():
    traces = []

    @jax.jit
    def f(sde, t):
        traces.append(1)
        return sde.sigma(t)

    t = jnp.array([0.5])
    f(VPSDE(), t)
    f(VPSDE(), t + 0.1)
    assert len(traces) == 1
    f(VPSDE(beta_max=10.0), t)
    f(SubVPSDE(), t)
    assert len(traces) == 3
    assert hash(VPSDE()) == hash(VPSDE()) and VPSDE() == VPSDE() and VPSDE() != SubVPSDE()
    assert jax.tree_util.tree_leaves(VESDE()) == []


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: VPSDE(beta_min=5.0, beta_max=1.0), "beta_min must not exceed beta_max"),
        (lambda: VPSDE(beta_min=-0.1), "beta_min must be a finite positive"),
        (lambda: VPSDE(N=0), "N must be a positive integer"),
        (lambda: SubVPSDE(beta_max=float("nan")), "beta_max must be a finite positive"),
        (lambda: VESDE(sigma_min=-1.0), "sigma_min must be a finite positive"),
        (lambda: VESDE(sigma_min=10.0, sigma_max=1.0), "sigma_min must be below sigma_max"),
        (lambda: CosineVPSDE(T=1.0), "needs 0 < T < 1"),
    ],
)
def test_invalid_hyperparameters(make, message):
    with pytest.raises(ValueError, match=message):
        make()
