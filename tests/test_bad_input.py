"""Bad input everywhere: each case is the input tried and the message expected, raised before any compilation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.tree_util import Partial

import jaxdiff
import jaxdiff.data
import jaxdiff.guidance
from jaxdiff import PerExample
from jaxdiff.likelihood import bits_per_dim, log_likelihood
from jaxdiff.models import DDPMpp, NCSNpp
from jaxdiff.parallel import check_batch_size, make_mesh
from jaxdiff.sde import VESDE, VPSDE, SubVPSDE

SDE = VPSDE()
GOOD_SCORE = lambda x, t: -x  # noqa: E731
KEY = jax.random.key(0)


def _sample(**kw):
    args = dict(key=KEY, score_fn=GOOD_SCORE, sde=SDE, shape=(4, 2))
    args.update(kw)
    return jaxdiff.sample(args.pop("key"), args.pop("score_fn"), args.pop("sde"), args.pop("shape"), **args)


def _loss(batch):
    from jaxdiff import losses, models

    model = models.MLP(hidden_sizes=(8,), embedding_size=4, embedding_type="positional")
    params = model.init(KEY, jnp.zeros((4, 2)), jnp.zeros((4,)))
    return losses.make_loss_fn(SDE, model)(params, KEY, batch)


def _unet(model, shape):
    x = jnp.zeros(shape)
    return jax.eval_shape(model.init, {"params": KEY}, x, jnp.zeros((shape[0],)))


CASES = [
    # (what, call, exception, message)
    (
        "sampler: score of the wrong shape",
        lambda: _sample(score_fn=lambda x, t: x[:, :1]),
        ValueError,
        r"score_fn returned shape \(4, 1\) for x of shape \(4, 2\)",
    ),
    (
        "sampler: integer score",
        lambda: _sample(score_fn=lambda x, t: jnp.zeros(x.shape, jnp.int32)),
        ValueError,
        "score must be floating point",
    ),
    (
        "sampler: score_fn with the wrong signature",
        lambda: _sample(score_fn=lambda x: x),
        TypeError,
        r"score_fn\(x, t\)",
    ),
    ("sampler: shape without a batch axis", lambda: _sample(shape=(2,)), ValueError, "shape must be"),
    ("sampler: non-integer shape", lambda: _sample(shape=(4, "a")), ValueError, "shape must be a tuple of ints"),
    ("sampler: not an SDE", lambda: _sample(sde="vp"), TypeError, "sde must be a jaxdiff.sde.SDE"),
    ("sampler: unknown method", lambda: _sample(method="rk45"), ValueError, "unknown sampling method 'rk45'"),
    ("sampler: unknown option", lambda: _sample(method="ode", snr=0.1), ValueError, "unknown option"),
    ("sampler: zero steps", lambda: _sample(steps=0), ValueError, "steps must be a positive integer"),
    ("sampler: eps past T", lambda: _sample(eps=1.5), ValueError, "eps must satisfy"),
    (
        "likelihood: integer data",
        lambda: log_likelihood(KEY, GOOD_SCORE, SDE, jnp.zeros((4, 2), jnp.int32)),
        ValueError,
        "x must be floating point",
    ),
    (
        "likelihood: no batch axis",
        lambda: log_likelihood(KEY, GOOD_SCORE, SDE, jnp.zeros((3,))),
        ValueError,
        r"x must have shape \(batch, \*event_shape\)",
    ),
    (
        "likelihood: score of the wrong shape",
        lambda: log_likelihood(KEY, lambda x, t: x.sum(-1), SDE, jnp.zeros((4, 2))),
        ValueError,
        "score_fn returned shape",
    ),
    (
        "likelihood: per-example labels of another batch size",
        lambda: log_likelihood(
            KEY,
            Partial(lambda m, x, t: -x + 0.0 * jnp.sum(m.value), PerExample(jnp.zeros((3,)))),
            SDE,
            jnp.zeros((4, 2)),
        ),
        ValueError,
        r"score_fn holds per-example data \(labels\) of shape \(3,\), which must lead with the batch size 4",
    ),
    (
        "likelihood: unknown trace",
        lambda: log_likelihood(KEY, GOOD_SCORE, SDE, jnp.zeros((4, 2)), trace="hutch"),
        ValueError,
        "trace must be one of",
    ),
    (
        "likelihood: negative tolerance",
        lambda: log_likelihood(KEY, GOOD_SCORE, SDE, jnp.zeros((4, 2)), rtol=-1.0),
        ValueError,
        "rtol must be a positive finite number, got -1.0",
    ),
    (
        "bits/dim: dequantising float data",
        lambda: bits_per_dim(KEY, GOOD_SCORE, SDE, jnp.zeros((2, 4, 4, 1)), dequantize=True),
        ValueError,
        "dequantize=True needs integer data",
    ),
    # Solver tolerances: zero, negative or NaN would give an unconverged or silently altered solve.
    ("ode: rtol = atol = 0", lambda: _sample(method="ode", rtol=0.0, atol=0.0), ValueError, "rtol must be a positive"),
    ("ode: negative atol", lambda: _sample(method="ode", atol=-1e-5), ValueError, "atol must be a positive finite"),
    ("ode: NaN rtol", lambda: _sample(method="ode", rtol=float("nan")), ValueError, "rtol must be a positive finite"),
    (
        "likelihood: atol = 0",
        lambda: log_likelihood(KEY, GOOD_SCORE, SDE, jnp.zeros((4, 2)), atol=0.0),
        ValueError,
        "atol must be a positive finite number, got 0.0",
    ),
    # Step counts: int32 overflow and grids of gigabytes are refused up front, floats are not counts.
    (
        "sampler: steps = 2**31",
        lambda: _sample(method="ddim", steps=2**31),
        ValueError,
        "steps must be a positive integer of at most 16777216, got 2147483648",
    ),
    ("sampler: steps = 20.0", lambda: _sample(method="pc", steps=20.0), ValueError, "steps must be a positive integer"),
    (
        "ode: max_steps = 2**40",
        lambda: _sample(method="ode", max_steps=2**40),
        ValueError,
        "max_steps must be a positive integer of at most",
    ),
    (
        "sampler: labels of another batch size",
        lambda: _sample(method="ddim", steps=3, score_fn=Partial(lambda m, x, t: -x, PerExample(jnp.zeros((3,))))),
        ValueError,
        r"per-example data \(labels\) of shape \(3,\), which must lead with the batch size 4",
    ),
    # bits/dim: data outside {0..255} or [0, 1] gives a finite, wrong number.
    (
        "bits/dim: 8-bit values as floats",
        lambda: bits_per_dim(KEY, GOOD_SCORE, SDE, jnp.full((2, 4, 4, 1), 255.0)),
        ValueError,
        r"float x must lie in \[0, 1\], got values in \[255, 255\] \(8-bit values as floats",
    ),
    (
        "bits/dim: integers above 255",
        lambda: bits_per_dim(KEY, GOOD_SCORE, SDE, jnp.full((2, 4, 4, 1), 300, jnp.int32)),
        ValueError,
        r"integer x must be 8-bit data in \{0, ..., 255\}, got values in \[300, 300\]",
    ),
    (
        "bits/dim: negative integers",
        lambda: bits_per_dim(KEY, GOOD_SCORE, SDE, jnp.full((2, 4, 4, 1), -1, jnp.int32)),
        ValueError,
        "integer x must be 8-bit data",
    ),
    (
        "bits/dim: data already centred",
        lambda: bits_per_dim(KEY, GOOD_SCORE, SDE, jnp.linspace(-1, 1, 32).reshape(2, 4, 4, 1)),
        ValueError,
        r"float x must lie in \[0, 1\], got values in \[-1, 1\] \(already centred",
    ),
    (
        "bits/dim: empty batch",
        lambda: bits_per_dim(KEY, GOOD_SCORE, SDE, jnp.zeros((0, 4, 4, 1), jnp.uint8)),
        ValueError,
        r"x is empty \(shape \(0, 4, 4, 1\)\)",
    ),
    (
        "bits/dim: NaN in the data",
        lambda: bits_per_dim(KEY, GOOD_SCORE, SDE, jnp.full((2, 4, 4, 1), jnp.nan)),
        ValueError,
        "x contains NaN or infinite values",
    ),
    (
        "bits/dim: boolean data",
        lambda: bits_per_dim(KEY, GOOD_SCORE, SDE, jnp.zeros((2, 4, 4, 1), bool)),
        ValueError,
        "x must be integer data in",
    ),
    # Data and training arguments.
    (
        "data: batch_size = 64.0",
        lambda: jaxdiff.data.get_dataset("gaussian_grid", batch_size=64.0),
        ValueError,
        "batch_size must be a positive integer, got 64.0",
    ),
    (
        "data: seed = -1",
        lambda: jaxdiff.data.get_dataset("gaussian_grid", batch_size=8, seed=-1),
        ValueError,
        "seed must be a non-negative integer, got -1",
    ),
    (
        "loss: a batch without 'x'",
        lambda: _loss({"image": jnp.zeros((4, 2))}),
        ValueError,
        r"batch must have an 'x' entry \(the data\), got keys \['image'\]",
    ),
    ("SDE: N = 10.0", lambda: VPSDE(N=10.0), ValueError, "N must be a positive integer, got 10.0"),
    # The reverse-time SDE is singular at T on the rectified-flow path: its predictors would be NaN or silently wrong.
    *[
        (
            f"rectified flow: {m}",
            lambda m=m: _sample(sde=jaxdiff.RectifiedFlow(), method=m, steps=4),
            ValueError,
            r"steps the reverse-time SDE, which is singular at T=1.0 for RectifiedFlow \(alpha\(T\) = 0\)",
        )
        for m in ("pc", "euler_maruyama", "reverse_diffusion", "ancestral")
    ],
    (
        "rectified flow: inpainting with a predictor",
        lambda: jaxdiff.guidance.inpaint(
            KEY, GOOD_SCORE, jaxdiff.RectifiedFlow(), jnp.zeros((4, 2)), jnp.ones((4, 2)), steps=4
        ),
        ValueError,
        "singular at T=1.0",
    ),
    ("SDE: negative sigma", lambda: VESDE(sigma_min=-0.01), ValueError, "sigma_min must be a finite positive"),
    (
        "SDE: beta_min > beta_max",
        lambda: SubVPSDE(beta_min=30.0, beta_max=20.0),
        ValueError,
        "beta_min must not exceed beta_max",
    ),
    ("SDE: N = 0", lambda: VPSDE(N=0), ValueError, "N must be a positive integer"),
    (
        "model: image size not divisible by the U-Net's down-sampling",
        lambda: _unet(DDPMpp(nf=8, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=()), (2, 6, 6, 1)),
        ValueError,
        "divisible",
    ),
    (
        "model: unknown option string",
        lambda: NCSNpp(nf=8, progressive="sideways").init(KEY, jnp.zeros((1, 8, 8, 1)), jnp.zeros((1,))),
        ValueError,
        "sideways",
    ),
    ("parallel: batch not divisible by the device count", lambda: check_batch_size(12, make_mesh()), ValueError, "12"),
]


@pytest.mark.parametrize("what, call, exc, message", CASES, ids=[c[0] for c in CASES])
def test_bad_input_raises_a_clear_error(what, call, exc, message):
    with pytest.raises(exc, match=message):
        call()


ACCEPTED = [
    # NumPy scalars are accepted wherever Python numbers are (they come out of configs and array code).
    ("numpy steps", lambda: _sample(method="ddim", steps=np.int64(3))),
    ("numpy shape", lambda: _sample(method="ddim", steps=3, shape=(np.int64(4), np.int32(2)))),
    ("numpy eps", lambda: _sample(method="ddim", steps=3, eps=np.float32(1e-3))),
    ("numpy tolerances", lambda: _sample(method="ode", rtol=np.float32(1e-3), atol=np.float64(1e-3))),
    ("numpy SDE parameters", lambda: VPSDE(beta_max=np.float32(20.0), N=np.int64(1000))),
    (
        "numpy batch size and seed",
        lambda: jaxdiff.data.get_dataset("gaussian_grid", batch_size=np.int64(8), seed=np.int32(1)),
    ),
    ("numpy num_probes", lambda: log_likelihood(KEY, GOOD_SCORE, SDE, jnp.zeros((2, 2)), num_probes=np.int64(1))),
]


@pytest.mark.parametrize("what, call", ACCEPTED, ids=[c[0] for c in ACCEPTED])
def test_numpy_scalars_are_accepted(what, call):
    call()


def test_numpy_sde_parameters_give_the_same_sde():
    # Stored as Python numbers: equal and hash-equal to the SDE built from Python numbers (no recompilation).
    a, b = VPSDE(beta_max=np.float32(20.0), N=np.int64(1000)), VPSDE()
    assert a == b and hash(a) == hash(b) and type(a.N) is int and type(a.beta_max) is float


def test_checks_run_before_compilation():
    # A score of the wrong shape is caught by tracing it abstractly, before the sampler is compiled.
    from jaxdiff.samplers import pc

    before = pc._pc._cache_size()
    with pytest.raises(ValueError):
        _sample(score_fn=lambda x, t: x[:, :1], steps=3)
    assert pc._pc._cache_size() == before
    np.testing.assert_equal(jax.device_count(), 8)


def test_score_fn_is_traced_for_the_check_once_per_shape():
    from jaxdiff.samplers._common import check_score_fn

    shapes = []

    def score(x, t):
        shapes.append(x.shape)
        return -x

    check_score_fn(score, (4, 2))
    check_score_fn(score, (4, 2))
    assert shapes == [(4, 2)]
    check_score_fn(score, (3, 2))
    assert shapes == [(4, 2), (3, 2)]
    # A function that failed is not remembered: it fails again, with the same message.
    bad = lambda x, t: x[:, :1]  # noqa: E731
    for _ in range(2):
        with pytest.raises(ValueError, match=r"score_fn returned shape \(4, 1\)"):
            check_score_fn(bad, (4, 2))
