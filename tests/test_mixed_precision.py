"""Mixed precision: every network's ``dtype='bfloat16'`` against its float32 self on the same parameters.

The policy under test: parameters (and so optimiser state and EMA) float32; convolutions, dense layers,
attention products and FIR resampling in bfloat16; the noise-level embedding, group normalisation, the
attention softmax and the output in float32. The closeness of the outputs alone cannot tell a wrong cast from
a right one (group normalisation in bfloat16 moves the output by about as much as bfloat16 does anyway), so
the casts are also checked where they happen: in the jaxpr (every convolution and matrix product takes
bfloat16 operands, every ``exp`` is float32) and in the dtypes of the group-normalisation outputs.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.models import MLP, DDPMpp, NCSNpp, NoiseConditionalClassifier
from jaxdiff.models._layers import GroupNorm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPERIMENTS = os.path.join(ROOT, "experiments")
CONFIGS = os.path.join(EXPERIMENTS, "configs")

# Tiny versions of every network, with the options that change which layers run: FIR resampling with the
# residual input pyramid and Fourier features (NCSN++), the output and input skips with concatenation, class
# conditioning (DDPM++), DDPM residual blocks with learned resampling, the MLP and the classifier. A nonzero
# init_scale makes every branch contribute to the output.
_UNET = dict(nf=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), init_scale=1.0)
NETWORKS = {
    "ncsnpp": (NCSNpp, dict(_UNET, fourier_scale=1.0)),
    "ncsnpp_skips": (
        NCSNpp,
        dict(_UNET, progressive="output_skip", progressive_input="input_skip", progressive_combine="cat"),
    ),
    "ddpmpp_cond": (DDPMpp, dict(_UNET, num_classes=3)),
    "ddpm": (DDPMpp, dict(_UNET, resblock_type="ddpm", skip_rescale=False)),
    "mlp": (MLP, dict(hidden_sizes=(16, 16))),
    "classifier": (NoiseConditionalClassifier, dict(num_classes=3, hidden_sizes=(16,), conv_channels=(8, 8))),
}

# Relative L2 error of the bfloat16 output against float32's, same parameters. Measured on these networks over
# five parameter draws: 0.3-1.7% (1.0-1.6% with the networks' own initialisation at 16 channels); bfloat16 keeps
# 8 significant bits, a relative rounding of up to 0.4% per operation, over some twenty layers. 3% is about
# twice the largest. The lower bound catches a network that does not compute in
# bfloat16 at all (its error would be 0).
RTOL = 3e-2
MIN_DIFFERENCE = 1e-3
FAST_NUMERICS = ("ncsnpp", "mlp", "classifier")


def _jit(fun):
    """``jax.jit`` without LLVM optimisation: these small programs compile about twice as fast."""
    return jax.jit(fun, compiler_options={"xla_backend_optimization_level": 0})


def _inputs(name, batch=2):
    key_x, key_t = jax.random.split(jax.random.key(0))
    x = jax.random.normal(key_x, (batch, 4) if name == "mlp" else (batch, 8, 8, 2))
    noise_cond = jax.random.uniform(key_t, (batch,), minval=0.0, maxval=999.0)
    y = jnp.arange(batch) % 3 if name == "ddpmpp_cond" else None
    return (x, noise_cond) if y is None else (x, noise_cond, y)


def _model(name, dtype):
    cls, kwargs = NETWORKS[name]
    return cls(**kwargs, dtype=dtype)


def _walk(jaxpr):
    """Every equation of ``jaxpr`` and of the jaxprs nested in it (jit, custom_jvp, scan bodies)."""
    for eqn in jaxpr.eqns:
        yield eqn
        for value in eqn.params.values():
            for sub in value if isinstance(value, (list, tuple)) else (value,):
                inner = getattr(sub, "jaxpr", sub)  # a ClosedJaxpr holds its Jaxpr in .jaxpr
                if hasattr(inner, "eqns"):
                    yield from _walk(inner)


def _primitive_dtypes(jaxpr, primitives):
    """``[(primitive name, input dtypes, output dtypes)]`` of every ``primitives`` equation of ``jaxpr``."""
    return [
        (e.primitive.name, [str(v.aval.dtype) for v in e.invars], [str(v.aval.dtype) for v in e.outvars])
        for e in _walk(jaxpr)
        if e.primitive.name in primitives
    ]


def _random_params(shapes, seed=0):
    """Parameters of the given shapes, drawn in NumPy (no initialiser to compile): weights with variance
    ``1 / fan_in``, normalisation scales around one, small biases."""
    rng = np.random.default_rng(seed)

    def draw(path, s):
        if len(s.shape) > 1:
            return rng.normal(size=s.shape, scale=np.prod(s.shape[:-1]) ** -0.5)
        if jax.tree_util.keystr(path).endswith("['scale']"):
            return 1.0 + 0.1 * rng.normal(size=s.shape)
        return 0.1 * rng.normal(size=s.shape)

    return jax.tree_util.tree_map_with_path(lambda p, s: jnp.asarray(draw(p, s), jnp.float32), shapes)


@functools.cache
def _setup(name):
    """``(name, float32 model, bfloat16 model, params, inputs)``."""
    f32, bf16 = _model(name, "float32"), _model(name, "bfloat16")
    inputs = _inputs(name)
    params = _random_params(jax.eval_shape(f32.init, jax.random.key(1), *inputs)["params"])
    return name, f32, bf16, params, inputs


@functools.cache
def _trace(name, dtype):
    """The jaxpr of the network's forward pass in ``dtype`` (traced, not compiled), and the shapes of its
    output and of the group normalisations' outputs."""
    _, f32, bf16, params, inputs = _setup(name)
    model = bf16 if dtype == "bfloat16" else f32
    capture = lambda module, method: isinstance(module, GroupNorm)  # noqa: E731
    fn = lambda p: model.apply({"params": p}, *inputs, capture_intermediates=capture, mutable=["intermediates"])  # noqa: E731
    closed, (out, state) = jax.make_jaxpr(fn, return_shape=True)(params)
    return closed.jaxpr, out, jax.tree.leaves(state.get("intermediates", {}))


