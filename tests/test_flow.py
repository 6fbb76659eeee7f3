"""Flow matching on the SDE interface: the RectifiedFlow path, its t = 1 endpoint, the velocity parameterization,
the conditional flow-matching loss, and the samplers and likelihood on the Gaussian-mixture oracle."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

import jaxdiff
from jaxdiff import losses as L
from jaxdiff import parameterization as P
from jaxdiff.likelihood import log_likelihood
from jaxdiff.oracle import GaussianMixture
from jaxdiff.samplers import _common as C
from jaxdiff.samplers.ddim import ddim_sample
from jaxdiff.samplers.dpm_solver import dpm_solver_pp_sample
from jaxdiff.samplers.edm import heun_sample
from jaxdiff.samplers.flow import flow_euler_sample
from jaxdiff.samplers.ode import decode
from jaxdiff.sde import VPSDE, RectifiedFlow
from tests.helpers import assert_matches_mixture, component_masses, four_component_mixture

SDE = RectifiedFlow()
GM = four_component_mixture()
KEY = jax.random.key(0)

_drift = jax.jit(lambda score_fn, x, t: SDE.probability_flow_drift(score_fn, x, t))
_call = jax.jit(lambda score_fn, x, t: score_fn(x, t))


def _posterior_mean_x0(gm: GaussianMixture, x, t) -> np.ndarray:
    """``E[x_0 | x_t]`` on the linear path, in float64 from the mixture's posterior (no score)."""
    w, m, c = (np.asarray(a, np.float64) for a in (gm.weights, gm.means, gm.covs))
    out = np.empty_like(x)
    for i in range(len(x)):
        a, s = 1.0 - t[i], t[i]
        logp, means = [], []
        for k in range(len(w)):
            cov = a**2 * c[k] + s**2 * np.eye(x.shape[1])
            r = x[i] - a * m[k]
            sol = np.linalg.solve(cov, r)
            logp.append(np.log(w[k]) - 0.5 * r @ sol - 0.5 * np.linalg.slogdet(2 * np.pi * cov)[1])
            means.append(m[k] + a * c[k] @ sol)
        resp = np.exp(np.array(logp) - max(logp))
        out[i] = (resp / resp.sum()) @ np.array(means)
    return out


def _exact_velocity(gm: GaussianMixture, x, t) -> np.ndarray:
    """``E[eps - x_0 | x_t]``: ``eps = (x - (1 - t) x0) / t`` from the float64 posterior mean (``t > 0``)."""
    x0 = _posterior_mean_x0(gm, x, t)
    return (x - (1 - t)[:, None] * x0) / t[:, None] - x0


