"""Controllable generation against closed-form answers of the Gaussian-mixture oracle."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff import guidance as G
from jaxdiff import models as M
from jaxdiff.oracle import GaussianMixture
from jaxdiff.samplers import sample
from jaxdiff.sde import VPSDE
from tests.helpers import component_masses, four_component_mixture

SDE = VPSDE()


def component(mixture: GaussianMixture, k: int) -> GaussianMixture:
    """Component ``k`` of a mixture, as a one-component mixture."""
    return GaussianMixture([1.0], mixture.means[k : k + 1], mixture.covs[k : k + 1])


def assert_gaussian_moments(x, mean, cov, n_se=5.0):
    """Sample mean and covariance within ``n_se`` Monte-Carlo standard errors of a Gaussian's."""
    x = np.asarray(x, np.float64)
    mean, cov = np.asarray(mean, np.float64), np.asarray(cov, np.float64)
    n = len(x)
    np.testing.assert_allclose(x.mean(0), mean, rtol=0, atol=n_se * np.sqrt(np.diag(cov).max() / n))
    # Var of a Gaussian sample covariance entry: (C_ij^2 + C_ii C_jj) / n.
    se_cov = np.sqrt((cov**2 + np.outer(np.diag(cov), np.diag(cov))) / n)
    diff = np.abs(np.cov(x.T) - cov)
    assert np.all(diff <= n_se * se_cov), f"covariance {np.cov(x.T)} vs {cov}"


# ----------------------------------------------------------------------------------------------------------
# Classifier guidance
# ----------------------------------------------------------------------------------------------------------
def test_exact_mixture_classifier_is_the_responsibilities():
    gm = four_component_mixture()
    x = gm.sample(jax.random.key(0), 64) * 0.7
    t = jnp.linspace(0.01, 1.0, 64)
    log_p = G.mixture_classifier_log_probs(gm, SDE)(x, t)
    np.testing.assert_allclose(jnp.exp(log_p), gm.responsibilities(x, t, SDE), rtol=1e-4, atol=1e-6)


def test_exact_classifier_guidance_gives_the_component_score():
    gm = four_component_mixture()
    x = gm.sample(jax.random.key(1), 32)
    t = jnp.full((32,), 0.3)
    guided = G.classifier_guided_score_fn(gm.score_fn(SDE), G.mixture_classifier_log_probs(gm, SDE), y=1)
    np.testing.assert_allclose(guided(x, t), component(gm, 1).score(x, t, SDE), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "gm,y", [(four_component_mixture(), 1), pytest.param("4d", 2, marks=pytest.mark.slow)], ids=["2d", "4d"]
)
def test_classifier_guidance_samples_one_component(gm, y):
    if gm == "4d":
        rng = np.random.default_rng(0)
        a = rng.normal(size=(3, 4, 4)) * 0.4
        gm = GaussianMixture([0.5, 0.3, 0.2], rng.normal(size=(3, 4)) * 3.0, a @ a.transpose(0, 2, 1) + 0.2 * np.eye(4))
    guided = G.classifier_guided_score_fn(gm.score_fn(SDE), G.mixture_classifier_log_probs(gm, SDE), y=y)
    x, info = sample(jax.random.key(2), guided, SDE, (2000, gm.dim), method="pc", steps=500)
    assert int(info["nonfinite"]) == 0
    assert component_masses(gm, x)[y] >= 0.98
    assert_gaussian_moments(x, gm.means[y], gm.covs[y])


def test_classifier_free_guidance_w0_is_conditional_and_w_sharpens():
    # Component 0 is narrow, component 1 broad around the same centre: p_y^(1+w) / p^w has thinner tails.
    gm = GaussianMixture.isotropic([0.5, 0.5], [[1.0, -1.0], [1.0, -1.0]], [0.5, 1.5])
    cond = component(gm, 0)
    xs = {}
    for w in (0.0, 2.0):
        fn = G.classifier_free_guided_score_fn(cond.score_fn(SDE), gm.score_fn(SDE), w)
        xs[w], _ = sample(jax.random.key(3), fn, SDE, (3000, 2), method="pc", steps=500)
    assert_gaussian_moments(xs[0.0], cond.means[0], cond.covs[0])
    var0, var2 = np.trace(np.cov(np.asarray(xs[0.0]).T)), np.trace(np.cov(np.asarray(xs[2.0]).T))
    assert var2 < 0.85 * var0, (var0, var2)
    np.testing.assert_allclose(np.asarray(xs[2.0]).mean(0), [1.0, -1.0], rtol=0, atol=0.05)


