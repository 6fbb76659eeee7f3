"""Tests of the score networks (``jaxdiff.models``).

Initialising a U-Net compiles one random-number program per parameter, which is slow on CPU, so
most tests draw parameters of the right shapes (from ``jax.eval_shape``) with numpy and only apply
the network; a few tests exercise ``model.init`` itself on the smallest configuration.
"""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.models import MLP, DDPMpp, NCSNpp, get_model
from jaxdiff.models._embedding import GaussianFourierProjection, sinusoidal_embedding
from jaxdiff.models._fir import downsample_2d, fir_filter, upsample_2d

# RngBitGenerator keys: their random-bit programs compile far faster on CPU than threefry ones.
KEY = jax.random.key(0, impl="rbg")
TINY = dict(nf=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), dropout=0.1)


def _jit(fun, **kwargs):
    """``jax.jit`` without LLVM optimisation: these tiny programs compile about twice as fast."""
    return jax.jit(fun, compiler_options={"xla_backend_optimization_level": 0}, **kwargs)


def _count(tree) -> int:
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))


def _fake_variables(model, x, s, y=None, seed=0):
    """Random parameters of the right shapes, without compiling the initialisers."""
    shapes = jax.eval_shape(model.init, KEY, x, s, y)
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda a: jnp.asarray(rng.normal(0.0, 0.2, a.shape), a.dtype), shapes)


def _inputs(batch=2, size=16, channels=3, seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(batch, size, size, channels)), jnp.float32)
    s = jnp.asarray(rng.uniform(-1.0, 1.0, size=(batch,)), jnp.float32)
    return x, s


