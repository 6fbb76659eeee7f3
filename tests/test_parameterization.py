"""Tests of jaxdiff.parameterization: conversions, the oracle, EDM preconditioning, score_fn plumbing."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.tree_util import Partial

from jaxdiff import parameterization as P
from jaxdiff.models import MLP
from jaxdiff.oracle import GaussianMixture
from jaxdiff.sde import VESDE, VPSDE, CosineVPSDE, SubVPSDE

_call = jax.jit(lambda score_fn, x, t: score_fn(x, t))  # one compilation per model, not one dispatch per op

SDES = [VPSDE(), SubVPSDE(), VESDE(sigma_min=0.01, sigma_max=10.0), CosineVPSDE()]
TIMES = np.array([0.02, 0.1, 0.3, 0.6, 0.9], np.float32)


def _mixture() -> GaussianMixture:
    covs = np.array([[[0.3, 0.1], [0.1, 0.2]], [[0.5, 0.0], [0.0, 0.1]], [[0.2, -0.05], [-0.05, 0.4]]])
    return GaussianMixture([0.2, 0.5, 0.3], [[-2.0, 0.0], [1.5, 1.0], [0.0, -2.5]], covs)


def _posterior_mean_x0(gm: GaussianMixture, x, alpha, sigma) -> np.ndarray:
    """Tweedie's E[x_0 | x_t] for a Gaussian mixture, computed directly in float64 (no scores).

    Per component, x_0 | x_t, k is Gaussian with mean m + C a (a^2 C + s^2 I)^{-1} (x - a m); the posterior
    weights are w_k N(x; a m_k, a^2 C_k + s^2 I) normalised.
    """
    w, m, c = (np.asarray(v, np.float64) for v in (gm.weights, gm.means, gm.covs))
    out = np.zeros_like(x, dtype=np.float64)
    for i in range(x.shape[0]):
        a, s = float(alpha[i]), float(sigma[i])
        logp, means = [], []
        for k in range(len(w)):
            cov = a**2 * c[k] + s**2 * np.eye(2)
            r = x[i] - a * m[k]
            sol = np.linalg.solve(cov, r)
            logp.append(np.log(w[k]) - 0.5 * r @ sol - 0.5 * np.linalg.slogdet(2 * np.pi * cov)[1])
            means.append(m[k] + a * c[k] @ sol)
        logp = np.array(logp)
        resp = np.exp(logp - logp.max())
        resp /= resp.sum()
        out[i] = resp @ np.array(means)
    return out


# -- pure conversions ---------------------------------------------------------------------------------
@pytest.mark.parametrize("source", P.TARGETS)
@pytest.mark.parametrize("target", P.TARGETS)
def test_round_trip(source, target):
    kx, kv, ka = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (6, 3))
    value = jax.random.normal(kv, (6, 3))
    # VP-like, VE-like (alpha = 1, large sigma) and sub-VP-like (alpha^2 + sigma^2 != 1) coefficients.
    alpha = jnp.array([0.9, 0.5, 1.0, 1.0, 0.99, 0.3])
    sigma = jnp.array([0.4359, 0.8660, 5.0, 0.05, 0.0199, 0.91])
    there = P.convert(value, x, alpha, sigma, source=source, target=target)
    back = P.convert(there, x, alpha, sigma, source=target, target=source)
    # float32 round trips through x0 lose about eps_32 |x| / sigma^2: the conditioning of x0 <-> eps.
    atol = 2e-6 * (1 + jnp.abs(x)) / jnp.minimum(sigma, 1.0)[:, None] ** 2
    np.testing.assert_array_less(jnp.abs(back - value), atol + 1e-5 * jnp.abs(value))


def test_definitions():
    """Each conversion is the textbook identity, checked from a known (x0, eps) pair."""
    kx, ke = jax.random.split(jax.random.key(1))
    x0, eps = jax.random.normal(kx, (5, 4)), jax.random.normal(ke, (5, 4))
    alpha, sigma = jnp.array([0.95, 0.7, 1.0, 0.2, 0.6]), jnp.array([0.3, 0.7, 3.0, 0.9, 0.5])
    x = alpha[:, None] * x0 + sigma[:, None] * eps
    v = alpha[:, None] * eps - sigma[:, None] * x0  # Salimans & Ho (2022)
    velocity = eps - x0  # flow matching (Lipman et al. 2023)
    truth = {"eps": eps, "x0": x0, "v": v, "velocity": velocity, "score": -eps / sigma[:, None]}  # eq. 7's score
    for source, value in truth.items():
        for target, expected in truth.items():
            got = P.convert(value, x, alpha, sigma, source=source, target=target)
            np.testing.assert_allclose(got, expected, rtol=1e-5, atol=2e-5, err_msg=f"{source}->{target}")


def test_unknown_kind():
    x = jnp.zeros((1, 2))
    with pytest.raises(ValueError, match="unknown prediction"):
        P.convert(x, x, 1.0, 1.0, source="noise", target="x0")
    with pytest.raises(ValueError, match="unknown parameterization"):
        P.Parameterization("noise")
    with pytest.raises(ValueError, match="scale_by_sigma"):
        P.Parameterization("eps", scale_by_sigma=True)


@pytest.mark.parametrize("sde", SDES, ids=lambda s: type(s).__name__)
def test_oracle_score_to_x0_is_tweedie(sde):
    """The exact score converted to x0 is E[x_0 | x_t], computed independently from the posterior."""
    gm = _mixture()
    x = np.asarray(gm.sample(jax.random.key(2), len(TIMES)))
    t = jnp.asarray(TIMES * sde.T)
    xt = sde.alpha(t)[:, None] * x + sde.sigma(t)[:, None] * jax.random.normal(jax.random.key(3), x.shape)
    alpha, sigma = sde.alpha(t), sde.sigma(t)
    score = jax.jit(gm.score_fn(sde))(xt, t)
    x0 = P.convert(score, xt, alpha, sigma, source="score", target="x0")
    expected = _posterior_mean_x0(gm, np.asarray(xt, np.float64), np.asarray(alpha), np.asarray(sigma))
    np.testing.assert_allclose(x0, expected, rtol=1e-3, atol=1e-3 * (1 + float(sigma.max()) ** 2))


# -- noise conditioning -----------------------------------------------------------------------------
def test_noise_cond():
    t = jnp.array([1e-3, 0.5, 1.0])
    np.testing.assert_allclose(P.noise_cond(t, VESDE(), "fourier"), np.log(VESDE().sigma(t)), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(P.noise_cond(t, VPSDE(), "positional"), 999.0 * np.asarray(t), rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match="embedding_type"):
        P.noise_cond(t, VPSDE(), "learned")


# -- a network that knows the answer ------------------------------------------------------------------
@dataclasses.dataclass(frozen=True, eq=False)
class OracleNet:
    """Stands in for a Flax module: outputs the exact prediction of ``kind`` from its own inputs only."""

    gm: GaussianMixture
    sde: object
    kind: str
    sigma_data: float = 0.5
    num_classes = None
    embedding_type = "positional"

    def apply(self, variables, x_in, cond, y=None, train=False, rngs=None):
        sde = self.sde
        if self.kind == "edm":
            sigma_edm = jnp.exp(4.0 * cond)  # c_noise = log(sigma_edm) / 4
            t = sde.t_from_log_snr(-2.0 * jnp.log(sigma_edm))
            c_skip, c_out, c_in, _ = P.edm_coefficients(sigma_edm, self.sigma_data)
            x_edm = x_in / c_in[:, None]
            x = x_edm * sde.alpha(t)[:, None]
        else:
            t, x = cond / 999.0, x_in
        alpha, sigma = sde.alpha(t), sde.sigma(t)
        score = self.gm.score(x, t, sde)
        if self.kind == "edm":
            x0 = P.convert(score, x, alpha, sigma, source="score", target="x0")
            return (x0 - c_skip[:, None] * x_edm) / c_out[:, None]
        if self.kind == "scaled_score":
            return score * sigma[:, None]
        return P.convert(score, x, alpha, sigma, source="score", target=self.kind)


@pytest.mark.parametrize("sde", [VPSDE(), VESDE(sigma_min=0.01, sigma_max=10.0)], ids=lambda s: type(s).__name__)
@pytest.mark.parametrize("kind", ["score", "scaled_score", "eps", "x0", "v", "edm"])
def test_every_parameterization_gives_the_oracle_score(sde, kind):
    gm = _mixture()
    net = OracleNet(gm, sde, kind)
    output = "score" if kind == "scaled_score" else kind
    score_fn = P.make_score_fn(
        net, {}, sde, parameterization=output, embedding_type="positional", scale_by_sigma=kind == "scaled_score"
    )
    assert isinstance(score_fn, Partial)
    t = jnp.asarray(TIMES)
    x = jax.random.normal(jax.random.key(4), (len(TIMES), 2)) * (1 + sde.sigma(t)[:, None])
    expected = gm.score(x, t, sde)
    rtol = 2e-3 if kind in ("x0", "v", "edm") else 1e-5  # x0-type outputs lose digits at small sigma
    np.testing.assert_allclose(_call(score_fn, x, t), expected, rtol=rtol, atol=rtol * float(jnp.abs(expected).max()))


def test_edm_table1():
    """Karras et al. (2022), Table 1: with F = 0 the denoiser is c_skip x; c_in, c_out by hand."""
    s, d = jnp.array([0.1, 1.0, 80.0]), 0.5
    c_skip, c_out, c_in, c_noise = P.edm_coefficients(s, d)
    np.testing.assert_allclose(c_skip, d**2 / (s**2 + d**2), rtol=1e-6, atol=0)
    np.testing.assert_allclose(c_out, s * d / np.sqrt(s**2 + d**2), rtol=1e-6, atol=0)
    np.testing.assert_allclose(c_in, 1 / np.sqrt(s**2 + d**2), rtol=1e-6, atol=0)
    np.testing.assert_allclose(c_noise, np.log(s) / 4, rtol=1e-6, atol=1e-7)
    # On a VP SDE, x_edm = x / alpha and sigma_edm = sigma / alpha.
    sde = VPSDE()
    t = jnp.array([0.3, 0.7])
    alpha, sigma = sde.alpha(t), sde.sigma(t)
    x = jnp.ones((2, 3))
    seen = {}

    def zero_net(x_in, c):
        seen["x_in"], seen["c"] = x_in, c
        return jnp.zeros_like(x_in)

    x0 = P.Parameterization("edm", sigma_data=d)(zero_net, x, alpha, sigma, None, "x0")
    se = sigma / alpha
    np.testing.assert_allclose(x0, (d**2 / (se**2 + d**2) / alpha)[:, None] * x, rtol=1e-5, atol=0)
    np.testing.assert_allclose(seen["x_in"], (1 / (alpha * np.sqrt(se**2 + d**2)))[:, None] * x, rtol=1e-5, atol=0)
    np.testing.assert_allclose(seen["c"], np.log(se) / 4, rtol=1e-5, atol=1e-6)


# -- Flax networks: noise conditioning, Partial, guidance ---------------------------------------------
def _mlp(**kw):
    model = MLP(hidden_sizes=(16, 16), embedding_size=8, **kw)
    kwargs = {"y": jnp.zeros((1,), jnp.int32)} if kw.get("num_classes") else {}
    init = jax.jit(lambda k: model.init(k, jnp.zeros((1, 2)), jnp.zeros((1,)), **kwargs)["params"])
    params = init(jax.random.key(0))
    return model, params


@pytest.mark.parametrize("embedding_type", ["fourier", "positional"])
def test_model_receives_noise_cond(embedding_type):
    model, params = _mlp(embedding_type=embedding_type)
    sde = VESDE()
    x, t = jax.random.normal(jax.random.key(1), (3, 2)), jnp.array([0.1, 0.5, 0.9])
    raw = jax.jit(model.apply)({"params": params}, x, P.noise_cond(t, sde, embedding_type))
    got = _call(P.make_score_fn(model, params, sde, parameterization="score"), x, t)
    np.testing.assert_allclose(got, raw, rtol=1e-6, atol=1e-6)
    scaled = _call(P.make_score_fn(model, params, sde, parameterization="score", scale_by_sigma=True), x, t)
    np.testing.assert_allclose(scaled, raw / sde.sigma(t)[:, None], rtol=1e-5, atol=1e-6)
    eps_score = _call(P.make_score_fn(model, params, sde, parameterization="eps"), x, t)
    np.testing.assert_allclose(eps_score, -raw / sde.sigma(t)[:, None], rtol=1e-5, atol=1e-6)


def test_partial_params_are_traced():
    """A new parameter value reuses the compiled function: params are leaves, the model is static."""
    model, params = _mlp()
    sde = VPSDE()
    traces = []

    @jax.jit
    def apply(score_fn, x, t):
        traces.append(1)
        return score_fn(x, t)

    x, t = jnp.ones((4, 2)), jnp.full((4,), 0.5)
    out1 = apply(P.make_score_fn(model, params, sde), x, t)
    params2 = jax.tree.map(lambda p: p + 0.1, params)
    out2 = apply(P.make_score_fn(model, params2, sde), x, t)
    assert len(traces) == 1
    assert not np.allclose(out1, out2, rtol=1e-3, atol=1e-3)
    assert len(jax.tree.leaves(P.make_score_fn(model, params, sde))) == len(jax.tree.leaves(params))


def test_classifier_free_guidance():
    model, params = _mlp(num_classes=3)
    sde = VPSDE()
    x, t, y = jnp.ones((4, 2)), jnp.full((4,), 0.4), jnp.array([0, 1, 2, 1])
    cond = _call(P.make_score_fn(model, params, sde, y=y), x, t)
    uncond = _call(P.make_score_fn(model, params, sde, y=jnp.full((4,), 3)), x, t)
    guided = _call(P.make_score_fn(model, params, sde, y=y, guidance_weight=2.0), x, t)
    np.testing.assert_allclose(guided, 3.0 * cond - 2.0 * uncond, rtol=1e-5, atol=1e-5)
    zero = _call(P.make_score_fn(model, params, sde, y=y, guidance_weight=0.0), x, t)
    np.testing.assert_allclose(zero, cond, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="guidance"):
        P.make_score_fn(MLP(), {}, sde, guidance_weight=1.0)
