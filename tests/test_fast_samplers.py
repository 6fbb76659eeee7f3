"""DDIM, DPM-Solver++ and EDM's Heun sampler, checked on the Gaussian-mixture oracle's exact score."""

import functools
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff import VESDE, VPSDE, GaussianMixture, SubVPSDE
from jaxdiff.samplers import _common as C
from jaxdiff.samplers import sample
from jaxdiff.samplers.ddim import ddim_sample
from jaxdiff.samplers.dpm_solver import dpm_solver_pp_sample, step_orders
from jaxdiff.samplers.edm import heun_sample
from jaxdiff.samplers.pc import ancestral_sample
from jaxdiff.samplers.schedules import karras_sigmas, time_steps

MIXTURE = GaussianMixture.grid(2, spacing=4.0, std=0.5)  # weights 0.1, 0.2, 0.3, 0.4
SDES = {"vp": VPSDE(), "subvp": SubVPSDE(), "ve": VESDE()}
EPS = 1e-3

# name -> (sampler, options, exact number of score evaluations)
SAMPLERS = {
    "ddim": (ddim_sample, dict(steps=100, time_schedule="quadratic"), 100),
    "ddim_eta_half": (ddim_sample, dict(steps=200, eta=0.5, time_schedule="logsnr", denoise=True), 201),
    "dpm_solver++2M": (dpm_solver_pp_sample, dict(steps=30, order=2), 30),
    "dpm_solver++3M": (dpm_solver_pp_sample, dict(steps=30, order=3, denoise=True), 31),
    "heun": (heun_sample, dict(steps=40), 79),
    "heun_churn": (heun_sample, dict(steps=40, s_churn=10.0, s_tmin=0.05, s_tmax=50.0), 79),
}
# The cheapest case on every SDE by default, the rest on VP; all of them with -m slow.
FAST_CASES = {("dpm_solver++2M", s) for s in SDES} | {(m, "vp") for m in SAMPLERS} | {("heun", "ve")}


def _cases():
    for method in SAMPLERS:
        for name in SDES:
            marks = () if (method, name) in FAST_CASES else (pytest.mark.slow,)
            yield pytest.param(method, name, marks=marks, id=f"{method}-{name}")


def assert_follows_mixture(x, sde):
    """Component masses within 2 points of the weights; mean and covariance within 5 standard errors of p_eps."""
    x = np.asarray(x, np.float64)
    n = x.shape[0]
    # The binomial standard error of a mass is at most 0.005, so 2 points is 4 s.e.
    labels = np.asarray(MIXTURE.responsibilities(jnp.asarray(x)).argmax(-1))
    mass = np.bincount(labels, minlength=4) / n
    np.testing.assert_allclose(mass, MIXTURE.weights, rtol=0, atol=0.02)
    # Samplers stop at eps: the target is p_eps, components widened by sigma(eps) (and scaled by alpha(eps)).
    target = MIXTURE.at_time(EPS, sde)
    mean, cov = np.asarray(target.mean()), np.asarray(target.covariance())
    se_mean = x.std(0) / np.sqrt(n)
    np.testing.assert_allclose(x.mean(0), mean, rtol=0, atol=5 * se_mean.max())
    centred = x - mean
    products = centred[:, :, None] * centred[:, None, :]
    se_cov = products.reshape(n, -1).std(0).reshape(2, 2) / np.sqrt(n)
    assert np.all(np.abs(products.mean(0) - cov) < 5 * se_cov), (products.mean(0), cov, se_cov)


@pytest.mark.parametrize("method, name", list(_cases()))
def test_samples_follow_the_mixture(method, name):
    sde = SDES[name]
    fn, options, nfe = SAMPLERS[method]
    n = 10_000
    x, info = fn(jax.random.key(0), MIXTURE.score_fn(sde), sde, (n, 2), **options)
    assert x.shape == (n, 2)
    assert int(info["nfe"]) == nfe
    assert int(info["nonfinite"]) == 0
    assert_follows_mixture(x, sde)