@pytest.mark.slow
def test_noise_conditional_classifier_trains_and_guides():
    gm = four_component_mixture()
    x, y = gm.sample(jax.random.key(4), 4096, return_labels=True)
    model = M.NoiseConditionalClassifier(num_classes=4, hidden_sizes=(64, 64))
    params, losses = M.train_classifier(jax.random.key(5), model, SDE, x, y, steps=300, batch_size=256)
    losses = np.asarray(losses)
    assert np.mean(losses[-50:]) < 0.7 * np.mean(losses[:10])
    log_p = M.make_classifier_log_prob_fn(model, params, SDE)
    # At small t the classifier recovers the labels of well-separated components.
    xt = gm.sample(jax.random.key(6), 512, return_labels=True)
    acc = np.mean(np.asarray(log_p(xt[0], jnp.full((512,), 0.01)).argmax(-1)) == np.asarray(xt[1]))
    assert acc > 0.95
    guided = G.classifier_guided_score_fn(gm.score_fn(SDE), log_p, y=3, scale=1.0)
    out = guided(xt[0], jnp.full((512,), 0.5))
    assert out.shape == (512, 2) and bool(jnp.all(jnp.isfinite(out)))


def test_classifier_names_moved_to_models_still_resolve_in_guidance():
    for name in G._MOVED_TO_MODELS:
        assert getattr(G, name) is getattr(M, name)
    with pytest.raises(AttributeError, match="no attribute 'NoSuchName'"):
        G.NoSuchName  # noqa: B018


