"""Tests of jaxdiff.losses against closed forms on Gaussian (mixture) oracles."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff import losses as L
from jaxdiff import parameterization as P
from jaxdiff.models import MLP
from jaxdiff.oracle import GaussianMixture
from jaxdiff.sde import VESDE, VPSDE, CosineVPSDE, SubVPSDE

S0, MEAN, D = 0.7, np.array([0.5, -1.0]), 2  # the single Gaussian N(MEAN, S0^2 I) in D dimensions
N_MC = 16384
SDES = {"VP": VPSDE(), "subVP": SubVPSDE(), "VE": VESDE(sigma_min=0.01, sigma_max=10.0)}


def _gaussian() -> GaussianMixture:
    return GaussianMixture.isotropic([1.0], MEAN[None], S0)


def _j(alpha, sigma):
    """Per-dimension E|| s(x_t) + z / sigma ||^2 at the exact score of N(m, s0^2 I): a^2 s0^2 / (s^2 (a^2 s0^2 + s^2)).

    With v = a^2 s0^2 + s^2: s + z / sigma = -a s0 xi / v + z a^2 s0^2 / (sigma v), xi, z independent N(0, 1).
    """
    return alpha**2 * S0**2 / (sigma**2 * (alpha**2 * S0**2 + sigma**2))


@functools.cache
def _leggauss(n):
    return np.polynomial.legendre.leggauss(n)


def _integral(f, sde, eps, n=256):
    """int_eps^T f(t) dt by Gauss-Legendre in s = log t (the integrands are ~1/t near 0)."""
    x, w = _leggauss(n)
    lo, hi = np.log(eps), np.log(sde.T)
    s = 0.5 * (hi - lo) * x + 0.5 * (hi + lo)
    t = jnp.asarray(np.exp(s), jnp.float32)
    vals = np.asarray(f(t), np.float64) * np.exp(s)
    return 0.5 * (hi - lo) * np.sum(w * vals)


def _weight(sde, t, likelihood):
    return sde.sde(jnp.zeros((t.shape[0], 1)), t)[1] ** 2 if likelihood else sde.sigma(t) ** 2


def _expected_min(sde, likelihood, eps):
    """E_{t ~ U[eps, T]}[lambda(t) D J(t)], the DSM loss at the exact score, by quadrature."""
    f = lambda t: _weight(sde, t, likelihood) * D * _j(sde.alpha(t), sde.sigma(t))
    return _integral(f, sde, eps) / (sde.T - eps)


def _sample(gm, seed, n=N_MC):
    return jax.jit(gm.sample, static_argnums=1)(jax.random.key(seed), n)


def _mc(losses):
    losses = np.asarray(losses, np.float64)
    return losses.mean(), losses.std() / np.sqrt(losses.size)


# -- continuous DSM at the exact score ---------------------------------------------------------------
MODES = {"sigma2": (False, False, 1e-5), "likelihood": (True, False, 1e-3), "likelihood_is": (True, True, 1e-3)}


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("sde_name", list(SDES))
def test_dsm_minimum_single_gaussian(sde_name, mode):
    """At the exact score the loss equals its closed-form minimum; a perturbed score is strictly worse."""
    sde, (likelihood, importance, eps) = SDES[sde_name], MODES[mode]
    gm = _gaussian()
    x0 = _sample(gm, 0)
    kw = dict(likelihood_weighting=likelihood, importance_sampling=importance, eps=eps)

    @jax.jit
    def both(key):
        exact = L.dsm_loss(key, gm.score_fn(sde), sde, x0, **kw)
        # Same key (common random numbers): a bias of 0.3 per dimension in noise space.
        perturbed = lambda x, t: gm.score(x, t, sde) + 0.3 / sde.sigma(t)[:, None]
        return exact, L.dsm_loss(key, perturbed, sde, x0, **kw)

    exact, perturbed = both(jax.random.key(1))
    mean, se = _mc(exact)
    expected = _expected_min(sde, likelihood, eps)
    assert abs(mean - expected) < 4.5 * se + 1e-4 * expected, (mean, se, expected)
    diff_mean, diff_se = _mc(perturbed - exact)
    assert diff_mean > 5 * diff_se > 0, (diff_mean, diff_se)


def test_importance_sampling_reduces_variance():
    sde, gm = VPSDE(), _gaussian()
    x0 = _sample(gm, 0)
    kw = dict(likelihood_weighting=True, eps=1e-3)
    plain = L.dsm_loss(jax.random.key(2), gm.score_fn(sde), sde, x0, **kw)
    weighted = L.dsm_loss(jax.random.key(2), gm.score_fn(sde), sde, x0, importance_sampling=True, **kw)
    assert float(jnp.std(weighted)) < 0.5 * float(jnp.std(plain))


@pytest.mark.parametrize("sde", list(SDES.values()) + [CosineVPSDE()], ids=lambda s: type(s).__name__)
def test_importance_sampling_change_of_variables(sde):
    """E_q[Z/(T-eps) sigma^2 J] over a fine u-grid equals the uniform-t likelihood-weighted integral.

    This checks the inverse CDF (t(u) has density g^2 / (sigma^2 Z)) and the weight, without Monte Carlo.
    """
    eps = 1e-4
    u = (np.arange(20000) + 0.5) / 20000
    t = L.importance_time(jnp.asarray(u, jnp.float32), sde, eps)
    z = float(L.importance_normalizer(sde, eps))
    is_mean = np.mean(z / (sde.T - eps) * np.asarray(sde.sigma(t) ** 2 * D * _j(sde.alpha(t), sde.sigma(t))))
    np.testing.assert_allclose(is_mean, _expected_min(sde, True, eps), rtol=2e-3, atol=0)
    # Z is the integral of g^2 / sigma^2; the ends of the grid map to eps and T.
    ratio = lambda t: _weight(sde, t, True) / sde.sigma(t) ** 2
    np.testing.assert_allclose(z, _integral(ratio, sde, eps), rtol=1e-3, atol=0)
    ends = L.importance_time(jnp.array([0.0, 1.0]), sde, eps)
    # (CosineVPSDE.t_from_log_snr goes through arccos of a number near 1: ~1e-6 absolute in float32.)
    np.testing.assert_allclose(ends, [eps, sde.T], rtol=1e-3, atol=3e-6)
    assert np.all(np.diff(np.asarray(t)) >= 0)


def test_dsm_minimum_mixture():
    """For a mixture, min = E_t[d - sigma^2 E||grad log p_t||^2] (as E[z | x_t] = -sigma score); estimated
    from independent draws and compared with the loss at the exact score."""
    sde = VPSDE()
    covs = np.array([[[0.3, 0.1], [0.1, 0.2]], [[0.5, 0.0], [0.0, 0.1]], [[0.2, -0.05], [-0.05, 0.4]]])
    gm = GaussianMixture([0.2, 0.5, 0.3], [[-2.0, 0.0], [1.5, 1.0], [0.0, -2.5]], covs)

    @jax.jit
    def run(k0, k1, k2, k3):
        loss = L.dsm_loss(k1, gm.score_fn(sde), sde, gm.sample(k0, N_MC))
        kt, kz = jax.random.split(k3)
        t = jax.random.uniform(kt, (N_MC,), minval=1e-5, maxval=sde.T)
        x0 = gm.sample(k2, N_MC)
        xt = sde.alpha(t)[:, None] * x0 + sde.sigma(t)[:, None] * jax.random.normal(kz, x0.shape)
        other = D - sde.sigma(t) ** 2 * jnp.sum(gm.score(xt, t, sde) ** 2, -1)
        return loss, other

    loss, other = run(*jax.random.split(jax.random.key(5), 4))
    (m1, se1), (m2, se2) = _mc(loss), _mc(other)
    assert abs(m1 - m2) < 4.5 * np.hypot(se1, se2), (m1, se1, m2, se2)
    assert m1 < D  # the exact score beats the zero score, whose loss is E||z||^2 = D


# -- discrete losses ---------------------------------------------------------------------------------
def test_ddpm_minimum():
    sde = VPSDE()
    x0 = _sample(_gaussian(), 0)
    m = jnp.asarray(MEAN, jnp.float32)

    def eps_fn(x, t, a, s):  # E[z | x_i] under the discrete kernel N(a x_0, s^2 I)
        return s[:, None] * (x - a[:, None] * m) / (a[:, None] ** 2 * S0**2 + s[:, None] ** 2)

    key = jax.random.key(3)
    exact = L.ddpm_loss(key, eps_fn, sde, x0)
    worse = L.ddpm_loss(key, lambda *a: eps_fn(*a) + 0.2, sde, x0)
    abar = np.cumprod(1 - np.asarray(sde.discrete_betas, np.float64))
    expected = np.mean(D * abar * S0**2 / (abar * S0**2 + 1 - abar))
    mean, se = _mc(exact)
    assert abs(mean - expected) < 4.5 * se, (mean, se, expected)
    diff_mean, diff_se = _mc(worse - exact)
    assert diff_mean > 5 * diff_se > 0


def test_smld_minimum_and_levels():
    sde = VESDE(sigma_min=0.01, sigma_max=10.0, N=100)
    x0 = _sample(_gaussian(), 0)
    m = jnp.asarray(MEAN, jnp.float32)
    score_fn = lambda x, t, a, s: -(x - m) / (S0**2 + s[:, None] ** 2)
    key = jax.random.key(4)
    exact = L.smld_loss(key, score_fn, sde, x0)
    sig = np.asarray(sde.discrete_sigmas, np.float64)
    expected = np.mean(D * S0**2 / (S0**2 + sig**2))
    mean, se = _mc(exact)
    assert abs(mean - expected) < 4.5 * se, (mean, se, expected)
    # Level i sits at t_i = i T / (N - 1), where the continuous sigma(t_i) is the discrete sigma_i.
    via_t = L.smld_loss(key, lambda x, t, a, s: score_fn(x, t, a, sde.sigma(t)), sde, x0)
    np.testing.assert_allclose(via_t, exact, rtol=1e-4, atol=1e-6)
    worse = L.smld_loss(key, lambda *a: 1.1 * score_fn(*a), sde, x0)
    diff_mean, diff_se = _mc(worse - exact)
    assert diff_mean > 5 * diff_se > 0


# -- the factory ---------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True, eq=False)
class _OracleEpsNet:
    """A stand-in network that outputs the exact E[eps | x_t] from (x, 999 t)."""

    gm: GaussianMixture
    sde: object
    num_classes = None
    embedding_type = "positional"

    def apply(self, variables, x, cond, y=None, train=False, rngs=None):
        t = cond / 999.0
        return -self.sde.sigma(t)[:, None] * self.gm.score(x, t, self.sde)


def test_factory_matches_core_loss():
    sde, gm = SubVPSDE(), _gaussian()
    batch = {"x": _sample(gm, 0, 256)}
    loss_fn = L.make_loss_fn(sde, _OracleEpsNet(gm, sde), parameterization="eps", likelihood_weighting=True)
    key = jax.random.key(7)
    loss, aux = jax.jit(loss_fn)({}, key, batch)
    core = L.dsm_loss(jax.random.split(key, 3)[0], gm.score_fn(sde), sde, batch["x"], likelihood_weighting=True)
    np.testing.assert_allclose(aux["losses"], core, rtol=2e-4, atol=1e-5)
    np.testing.assert_allclose(loss, jnp.mean(core), rtol=2e-4, atol=0)


CONFIGS = {
    "vp_eps": (VPSDE(), dict(parameterization="eps"), "positional"),
    "vp_likelihood_is": (VPSDE(), dict(likelihood_weighting=True, importance_sampling=True), "positional"),
    "ddpm": (VPSDE(), dict(continuous=False), "positional"),
    "smld": (VESDE(), dict(continuous=False, parameterization="score", scale_by_sigma=True), "fourier"),
    "ve_x0": (VESDE(), dict(parameterization="x0"), "fourier"),
    "subvp_v": (SubVPSDE(), dict(parameterization="v"), "positional"),
    "vp_edm": (VPSDE(), dict(parameterization="edm"), "positional"),
}


_SLOW_CONFIGS = ("vp_likelihood_is", "ve_x0", "subvp_v")


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.slow) if n in _SLOW_CONFIGS else n for n in CONFIGS]
)
def test_make_loss_fn_configs(name):
    sde, kwargs, emb = CONFIGS[name]
    model = MLP(hidden_sizes=(16, 16), embedding_size=8, embedding_type=emb)
    params = jax.jit(lambda k: model.init(k, jnp.zeros((1, 2)), jnp.zeros((1,)))["params"])(jax.random.key(0))
    batch = {"x": jax.random.normal(jax.random.key(1), (16, 2))}

    @jax.jit
    def run(params, key):
        sum_fn = L.make_loss_fn(sde, model, **kwargs)
        mean_fn = L.make_loss_fn(sde, model, reduce_mean=True, **kwargs)
        (loss, aux), grads = jax.value_and_grad(sum_fn, has_aux=True)(params, key, batch)
        return loss, aux["losses"], mean_fn(params, key, batch)[1]["losses"], grads

    loss, losses, mean_losses, grads = run(params, jax.random.key(2))
    assert losses.shape == (16,) and np.all(np.isfinite(losses))
    np.testing.assert_allclose(loss, np.mean(losses), rtol=1e-6, atol=0)
    np.testing.assert_allclose(mean_losses, losses / D, rtol=1e-5, atol=1e-7)
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
    assert sum(float(jnp.sum(g**2)) for g in jax.tree.leaves(grads)) > 0


def test_label_dropout_and_conditioning():
    model = MLP(hidden_sizes=(16,), embedding_size=8, num_classes=3)
    init = lambda k: model.init(k, jnp.zeros((1, 2)), jnp.zeros((1,)), jnp.zeros((1,), jnp.int32))["params"]
    params = jax.jit(init)(jax.random.key(0))
    batch = {"x": jnp.ones((8, 2)), "label": jnp.arange(8) % 3}
    loss_fn = jax.jit(L.make_loss_fn(VPSDE(), model, label_dropout=0.5))
    loss, aux = loss_fn(params, jax.random.key(1), batch)
    assert np.isfinite(loss) and aux["losses"].shape == (8,)


def test_invalid_options():
    model = MLP(hidden_sizes=(4,))
    with pytest.raises(ValueError, match="importance_sampling"):
        L.make_loss_fn(VPSDE(), model, importance_sampling=True)
    with pytest.raises(ValueError, match="continuous loss only"):
        L.make_loss_fn(VPSDE(), model, continuous=False, likelihood_weighting=True)
    with pytest.raises(ValueError, match="discrete losses"):
        L.make_loss_fn(SubVPSDE(), model, continuous=False)
    with pytest.raises(ValueError, match="eps"):
        L.dsm_loss(jax.random.key(0), lambda x, t: x, VPSDE(), jnp.zeros((2, 2)), eps=0.0)
    assert isinstance(P.as_parameterization("v", model), P.Parameterization)