# --------------------------------------------------------------------------------------------------------
# Exact relations between samplers.
# --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["vp", "ve"])
def test_ddim_eta_one_is_ancestral_sampling(name):
    # Same prior draw, same noise stream, same grid: the two differ only by float32 rounding.
    sde = SDES[name]
    score_fn = MIXTURE.score_fn(sde)
    key, shape = jax.random.key(5), (64, 2)
    x_ddim, info = ddim_sample(key, score_fn, sde, shape, steps=20, eta=1.0, denoise=True)
    x_anc, info_anc = ancestral_sample(key, score_fn, sde, shape, steps=20, denoise=True)
    assert int(info["nfe"]) == int(info_anc["nfe"]) == 21
    scale = float(np.abs(x_anc).max())
    np.testing.assert_allclose(x_ddim, x_anc, rtol=0, atol=2e-5 * scale)


@pytest.mark.parametrize("name", ["vp", "ve"])
def test_dpm_solver_order_one_is_ddim(name):
    sde = SDES[name]
    score_fn = MIXTURE.score_fn(sde)
    key, shape = jax.random.key(6), (64, 2)
    x_dpm, info = dpm_solver_pp_sample(key, score_fn, sde, shape, steps=12, order=1, time_schedule="quadratic")
    x_ddim, _ = ddim_sample(key, score_fn, sde, shape, steps=12, eta=0.0, time_schedule="quadratic")
    assert int(info["nfe"]) == 12
    scale = float(np.abs(x_ddim).max())
    np.testing.assert_allclose(x_dpm, x_ddim, rtol=0, atol=2e-6 * scale)


# --------------------------------------------------------------------------------------------------------
# Convergence order on the probability-flow ODE.
# --------------------------------------------------------------------------------------------------------
# name -> (sampler, options, step counts, (low, high) bounds on the fitted order)
SOLVERS = {
    "ddim": (ddim_sample, dict(time_schedule="logsnr"), (20, 40, 80), (0.7, 1.6)),
    "dpm_solver++1": (dpm_solver_pp_sample, dict(order=1, time_schedule="quadratic"), (20, 40, 80), (0.7, 1.6)),
    "dpm_solver++2M": (dpm_solver_pp_sample, dict(order=2), (20, 40, 80), (1.6, 2.5)),
    # The published 3M halves the x0'' term: order 2 asymptotically, 2.25-2.36 measured here on VP, sub-VP, VE;
    # the Taylor variant measures 2.75-3.05. The bounds separate the two.
    "dpm_solver++3M": (dpm_solver_pp_sample, dict(order=3), (40, 80, 160), (1.8, 2.5)),
    "dpm_solver++3M_taylor": (dpm_solver_pp_sample, dict(order=3, variant="taylor"), (40, 80, 160), (2.6, 3.4)),
    "heun": (heun_sample, dict(), (10, 20, 40), (1.6, 2.6)),
}
# DPM-Solver++1 is DDIM (test_dpm_solver_order_one_is_ddim), so by default it is left to the slow run.
FAST_SOLVERS = {
    ("ddim", "vp"),
    ("dpm_solver++2M", "vp"),
    ("dpm_solver++3M", "vp"),
    ("dpm_solver++3M_taylor", "vp"),
    ("heun", "vp"),
}


@functools.cache
def _pf_reference(name):
    """A very-many-step third-order solution of the probability-flow ODE from the prior draws of key 7."""
    sde = SDES[name]
    score_fn = MIXTURE.score_fn(sde)
    x, _ = dpm_solver_pp_sample(jax.random.key(7), score_fn, sde, (32, 2), steps=2000, order=3, variant="taylor")
    return np.asarray(x, np.float64)


def _solver_cases():
    for solver in SOLVERS:
        for name in SDES:
            marks = () if (solver, name) in FAST_SOLVERS else (pytest.mark.slow,)
            yield pytest.param(solver, name, marks=marks, id=f"{solver}-{name}")


