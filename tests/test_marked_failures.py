"""A result is right, marked, or refused: faults injected into one example come back as NaN, counted in
``info["nonfinite"]``, and leave every other example of the batch as it would have been without the fault.

The fault is a score function that is NaN for the examples flagged in a per-example mask (a
:class:`jaxdiff.PerExample` leaf, so per-example solves hand each example its own flag).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.tree_util import Partial

import jaxdiff
from jaxdiff import PerExample
from jaxdiff.likelihood import bits_per_dim, log_likelihood
from jaxdiff.per_example import unwrap
from jaxdiff.samplers import ode as ode_sampler
from jaxdiff.sde import VPSDE
from tests.helpers import four_component_mixture

SDE = VPSDE()
GM = four_component_mixture()
BATCH = 6
BAD = 2  # the example whose score is NaN
KEY = jax.random.key(0)


def _gm_score(flags, x, t):
    score = GM.score_fn(SDE)(x, t)
    bad = jnp.reshape(unwrap(flags), (-1,) + (1,) * (x.ndim - 1))
    return jnp.where(bad, jnp.nan, score)


def _score(bad_index=None, batch=BATCH):
    flags = np.zeros((batch,), bool)
    if bad_index is not None:
        flags[bad_index] = True
    return Partial(_gm_score, PerExample(jnp.asarray(flags)))


def _image_score(flags, x, t):
    # The exact score of N(0.5, 0.1^2) pixels in [0, 1] (uncentred) is elementwise: -(x - a m) / (a^2 s^2 + sigma^2).
    a = SDE.alpha(t)[:, None, None, None]
    s = SDE.sigma(t)[:, None, None, None]
    score = -(x - 0.5 * a) / (0.01 * a**2 + s**2)
    bad = jnp.reshape(unwrap(flags), (-1, 1, 1, 1))
    return jnp.where(bad, jnp.nan, score)


DATA = GM.sample(jax.random.key(1), BATCH)
IMAGES = jnp.asarray(np.random.default_rng(0).integers(100, 156, (BATCH, 2, 2, 1)), jnp.uint8)
TOL = dict(rtol=1e-4, atol=1e-4)

# (name, run(score_fn) -> (output (batch, ...), info), exact): ``exact`` when the unaffected examples must be
# bitwise equal to the fault-free run, else equal to solver tolerance.
CASES = [
    ("ode sample, per-example steps", lambda s: jaxdiff.sample(KEY, s, SDE, (BATCH, 2), method="ode", **TOL), True),
    (
        "ode sample, shared steps",
        lambda s: jaxdiff.sample(KEY, s, SDE, (BATCH, 2), method="ode", per_example_steps=False, **TOL),
        False,
    ),
    ("ode sample, rk4", lambda s: ode_sampler.ode_sample(KEY, s, SDE, (BATCH, 2), method="rk4", steps=8), True),
    ("encode, per-example steps", lambda s: ode_sampler.encode(s, SDE, DATA, **TOL), True),
    ("encode, shared steps", lambda s: ode_sampler.encode(s, SDE, DATA, per_example_steps=False, **TOL), False),
    ("decode", lambda s: ode_sampler.decode(s, SDE, DATA, **TOL), True),
    ("log-likelihood, per-example steps", lambda s: log_likelihood(KEY, s, SDE, DATA, trace="exact", **TOL), True),
    (
        "log-likelihood, shared steps",
        lambda s: log_likelihood(KEY, s, SDE, DATA, trace="exact", per_example_steps=False, **TOL),
        False,
    ),
    ("pc, default corrector", lambda s: jaxdiff.sample(KEY, s, SDE, (BATCH, 2), method="pc", steps=8), True),
    ("reverse diffusion", lambda s: jaxdiff.sample(KEY, s, SDE, (BATCH, 2), method="reverse_diffusion", steps=8), True),
    ("ddim", lambda s: jaxdiff.sample(KEY, s, SDE, (BATCH, 2), method="ddim", steps=8), True),
    ("dpm-solver++", lambda s: jaxdiff.sample(KEY, s, SDE, (BATCH, 2), method="dpm_solver++", steps=8), True),
    ("edm heun", lambda s: jaxdiff.sample(KEY, s, SDE, (BATCH, 2), method="heun", steps=8), True),
]


def _run(case, score_fn):
    _, run, _ = case
    out, info = run(score_fn)
    return np.asarray(out).reshape(out.shape[0], -1), info


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_a_failed_example_is_nan_counted_and_isolated(case):
    clean, clean_info = _run(case, _score())
    faulty, info = _run(case, _score(BAD))
    assert np.all(np.isfinite(clean)) and int(clean_info["nonfinite"]) == 0
    assert np.all(np.isnan(faulty[BAD])), "the failed example must come back as NaN, not as a plausible number"
    assert int(info["nonfinite"]) == 1
    if "success" in info:
        np.testing.assert_array_equal(np.asarray(info["success"]), np.arange(BATCH) != BAD)
    others = np.arange(BATCH) != BAD
    if case[2]:
        np.testing.assert_array_equal(faulty[others], clean[others])
    else:
        # One step size for the batch: the others take other steps once the failed example is dropped, so they
        # agree to the solver's tolerance.
        np.testing.assert_allclose(faulty[others], clean[others], rtol=1e-3, atol=1e-3)


def test_bits_per_dim_of_a_failed_example_is_nan_and_counted():
    ok = Partial(_image_score, PerExample(jnp.zeros((BATCH,), bool)))
    bad = Partial(_image_score, PerExample(jnp.arange(BATCH) == BAD))
    clean, clean_info = bits_per_dim(KEY, ok, SDE, IMAGES, centered=False, trace="exact", **TOL)
    faulty, info = bits_per_dim(KEY, bad, SDE, IMAGES, centered=False, trace="exact", **TOL)
    assert np.all(np.isfinite(clean)) and int(clean_info["nonfinite"]) == 0
    assert np.isnan(faulty[BAD]) and int(info["nonfinite"]) == 1
    others = np.arange(BATCH) != BAD
    np.testing.assert_array_equal(np.asarray(faulty)[others], np.asarray(clean)[others])


@pytest.mark.parametrize("per_example_steps", [True, False])
def test_an_unconverged_solve_is_nan_not_a_wrong_number(per_example_steps):
    # Three steps cannot reach T: every example fails, and none returns the state where the solve stopped.
    logp, info = log_likelihood(
        KEY, _score(), SDE, DATA, trace="exact", max_steps=3, per_example_steps=per_example_steps
    )
    assert np.all(np.isnan(logp)) and int(info["nonfinite"]) == BATCH
    assert not np.any(np.asarray(info["success"]))
    x, info = jaxdiff.sample(KEY, _score(), SDE, (BATCH, 2), method="ode", max_steps=3)
    assert np.all(np.isnan(x)) and int(info["nonfinite"]) == BATCH


def test_shared_steps_are_not_steered_by_a_failed_example():
    # Without the failed example's error in the norm, the batch takes the steps it takes without that example.
    clean = ode_sampler.encode(_score(), SDE, DATA, per_example_steps=False, **TOL)[1]
    faulty = ode_sampler.encode(_score(BAD), SDE, DATA, per_example_steps=False, **TOL)[1]
    assert int(faulty["nfe"]) <= int(clean["nfe"]) + 3 * 6 + 6  # at most the attempts that dropped it


def test_reference_corrector_is_not_switched_off_by_a_failed_example():
    # The batch-averaged corrector leaves non-finite examples out of its means: the others are sampled as in a batch
    # without the failed example (the failed one last, so the others keep their indices and keys).
    kw = dict(method="pc", steps=8, corrector="langevin_batch")
    with_bad, info = jaxdiff.sample(KEY, _score(BATCH - 1), SDE, (BATCH, 2), **kw)
    without, _ = jaxdiff.sample(KEY, _score(batch=BATCH - 1), SDE, (BATCH - 1, 2), **kw)
    assert int(info["nonfinite"]) == 1
    np.testing.assert_allclose(with_bad[:-1], without, rtol=1e-5, atol=1e-5)
    uncorrected, _ = jaxdiff.sample(
        KEY, _score(batch=BATCH - 1), SDE, (BATCH - 1, 2), method="pc", steps=8, corrector=None
    )
    assert not np.allclose(with_bad[:-1], uncorrected, atol=1e-3), "the corrector must still act on the others"


FIXED_STEP = [
    "euler_maruyama",
    "reverse_diffusion",
    "ancestral",
    "annealed_langevin",
    "pc",
    "ddim",
    "dpm_solver++",
    "heun",
]


@pytest.mark.parametrize("method", [*FIXED_STEP, "ode"])
def test_same_key_same_sample_whatever_the_batch_size(method):
    # Every default sampler: example 0 drawn alone and inside a batch of 64. Programs compiled for different shapes
    # may round differently in the last bit (XLA:CPU, measured up to 1.4e-6 on this problem), and an adaptive solver
    # can turn that into a different step sequence: equal to float rounding, and to tolerance for "ode".
    score_fn = GM.score_fn(SDE)
    kw = dict(rtol=1e-5, atol=1e-5) if method == "ode" else dict(steps=10)
    alone, _ = jaxdiff.sample(jax.random.key(3), score_fn, SDE, (1, 2), method=method, **kw)
    batch, _ = jaxdiff.sample(jax.random.key(3), score_fn, SDE, (64, 2), method=method, **kw)
    tol = 1e-3 if method == "ode" else 4e-6
    np.testing.assert_allclose(alone[0], batch[0], rtol=tol, atol=tol)


def test_the_reference_corrector_is_batch_dependent_as_documented():
    # The control for the test above: a batch statistic in the step size changes the sample by far more than rounding.
    score_fn = GM.score_fn(SDE)
    kw = dict(method="pc", steps=10, corrector="langevin_batch")
    alone, _ = jaxdiff.sample(jax.random.key(3), score_fn, SDE, (1, 2), **kw)
    batch, _ = jaxdiff.sample(jax.random.key(3), score_fn, SDE, (64, 2), **kw)
    assert np.max(np.abs(alone[0] - batch[0])) > 1e-3
