"""Tests of jaxdiff.train: learning a 2-D mixture, U-Net steps, sharding, checkpoint resume, tracing."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxdiff.train as train_lib
from jaxdiff.checkpoint import Checkpointer
from jaxdiff.data import get_dataset
from jaxdiff.losses import make_loss_fn
from jaxdiff.models import MLP, DDPMpp, NCSNpp
from jaxdiff.oracle import GaussianMixture
from jaxdiff.parallel import make_mesh, shard_batch
from jaxdiff.parameterization import make_score_fn
from jaxdiff.samplers import sample
from jaxdiff.sde import VESDE, VPSDE
from jaxdiff.train import (
    TrainState,
    abstract_train_state,
    create_train_state,
    make_eval_step,
    make_optimizer,
    make_train_step,
)

SCALE = 2.0  # the mixture is divided by this, to bring it near unit scale
GM = GaussianMixture.grid(n_per_side=2, spacing=4.0, std=0.5)  # weights 0.1, 0.2, 0.3, 0.4


def _mlp(dropout=0.0):
    return MLP(hidden_sizes=(32, 32), embedding_size=8, embedding_type="positional", dropout=dropout)


@functools.partial(jax.jit, static_argnums=1)
def _mixture_batch(i, n=16):
    return {"x": GM.sample(jax.random.fold_in(jax.random.key(1), i), n) / SCALE}


def _leaves_equal(a, b) -> bool:
    la = jax.tree.leaves(jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, a))
    lb = jax.tree.leaves(jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, b))
    return len(la) == len(lb) and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb, strict=True))


def _is_key(x) -> bool:
    return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _build(ema_rate, mesh, counter, lr, warmup, dropout):
    sde, model = VPSDE(), _mlp(dropout)
    tx = make_optimizer(learning_rate=lr, warmup=warmup)
    loss_fn = make_loss_fn(sde, model)
    if counter is not None:
        inner = loss_fn

        def loss_fn(params, key, batch):
            counter.append(1)  # runs once per trace, not per call
            return inner(params, key, batch)

    state = create_train_state(jax.random.key(0), model, jnp.zeros((1, 2)), tx, mesh=mesh)
    return state, make_train_step(loss_fn, tx, ema_rate=ema_rate, mesh=mesh), loss_fn, tx


@functools.cache
def _cached(ema_rate, mesh, lr, warmup, dropout):
    return _build(ema_rate, mesh, None, lr, warmup, dropout)


def _setup(ema_rate=0.999, mesh=None, counter=None, lr=1e-3, warmup=3, dropout=0.0):
    """A fresh train state, its jitted step, the loss and the optimiser (compiled once per configuration)."""
    if counter is not None:
        return _build(ema_rate, mesh, counter, lr, warmup, dropout)
    state, *rest = _cached(ema_rate, mesh, lr, warmup, dropout)
    return (jax.tree.map(jnp.copy, state), *rest)  # the template is never donated


# -- a small model learns the mixture -----------------------------------------------------------------
def test_mlp_learns_mixture():
    sde = VPSDE()
    model = MLP(hidden_sizes=(64, 64, 64), embedding_size=16, embedding_type="positional")
    tx = make_optimizer(learning_rate=3e-3, warmup=20)
    state = create_train_state(jax.random.key(0), model, jnp.zeros((1, 2)), tx)
    train_step = make_train_step(make_loss_fn(sde, model), tx, ema_rate=0.99)
    losses = []
    for i in range(300):
        state, metrics = train_step(state, _mixture_batch(i, 256))
        losses.append(float(metrics["loss"]))
    assert np.mean(losses[-50:]) < 0.6 * np.mean(losses[:20]), (np.mean(losses[:20]), np.mean(losses[-50:]))

    score_fn = make_score_fn(model, state.params, sde, parameterization="eps")
    x, _ = sample(jax.random.key(2), score_fn, sde, (2000, 2), method="euler_maruyama", steps=200)
    x = np.asarray(x) * SCALE
    assert np.all(np.isfinite(x))
    nearest = np.argmin(np.linalg.norm(x[:, None] - np.asarray(GM.means)[None], axis=-1), -1)
    dist = np.linalg.norm(x - np.asarray(GM.means)[nearest], axis=-1)
    assert np.mean(dist < 3 * 0.5) > 0.8  # most samples within 3 std of a component
    mass = np.bincount(nearest[dist < 1.5], minlength=4) / len(x)
    assert np.all(mass > 0.5 * np.asarray(GM.weights)), mass  # mass on every component


# -- the optimiser, EMA and metrics -----------------------------------------------------------------
def test_step_metrics_schedule_and_ema():
    counter = []
    state, train_step, loss_fn, tx = _setup(ema_rate=0.9, counter=counter, lr=1e-3, warmup=3)
    params0 = jax.tree.map(jnp.copy, state.params)  # the train step donates the state's buffers
    batch = _mixture_batch(0)
    key0 = jax.random.fold_in(state.key, 0)
    (expected_loss, _), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params0, key0, batch)
    state, metrics = train_step(state, batch)
    np.testing.assert_allclose(metrics["loss"], expected_loss, rtol=1e-5, atol=0)
    np.testing.assert_allclose(
        metrics["grad_norm"], np.sqrt(sum(np.sum(np.square(g)) for g in jax.tree.leaves(grads))), rtol=1e-5, atol=0
    )
    # EMA after one step: 0.9 * params0 + 0.1 * params1.
    ema = jax.tree.map(lambda p0, p1: 0.9 * p0 + 0.1 * p1, params0, state.params)
    for a, b in zip(jax.tree.leaves(state.ema_params), jax.tree.leaves(ema), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    lrs = [float(metrics["learning_rate"])]
    for i in range(1, 5):
        state, metrics = train_step(state, _mixture_batch(i))
        lrs.append(float(metrics["learning_rate"]))
    np.testing.assert_allclose(lrs, [1e-3 / 3, 2e-3 / 3, 1e-3, 1e-3, 1e-3], rtol=1e-6, atol=0)
    assert int(state.step) == 5
    assert len(counter) == 1 + 1  # the step traced once, plus the reference computation above


def test_gradient_clipping():
    """With grad_clip the first Adam update has the magnitude of lr (Adam normalises), and clipping
    rescales the gradient before Adam: the update equals Adam's on grads * clip / ||grads||."""
    params = {"w": jnp.array([3.0, 4.0])}  # ||grad|| = 5 for loss 0.5 ||w||^2 ... grad = w
    tx = make_optimizer(learning_rate=0.1, warmup=0, grad_clip=1.0)
    updates, _ = tx.update(params, tx.init(params), params)
    ref = optax.adam(0.1)
    ref_updates, _ = ref.update({"w": params["w"] / 5.0}, ref.init(params), params)
    np.testing.assert_allclose(updates["w"], ref_updates["w"], rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match="weight_decay"):
        make_optimizer(weight_decay=0.1)
    assert make_optimizer(optimizer="adamw", weight_decay=0.01) is not None


