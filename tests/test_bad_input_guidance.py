"""Bad input to guidance and the toy data: each case is the input tried and the message expected, raised before
the sampler is compiled; and the one case that can only be marked (labels known only inside ``jax.jit``)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdiff
from jaxdiff import data
from jaxdiff import guidance as G
from jaxdiff.samplers import dpm_solver
from jaxdiff.sde import VPSDE
from tests.helpers import four_component_mixture

SDE = VPSDE()
MIXTURE = four_component_mixture()  # 4 classes
KEY = jax.random.key(0)
BATCH = 8
X_KNOWN = jnp.zeros((BATCH, 2)).at[:, 0].set(1.0)
MASK = jnp.array([1.0, 0.0])
IMAGES = jnp.zeros((2, 4, 4, 3))


def _guided(y, log_prob_y_fn=None, scale=1.0):
    log_prob_y_fn = G.mixture_classifier_log_probs(MIXTURE, SDE) if log_prob_y_fn is None else log_prob_y_fn
    return G.classifier_guided_score_fn(MIXTURE.score_fn(SDE), log_prob_y_fn, y, scale)


def _sample_guided(y, **kw):
    # DPM-Solver++: the score is traced abstractly by jaxdiff.sample before the sampler is compiled.
    guided = _guided(y, **kw)
    return jaxdiff.sample(KEY, guided, SDE, (BATCH, 2), method="dpm_solver++", steps=3)


def _inpaint(score_fn=None, mask=MASK, x_known=X_KNOWN, method="pc"):
    score_fn = MIXTURE.score_fn(SDE) if score_fn is None else score_fn
    return G.inpaint(KEY, score_fn, SDE, x_known, mask, method=method, steps=3)


def _constrained(transform):
    known = jnp.zeros((2, 4, 4, 3))
    constraint = G.Constraint(known, jnp.array([1.0, 0.0, 0.0]), transform)
    return G.constrained_sample(KEY, lambda x, t: -x, SDE, constraint, method="ode_euler", steps=3)


CASES = [
    # (what, call, message, the jitted sampler that must not have compiled)
    (
        "classifier guidance: label = number of classes",
        lambda: _sample_guided(4),
        r"label y=4 is not a class of log_prob_y_fn, which has 4 classes; valid: 0 <= y < 4",
        dpm_solver._dpm_solver_pp,
    ),
    (
        "classifier guidance: one label of a batch past the classes",
        lambda: _sample_guided(jnp.array([0, 1, 2, 3, 0, 1, 9, 3])),
        r"label y=9 is not a class of log_prob_y_fn, which has 4 classes",
        dpm_solver._dpm_solver_pp,
    ),
    (
        "classifier guidance: negative label (wrapped to the last class before)",
        lambda: _guided(-1),
        r"label y=-1 is not a class; valid: 0 <= y < num_classes",
        None,
    ),
    (
        "classifier guidance: labels of another batch size",
        lambda: _guided(jnp.array([0, 1, 2]))(X_KNOWN, jnp.full((BATCH,), 0.5)),
        r"labels y of shape \(3,\) for a batch of 8 examples; valid: one label, or one per example, shape \(8,\)",
        None,
    ),
    (
        "classifier guidance: labels of another batch size, inside jax.jit",
        lambda: jax.jit(lambda y, x, t: _guided(y)(x, t))(jnp.array([0, 1, 2]), X_KNOWN, jnp.full((BATCH,), 0.5)),
        r"labels y of shape \(3,\) for a batch of 8 examples",
        None,
    ),
    (
        "classifier guidance: fractional label (truncated before)",
        lambda: _guided(1.5),
        r"y must be an integer class label or integer labels of shape \(batch,\), got 1.5",
        None,
    ),
    (
        "classifier guidance: log_prob_y_fn without a class axis",
        lambda: _sample_guided(1, log_prob_y_fn=lambda x, t: jnp.zeros(x.shape[:1])),
        r"log_prob_y_fn returned shape \(8,\) for x of shape \(8, 2\); valid: \(batch, num_classes\)",
        dpm_solver._dpm_solver_pp,
    ),
    (
        "classifier guidance: NaN scale",
        lambda: _guided(1, scale=float("nan")),
        "scale must be a finite number, got nan",
        None,
    ),
    (
        "inpaint: score of shape (b, 1) (broadcast before)",
        lambda: _inpaint(score_fn=lambda x, t: x[:, :1]),
        r"score_fn returned shape \(8, 1\) for x of shape \(8, 2\); the score must have the shape of x",
        G._constrained_pc,
    ),
    (
        "inpaint, ODE: score of shape (b, 1)",
        lambda: _inpaint(score_fn=lambda x, t: x[:, :1], method="ode"),
        r"score_fn returned shape \(8, 1\) for x of shape \(8, 2\)",
        G._constrained_ode,
    ),
    (
        "colorize: score of gray images",
        lambda: G.colorize(KEY, lambda x, t: x[..., :1], SDE, IMAGES[..., :1], steps=3),
        r"score_fn returned shape \(2, 4, 4, 1\) for x of shape \(2, 4, 4, 3\)",
        G._constrained_pc,
    ),
    (
        "inpaint: mask of the wrong shape",
        lambda: _inpaint(mask=jnp.array([1.0, 0.0, 1.0])),
        r"mask of shape \(3,\) does not broadcast to the data's shape \(8, 2\); valid: a shape that broadcasts to "
        r"it, e.g. \(2,\) \(the same for every example\) or \(8, 2\)",
        G._constrained_pc,
    ),
    (
        "inpaint: mask of another batch size",
        lambda: _inpaint(mask=jnp.ones((3, 2))),
        r"mask of shape \(3, 2\) does not broadcast to the data's shape \(8, 2\)",
        G._constrained_pc,
    ),
    (
        "inpaint: mask that is not 0/1",
        lambda: _inpaint(mask=jnp.array([0.5, 0.0])),
        r"mask must hold 0 \(unknown\) and 1 \(known\) only, got the value 0.5",
        G._constrained_pc,
    ),
    (
        "inpaint: integer known data",
        lambda: _inpaint(x_known=jnp.zeros((BATCH, 2), jnp.int32)),
        "the known data must be floating point, got dtype int32",
        G._constrained_pc,
    ),
    (
        "constrained sampling: transform of the wrong size",
        lambda: _constrained(jnp.eye(2)),
        r"transform of shape \(2, 2\) for data with 3 channels; valid: an orthogonal \(3, 3\) matrix",
        G._constrained_ode,
    ),
    (
        "constrained sampling: transform that is not orthogonal",
        lambda: _constrained(2.0 * jnp.eye(3)),
        r"transform must be orthogonal",
        G._constrained_ode,
    ),
    (
        "toy data: misspelt split (a new random set before)",
        lambda: data.get_dataset("two_moons", split="tset", batch_size=8, process_index=0, process_count=1),
        r"split='tset' is not a split of the toy data set 'two_moons'; valid: 'train', 'test', 'validation'",
        None,
    ),
]


@pytest.mark.parametrize("what, call, message, jitted", CASES, ids=[c[0] for c in CASES])
def test_bad_input_raises_a_clear_error_before_compiling(what, call, message, jitted):
    before = None if jitted is None else jitted._cache_size()
    with pytest.raises(ValueError, match=message):
        call()
    if jitted is not None:
        assert jitted._cache_size() == before, f"{what}: the sampler was compiled before the input was refused"


def test_good_input_of_the_same_kinds_passes():
    # The checks refuse only what they should: the valid neighbours of the cases above run.
    _, info = _sample_guided(jnp.array([0, 1, 2, 3, 0, 1, 2, 3]))
    assert int(info["nonfinite"]) == 0
    _, info = _sample_guided(np.int64(3))
    assert int(info["nonfinite"]) == 0
    x, info = _inpaint(mask=jnp.ones((BATCH, 2)).at[:, 1].set(0.0), method="ode")
    assert int(info["nonfinite"]) == 0 and bool(jnp.all(x[:, 0] == 1.0))
    assert data.get_dataset("two_moons", split="test", batch_size=8, process_index=0, process_count=1) is not None


def test_labels_known_only_inside_jit_mark_the_bad_example():
    # Inside jax.jit the label values are not known when the function is traced, so they cannot be refused:
    # the example with a label outside [0, 4) gets a NaN score (wrapping or a zero gradient before), the others
    # are exactly those of valid labels.
    x = MIXTURE.sample(jax.random.key(1), BATCH)
    t = jnp.full((BATCH,), 0.3)
    labels = jnp.array([0, 1, 2, 3, -1, 4, 1, 2])

    @jax.jit
    def guided_score(labels, x, t):
        return _guided(labels)(x, t)

    out = np.asarray(guided_score(labels, x, t))
    bad = np.array([False, False, False, False, True, True, False, False])
    assert np.all(np.isnan(out[bad])) and np.all(np.isfinite(out[~bad]))
    expected = np.asarray(_guided(jnp.where(bad, 0, labels))(x, t))
    np.testing.assert_allclose(out[~bad], expected[~bad], rtol=1e-6, atol=1e-6)