@pytest.mark.parametrize("event", [(3,), pytest.param((8, 8, 3), marks=pytest.mark.slow)], ids=["vectors", "images"])
def test_classifier_loss_is_per_example(event):
    model = M.NoiseConditionalClassifier(num_classes=3, conv_channels=(4, 8), hidden_sizes=(16,))
    x = jax.random.normal(jax.random.key(0), (5, *event))
    y = jnp.array([0, 1, 2, 0, 1])
    params = jax.jit(model.init)(jax.random.key(1), x, jnp.zeros((5,)))["params"]
    apply = M.make_classifier_apply(model, SDE)
    loss = M.noise_conditional_classifier_loss(jax.random.key(2), apply, params, SDE, x, y)
    assert loss.shape == (5,) and bool(jnp.all(loss > 0))
    # Per-example randomness: the first examples do not depend on the batch size.
    loss3 = M.noise_conditional_classifier_loss(jax.random.key(2), apply, params, SDE, x[:3], y[:3])
    np.testing.assert_allclose(loss3, loss[:3], rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------
# Inpainting
# ----------------------------------------------------------------------------------------------------------
INPAINT_GM = GaussianMixture(
    [0.3, 0.5, 0.2],
    [[-2.0, -2.0], [1.5, 2.0], [1.0, -2.5]],
    [[[1.0, 0.5], [0.5, 1.0]], [[0.6, -0.3], [-0.3, 0.8]], [[0.5, 0.2], [0.2, 0.7]]],
)
X_KNOWN = 1.0


def exact_conditional(gm: GaussianMixture, xk: float):
    """``p(x_1 | x_0 = xk)``: a 1-D mixture with weights, means and variances in closed form."""
    w, m, c = (np.asarray(a, np.float64) for a in (gm.weights, gm.means, gm.covs))
    log_w = np.log(w) - 0.5 * (xk - m[:, 0]) ** 2 / c[:, 0, 0] - 0.5 * np.log(c[:, 0, 0])
    weights = np.exp(log_w - log_w.max())
    weights /= weights.sum()
    means = m[:, 1] + c[:, 1, 0] / c[:, 0, 0] * (xk - m[:, 0])
    variances = c[:, 1, 1] - c[:, 1, 0] ** 2 / c[:, 0, 0]
    return weights, means, variances


def _inpaint(method, n=5000, **options):
    x0 = jnp.zeros((n, 2)).at[:, 0].set(X_KNOWN)
    return G.inpaint(
        jax.random.key(7), INPAINT_GM.score_fn(SDE), SDE, x0, jnp.array([1.0, 0.0]), method=method, **options
    )


def test_inpainting_pc_keeps_known_and_samples_the_conditional():
    """The replacement method with the paper's Langevin corrector against ``p(x_u | x_k)``.

    Replacement approximates the conditional score by the joint score at a forward-perturbed draw of the known
    part; it is exact only where the corrector equilibrates. With the reference's corrector (``langevin_batch``,
    snr 0.16) this mixture's answer is within Monte-Carlo error: component masses 0.643 / 0.357 for 0.647 / 0.349.
    The predictor alone over-weights the component that is nearer at large ``t`` (0.578 / 0.422); the default,
    batch-free ``langevin`` corrector, whose step is smaller here, lands between (0.614 / 0.386 at snr 0.16,
    0.643 / 0.357 at snr 0.3).
    """
    n = 5000
    x, info = _inpaint("pc", n, steps=500, predictor="reverse_diffusion", corrector="langevin_batch")
    x = np.asarray(x)
    assert np.array_equal(x[:, 0], np.full(n, X_KNOWN, np.float32))  # bit for bit
    weights, means, variances = exact_conditional(INPAINT_GM, X_KNOWN)
    u = x[:, 1].astype(np.float64)
    labels = np.argmax(np.log(weights) - 0.5 * (u[:, None] - means) ** 2 / variances - 0.5 * np.log(variances), 1)
    masses = np.bincount(labels, minlength=3) / n
    np.testing.assert_allclose(masses, weights, rtol=0, atol=4 * np.sqrt(0.25 / n))
    mean = weights @ means
    var = weights @ (variances + means**2) - mean**2
    np.testing.assert_allclose(u.mean(), mean, rtol=0, atol=4 * np.sqrt(var / n))
    np.testing.assert_allclose(u.var(), var, rtol=0.05, atol=0)
    for k in np.flatnonzero(weights > 0.1):  # within each re-weighted component
        uk = u[labels == k]
        np.testing.assert_allclose(uk.mean(), means[k], rtol=0, atol=5 * np.sqrt(variances[k] / len(uk)))
        np.testing.assert_allclose(uk.var(), variances[k], rtol=0.1, atol=0)


@pytest.mark.parametrize(
    "method,options",
    [
        ("pc", dict(predictor="ancestral", corrector="ald", steps=50)),
        ("pc", dict(predictor="euler_maruyama", corrector=None, steps=50)),
        ("ode_euler", dict(steps=50)),
        ("ode", dict(steps=50, denoise=True)),
    ],
)
def test_inpainting_every_sampler_keeps_known_exactly(method, options):
    x, info = _inpaint(method, 256, **options)
    x = np.asarray(x)
    assert np.array_equal(x[:, 0], np.full(256, X_KNOWN, np.float32))
    assert np.all(np.isfinite(x)) and int(info["nonfinite"]) == 0
    # The unknown coordinate lands in the support of the conditional.
    weights, means, variances = exact_conditional(INPAINT_GM, X_KNOWN)
    z = np.min(np.abs(x[:, 1:2] - means[weights > 0.01]) / np.sqrt(variances[weights > 0.01]), axis=1)
    assert np.mean(z < 3.5) > 0.98


def test_inpainting_is_per_example():
    # The default Langevin corrector's step depends on t only, so with it every example is its own.
    a, _ = _inpaint("pc", 8, steps=20)
    b, _ = _inpaint("pc", 3, steps=20)
    np.testing.assert_allclose(a[:3], b, rtol=1e-5, atol=1e-5)


def test_inpainting_rejects_unknown_method():
    with pytest.raises(ValueError, match="unknown method"):
        _inpaint("nope", 4, steps=2)


# ----------------------------------------------------------------------------------------------------------
# Colorization
# ----------------------------------------------------------------------------------------------------------
def test_decoupling_matrix_is_orthogonal_with_gray_first():
    m = G.DECOUPLE
    np.testing.assert_allclose(m.T @ m, np.eye(3), rtol=0, atol=1e-12)
    np.testing.assert_allclose(m[:, 0], np.full(3, 1 / np.sqrt(3)), rtol=0, atol=1e-12)


@pytest.mark.parametrize("method", ["pc", "ode"])
def test_colorize_keeps_the_grayscale(method):
    shape = (4, 4, 3)
    rng = np.random.default_rng(0)
    gm = GaussianMixture.isotropic([0.5, 0.5], rng.uniform(-0.8, 0.8, size=(2, 48)), [0.2, 0.3])
    images = jnp.reshape(gm.sample(jax.random.key(8), 6), (6, *shape))
    gray = G.grayscale(images)
    x, info = G.colorize(jax.random.key(9), gm.score_fn(SDE), SDE, gray, method=method, steps=40)
    assert x.shape == (6, *shape) and int(info["nonfinite"]) == 0
    np.testing.assert_allclose(G.grayscale(x), gray, rtol=0, atol=1e-5)
    assert float(jnp.std(x - gray)) > 0.05  # the colour channels are not simply the gray image


def test_make_mask():
    m = G.make_mask("left_half", (4, 6, 3))
    assert m.shape == (4, 6, 3) and float(m[:, :3].min()) == 1 and float(m[:, 3:].max()) == 0
    c = G.make_mask("center", (2, 8, 8, 1))
    assert float(c[:, 2:6, 2:6].max()) == 0 and float(c.sum()) == 2 * 48
    r = G.make_mask("random", (8, 8, 3), key=jax.random.key(0))
    assert bool(jnp.all(r[..., 0] == r[..., 2]))