def test_train_step_traces_once():
    counter = []
    state, train_step, _, _ = _setup(counter=counter)
    for i in range(25):
        state, metrics = train_step(state, _mixture_batch(i))
    assert len(counter) == 1
    assert np.isfinite(float(metrics["loss"]))


def test_eval_step():
    state, train_step, _, _ = _setup()
    state, _ = train_step(state, _mixture_batch(0))
    eval_step = make_eval_step(make_loss_fn(VPSDE(), _mlp(), train=False))
    batch = _mixture_batch(99)
    out1, out2 = eval_step(state, batch), eval_step(state, batch)
    assert out1["losses"].shape == (16,) and np.isfinite(float(out1["loss"]))
    np.testing.assert_array_equal(out1["loss"], out2["loss"])  # deterministic given the state
    other = eval_step(state, batch, jax.random.key(5))
    assert float(other["loss"]) != float(out1["loss"])
    raw = make_eval_step(make_loss_fn(VPSDE(), _mlp(), train=False), use_ema=False)(state, batch)
    assert float(raw["loss"]) != float(out1["loss"])  # EMA and raw parameters differ after a step


# -- U-Nets on digits -----------------------------------------------------------------------------------
_ONE_LEVEL = dict(nf=8, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(), dropout=0.1)
_TWO_LEVELS = dict(nf=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), dropout=0.1)