@pytest.fixture(params=sorted(NETWORKS))
def network(request):
    return _setup(request.param)


def test_parameter_trees_are_the_same_in_both_dtypes(network):
    """Same names, shapes and float32 dtype whatever the compute dtype: checkpoints load either way."""
    _, _, bf16, params, inputs = network
    p16 = jax.eval_shape(bf16.init, jax.random.key(1), *inputs)["params"]
    assert jax.tree.structure(p16) == jax.tree.structure(params)
    assert jax.tree.leaves(jax.tree.map(lambda p: (p.shape, p.dtype), p16)) == jax.tree.leaves(
        jax.tree.map(lambda p: (p.shape, p.dtype), params)
    )
    assert {p.dtype for p in jax.tree.leaves(p16)} == {jnp.dtype(jnp.float32)}


@pytest.mark.parametrize(
    "name", [n if n in FAST_NUMERICS else pytest.param(n, marks=pytest.mark.slow) for n in sorted(NETWORKS)]
)
def test_bf16_output_is_float32_and_close_to_float32s(name):
    """Each compiles the network twice (a few seconds for a U-Net): NCSN++, which has the most kinds of layer,
    and the cheap ones run by default, the others with ``-m slow``."""
    name, f32, bf16, params, inputs = _setup(name)
    out32 = _jit(f32.apply)({"params": params}, *inputs)
    out16 = _jit(bf16.apply)({"params": params}, *inputs)
    assert out16.dtype == out32.dtype == jnp.float32 and out16.shape == out32.shape
    error = float(jnp.linalg.norm(out16 - out32) / jnp.linalg.norm(out32))
    assert MIN_DIFFERENCE < error < RTOL, f"{name}: relative error {error:.2e}"


