"""The train state, the optimiser of the reference configs, and pure, jitted (optionally sharded) steps.

``TrainState`` is one pytree: ``step``, ``params``, ``ema_params``, ``opt_state`` and a PRNG ``key``. The
train step is a pure function ``(state, batch) -> (state, metrics)``: its randomness is
``jax.random.fold_in(state.key, state.step)``, so a run restored from a checkpoint continues bit for bit.
It is jitted once, with the state donated; given a mesh (:mod:`jaxdiff.parallel`) the state is replicated,
the batch split along ``'data'``, and XLA inserts the gradient all-reduce.

>>> from jaxdiff.losses import make_loss_fn
>>> from jaxdiff.models import MLP
>>> from jaxdiff.sde import VPSDE
>>> model = MLP(hidden_sizes=(32, 32), embedding_type="positional")
>>> tx = make_optimizer(learning_rate=1e-3, warmup=10)
>>> state = create_train_state(jax.random.key(0), model, jnp.zeros((8, 2)), tx)
>>> train_step = make_train_step(make_loss_fn(VPSDE(), model), tx)
>>> state, metrics = train_step(state, {"x": jnp.ones((8, 2))})
>>> sorted(metrics)
['finite', 'grad_norm', 'learning_rate', 'loss']
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from jax.sharding import AxisType, Mesh, SingleDeviceSharding
from jax.sharding import PartitionSpec as P

from jaxdiff._grouping import group_random_draws
from jaxdiff.parallel import batch_sharding, replicated_sharding

__all__ = [
    "TrainState",
    "create_train_state",
    "abstract_train_state",
    "make_optimizer",
    "make_train_step",
    "make_eval_step",
]

PyTree = Any
Array = jax.Array
LossFn = Callable[[PyTree, Array, dict], tuple[Array, Any]]

_EVAL_STREAM = 0x5EED  # folded into the step key for evaluation noise, disjoint from the training stream


@struct.dataclass
class TrainState:
    """Everything that changes during training, as one pytree (checkpointed whole).

    Attributes:
      step: number of optimiser steps taken (int32 scalar).
      params: the network's ``params`` collection.
      ema_params: exponential moving average of ``params`` (used for sampling and evaluation).
      opt_state: the optax optimiser state.
      key: the run's PRNG key; step ``i`` uses ``fold_in(key, i)``.
      skipped: number of steps whose loss or gradients were not finite and whose update was skipped
        (``step`` still advances, so the data order and the random stream move on).
    """

    step: Array
    params: PyTree
    ema_params: PyTree
    opt_state: optax.OptState
    key: Array
    skipped: Array = struct.field(default_factory=lambda: jnp.zeros((), jnp.int32))


def _sharded_jit(fn: Callable, mesh: Mesh, in_shardings: tuple, **kwargs) -> Callable:
    """``jax.jit`` over ``mesh`` with replicated outputs, the body run with ``Auto`` axes.

    ``jax.make_mesh`` gives ``Explicit`` axes, under which sharding is part of every array's type and model
    code that mixes a replicated array with a batch-sharded one in a ``select`` (Flax's ``Dropout``: a
    replicated mask against sharded activations) is rejected. ``jax.sharding.auto_axes`` lets XLA's sharding
    propagation place the step's intermediates instead; inputs and outputs keep the mesh's shardings.
    """
    body = fn
    if any(t == AxisType.Explicit for t in mesh.axis_types):

        def body(*args):
            with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
                return jax.sharding.auto_axes(fn, out_sharding=P())(*args)

    return jax.jit(body, in_shardings=in_shardings, out_shardings=replicated_sharding(mesh), **kwargs)


def make_optimizer(
    *,
    optimizer: str = "adam",
    learning_rate: float = 2e-4,
    warmup: int = 5000,
    grad_clip: float | None = 1.0,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
) -> optax.GradientTransformation:
    """Adam(W) with linear warm-up and global-norm gradient clipping, as in the score-SDE configs.

    The learning rate at step ``k`` (counting from 0) is ``learning_rate * min((k + 1) / warmup, 1)``, the
    reference code's ``lr * min(step / warmup, 1)`` with its 1-based step. It is recorded in the optimiser
    state (``optax.inject_hyperparams``), so the train step reports it.

    Args:
      optimizer: ``'adam'`` or ``'adamw'``.
      learning_rate: peak learning rate.
      warmup: warm-up steps (0 for none).
      grad_clip: clip the global gradient norm to this value (``None`` or ``<= 0`` for no clipping).
      beta1: Adam's first-moment decay.
      beta2: Adam's second-moment decay.
      eps: Adam's epsilon.
      weight_decay: decoupled weight decay (``'adamw'`` only).
    """
    optimizer = optimizer.lower()
    if optimizer not in ("adam", "adamw"):
        raise ValueError(f"unknown optimizer {optimizer!r}; valid: adam, adamw")
    if optimizer == "adam" and weight_decay:
        raise ValueError("weight_decay needs optimizer='adamw'")
    if warmup < 0 or not learning_rate > 0:
        raise ValueError(f"need warmup >= 0 and learning_rate > 0, got {warmup} and {learning_rate}")

    def schedule(count):
        if warmup == 0:
            return jnp.asarray(learning_rate, jnp.float32)
        return learning_rate * jnp.minimum((count + 1) / warmup, 1.0)

    def build(learning_rate):
        if optimizer == "adamw":
            core = optax.adamw(learning_rate, b1=beta1, b2=beta2, eps=eps, weight_decay=weight_decay)
        else:
            core = optax.adam(learning_rate, b1=beta1, b2=beta2, eps=eps)
        clip = [optax.clip_by_global_norm(grad_clip)] if grad_clip and grad_clip > 0 else []
        return optax.chain(*clip, core)

    return optax.inject_hyperparams(build)(learning_rate=schedule)


def _init_inputs(model: nn.Module, sample_input: Array):
    shape, dtype = tuple(sample_input.shape), getattr(sample_input, "dtype", jnp.float32)
    x = jnp.zeros(shape, dtype)
    args = [x, jnp.zeros(shape[:1], jnp.float32)]
    if getattr(model, "num_classes", None) is not None:
        args.append(jnp.zeros(shape[:1], jnp.int32))
    return args


# The initialiser runs once, so its compile time is the cost that matters. Three things cut it on XLA:CPU, each
# leaving the values bitwise as they are (tested for uniform and truncated-normal initialisers): batching its
# hundreds of small random draws into a few (``group_random_draws``), backend optimisation level 1, and the
# classic fusion emitters, whose code for these small elementwise fusions compiles several times faster than the
# newer MLIR emitters' (small DDPM++: 13-15 s before any of this, 1.1 s with all three). Level 0 would halve that
# again but changes the last bits of erf-based (normal) draws. Options an older XLA does not know are dropped
# (``_compile_init``).
_INIT_COMPILER_OPTIONS = {"cpu": {"xla_backend_optimization_level": 1, "xla_cpu_use_fusion_emitters": False}}


def _init_fn(model: nn.Module, sample_input: Array | jax.ShapeDtypeStruct, tx: optax.GradientTransformation):
    def init(key):
        k_init, k_dropout, k_run = jax.random.split(key, 3)
        variables = model.init({"params": k_init, "dropout": k_dropout}, *_init_inputs(model, sample_input))
        params = variables["params"]
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            ema_params=jax.tree.map(jnp.copy, params),
            opt_state=tx.init(params),
            key=k_run,
            skipped=jnp.zeros((), jnp.int32),
        )

    return init


def _run_key(key: Array) -> Array:
    return jax.random.split(key, 3)[2]  # as in ``_init_fn``


def _state_sharding(mesh: Mesh | None) -> jax.sharding.Sharding:
    return replicated_sharding(mesh) if mesh is not None else SingleDeviceSharding(jax.devices()[0])


def _platform(mesh: Mesh | None) -> str:
    """The platform the state lives on (``'cpu'``, ``'gpu'``, ``'tpu'``)."""
    return next(iter(_state_sharding(mesh).device_set)).platform


def create_train_state(
    key: Array,
    model: nn.Module,
    sample_input: Array | jax.ShapeDtypeStruct,
    tx: optax.GradientTransformation,
    *,
    mesh: Mesh | None = None,
) -> TrainState:
    """Initialises the network and the optimiser, already placed: replicated over ``mesh`` if given.

    The initialiser is one jitted program whose outputs are created in place with their final shardings. Its
    random draws are batched (one draw for many parameters, :func:`jaxdiff._grouping.group_random_draws`) and,
    on the CPU, it is compiled for compile speed (``_INIT_COMPILER_OPTIONS``): it runs once, and neither
    changes a bit of the values.
    A run that will restore a checkpoint needs no initial values at all: see :func:`abstract_train_state`.

    Args:
      key: PRNG key; split into the initialisation key and the run's key.
      model: the Flax network (called as ``model(x, noise_cond[, y])``).
      sample_input: an array or ``ShapeDtypeStruct`` with the data's shape (only the shape is used).
      tx: the optimiser.
      mesh: a data-parallel mesh; the state is created replicated on it (``jax.jit(..., out_shardings=)``).

    Returns:
      A :class:`TrainState` at step 0 with ``ema_params == params``.
    """
    # Placed explicitly (committed) also on one device: a state restored from a checkpoint is, and the train step
    # then lowers to the same program either way, found in the persistent compilation cache by a resumed run.
    out_shardings = _state_sharding(mesh)
    options = _INIT_COMPILER_OPTIONS.get(_platform(mesh), {})
    lowered = jax.jit(group_random_draws(_init_fn(model, sample_input, tx)), out_shardings=out_shardings).lower(key)
    return _compile_init(lowered, options)(key)


def _compile_init(lowered: Any, options: dict) -> Any:
    """``lowered`` compiled with those of ``options`` this XLA knows (a compile option it lacks is an error)."""
    options = dict(options)
    while True:
        try:
            return lowered.compile(options or None)
        except Exception as err:  # XlaRuntimeError: INVALID_ARGUMENT: No such compile option: '<name>'
            unknown = [name for name in options if f"'{name}'" in str(err)]
            if "No such compile option" not in str(err) or not unknown:
                raise
            for name in unknown:
                del options[name]


def abstract_train_state(
    key: Array,
    model: nn.Module,
    sample_input: Array | jax.ShapeDtypeStruct,
    tx: optax.GradientTransformation,
    *,
    mesh: Mesh | None = None,
) -> TrainState:
    """The state :func:`create_train_state` would return, as shapes, dtypes and shardings only.

    Costs a trace, no compilation and no memory: the target to restore a checkpoint into
    (:meth:`jaxdiff.checkpoint.Checkpointer.restore_newest`), so that a resumed run never initialises a network
    it is about to overwrite. The run's ``key`` is concrete (restoring needs its PRNG implementation); every
    other leaf is a ``jax.ShapeDtypeStruct`` with the sharding the created state would have.
    """
    sharding = _state_sharding(mesh)
    shapes = jax.eval_shape(_init_fn(model, sample_input, tx), key)
    state = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), shapes)
    return state.replace(key=jax.device_put(_run_key(key), sharding))


def _global_norm(tree: PyTree) -> Array:
    """The l2 norm of all leaves together (``optax.tree.norm``; ``optax.global_norm`` before optax 0.2.5)."""
    tree_norm = getattr(getattr(optax, "tree", None), "norm", None)
    return tree_norm(tree) if tree_norm is not None else optax.global_norm(tree)


def _learning_rate(opt_state) -> Array:
    """The learning rate recorded by ``optax.inject_hyperparams`` (NaN for an optimiser without one)."""
    lr = getattr(opt_state, "hyperparams", {}).get("learning_rate")
    return jnp.asarray(jnp.nan if lr is None else lr, jnp.float32)


def make_train_step(
    loss_fn: LossFn,
    tx: optax.GradientTransformation,
    *,
    ema_rate: float = 0.9999,
    mesh: Mesh | None = None,
    donate: bool = True,
    jit: bool = True,
    steps_per_call: int = 1,
) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """Builds the pure train step ``(state, batch) -> (state, metrics)``, jitted once.

    Args:
      loss_fn: ``loss_fn(params, key, batch) -> (loss, aux)`` (see :func:`jaxdiff.losses.make_loss_fn`).
      tx: the optimiser the state was created with.
      ema_rate: ``ema <- rate * ema + (1 - rate) * params`` after every step.
      mesh: run data-parallel: state replicated, batch sharded along the mesh's data axis.
      donate: donate the input state's buffers (do not reuse a state after passing it in).
      jit: return the plain function instead (to compose it under another transformation).
      steps_per_call: take this many optimiser steps per call, a ``lax.scan`` over batches stacked along a new
        leading axis (``batch["x"]`` of shape ``(steps_per_call, batch_size, ...)``; over a mesh the batch axis,
        the second, is the sharded one: :func:`jaxdiff.parallel.shard_batch` with ``batch_axis=1``). One
        dispatch and one host round trip pay for several steps: it pays where a step is short (small networks,
        the toy MLP). Each scanned step is the single step, with its own ``fold_in(key, step)``. On the CPU the scan is
        unrolled (XLA:CPU runs convolutions slowly inside a loop), so compiling takes about K times as long.

    Returns:
      ``train_step(state, batch)`` with metrics ``loss``, ``grad_norm`` (before clipping),
      ``learning_rate`` (the one this step used) and ``finite`` (whether loss and gradients were finite);
      with ``steps_per_call > 1`` each metric has a leading axis of that length, one entry per step.

    Numerical guard: a step whose loss or gradient norm is not finite changes neither the parameters, the
    EMA nor the optimiser state; it only advances ``step`` and counts itself in ``state.skipped``, inside
    the compiled step (no host round trip). What to do about it (go on, or stop and keep the last good
    state) is the caller's policy, read from ``metrics["finite"]``.
    """
    if not 0.0 <= ema_rate <= 1.0:
        raise ValueError(f"ema_rate must be in [0, 1], got {ema_rate}")
    if isinstance(steps_per_call, bool) or not isinstance(steps_per_call, int | np.integer) or steps_per_call < 1:
        raise ValueError(f"steps_per_call must be an integer >= 1, got {steps_per_call!r}")
    steps_per_call = int(steps_per_call)

    def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        key = jax.random.fold_in(state.key, state.step)
        (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, key, batch)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema_params = jax.tree.map(lambda e, p: ema_rate * e + (1.0 - ema_rate) * p, state.ema_params, params)
        grad_norm = _global_norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)  # noqa: E731
        new_state = state.replace(
            step=state.step + 1,
            params=keep(params, state.params),
            ema_params=keep(ema_params, state.ema_params),
            opt_state=keep(opt_state, state.opt_state),
            skipped=state.skipped + (~finite).astype(jnp.int32),
        )
        metrics = {
            "loss": loss,
            "grad_norm": grad_norm,
            "learning_rate": _learning_rate(opt_state),
            "finite": finite,
        }
        return new_state, metrics

    step_fn = train_step
    if steps_per_call > 1:
        # XLA:CPU runs a convolutional network's step inside a loop body many times slower than the same step
        # alone (the digits DDPM++: 1663 against 79 ms a step); unrolled, the steps run at full speed and the
        # compile takes about K times longer. Accelerators keep the rolled loop.
        unroll = steps_per_call if _platform(mesh) == "cpu" else 1

        def step_fn(state: TrainState, batches: dict) -> tuple[TrainState, dict]:
            _check_stacked(batches, steps_per_call)
            return jax.lax.scan(train_step, state, batches, unroll=unroll)

    if not jit:
        return step_fn
    donate_argnums = (0,) if donate else ()
    if mesh is None:
        return jax.jit(step_fn, donate_argnums=donate_argnums)
    shardings = (replicated_sharding(mesh), batch_sharding(mesh, batch_axis=1 if steps_per_call > 1 else 0))
    return _sharded_jit(step_fn, mesh, shardings, donate_argnums=donate_argnums)


def _check_stacked(batches: dict, steps: int) -> None:
    """Stacked batches have a leading axis of ``steps`` on every leaf (a plain batch would be misread)."""
    for path, leaf in jax.tree_util.tree_leaves_with_path(batches):
        if jnp.ndim(leaf) < 1 or jnp.shape(leaf)[0] != steps:
            raise ValueError(f"with steps_per_call={steps} the batch is {steps} batches stacked along a new leading "
                             f"axis; batch{jax.tree_util.keystr(path)} has shape {jnp.shape(leaf)}")  # fmt: skip


def _eval_key(state: TrainState) -> Array:
    return jax.random.fold_in(jax.random.fold_in(state.key, state.step), _EVAL_STREAM)


def make_eval_step(
    loss_fn: LossFn, *, use_ema: bool = True, mesh: Mesh | None = None, jit: bool = True
) -> Callable[..., dict]:
    """Builds ``eval_step(state, batch, key=None) -> {'loss': ..., 'losses': (batch,)}`` (no update).

    Args:
      loss_fn: as for :func:`make_train_step`, built with ``train=False``.
      use_ema: evaluate the EMA parameters (else the raw ones).
      mesh: data-parallel mesh, as for :func:`make_train_step`.
      jit: jit the step.

    The noise of evaluation comes from ``key``, by default from the state's key and step on a stream
    separate from training's.
    """

    def eval_step(state: TrainState, batch: dict, key: Array | None = None) -> dict:
        if key is None:
            key = _eval_key(state)
        params = state.ema_params if use_ema else state.params
        loss, aux = loss_fn(params, key, batch)
        out = {"loss": loss}
        if isinstance(aux, dict) and "losses" in aux:
            out["losses"] = aux["losses"]
        return out

    if not jit:
        return eval_step
    if mesh is None:
        return jax.jit(eval_step)
    replicated = replicated_sharding(mesh)
    sharded = _sharded_jit(eval_step, mesh, (replicated, batch_sharding(mesh), replicated))
    return lambda state, batch, key=None: sharded(state, batch, _eval_key(state) if key is None else key)