@pytest.mark.parametrize("solver, name", list(_solver_cases()))
def test_convergence_order(solver, name):
    sde = SDES[name]
    fn, options, steps, (low, high) = SOLVERS[solver]
    reference = _pf_reference(name)
    errors = []
    for n in steps:
        x, _ = fn(jax.random.key(7), MIXTURE.score_fn(sde), sde, (32, 2), steps=n, **options)
        errors.append(np.sqrt(np.mean((np.asarray(x, np.float64) - reference) ** 2)))
    # Converging to the same ODE solution, not just at some rate.
    assert errors[0] > errors[1] > errors[2] and errors[2] < 0.1, errors
    # The error falls as steps^-order: the order is the slope of log error on log steps.
    order = -np.polyfit(np.log(steps), np.log(errors), 1)[0]
    assert low < order < high, (solver, order, errors)


# --------------------------------------------------------------------------------------------------------
# DPM-Solver++(3M): both variants, against an independent float64 write-up of the published formulas.
# --------------------------------------------------------------------------------------------------------
def _mixture_score_f64(x, alpha, sigma):
    """The exact score of the mixture perturbed to ``N(alpha m_k, alpha^2 C_k + sigma^2 I)``, in float64 NumPy."""
    w, m, c = (np.asarray(a, np.float64) for a in (MIXTURE.weights, MIXTURE.means, MIXTURE.covs))
    cov = alpha**2 * c + sigma**2 * np.eye(c.shape[-1])
    prec = np.linalg.inv(cov)
    diff = x[:, None, :] - alpha * m[None]  # (n, K, d)
    maha = np.einsum("nki,kij,nkj->nk", diff, prec, diff)
    log_p = np.log(w) - 0.5 * maha - 0.5 * np.linalg.slogdet(cov)[1]
    resp = np.exp(log_p - log_p.max(1, keepdims=True))
    resp /= resp.sum(1, keepdims=True)
    return -np.einsum("nk,kij,nkj->ni", resp, prec, diff)


def _dpm_solver_3m_f64(x, ts, sde, steps, variant):
    """DPM-Solver++(3M) written from the DPM-Solver code's formulas (multistep updates in lambda), in float64.

    ``phi_1 = e^{-h} - 1``, ``phi_2 = phi_1 / h + 1``, ``phi_3 = phi_2 / h - 0.5``;
    ``x_t = sigma_t / sigma_s x - alpha_t phi_1 D0 + alpha_t phi_2 D1 - alpha_t phi_3 D2`` with
    ``D2 = (D1_0 - D1_1) / (r0 + r1)``; the Taylor variant takes twice that ``D2``. Order 2 is the
    ``dpmsolver`` form ``- alpha_t phi_1 (D0 + D1 / 2)``, order 1 DDIM.
    """
    alpha = np.asarray(sde.alpha(ts), np.float64)
    sigma = np.asarray(sde.sigma(ts), np.float64)
    lam = np.log(alpha) - np.log(sigma)
    preds = []
    for i, order in enumerate(step_orders(steps, 3)):
        preds.append((x + sigma[i] ** 2 * _mixture_score_f64(x, alpha[i], sigma[i])) / alpha[i])
        h = lam[i + 1] - lam[i]
        phi_1 = np.expm1(-h)
        x = sigma[i + 1] / sigma[i] * x - alpha[i + 1] * phi_1 * preds[-1]
        if order >= 2:
            r0 = (lam[i] - lam[i - 1]) / h
            d1_0 = (preds[-1] - preds[-2]) / r0
        if order == 2:
            x = x - 0.5 * alpha[i + 1] * phi_1 * d1_0
        if order == 3:
            r1 = (lam[i - 1] - lam[i - 2]) / h
            d1_1 = (preds[-2] - preds[-3]) / r1
            d1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)
            d2 = (d1_0 - d1_1) / (r0 + r1) * (2.0 if variant == "taylor" else 1.0)
            phi_2 = phi_1 / h + 1.0
            phi_3 = phi_2 / h - 0.5
            x = x + alpha[i + 1] * phi_2 * d1 - alpha[i + 1] * phi_3 * d2
    return x