@pytest.mark.parametrize(
    "name, kw",
    [
        ("ncsnpp", _ONE_LEVEL),
        pytest.param("ddpmpp", _ONE_LEVEL, marks=pytest.mark.slow),
        pytest.param("ncsnpp", _TWO_LEVELS, marks=pytest.mark.slow, id="ncsnpp-two-levels"),
        pytest.param("ddpmpp", _TWO_LEVELS, marks=pytest.mark.slow, id="ddpmpp-two-levels"),
    ],
)
def test_unet_one_step_on_digits(name, kw):
    batch = next(iter(get_dataset("digits", batch_size=4, seed=0)))
    if name == "ncsnpp":
        model, sde = NCSNpp(**kw), VESDE(sigma_min=0.01, sigma_max=5.0)
        loss_fn = make_loss_fn(sde, model, parameterization="score", scale_by_sigma=True)
    else:
        model, sde = DDPMpp(**kw), VPSDE()
        loss_fn = make_loss_fn(sde, model, parameterization="eps")
    tx = make_optimizer(learning_rate=1e-3, warmup=1)
    state = create_train_state(jax.random.key(0), model, batch["x"], tx)
    before = jax.tree.map(np.asarray, state.params)
    train_step = make_train_step(loss_fn, tx)
    for _ in range(2):  # zero-initialised branch outputs (init_scale=0) leave their inputs still at step 1
        state, metrics = train_step(state, {"x": batch["x"]})
        assert np.isfinite(float(metrics["loss"])) and float(metrics["grad_norm"]) > 0
    changed = [
        not np.array_equal(a, np.asarray(b))
        for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(state.params), strict=True)
    ]
    # Every parameter moves, except the frozen Fourier frequencies.
    assert sum(changed) >= len(changed) - 1 and any(changed)