# -- U-Net option combinations (traced, not compiled: shapes only) ---------------------------------
def _combinations():
    """Every (progressive, progressive_input) pair; the other options alternate between cases."""
    cases = []
    pairs = itertools.product(("none", "output_skip", "residual"), ("none", "input_skip", "residual"))
    for i, (prog, prog_in) in enumerate(pairs):
        options = dict(
            resblock_type=("ddpm", "biggan")[i % 2],
            progressive=prog,
            progressive_input=prog_in,
            progressive_combine=("sum", "cat")[(i // 2) % 2],
            embedding_type=("fourier", "positional")[(i // 3) % 2],
            fir=bool((i // 2) % 2),
            skip_rescale=i % 3 != 0,
            resamp_with_conv=i % 4 != 0,
            num_classes=(None, 10)[(i // 4) % 2],
            conditional=i != 5,
        )
        cases.append((options, (16, 8)[(i // 3) % 2]))
    return cases


def _case_id(case):
    options, size = case
    return f"{size}px-" + "-".join(str(v) for v in options.values())


def _output_shape(model, x, s, y=None):
    out, variables = jax.eval_shape(lambda: model.init_with_output(KEY, x, s, y))
    return out, variables


@pytest.mark.parametrize("case", _combinations(), ids=_case_id)
def test_unet_output_shape(case):
    options, size = case
    model = NCSNpp(**{**TINY, **options})
    x, s = _inputs(size=size)
    y = None if model.num_classes is None else jnp.array([0, model.num_classes])  # incl. null
    out, _ = _output_shape(model, x, s, y)
    assert (out.shape, out.dtype) == (x.shape, x.dtype)


def test_combinations_cover_every_option_value():
    seen = {}
    for options, size in _combinations():
        for name, value in {**options, "size": size}.items():
            seen.setdefault(name, set()).add(value)
    assert seen["resblock_type"] == {"ddpm", "biggan"}
    assert seen["progressive"] == {"none", "output_skip", "residual"}
    assert seen["progressive_input"] == {"none", "input_skip", "residual"}
    assert seen["progressive_combine"] == {"sum", "cat"}
    assert seen["embedding_type"] == {"fourier", "positional"}
    for flag in ("fir", "skip_rescale", "resamp_with_conv", "conditional"):
        assert seen[flag] == {False, True}
    assert seen["num_classes"] == {None, 10}
    assert seen["size"] == {8, 16}


@pytest.mark.slow
@pytest.mark.parametrize(
    "block, prog, prog_in, combine, emb, fir",
    list(
        itertools.product(
            ("ddpm", "biggan"),
            ("none", "output_skip", "residual"),
            ("none", "input_skip", "residual"),
            ("sum", "cat"),
            ("fourier", "positional"),
            (False, True),
        )
    ),
)
def test_unet_output_shape_all_combinations(block, prog, prog_in, combine, emb, fir):
    model = NCSNpp(
        **TINY,
        resblock_type=block,
        progressive=prog,
        progressive_input=prog_in,
        progressive_combine=combine,
        embedding_type=emb,
        fir=fir,
    )
    x, s = _inputs(size=8)
    out, _ = _output_shape(model, x, s)
    assert out.shape == x.shape


def test_three_levels_and_non_square_images():
    model = DDPMpp(**{**TINY, "ch_mult": (1, 2, 2), "attn_resolutions": (4,)})
    x = jnp.zeros((1, 8, 12, 1))
    out, _ = _output_shape(model, x, jnp.zeros((1,)))
    assert out.shape == x.shape


def test_ddpmpp_is_ncsnpp_with_other_defaults():
    assert issubclass(DDPMpp, NCSNpp)
    assert (NCSNpp().embedding_type, DDPMpp().embedding_type) == ("fourier", "positional")
    assert (NCSNpp().fir, DDPMpp().fir) == (True, False)
    assert (NCSNpp().progressive_input, DDPMpp().progressive_input) == ("residual", "none")


def test_config_values_are_normalised():
    model = NCSNpp(ch_mult=[1, 2], fir_kernel=[1, 3, 3, 1], resblock_type="BigGAN")
    assert model.ch_mult == (1, 2)
    assert model.fir_kernel == (1, 3, 3, 1)
    assert model.resblock_type == "biggan"


# -- behaviour (one small class-conditional U-Net with FIR, compiled once per train flag) ---------
@pytest.fixture(scope="module")
def small_unet():
    model = NCSNpp(**{**TINY, "nf": 8, "attn_resolutions": (4,)}, num_classes=4)
    rng = np.random.default_rng(1)
    # Rows are independent examples; each pair differs in one input only.
    x = jnp.asarray(rng.normal(size=(4, 8, 8, 3)), jnp.float32)
    x = x.at[1].set(x[0]).at[2].set(x[0])
    s = jnp.array([0.3, -0.7, 0.3, 0.1])  # rows 0, 1: same x and label, other noise level
    y = jnp.array([2, 2, 4, 1])  # rows 0, 2: same x and noise level, label vs null class
    variables = _fake_variables(model, x, s, y)
    apply = _jit(model.apply, static_argnames="train")
    return model, apply, variables, x, s, y


def test_unet_is_deterministic_and_conditioned(small_unet):
    model, apply, variables, x, s, y = small_unet
    out = apply(variables, x, s, y)
    np.testing.assert_array_equal(out, apply(variables, x, s, y))
    np.testing.assert_array_equal(out, apply(variables, x, s, y, train=False))
    assert out.shape == x.shape and bool(jnp.all(jnp.isfinite(out)))
    assert float(jnp.max(jnp.abs(out[0] - out[1]))) > 1e-3  # noise level matters
    assert float(jnp.max(jnp.abs(out[0] - out[2]))) > 1e-3  # label vs null class matters
    table = variables["params"]["label_embed"]["embedding"]
    assert table.shape[0] == model.num_classes + 1  # last row: the null class


def test_unet_examples_are_independent(small_unet):
    # GroupNorm and attention must act within an example: changing row 3 leaves rows 0-2 alone.
    _, apply, variables, x, s, y = small_unet
    out = apply(variables, x, s, y)
    changed = apply(variables, x.at[3].multiply(-2.0), s.at[3].set(5.0), y.at[3].set(0))
    np.testing.assert_allclose(changed[:3], out[:3], rtol=1e-5, atol=1e-6)
    assert float(jnp.max(jnp.abs(changed[3] - out[3]))) > 1e-3


def test_unet_dropout_only_in_train_mode(small_unet):
    _, apply, variables, x, s, y = small_unet
    evals = apply(variables, x, s, y)
    k1, k2 = jax.random.key(1, impl="rbg"), jax.random.key(2, impl="rbg")
    train_1 = apply(variables, x, s, y, train=True, rngs={"dropout": k1})
    np.testing.assert_array_equal(train_1, apply(variables, x, s, y, train=True, rngs={"dropout": k1}))
    train_2 = apply(variables, x, s, y, train=True, rngs={"dropout": k2})
    assert float(jnp.max(jnp.abs(train_1 - train_2))) > 1e-4
    assert float(jnp.max(jnp.abs(train_1 - evals))) > 1e-4


def test_unconditional_model_has_no_time_embedding():
    model = NCSNpp(**TINY, conditional=False)
    _, variables = _output_shape(model, *_inputs(size=8))
    assert "temb_dense_0" not in variables["params"]
    assert "fourier_proj" not in variables["params"]


@pytest.mark.slow
def test_unet_init_is_deterministic_and_residual_branches_start_small():
    model = NCSNpp(nf=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), dropout=0.0)
    x, s = _inputs(batch=1, size=4, channels=1)
    init = _jit(model.init)
    v1, v2 = init(KEY, x, s), init(KEY, x, s)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), v1, v2)
    out = model.apply(v1, x, s)
    # init_scale=0: the output convolution starts with weights of scale ~1e-5.
    assert float(jnp.max(jnp.abs(out))) < 1e-3


def test_fourier_projection_is_frozen():
    proj = GaussianFourierProjection(embedding_size=256, scale=16.0)
    s = jnp.array([0.1, -2.0])

    @_jit
    def init_and_grad(key):
        variables = proj.init(key, s)
        return variables, jax.grad(lambda v: jnp.sum(proj.apply(v, s) ** 2))(variables)

    variables, grad = init_and_grad(KEY)
    np.testing.assert_array_equal(grad["params"]["W"], np.zeros(256))
    np.testing.assert_allclose(jnp.std(variables["params"]["W"]), 16.0, rtol=0.2)
    assert proj.apply(variables, s).shape == (2, 512)


def test_sinusoidal_embedding_formula():
    s = jnp.array([0.0, 3.0, 999.0])
    emb = sinusoidal_embedding(s, 6)
    freqs = np.exp(-np.log(10_000.0) * np.arange(3) / 2)
    expected = np.concatenate([np.sin(np.outer(s, freqs)), np.cos(np.outer(s, freqs))], axis=1)
    np.testing.assert_allclose(emb, expected, rtol=1e-5, atol=1e-5)
    assert sinusoidal_embedding(s, 7).shape == (3, 7)


# -- FIR resampling -----------------------------------------------------------------------------
def test_fir_filter_is_normalised():
    k = fir_filter((1, 3, 3, 1))
    assert k.shape == (4, 4)
    np.testing.assert_allclose(k.sum(), 1.0, rtol=1e-6)
    np.testing.assert_allclose(k, np.outer([1, 3, 3, 1], [1, 3, 3, 1]) / 64.0, rtol=1e-6)


def test_fir_resampling_preserves_constants_and_box_filter_is_average_pooling():
    @_jit
    def resample(x, z):
        fir = (upsample_2d(x, (1, 3, 3, 1)), downsample_2d(x, (1, 3, 3, 1)))
        return fir + (upsample_2d(z, (1, 1)), downsample_2d(z, (1, 1)))

    x = jnp.full((1, 8, 8, 2), 3.0)
    z = jnp.arange(32.0).reshape(1, 4, 4, 2)
    up, down, z_up, z_down = resample(x, z)
    assert up.shape == (1, 16, 16, 2) and down.shape == (1, 4, 4, 2)
    np.testing.assert_allclose(up[:, 2:-2, 2:-2], 3.0, rtol=1e-6)
    np.testing.assert_allclose(down[:, 1:-1, 1:-1], 3.0, rtol=1e-6)
    pooled = z.reshape(1, 2, 2, 2, 2, 2).mean(axis=(2, 4))
    np.testing.assert_allclose(z_down, pooled, rtol=1e-6, atol=1e-6)
    nearest = jnp.repeat(jnp.repeat(z, 2, 1), 2, 2)
    np.testing.assert_allclose(z_up, nearest, rtol=1e-6, atol=1e-6)


# -- MLP ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs",
    [
        dict(),
        dict(embedding_type="positional", dropout=0.5),
        dict(num_classes=5),
        dict(conditional=False, num_classes=2),
    ],
)
def test_mlp_shapes_determinism_and_dropout(kwargs):
    model = MLP(hidden_sizes=(32, 32), embedding_size=16, **kwargs)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 3)), jnp.float32)
    s = jnp.linspace(-1.0, 1.0, 4)
    y = None if model.num_classes is None else jnp.array([0, 1, 1, model.num_classes])
    variables = _fake_variables(model, x, s, y)
    apply = _jit(model.apply, static_argnames="train")
    out = apply(variables, x, s, y)
    assert out.shape == x.shape
    np.testing.assert_array_equal(out, apply(variables, x, s, y))
    if model.dropout > 0:
        key = jax.random.key(3, impl="rbg")
        train = apply(variables, x, s, y, train=True, rngs={"dropout": key})
        assert float(jnp.max(jnp.abs(train - out))) > 1e-4


def test_mlp_init_is_deterministic():
    model = MLP(hidden_sizes=(16,), embedding_size=8, num_classes=3)
    x, s, y = jnp.ones((2, 2)), jnp.zeros((2,)), jnp.array([0, 3])
    init = _jit(model.init)
    v1, v2 = init(KEY, x, s, y), init(KEY, x, s, y)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), v1, v2)
    assert v1["params"]["label_embed"]["embedding"].shape == (4, 8)  # + the null class


def test_mlp_errors():
    model = MLP(hidden_sizes=(8,))
    x, s = jnp.ones((4, 2)), jnp.zeros((4,))
    v = jax.eval_shape(model.init, KEY, x, s)
    check = lambda *args: jax.eval_shape(model.apply, v, *args)
    with pytest.raises(ValueError, match="shape \\(batch, d\\)"):
        check(jnp.ones((4, 2, 1)), s)
    with pytest.raises(ValueError, match="initialised for d=2"):
        check(jnp.ones((4, 3)), s)
    with pytest.raises(ValueError, match="noise_cond"):
        check(x, jnp.zeros((4, 1)))
    with pytest.raises(ValueError, match="without class conditioning"):
        check(x, s, jnp.zeros((4,), jnp.int32))
    with pytest.raises(ValueError, match="embedding_type"):
        MLP(embedding_type="learned")


# -- errors, all raised while tracing (before any compilation) ----------------------------------
def test_option_strings_are_checked_at_construction():
    bad = {
        "resblock_type": ("resnet", "'ddpm', 'biggan'"),
        "progressive": ("input_skip", "'none', 'output_skip', 'residual'"),
        "progressive_input": ("output_skip", "'none', 'input_skip', 'residual'"),
        "progressive_combine": ("mean", "'sum', 'cat'"),
        "embedding_type": ("learned", "'fourier', 'positional'"),
    }
    for name, (value, valid) in bad.items():
        with pytest.raises(ValueError, match=f"{name}='{value}'.*{valid}"):
            NCSNpp(**{name: value})
    with pytest.raises(ValueError, match="dropout"):
        NCSNpp(dropout=1.0)
    with pytest.raises(ValueError, match="num_classes"):
        DDPMpp(num_classes=0)


def test_image_size_must_be_divisible():
    model = NCSNpp(**{**TINY, "ch_mult": (1, 2, 2)})
    x, s = _inputs(size=6)
    with pytest.raises(ValueError, match="not divisible by 2\\*\\*\\(len\\(ch_mult\\)-1\\) = 4"):
        jax.eval_shape(model.init, KEY, x, s)
    with pytest.raises(ValueError, match="NHWC"):
        jax.eval_shape(model.init, KEY, x[..., 0], s)


def test_input_errors(small_unet):
    model, _, variables, x, s, y = small_unet
    check = lambda *args: jax.eval_shape(model.apply, variables, *args)
    with pytest.raises(ValueError, match="initialised for 3 input channels"):
        check(x[..., :1], s, y)
    for bad_s in (jnp.zeros(()), jnp.zeros((4, 1)), jnp.zeros((3,))):
        with pytest.raises(ValueError, match="noise_cond must have shape \\(batch,\\) = \\(4,\\)"):
            check(x, bad_s, y)
    with pytest.raises(ValueError, match="class-conditional"):
        check(x, s)
    with pytest.raises(ValueError, match="integers"):
        check(x, s, y.astype(jnp.float32))
    with pytest.raises(ValueError, match="labels y must have shape"):
        check(x, s, y[:2])
    # Raised at trace time under jit too, before anything is compiled.
    with pytest.raises(ValueError, match="noise_cond"):
        jax.jit(model.apply)(variables, x, s[:2], y)


def test_labels_rejected_by_unconditional_model():
    model = NCSNpp(**TINY)
    x, s = _inputs(size=8)
    with pytest.raises(ValueError, match="without class conditioning"):
        jax.eval_shape(model.init, KEY, x, s, jnp.zeros((2,), jnp.int32))


def test_get_model():
    assert isinstance(get_model("NCSNpp"), NCSNpp)
    assert isinstance(get_model("ddpmpp", nf=32), DDPMpp)
    assert get_model("mlp", hidden_sizes=(4,)).hidden_sizes == (4,)
    with pytest.raises(ValueError, match="valid names: ddpmpp, mlp, ncsnpp"):
        get_model("unet")


# -- parameter counts of the paper's CIFAR-10 networks (see jaxdiff/models/PARAMS.md) ------------
# Identical to the reference implementation (yang-song/score_sde) instantiated with the paper's
# configs configs/{ve,vp}/cifar10_{ncsnpp,ddpmpp}[_deep]_continuous.py (and models/ddpm.py for DDPM).
CIFAR10_PARAMS = {
    "ncsnpp": (NCSNpp, {}, 62_758_915),
    "ncsnpp_deep": (NCSNpp, dict(num_res_blocks=8), 107_587_075),
    "ddpmpp": (DDPMpp, {}, 61_804_419),
    "ddpmpp_deep": (DDPMpp, dict(num_res_blocks=8), 106_632_579),
    "ddpm": (DDPMpp, dict(resblock_type="ddpm", skip_rescale=False, num_res_blocks=2), 35_218_947),
}


@pytest.mark.parametrize("name", list(CIFAR10_PARAMS))
def test_cifar10_parameter_counts(name):
    cls, overrides, expected = CIFAR10_PARAMS[name]
    model = cls(**overrides)  # the class defaults are the paper's CIFAR-10 configs
    shapes = jax.eval_shape(model.init, KEY, jnp.zeros((1, 32, 32, 3)), jnp.zeros((1,)))
    assert _count(shapes["params"]) == expected


@pytest.mark.parametrize("shape,groups", [((2, 8, 8, 64), 16), ((3, 4, 4, 32), 8), ((4, 12), 3)])
def test_group_norm_equals_flax_group_norm(shape, groups):
    """The per-channel-affine GroupNorm has Flax's parameters and gives Flax's values and gradients."""
    import flax.linen as nn

    from jaxdiff.models._layers import GroupNorm

    x = 3.0 * jax.random.normal(jax.random.key(0), shape) + 1.0
    ref = nn.GroupNorm(num_groups=groups, epsilon=1e-6)
    variables = ref.init(jax.random.key(1), x)
    variables = jax.tree.map(lambda p: p + jax.random.normal(jax.random.key(2), p.shape), variables)
    ours = GroupNorm(num_groups=groups)
    assert jax.tree.structure(ours.init(jax.random.key(1), x)) == jax.tree.structure(variables)
    np.testing.assert_allclose(ours.apply(variables, x), ref.apply(variables, x), atol=1e-5)
    loss = lambda module: lambda v, x: jnp.sum(jnp.sin(module.apply(v, x)))  # noqa: E731
    g_ours = jax.grad(loss(ours), argnums=(0, 1))(variables, x)
    g_ref = jax.grad(loss(ref), argnums=(0, 1))(variables, x)
    for a, b in zip(jax.tree.leaves(g_ours), jax.tree.leaves(g_ref), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="num_groups=5 does not divide the 12 channels"):
        GroupNorm(num_groups=5).init(jax.random.key(0), jnp.ones((2, 12)))