@pytest.mark.parametrize("variant", ["published", "taylor"])
@pytest.mark.parametrize("name", ["vp", "ve"])
def test_dpm_solver_3m_matches_an_independent_derivation(variant, name):
    sde = SDES[name]
    key, shape, steps = jax.random.key(8), (32, 2), 12  # 12 < 15: warm-up 1, 2 and lowered final orders 2, 1
    x, info = dpm_solver_pp_sample(key, MIXTURE.score_fn(sde), sde, shape, steps=steps, order=3, variant=variant)
    assert int(info["nfe"]) == steps
    x_T = np.asarray(C.prior_sample(C.example_keys(key, shape[0]), sde, shape[1:]), np.float64)
    ts = time_steps(sde, steps, EPS, "logsnr")
    expected = {v: _dpm_solver_3m_f64(x_T, ts, sde, steps, v) for v in ("published", "taylor")}
    # float32 against float64: a few 1e-6 of the data's scale; the two variants differ by about 0.05 here.
    scale = float(np.abs(expected[variant]).max())
    np.testing.assert_allclose(x, expected[variant], rtol=0, atol=2e-5 * scale)
    other = "taylor" if variant == "published" else "published"
    assert np.median(np.linalg.norm(expected[other] - expected[variant], axis=-1)) > 100 * 2e-5 * scale


def test_dpm_solver_variants_by_name():
    sde = SDES["vp"]
    score_fn = MIXTURE.score_fn(sde)
    key, shape = jax.random.key(9), (16, 2)
    run = functools.partial(sample, key, score_fn, sde, shape, method="dpm_solver++", steps=16)
    default, _ = run(order=3)
    published, _ = run(order=3, variant="published")
    taylor, _ = run(order=3, variant="taylor")
    np.testing.assert_array_equal(default, published)
    assert float(np.max(np.abs(taylor - published))) > 1e-3  # (orders 1 and 2: the derivation test above)


def test_heun_sigma_grid_is_edm_schedule():
    sigmas = karras_sigmas(4, 0.002, 80.0, 7.0)
    ramp = np.linspace(0.0, 1.0, 5)
    expected = (80.0 ** (1 / 7) + ramp * (0.002 ** (1 / 7) - 80.0 ** (1 / 7))) ** 7
    np.testing.assert_allclose(sigmas, expected, rtol=1e-5, atol=0)


@pytest.mark.parametrize("schedule", ["uniform", "quadratic", "logsnr"])
@pytest.mark.parametrize("name", list(SDES))
def test_time_grids(schedule, name):
    sde = SDES[name]
    ts = np.asarray(time_steps(sde, 8, EPS, schedule))
    assert ts.shape == (9,)
    np.testing.assert_allclose([ts[0], ts[-1]], [sde.T, EPS], rtol=1e-6, atol=0)
    assert np.all(np.diff(ts) < 0)
    if schedule == "logsnr":
        lam = np.asarray(sde.log_snr(jnp.asarray(ts)), np.float64)
        np.testing.assert_allclose(np.diff(lam), np.full(8, (lam[-1] - lam[0]) / 8), rtol=2e-3, atol=0)
    if schedule == "quadratic":
        np.testing.assert_allclose(np.diff(np.sqrt(ts)), np.full(8, (np.sqrt(EPS) - 1) / 8), rtol=1e-4, atol=0)


def test_step_orders_warm_up_and_lower_final():
    np.testing.assert_array_equal(step_orders(6, 3), [1, 2, 3, 3, 2, 1])
    np.testing.assert_array_equal(step_orders(6, 3, lower_order_final=False), [1, 2, 3, 3, 3, 3])
    np.testing.assert_array_equal(step_orders(20, 2)[[0, 1, -1]], [1, 2, 2])  # 15 steps and more: no lowering
    np.testing.assert_array_equal(step_orders(3, 1), [1, 1, 1])


# --------------------------------------------------------------------------------------------------------
# Reproducibility, the dispatcher, NFE and errors.
# --------------------------------------------------------------------------------------------------------
REPRO = {
    "ddim": dict(steps=5, eta=0.7),
    "dpm_solver++": dict(steps=6, order=3, denoise=True),
    "heun": dict(steps=4, s_churn=5.0),
}
REPRO_NFE = {"ddim": 5, "dpm_solver++": 7, "heun": 7}