def test_convolutions_and_products_compute_in_bf16(network):
    """Every convolution and matrix product of the bfloat16 network takes bfloat16 operands (none is left in
    float32), every ``exp`` (softmax, the sinusoidal embedding) is float32, and so is the output; the float32
    network has no bfloat16 at all."""
    name = network[0]
    jaxpr, out, _ = _trace(name, "bfloat16")
    ops = ("conv_general_dilated", "dot_general")
    found = _primitive_dtypes(jaxpr, ops)
    assert found, f"{name}: no convolution or matrix product"
    wrong = [f for f in found if f[1] != ["bfloat16", "bfloat16"]]
    assert not wrong, f"{name}: not in bfloat16: {wrong}"
    if name.startswith(("ncsnpp", "ddpm")):  # the attention logits: bfloat16 operands, float32 result
        assert any(f[0] == "dot_general" and f[2] == ["float32"] for f in found)
        assert {f[0] for f in found} == set(ops)
    exps = _primitive_dtypes(jaxpr, ("exp",))
    assert all(f[1] == ["float32"] for f in exps), exps
    assert out.dtype == jnp.float32
    everything = _primitive_dtypes(_trace(name, "float32")[0], ops)
    assert all(set(f[1] + f[2]) == {"float32"} for f in everything)


def test_group_norm_computes_in_float32(network):
    """Group normalisation returns float32 in the bfloat16 network (its statistics are float32 too: Flax
    reduces in at least float32), whatever the dtype of the activations it normalises."""
    name = network[0]
    if name in ("mlp", "classifier"):
        pytest.skip("no normalisation layers")
    _, _, outputs = _trace(name, "bfloat16")
    assert len(outputs) >= 5
    assert {o.dtype for o in outputs} == {jnp.dtype(jnp.float32)}


def test_gradients_are_float32(network):
    name, _, bf16, params, inputs = network

    def loss(p):
        return jnp.mean(bf16.apply({"params": p}, *inputs) ** 2)

    value, grads = jax.eval_shape(jax.value_and_grad(loss), params)
    assert value.dtype == jnp.float32
    assert jax.tree.structure(grads) == jax.tree.structure(params)
    assert {g.dtype for g in jax.tree.leaves(grads)} == {jnp.dtype(jnp.float32)}


@pytest.mark.parametrize("name", ["ncsnpp", "ddpmpp_cond", "mlp"])
def test_noise_level_is_embedded_in_float32_even_for_bf16_data(name):
    """bfloat16 cannot tell ``999 t`` from its neighbours: the embedding's sin and cos are float32 whatever the
    data's dtype."""
    _, _, bf16, params, inputs = _setup(name)
    inputs = (inputs[0].astype(jnp.bfloat16), *inputs[1:])
    jaxpr = jax.make_jaxpr(lambda p: bf16.apply({"params": p}, *inputs))(params).jaxpr
    found = _primitive_dtypes(jaxpr, ("sin", "cos"))
    assert found and all(f[1] == ["float32"] for f in found), found


@pytest.mark.parametrize("name", sorted(NETWORKS))
@pytest.mark.parametrize("dtype", ["float16", "bf16", jnp.float16, None, 32])
def test_bad_dtype_is_refused(name, dtype):
    with pytest.raises(ValueError, match=r"dtype=.*not a valid compute dtype.*'float32', 'bfloat16'") as info:
        _model(name, dtype)
    assert repr(dtype) in str(info.value)


@pytest.mark.parametrize("dtype", ["bfloat16", "BFloat16", jnp.bfloat16])
def test_dtype_spellings(dtype):
    assert MLP(dtype=dtype).dtype == "bfloat16"
    assert DDPMpp(dtype=dtype).dtype == "bfloat16"


# -- configs and work directories ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def experiments():
    """The experiment scripts' ``common`` and ``workdir`` modules."""
    sys.path.insert(0, EXPERIMENTS)
    try:
        import common
        import workdir

        yield common, workdir
    finally:
        sys.path.remove(EXPERIMENTS)


def _config(name):
    spec = importlib.util.spec_from_file_location(name[:-3], os.path.join(CONFIGS, name))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


@pytest.mark.parametrize("name", sorted(f for f in os.listdir(CONFIGS) if f.endswith(".py")))
def test_every_config_has_a_model_dtype_that_reaches_the_network(experiments, name):
    common, _ = experiments
    config = _config(name)
    assert config.model.dtype == "float32"
    config.model.dtype = "bfloat16"
    assert common.build_model(config).dtype == "bfloat16"
    config.model.dtype = "float16"
    with pytest.raises(common.ConfigError, match="dtype='float16'"):
        common.build_model(config)