# -- the path --------------------------------------------------------------------------------------------------
def test_kernel_log_snr_and_inverse():
    t = jnp.array([0.0, 0.1, 0.5, 0.9, 1.0])
    np.testing.assert_array_equal(SDE.alpha(t), 1.0 - np.asarray(t))
    np.testing.assert_array_equal(SDE.sigma(t), np.asarray(t))
    lam = SDE.log_snr(t)
    assert lam[0] == np.inf and lam[-1] == -np.inf
    np.testing.assert_allclose(lam[1:-1], 2 * np.log((1 - t[1:-1]) / t[1:-1]), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(SDE.t_from_log_snr(lam), t, rtol=0, atol=1e-6)  # endpoints included
    mean, std = SDE.marginal_prob(jnp.ones((5, 3)), t)
    np.testing.assert_allclose(mean, np.broadcast_to((1 - np.asarray(t))[:, None], (5, 3)), rtol=0, atol=0)
    np.testing.assert_array_equal(std, t)


def test_drift_and_diffusion_are_those_of_the_kernel():
    """``f = d log alpha / dt`` and ``g^2 = d sigma^2 / dt - 2 f sigma^2`` (every linear SDE), by autodiff."""
    t = jnp.array([0.05, 0.3, 0.7, 0.95])
    x = jnp.ones((4, 1))
    drift, g = jax.jit(SDE.sde)(x, t)
    dlog_alpha = jax.jit(jax.vmap(jax.grad(lambda s: jnp.log(SDE.alpha(s)))))(t)
    dvar = jax.jit(jax.vmap(jax.grad(lambda s: SDE.sigma(s) ** 2)))(t)
    np.testing.assert_allclose(drift[:, 0], dlog_alpha, rtol=1e-6, atol=0)
    np.testing.assert_allclose(g**2, dvar - 2 * dlog_alpha * t**2, rtol=1e-5, atol=0)
    np.testing.assert_allclose(g**2, 2 * t / (1 - t), rtol=1e-5, atol=0)
    a, v = SDE.transition(jnp.float32(0.8), jnp.float32(0.3))  # sigma(t)^2 = a^2 sigma(s)^2 + v
    np.testing.assert_allclose(a, 0.2 / 0.7, rtol=1e-6)
    np.testing.assert_allclose(v, 0.8**2 - (0.2 / 0.7) ** 2 * 0.3**2, rtol=1e-5)


def test_prior_is_exact_at_T():
    z = jax.random.normal(KEY, (6, 3))
    np.testing.assert_allclose(SDE.prior_logp(z), stats.norm.logpdf(np.asarray(z)).sum(-1), rtol=1e-6, atol=1e-5)
    # The mixture's marginal at T = 1 is the prior itself: alpha(1) = 0.
    x = jax.random.normal(KEY, (6, 2)) * 2
    logp, score = jax.jit(lambda x: (GM.marginal_log_prob(x, 1.0, SDE), GM.score(x, jnp.ones(6), SDE)))(x)
    np.testing.assert_allclose(logp, SDE.prior_logp(x), rtol=1e-6, atol=1e-5)
    np.testing.assert_allclose(score, -x, rtol=1e-6, atol=1e-6)


@pytest.mark.slow
def test_oracle_marginal_under_the_path():
    """The oracle's ``p_t`` is the law of ``(1 - t) x_0 + t eps``: moments, and score = grad log p_t."""
    t = 0.6
    k0, k1 = jax.random.split(KEY)
    n = 20_000
    xt = np.asarray((1 - t) * GM.sample(k0, n) + t * jax.random.normal(k1, (n, 2)))
    pt = GM.at_time(t, SDE)
    np.testing.assert_allclose(xt.mean(0), pt.mean(), rtol=0, atol=5 * 1.5 / np.sqrt(n))  # std per axis < 1.5
    np.testing.assert_allclose(np.cov(xt.T), pt.covariance(), rtol=0, atol=0.1)  # 5 se of each entry < 0.1
    x = jnp.asarray(xt[:8])
    tt = jnp.full((8,), t)
    grad = jax.jit(jax.vmap(jax.grad(lambda y, s: GM.marginal_log_prob(y[None], s, SDE)[0])))(x, tt)
    np.testing.assert_allclose(_call(GM.score_fn(SDE), x, tt), grad, rtol=1e-4, atol=1e-5)


def test_validation():
    with pytest.raises(ValueError, match="N must be a positive integer, got 0"):
        RectifiedFlow(N=0)
    with pytest.raises(TypeError):
        RectifiedFlow(T=0.5)  # the prior N(0, I) is exact at T = 1 only: T is not a parameter


# -- the velocity at every t, t = 1 included -------------------------------------------------------------------
def test_velocity_is_exact_at_every_time_including_t1():
    x = np.asarray(jax.random.normal(jax.random.key(1), (5, 2)) * 2, np.float64)
    for t_value in (0.05, 0.5, 0.9, 0.999):
        t = np.full(5, t_value)
        v = _drift(GM.score_fn(SDE), jnp.asarray(x, jnp.float32), jnp.asarray(t, jnp.float32))
        np.testing.assert_allclose(v, _exact_velocity(GM, x, t), rtol=1e-3, atol=2e-3, err_msg=f"t={t_value}")
    v1 = _drift(GM.score_fn(SDE), jnp.asarray(x, jnp.float32), jnp.ones(5))
    # At t = 1, x_1 = eps is independent of x_0: E[eps - x_0 | x_1 = x] = x - E[x_0].
    np.testing.assert_allclose(v1, x - np.asarray(GM.mean()), rtol=0, atol=1e-5)
    # The reverse probability-flow ODE goes through the same finite form.
    reverse = jax.jit(lambda score_fn, x, t: SDE.reverse(score_fn, probability_flow=True).sde(x, t))
    drift, g = reverse(GM.score_fn(SDE), jnp.asarray(x, jnp.float32), jnp.ones(5))
    np.testing.assert_allclose(drift, v1, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(g, 0.0)
    # Mixed times in one batch: each example takes its own branch.
    tm = jnp.array([1.0, 0.5, 1.0, 0.9, 0.05])
    vm = _drift(GM.score_fn(SDE), jnp.asarray(x, jnp.float32), tm)
    np.testing.assert_allclose(vm[jnp.array([0, 2])], v1[jnp.array([0, 2])], rtol=0, atol=1e-6)
    np.testing.assert_allclose(vm[1], _exact_velocity(GM, x[1:2], np.array([0.5]))[0], rtol=1e-3, atol=2e-3)
    x0, _ = jax.jit(SDE.data_prediction)(GM.score_fn(SDE), jnp.asarray(x, jnp.float32), jnp.float32(1.0))
    np.testing.assert_allclose(x0, np.broadcast_to(GM.mean(), x.shape), rtol=0, atol=1e-5)


# -- a velocity network ----------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True, eq=False)
class VelocityNet:
    """Stands in for a Flax module: the exact velocity ``E[eps - x_0 | x_t]`` from its own inputs (``999 t``).

    With ``num_classes``, label ``k`` is component ``k`` of the mixture and the null label the whole mixture.
    """

    gm: GaussianMixture
    num_classes: int | None = None
    embedding_type = "positional"

    def __post_init__(self):
        if self.num_classes is not None:
            parts = tuple(_component(self.gm, k) for k in range(self.num_classes)) + (self.gm,)
            object.__setattr__(self, "parts", parts)

    def _velocity(self, gm, x, t):
        return SDE.probability_flow_drift(gm.score_fn(SDE), x, t)

    def apply(self, variables, x, cond, y=None, train=False, rngs=None):
        t = cond / 999.0
        if self.num_classes is None:
            return self._velocity(self.gm, x, t)
        vs = jnp.stack([self._velocity(g, x, t) for g in self.parts])  # (K + 1, batch, d)
        return vs[y, jnp.arange(x.shape[0])]


def _component(gm: GaussianMixture, k: int) -> GaussianMixture:
    return GaussianMixture(np.ones(1), np.asarray(gm.means[k : k + 1]), np.asarray(gm.covs[k : k + 1]))


def test_velocity_network_gives_the_exact_score_and_a_finite_flow_at_t1():
    score_fn = P.make_score_fn(VelocityNet(GM), {}, SDE, parameterization="velocity")
    x = jax.random.normal(jax.random.key(2), (4, 2)) * 2
    t = jnp.array([0.1, 0.4, 0.8, 0.99])
    np.testing.assert_allclose(_call(score_fn, x, t), GM.score(x, t, SDE), rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(_call(score_fn, x, jnp.ones(4)), -x, rtol=0, atol=1e-6)  # score(x, 1) = -x exactly
    # Through the score, the flow at t = 1 is the network's velocity (l'Hopital through the conversion).
    np.testing.assert_allclose(_drift(score_fn, x, jnp.ones(4)), x - GM.mean(), rtol=0, atol=1e-5)


@pytest.mark.slow
def test_classifier_free_guidance_with_a_velocity_network():
    """Guidance mixes scores, and scores are affine in the velocity with the same coefficients: the guided flow is
    ``(1 + w) u(x, t, y) - w u(x, t)``, finite at ``t = 1`` (where it is ``x - ((1 + w) m_y - w E[x_0])``)."""
    net, w = VelocityNet(GM, num_classes=4), 1.5
    y = jnp.array([0, 1, 2, 3])
    score_fn = P.make_score_fn(net, {}, SDE, parameterization="velocity", y=y, guidance_weight=w)
    x = jax.random.normal(jax.random.key(3), (4, 2)) * 2
    t = jnp.array([0.2, 0.5, 0.7, 0.95])
    cond = jnp.stack([_component(GM, k).score(x[k : k + 1], t[k : k + 1], SDE)[0] for k in range(4)])
    guided = _call(score_fn, x, t)
    np.testing.assert_allclose(guided, (1 + w) * cond - w * GM.score(x, t, SDE), rtol=1e-3, atol=1e-3)
    expected = x - ((1 + w) * GM.means[y] - w * GM.mean())
    np.testing.assert_allclose(_drift(score_fn, x, jnp.ones(4)), expected, rtol=0, atol=1e-5)


# -- samplers and likelihood on the oracle ---------------------------------------------------------------------
N_SAMPLES = 2000


@pytest.mark.parametrize(
    "method, options",
    [
        ("flow_euler", {"steps": 100}),
        ("ode", {"rtol": 1e-4, "atol": 1e-4}),
        ("dpm_solver++", {"steps": 20, "time_schedule": "uniform"}),
        pytest.param("heun", {"steps": 18, "sigma_max": 80.0}, marks=pytest.mark.slow),
        pytest.param("ddim", {"steps": 50, "eta": 1.0}, marks=pytest.mark.slow),
    ],
)
def test_samplers_reproduce_the_mixture(method, options):
    x, info = jaxdiff.sample(KEY, GM.score_fn(SDE), SDE, (N_SAMPLES, 2), method=method, **options)
    assert int(info["nonfinite"]) == 0
    assert_matches_mixture(GM, x)


@pytest.mark.slow
def test_flow_euler_is_ddim_on_the_linear_path():
    """One Euler step of the flow ODE is the deterministic DDIM step ``(1 - s) x0 + s eps``."""
    x_euler, info = flow_euler_sample(KEY, GM.score_fn(SDE), SDE, (64, 2), steps=10, eps=1e-3)
    x_ddim, _ = ddim_sample(KEY, GM.score_fn(SDE), SDE, (64, 2), steps=10, eps=1e-3)
    assert int(info["nfe"]) == 10
    np.testing.assert_allclose(x_euler, x_ddim, rtol=0, atol=2e-5)


@pytest.mark.slow
def test_flow_euler_converges_with_order_one():
    """Distance to the adaptive solution from the same prior draws: the slope of log error on log step is 1."""
    n = 256
    z = C.prior_sample(C.example_keys(KEY, n), SDE, (2,))  # flow_euler's own prior draws
    ref, _ = decode(GM.score_fn(SDE), SDE, z, rtol=1e-7, atol=1e-7, eps=0.0)
    steps = np.array([20, 40, 80])
    errors = []
    for k in steps:
        x, _ = flow_euler_sample(KEY, GM.score_fn(SDE), SDE, (n, 2), steps=int(k))
        errors.append(float(np.mean(np.linalg.norm(np.asarray(x - ref), axis=-1))))
    slope = np.polyfit(np.log(1.0 / steps), np.log(errors), 1)[0]
    assert 0.85 < slope < 1.2, (errors, slope)


def test_exact_likelihood_matches_the_mixture():
    x = GM.sample(jax.random.key(4), 8)
    logp, info = log_likelihood(jax.random.key(5), GM.score_fn(SDE), SDE, x, trace="exact", rtol=1e-5, atol=1e-5)
    assert bool(info["success"].all())
    np.testing.assert_allclose(logp, GM.log_prob(x), rtol=0, atol=0.01)
    # The prior term is exact: the latents are the ODE's state at T = 1 itself.
    np.testing.assert_allclose(info["prior_logp"], SDE.prior_logp(info["z"]), rtol=1e-6, atol=1e-5)


@pytest.mark.slow
def test_exact_likelihood_of_a_velocity_network():
    """The likelihood through a velocity network's score: the t = 1 derivative goes through the conversion."""
    score_fn = P.make_score_fn(VelocityNet(GM), {}, SDE, parameterization="velocity")
    x = GM.sample(jax.random.key(4), 8)
    logp, info = log_likelihood(jax.random.key(5), score_fn, SDE, x, trace="exact", rtol=1e-5, atol=1e-5)
    assert bool(info["success"].all())
    np.testing.assert_allclose(logp, GM.log_prob(x), rtol=0, atol=0.01)


def test_refusals_where_a_method_does_not_apply():
    score_fn = GM.score_fn(SDE)
    with pytest.raises(ValueError, match="time_schedule='logsnr' needs a finite log-SNR at T"):
        dpm_solver_pp_sample(KEY, score_fn, SDE, (4, 2))
    with pytest.raises(ValueError, match="DDIM time_schedule='logsnr' needs a finite log-SNR at T"):
        ddim_sample(KEY, score_fn, SDE, (4, 2), time_schedule="logsnr")
    with pytest.raises(ValueError, match="Heun sampler needs a finite sigma_max for RectifiedFlow"):
        heun_sample(KEY, score_fn, SDE, (4, 2))
    # VP keeps its defaults.
    x, _ = dpm_solver_pp_sample(KEY, GM.score_fn(VPSDE()), VPSDE(), (4, 2), steps=5)
    assert np.all(np.isfinite(np.asarray(x)))


# -- the conditional flow-matching loss ------------------------------------------------------------------------
def _eps_net(x, t):
    return jnp.tanh(x) * (1.0 + t[:, None]) + 0.3 * x  # any noise prediction


@pytest.mark.parametrize("time_sampling", ["uniform", pytest.param("logit_normal", marks=pytest.mark.slow)])
def test_flow_matching_is_the_eps_loss_weighted_by_one_over_alpha_squared(time_sampling):
    x0 = GM.sample(jax.random.key(6), 256)

    def velocity_fn(x, t):
        return P.convert(_eps_net(x, t), x, SDE.alpha(t), SDE.sigma(t), source="eps", target="velocity")

    key = jax.random.key(7)
    losses = L.flow_matching_loss(key, velocity_fn, SDE, x0, time_sampling=time_sampling)
    k_t, k_z = jax.random.split(key)  # the documented use of the key
    t = L.flow_matching_time(k_t, 256, SDE, time_sampling)
    z = jax.random.normal(k_z, x0.shape)
    xt = (1 - t)[:, None] * x0 + t[:, None] * z
    eps_loss = jnp.sum((_eps_net(xt, t) - z) ** 2, -1)
    np.testing.assert_allclose(losses, eps_loss / (1 - t) ** 2, rtol=2e-3, atol=1e-6)
    lam = SDE.log_snr(t)  # the same weight in the log-SNR: (1 + exp(-lambda / 2))^2
    np.testing.assert_allclose((1 + jnp.exp(-lam / 2)) ** 2, 1 / (1 - t) ** 2, rtol=1e-4)


@pytest.mark.parametrize("time_sampling", ["uniform", pytest.param("logit_normal", marks=pytest.mark.slow)])
def test_exact_velocity_is_a_stationary_point_of_the_loss(time_sampling):
    """d/d delta of the loss at ``u* + delta phi`` is ~0 (within Monte-Carlo error) for the exact velocity ``u*``,
    and far from 0 for a velocity 5% off."""
    n = 20_000
    x0 = GM.sample(jax.random.key(8), n)
    A = jnp.array([[0.7, -0.2], [0.4, 1.1]])
    exact = lambda x, t: SDE.probability_flow_drift(GM.score_fn(SDE), x, t)
    perturbations = {"linear": lambda x, t: x @ A + t[:, None], "itself": exact}

    def losses(delta, scale, phi):
        velocity = lambda x, t: scale * exact(x, t) + delta * phi(x, t)
        return L.flow_matching_loss(jax.random.key(9), velocity, SDE, x0, time_sampling=time_sampling)

    @jax.jit
    def per_example_grad(scale):
        return {name: jax.jacfwd(losses)(0.0, scale, phi) for name, phi in perturbations.items()}

    for name, g in per_example_grad(1.0).items():
        se = float(jnp.std(g)) / np.sqrt(n)
        assert abs(float(jnp.mean(g))) < 4 * se, (name, float(jnp.mean(g)), se)
    for name, g in per_example_grad(1.05).items():
        se = float(jnp.std(g)) / np.sqrt(n)
        assert abs(float(jnp.mean(g))) > 8 * se, (name, float(jnp.mean(g)), se)


def test_logit_normal_times():
    t = L.flow_matching_time(jax.random.key(10), 20_000, SDE, "logit_normal", logit_mean=0.5, logit_std=0.8)
    t = np.asarray(t, np.float64)
    assert np.all((t > 0) & (t < 1))
    p = stats.kstest(np.log(t / (1 - t)), stats.norm(0.5, 0.8).cdf).pvalue
    assert p > 0.01, p
    u = np.asarray(L.flow_matching_time(jax.random.key(11), 20_000, SDE, "uniform"), np.float64)
    assert np.all((u > 0) & (u <= 1))  # no t = 0, where a Fourier embedding log(sigma) is -inf
    assert stats.kstest(u, "uniform").pvalue > 0.01


@pytest.mark.slow
def test_make_loss_fn_flow_matching_trains_the_velocity():
    """With a velocity network, the loss is the regression of its raw output on ``eps - x_0``."""
    net = VelocityNet(GM)
    loss_fn = L.make_loss_fn(SDE, net, parameterization="velocity", objective="flow_matching", train=False)
    batch = {"x": GM.sample(jax.random.key(11), 64)}
    key = jax.random.key(12)
    loss, aux = jax.jit(loss_fn)({}, key, batch)
    exact = lambda x, t: SDE.probability_flow_drift(GM.score_fn(SDE), x, t)
    expected = L.flow_matching_loss(jax.random.split(key, 3)[0], exact, SDE, batch["x"])
    np.testing.assert_allclose(aux["losses"], expected, rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(loss, jnp.mean(expected), rtol=1e-3)


def test_flow_matching_argument_errors():
    net = VelocityNet(GM)
    with pytest.raises(ValueError, match="unknown objective 'fm'"):
        L.make_loss_fn(SDE, net, objective="fm")
    with pytest.raises(ValueError, match="likelihood_weighting=True"):
        L.make_loss_fn(SDE, net, objective="flow_matching", likelihood_weighting=True)
    with pytest.raises(ValueError, match="continuous=False"):
        L.make_loss_fn(SDE, net, objective="flow_matching", continuous=False)
    with pytest.raises(ValueError, match="time_sampling applies to objective='flow_matching' only"):
        L.make_loss_fn(SDE, net, time_sampling="logit_normal")
    with pytest.raises(ValueError, match="unknown time_sampling 'beta'"):
        L.make_loss_fn(SDE, net, objective="flow_matching", time_sampling="beta")
    with pytest.raises(ValueError, match="importance_sampling draws t uniformly in the log-SNR, which is -inf at T"):
        L.make_loss_fn(SDE, net, likelihood_weighting=True, importance_sampling=True)
    with pytest.raises(ValueError, match="logit_std must be a finite positive number, got 0.0"):
        L.flow_matching_loss(KEY, lambda x, t: x, SDE, jnp.zeros((2, 2)), time_sampling="logit_normal", logit_std=0.0)


@pytest.mark.slow
def test_a_velocity_network_trains_to_the_oracle_loss_and_samples_the_mixture():
    """End to end: flow matching drives an MLP's loss to within 3% of the exact velocity's (the loss's minimum),
    and Euler on the trained flow puts each component's mass within 5 points."""
    from jaxdiff import train
    from jaxdiff.models import MLP

    model = MLP(hidden_sizes=(128, 128, 128), embedding_type="positional")
    tx = train.make_optimizer(learning_rate=2e-3, warmup=100, grad_clip=1.0)
    state = train.create_train_state(jax.random.key(0), model, jnp.zeros((8, 2)), tx)
    loss_fn = L.make_loss_fn(SDE, model, parameterization="velocity", objective="flow_matching")
    step = train.make_train_step(loss_fn, tx, ema_rate=0.99)
    for i in range(1500):
        state, _ = step(state, {"x": GM.sample(jax.random.fold_in(jax.random.key(1), i), 256)})
    x_eval = GM.sample(jax.random.key(2), 20_000)
    eval_fn = L.make_loss_fn(SDE, model, parameterization="velocity", objective="flow_matching", train=False)
    trained, _ = jax.jit(eval_fn)(state.ema_params, jax.random.key(3), {"x": x_eval})
    exact = lambda x, t: SDE.probability_flow_drift(GM.score_fn(SDE), x, t)
    minimum = jnp.mean(L.flow_matching_loss(jax.random.split(jax.random.key(3), 3)[0], exact, SDE, x_eval))
    # Measured: 5.188 against 5.170. A loss of the wrong target or time convention stays far above.
    assert float(minimum) * 0.99 < float(trained) < 1.03 * float(minimum), (float(trained), float(minimum))
    velocity_net = P.make_score_fn(model, state.ema_params, SDE, parameterization="velocity")
    x, info = jaxdiff.sample(KEY, velocity_net, SDE, (2000, 2), method="flow_euler", steps=50)
    assert int(info["nonfinite"]) == 0
    np.testing.assert_allclose(component_masses(GM, x), GM.weights, rtol=0, atol=0.05)