@pytest.mark.parametrize("method", list(REPRO))
def test_same_key_same_samples_whatever_the_batch(method):
    sde = SDES["vp"]
    score_fn = MIXTURE.score_fn(sde)
    key = jax.random.key(3)
    options = dict(REPRO[method])
    steps = options.pop("steps")
    x8, info = sample(key, score_fn, sde, (8, 2), method=method, steps=steps, **options)
    x8_again, _ = sample(key, score_fn, sde, (8, 2), method=method, steps=steps, **options)
    x16, _ = sample(key, score_fn, sde, (16, 2), method=method, steps=steps, **options)
    assert int(info["nfe"]) == REPRO_NFE[method]
    np.testing.assert_array_equal(x8, x8_again)
    # Per-example randomness: the first 8 of 16 are the batch of 8, up to float32 rounding that depends on the
    # batch size in XLA's vectorised arithmetic (Heun's VP start at sigma ~ 150 amplifies it to ~1e-5).
    np.testing.assert_allclose(x16[:8], x8, rtol=1e-5, atol=1e-5)
    x_other, _ = sample(jax.random.key(4), score_fn, sde, (8, 2), method=method, steps=steps, **options)
    assert not np.allclose(x_other, x8, rtol=0, atol=1e-3)


@pytest.mark.parametrize(
    "method, options, message",
    [
        ("dpm_solver++", dict(order=4), "order must be 1, 2 or 3"),
        ("dpm_solver++", dict(order=3, variant="exact"), "variant must be one of 'published', 'taylor', got 'exact'"),
        ("dpm_solver++", dict(time_schedule="cosine"), "unknown time_schedule 'cosine'"),
        ("dpm_solver++", dict(eps=0.0), "needs eps > 0"),
        ("ddim", dict(time_schedule="karras"), "unknown time_schedule 'karras'"),
        ("ddim", dict(eta=1.5), "eta must be in"),
        ("ddim", dict(eps=1.0), "eps must satisfy"),
        ("ddim", dict(eps=0.0, time_schedule="logsnr"), "needs eps > 0"),
        ("heun", dict(rho=0.0), "rho must be"),
        ("heun", dict(sigma_max=1e4), "covers noise levels"),
        ("heun", dict(sigma_min=2.0, sigma_max=1.0), "sigma_min must be below sigma_max"),
        ("heun", dict(s_churn=-1.0), "s_churn"),
        ("heun", dict(s_tmin=2.0, s_tmax=1.0), "s_tmin <= s_tmax"),
    ],
)
def test_bad_options_raise(method, options, message):
    sde = SDES["vp"]
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        sample(jax.random.key(0), MIXTURE.score_fn(sde), sde, (4, 2), method=method, steps=3, **options)


def test_bad_steps_and_unknown_options_raise():
    sde = SDES["ve"]
    score_fn = MIXTURE.score_fn(sde)
    with pytest.raises(ValueError, match="steps must be a positive integer"):
        dpm_solver_pp_sample(jax.random.key(0), score_fn, sde, (4, 2), steps=0)
    with pytest.raises(ValueError, match="unknown option"):
        sample(jax.random.key(0), score_fn, sde, (4, 2), method="heun", order=2)
    # VE's noise levels stop at its own sigma_min: asking for less is not defined.
    with pytest.raises(ValueError, match="covers noise levels"):
        heun_sample(jax.random.key(0), score_fn, sde, (4, 2), sigma_min=1e-3)


def test_defaults_and_single_step():
    defaults = {
        fn: inspect.signature(fn).parameters["steps"].default for fn in (ddim_sample, dpm_solver_pp_sample, heun_sample)
    }
    assert set(defaults.values()) == {None}  # None means the documented default below
    sde = SDES["ve"]
    score_fn = MIXTURE.score_fn(sde)
    key, shape = jax.random.key(0), (4, 2)
    _, info = dpm_solver_pp_sample(key, score_fn, sde, shape)
    assert int(info["nfe"]) == 20
    # One Heun step is one Euler step from sigma_max to sigma_min: one evaluation, landing near the mixture mean.
    x, info = heun_sample(key, score_fn, sde, shape, steps=1)
    assert int(info["nfe"]) == 1
    np.testing.assert_allclose(x, np.broadcast_to(MIXTURE.mean(), shape), rtol=0, atol=0.5)