# -- data parallel ---------------------------------------------------------------------------------------
def test_sharded_step_matches_single_device():
    assert jax.device_count() == 8, "tests/conftest.py should provide 8 virtual CPU devices"
    mesh = make_mesh()
    # Dropout on: its mask must not depend on how the batch is split (and must trace under a sharded batch).
    single, step1, _, _ = _setup(dropout=0.1)
    sharded, step8, _, _ = _setup(mesh=mesh, dropout=0.1)
    assert sharded.params["dense_in"]["kernel"].sharding.is_fully_replicated
    assert len(sharded.params["dense_in"]["kernel"].sharding.device_set) == 8
    for i in range(3):
        batch = _mixture_batch(i)
        single, m1 = step1(single, batch)
        sharded, m8 = step8(sharded, shard_batch(mesh, jax.tree.map(np.asarray, batch)))
        np.testing.assert_allclose(m8["loss"], m1["loss"], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(m8["grad_norm"], m1["grad_norm"], rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.tree.leaves(sharded.params), jax.tree.leaves(single.params), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert sharded.params["dense_in"]["kernel"].sharding.is_fully_replicated
    loss_fn = make_loss_fn(VPSDE(), _mlp(0.1), train=False)
    batch = _mixture_batch(7)
    e1 = make_eval_step(loss_fn)(single, batch)
    e8 = make_eval_step(loss_fn, mesh=mesh)(sharded, shard_batch(mesh, jax.tree.map(np.asarray, batch)))
    np.testing.assert_allclose(e8["loss"], e1["loss"], rtol=1e-5, atol=1e-6)


# -- checkpoints ------------------------------------------------------------------------------------------
def test_checkpoint_roundtrip_and_resume(tmp_path):
    state, train_step, _, _ = _setup()
    for i in range(3):
        state, _ = train_step(state, _mixture_batch(i))
    ckpt = Checkpointer(tmp_path / "ckpt", async_save=False)
    ckpt.save(3, state)
    saved = jax.tree.map(jnp.copy, state)  # the train step donates `state`

    target, _, _, _ = _setup()  # fresh state: same structure, step 0
    target = target.replace(key=jax.random.key(123))
    restored = ckpt.restore(target)
    ckpt.close()
    assert isinstance(restored, TrainState)
    assert _leaves_equal(restored, saved)

    for i in range(3, 6):  # uninterrupted
        state, m_a = train_step(state, _mixture_batch(i))
    for i in range(3, 6):  # resumed
        restored, m_b = train_step(restored, _mixture_batch(i))
    assert _leaves_equal(restored, state)
    np.testing.assert_array_equal(m_a["loss"], m_b["loss"])


# -- numerical guard ------------------------------------------------------------------------------------
def test_nonfinite_step_is_skipped_inside_the_compiled_step():
    state, train_step, _, _ = _setup()
    state, m = train_step(state, _mixture_batch(0))
    assert bool(m["finite"]) and int(state.skipped) == 0
    before = jax.tree.map(jnp.copy, state)
    bad = {"x": _mixture_batch(1)["x"].at[3, 0].set(jnp.nan)}
    state, m = train_step(state, bad)
    assert not bool(m["finite"]) and not np.isfinite(float(m["loss"]))
    assert int(state.step) == 2 and int(state.skipped) == 1
    # Parameters, EMA and optimiser state are exactly the last good ones.
    for name in ("params", "ema_params", "opt_state"):
        assert _leaves_equal(getattr(state, name), getattr(before, name)), name
    state, m = train_step(state, _mixture_batch(2))
    assert bool(m["finite"]) and int(state.skipped) == 1
    assert np.all(np.isfinite(np.asarray(jax.tree.leaves(state.params)[0])))


# -- start-up and several steps per call ------------------------------------------------------------------
def test_abstract_state_restores_what_was_saved_without_initialising(tmp_path):
    state, train_step, _, tx = _setup()
    for i in range(2):
        state, _ = train_step(state, _mixture_batch(i))
    ckpt = Checkpointer(tmp_path / "ckpt", async_save=False)
    ckpt.save(2, state)
    abstract = abstract_train_state(jax.random.key(0), _mlp(), jnp.zeros((1, 2)), tx)
    created = create_train_state(jax.random.key(0), _mlp(), jnp.zeros((1, 2)), tx)
    # The same tree as the created state: every leaf abstract except the run key, which equals the created one.
    assert jax.tree.structure(abstract) == jax.tree.structure(created)
    for a, c in zip(
        jax.tree.leaves(abstract.replace(key=None)), jax.tree.leaves(created.replace(key=None)), strict=True
    ):
        assert isinstance(a, jax.ShapeDtypeStruct) and (a.shape, a.dtype) == (c.shape, c.dtype)
    np.testing.assert_array_equal(jax.random.key_data(abstract.key), jax.random.key_data(created.key))
    restored = ckpt.restore_newest(abstract)
    ckpt.close()
    assert restored.step == 2 and _leaves_equal(restored.value, state)


def test_several_steps_per_call_equal_single_steps():
    state, train_step, loss_fn, tx = _setup(dropout=0.1)
    multi = make_train_step(loss_fn, tx, ema_rate=0.999, steps_per_call=3)
    batches = [_mixture_batch(i) for i in range(6)]
    stacked = [jax.tree.map(lambda *b: jnp.stack(b), *batches[k : k + 3]) for k in (0, 3)]
    other = jax.tree.map(jnp.copy, state)
    losses = []
    for b in batches:
        state, m = train_step(state, b)
        losses.append(float(m["loss"]))
    multi_losses = []
    for b in stacked:
        other, m = multi(other, b)
        assert m["loss"].shape == (3,) and m["finite"].shape == (3,)
        multi_losses.extend(np.asarray(m["loss"]))
    assert int(other.step) == 6
    np.testing.assert_allclose(multi_losses, losses, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(other.params), jax.tree.leaves(state.params), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="steps_per_call=3 .* shape \\(16, 2\\)"):
        multi(other, batches[0])
    for bad in (0, 2.0, True):
        with pytest.raises(ValueError, match="steps_per_call must be an integer >= 1"):
            make_train_step(loss_fn, tx, steps_per_call=bad)


def test_several_steps_per_call_sharded():
    mesh = make_mesh()
    single, step1, loss_fn, tx = _setup()
    sharded, _, _, _ = _setup(mesh=mesh)
    multi = make_train_step(loss_fn, tx, ema_rate=0.999, mesh=mesh, steps_per_call=2)
    batches = [jax.tree.map(np.asarray, _mixture_batch(i)) for i in range(2)]
    for b in batches:
        single, _ = step1(single, b)
    stacked = shard_batch(mesh, jax.tree.map(lambda *b: np.stack(b), *batches), batch_axis=1)
    assert stacked["x"].sharding.spec == jax.sharding.PartitionSpec(None, "data")
    sharded, m = multi(sharded, stacked)
    assert m["loss"].shape == (2,)
    for a, b in zip(jax.tree.leaves(sharded.params), jax.tree.leaves(single.params), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("net", ["ddpmpp", "mlp"])  # uniform (DDPM) and truncated-normal (lecun) initialisers
def test_initialiser_compiled_for_speed_gives_the_same_parameters(net):
    if net == "mlp":
        model, sample = _mlp(), jax.ShapeDtypeStruct((4, 2), jnp.float32)
    else:
        model = DDPMpp(nf=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,))
        sample = jax.ShapeDtypeStruct((2, 8, 8, 1), jnp.float32)
    tx = make_optimizer()
    created = create_train_state(jax.random.key(3), model, sample, tx)  # batched draws, compiled for speed
    default = jax.jit(train_lib._init_fn(model, sample, tx))(jax.random.key(3))  # as written, XLA's defaults
    assert _leaves_equal(created, default)
    if net == "mlp":
        return
    assert created.params["conv_in"]["kernel"].committed  # placed like a restored state (one program for both)