def test_a_run_from_before_model_dtype_still_resumes(experiments):
    """A saved config without ``model.dtype`` is a float32 run: no change against float32, and the precision
    may switch on resume (parameters and optimiser state are float32 either way); other keys still count."""
    _, wd = experiments
    new = wd.config_dict(_config("digits_vp_ddpmpp.py"))
    old = {**new, "model": {k: v for k, v in new["model"].items() if k != "dtype"}}
    assert wd.config_changes(old, new) == []
    assert wd.config_changes(new, old) == []
    bf16 = {**new, "model": {**new["model"], "dtype": "bfloat16"}}
    assert wd.config_changes(old, bf16) == [] and wd.config_changes(new, bf16) == []
    wider = {**old, "model": {**old["model"], "nf": 64}}
    assert wd.config_changes(old, wider) == ["model.nf: 32 -> 64"]


# -- training ------------------------------------------------------------------------------------------------
def _digits_runs(common, steps, fast_compile, **model):
    """The digits config's run (data, loss, optimiser, seed) with its network in float32 and in bfloat16, from
    the same initial state: the loss of every step, and the seconds per step after compilation, per dtype.
    ``fast_compile`` trades run time for compile time (for short runs)."""
    from jaxdiff.train import create_train_state, make_train_step

    config = _config("digits_vp_ddpmpp.py")
    config.model.update(model)
    config.training.batch_size = 32
    data = common.build_dataset(config, "train")
    batches = [jnp.asarray(next(data)["x"]) for _ in range(steps)]
    sde, tx = common.build_sde(config), common.build_optimizer(config)
    init = create_train_state(jax.random.key(config.seed), common.build_model(config), batches[0], tx)
    results = {}
    for dtype in ("float32", "bfloat16"):
        config.model.dtype = dtype
        net = common.build_model(config)
        step = make_train_step(common.build_loss_fn(config, sde, net), tx, ema_rate=config.model.ema_rate, jit=False)
        step = _jit(step) if fast_compile else jax.jit(step)
        state, first = step(jax.tree.map(jnp.copy, init), {"x": batches[0]})  # the float32 state, as it is
        losses = [first["loss"]]
        jax.block_until_ready(first)
        start = time.perf_counter()
        for x in batches[1:]:
            state, metrics = step(state, {"x": x})
            losses.append(metrics["loss"])
        losses = np.asarray(jax.device_get(losses))
        results[dtype] = losses, (time.perf_counter() - start) / max(steps - 1, 1)
        kept = jax.tree.leaves((state.params, state.ema_params, state.opt_state))
        assert {a.dtype for a in kept} <= {jnp.dtype(jnp.float32), jnp.dtype(jnp.int32)}
    return results


def _compare_runs(common, steps, last, fast_compile, **model):
    results = _digits_runs(common, steps, fast_compile, **model)
    (f32, t32), (bf16, t16) = results["float32"], results["bfloat16"]
    assert np.all(np.isfinite(bf16))
    final32, final16 = f32[-last:].mean(), bf16[-last:].mean()
    print(f"final loss float32 {final32:.4f}, bfloat16 {final16:.4f}; s/step {t32:.4f} vs {t16:.4f}")
    assert f32[:last].mean() > 1.5 * final32  # it learned something
    assert abs(final16 - final32) < 0.05 * final32


def test_digits_run_in_bf16_reaches_float32s_loss_small(experiments):
    """A tiny network on the digits (no resampling; the bottleneck's attention), same seed (same batches, times
    and noise): the mean loss of the last 40 of 150 steps agrees within 5%."""
    common, _ = experiments
    _compare_runs(common, 150, 40, fast_compile=True, nf=8, ch_mult=(1,), num_res_blocks=0, attn_resolutions=())


@pytest.mark.slow
def test_digits_run_in_bf16_reaches_float32s_loss(experiments):
    """The digits config's own network (nf 32, attention at 4x4): the mean loss of the last 100 of 600 steps
    agrees within 5%."""
    common, _ = experiments
    _compare_runs(common, 600, 100, fast_compile=False)
