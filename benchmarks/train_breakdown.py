"""Where the DDPM++ train step's time goes, block by block, beside PyTorch on the same CPU core.

Prints JSON lines. Everything runs on one core (``--cpu``, default 0) with one thread: the XLA flags
``--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1`` and ``torch.set_num_threads(1)``, the
affinity set before JAX or torch starts. JAX and torch measurements of a row are interleaved in the same
process, and each time is the median of ``--repeats`` repeats, so the ratio is robust to a busy machine even
when the absolute times are not.

Models (the blocks are found by intercepting every Flax module call of one training-mode forward pass, so the
shapes and counts are the model's own):
  small  DDPM++ nf 32, ch_mult (1, 2, 2), 2 blocks, attention at 16x16, dropout 0.1, 32x32x3, batch 32
         (1,754,147 parameters).
  cifar  the paper's CIFAR-10 DDPM++ (cont.): nf 128, ch_mult (1, 2, 2, 2), 4 blocks, attention at 16x16,
         dropout 0.1, 32x32x3, batch 8 (61,804,419 parameters).

Sections (``--sections``, comma-separated):
  blocks  forward+backward of every distinct 3x3 / 1x1 convolution, GroupNorm, SiLU, attention core, dense
          (attention projections), dropout, up/down resampling, and the time embedding (sinusoidal, two dense
          layers and every block's projection), JAX vs torch; ``count`` is how often it occurs per forward,
          and ``*_total_ms`` rows sum count x time per kind.
  rng     the loss's randomness: times, noise and every dropout mask, JAX threefry (default) vs ``rbg`` vs
          ``unsafe_rbg`` keys vs torch.
  optim   passes over all parameters: global norm, clipping, Adam, the whole optax chain of ``make_optimizer``,
          EMA, the non-finite guard, and the fused update tail with the guard as ``jnp.where``, as ``lax.cond``
          and without it; torch: ``clip_grad_norm_``, ``Adam.step``, the reference code's EMA loop.
  step    the library's train step (``make_train_step`` + ``make_loss_fn(VPSDE(), model)`` +
          ``make_optimizer()``) against a plain hand-written JAX step (same loss, optax chain and EMA, no
          guard), with threefry and rbg keys; the forward+backward of the loss alone.
  torch_step  a PyTorch DDPM++ step of the same architecture and parameter count (``_torch_ddpmpp.py``),
          interleaved with the library's step and with the library's step using Flax's GroupNorm (as before):
          examples/s of each.
  conv    formulations of the convolution forward+backward: NHWC/HWIO (Flax's), NCHW/OIHW, ``precision``,
          ``preferred_element_type``, 1x1 as a matmul, 3x3 as an im2col matmul, and ``jax.checkpoint``
          policies on the whole network's loss gradient; torch NCHW and channels_last beside them. GroupNorm:
          Flax's against direct formulations (two-pass, one-pass, per-channel statistics, NCHW).
  group_norm_step  the library's step and loss gradient (GroupNorm as a per-channel affine map,
          ``jaxdiff.models._layers.GroupNorm``) against the same network with Flax's ``nn.GroupNorm``, the
          formulation it had before (``group_norm`` replaced in this process only; the parameter tree is the same).
  conv1x1_step  the library's step with its 1x1 shortcut convolutions as ``nn.Conv`` against an ``einsum`` over
          the channel axis (the same parameters).
  flags   reruns ``conv`` (the baseline rows) and the network's gradient in subprocesses under each XLA CPU flag
          (``--flags`` to choose), to see which this jaxlib accepts and what each gives (ratio to torch measured in
          the same subprocess).

    python benchmarks/train_breakdown.py                                  # all sections, both models
    python benchmarks/train_breakdown.py --models small --sections blocks,rng --repeats 5
    python benchmarks/train_breakdown.py --sections flags --models small

Without torch installed the torch columns are null, the setup line says ``"torch": "not installed"`` and the
torch_step section prints ``"skipped"``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import statistics
import subprocess
import sys
import time

THREAD_FLAGS = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
SECTIONS = ("blocks", "rng", "optim", "step", "torch_step", "conv", "group_norm_step", "conv1x1_step", "flags")
MODELS = {
    "small": (dict(nf=32, ch_mult=(1, 2, 2), num_res_blocks=2, attn_resolutions=(16,), dropout=0.1), (32, 32, 32, 3)),
    "cifar": (
        dict(nf=128, ch_mult=(1, 2, 2, 2), num_res_blocks=4, attn_resolutions=(16,), dropout=0.1),
        (8, 32, 32, 3),
    ),
}
# XLA CPU flags tried by the ``flags`` section (names found in this jaxlib's binary; a flag XLA does not know
# makes the subprocess fail, which is reported as rejected).
XLA_FLAG_VARIANTS = (
    "",
    "--xla_cpu_use_thunk_runtime=false",
    "--xla_cpu_use_onednn=true",
    "--xla_cpu_experimental_onednn_custom_call=true",
    "--xla_cpu_use_xnnpack=true",
    "--xla_cpu_enable_fast_math=true",
    "--xla_cpu_prefer_vector_width=512",
    "--xla_cpu_use_fusion_emitters=false",
)


def _setup(cpu: int | None, extra_flags: str = "") -> None:
    """One core, one thread: call before JAX or torch is imported."""
    if cpu is not None and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {cpu})
    flags = os.environ.get("XLA_FLAGS", "").split()
    flags += [f for f in (THREAD_FLAGS + " " + extra_flags).split() if f not in flags]
    os.environ["XLA_FLAGS"] = " ".join(flags)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")


def _torch():
    try:
        import torch
    except ImportError:
        return None
    torch.set_num_threads(1)
    return torch


def _emit(row: dict) -> None:
    print(json.dumps(row), flush=True)


# ----------------------------------------------------------------------------------------------------------
# Timing: interleaved, median of repeats
# ----------------------------------------------------------------------------------------------------------
def _calls(fn, n: int) -> float:
    import jax

    t0 = time.perf_counter()
    out = None
    for _ in range(n):
        out = fn()
    jax.block_until_ready(out)
    return (time.perf_counter() - t0) / n


def time_side_by_side(fns: dict, repeats: int, target_s: float = 0.05) -> dict:
    """Median seconds per call of each zero-argument function, the functions interleaved in every repeat.

    Each is called once first (compilation, allocation), then as many times per repeat as fit in ``target_s``.
    """
    fns = {k: f for k, f in fns.items() if f is not None}
    inner = {}
    for name, fn in fns.items():
        _calls(fn, 1)
        inner[name] = max(1, min(1000, int(target_s / max(_calls(fn, 1), 1e-6))))
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(_calls(fn, inner[name]))
    return {name: statistics.median(ts) for name, ts in times.items()}


def _ms(s):
    return None if s is None else round(1e3 * s, 3)


def _ratio(a, b):
    return None if a is None or b is None else round(a / b, 3)


# ----------------------------------------------------------------------------------------------------------
# The model's blocks, found by intercepting module calls
# ----------------------------------------------------------------------------------------------------------
def record_blocks(model, shape):
    """``{key: count}`` of the leaf operations of one training-mode forward pass, with their shapes."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from jaxdiff.models._layers import AttnBlock, ResnetBlockBigGAN
    from jaxdiff.models._layers import GroupNorm as LibraryGroupNorm

    counts: dict = {}

    def add(key):
        counts[key] = counts.get(key, 0) + 1

    def interceptor(next_fun, args, kwargs, context):
        m, b = context.module, shape[0]
        if context.method_name == "__call__":
            x = args[0]
            if isinstance(m, nn.Conv):
                kind = "conv3x3" if tuple(m.kernel_size) == (3, 3) else "conv1x1"
                add((kind, b, *x.shape[1:], m.features))
            elif isinstance(m, nn.Dense) and x.ndim == 4:
                add(("dense", b, *x.shape[1:], m.features))
            elif isinstance(m, (nn.GroupNorm, LibraryGroupNorm)):
                add(("group_norm", b, *x.shape[1:], m.num_groups))
                add(("silu", b, *x.shape[1:]))  # every GroupNorm in DDPM++ is followed by the activation
            elif isinstance(m, nn.Dropout) and m.rate > 0 and not kwargs.get("deterministic", True):
                add(("dropout", b, *x.shape[1:], m.rate))
            elif isinstance(m, AttnBlock):
                add(("attention", b, *x.shape[1:]))
            elif isinstance(m, ResnetBlockBigGAN) and (m.up or m.down):
                for _ in range(2):  # the residual branch and the shortcut are both resampled
                    add(("upsample" if m.up else "downsample", b, *x.shape[1:]))
        return next_fun(*args, **kwargs)

    x = jnp.zeros(shape)
    rngs = {"params": jax.random.key(0), "dropout": jax.random.key(1)}
    with nn.intercept_methods(interceptor):
        jax.eval_shape(lambda: model.init(rngs, x, jnp.zeros(shape[:1]), train=True))
    return counts


def _block_fns(key, model_kw, torch, rng_impl=None):
    """(jax_fn, torch_fn) computing forward + backward (input and parameter gradients) of one block."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxdiff.models._embedding import sinusoidal_embedding
    from jaxdiff.models._layers import _mean_down, _nearest_up

    kind, b, *rest = key
    rng = np.random.default_rng(0)
    rand = lambda *s: rng.standard_normal(s, dtype=np.float32)  # noqa: E731
    F = torch.nn.functional if torch else None

    def jax_vjp(apply, params, x, extra=()):
        out = jax.eval_shape(apply, params, x, *extra)
        g = jax.tree.map(lambda o: jnp.asarray(rand(*o.shape)), out)

        @jax.jit
        def fb(params, x, g, *extra):
            # The output is returned with the gradients: otherwise XLA drops the forward pass wherever the
            # backward pass does not need it (a convolution's backward needs only its input and kernel).
            y, vjp = jax.vjp(lambda p, x: apply(p, x, *extra), params, x)
            return y, vjp(g)

        return lambda: fb(params, x, g, *extra)

    def torch_vjp(fn, x, weights=()):
        if torch is None:
            return None
        x = torch.from_numpy(np.ascontiguousarray(x)).requires_grad_(True)
        out = fn(x)
        g = torch.from_numpy(rand(*out.shape))
        leaves = [x, *weights]

        def fb():
            y = fn(x)
            return y, torch.autograd.grad(y, leaves, g)

        return fb

    def module(mod, x, rngs=None):
        params = jax.jit(mod.init)(jax.random.key(0), x)
        return jax_vjp(lambda p, x: mod.apply(p, x, rngs=rngs), params, jnp.asarray(x))

    if kind in ("conv3x3", "conv1x1"):
        h, w, cin, cout = rest
        k = 3 if kind == "conv3x3" else 1
        x = rand(b, h, w, cin)
        jf = module(nn.Conv(cout, (k, k), padding="SAME"), x)
        if torch is None:
            return jf, None
        conv = torch.nn.Conv2d(cin, cout, k, padding=k // 2)
        return jf, torch_vjp(conv, x.transpose(0, 3, 1, 2), list(conv.parameters()))
    if kind == "dense":
        h, w, cin, cout = rest
        x = rand(b, h, w, cin)
        jf = module(nn.Dense(cout), x)
        if torch is None:
            return jf, None
        lin = torch.nn.Linear(cin, cout)
        return jf, torch_vjp(lin, x.reshape(b, h * w, cin), list(lin.parameters()))
    if kind == "group_norm":
        h, w, c, groups = rest
        x = rand(b, h, w, c)
        from jaxdiff.models._layers import GroupNorm as LibraryGroupNorm

        jf = module(LibraryGroupNorm(num_groups=groups, epsilon=1e-6), x)
        if torch is None:
            return jf, None
        gn = torch.nn.GroupNorm(groups, c, eps=1e-6)
        return jf, torch_vjp(gn, x.transpose(0, 3, 1, 2), list(gn.parameters()))
    if kind in ("silu", "upsample", "downsample"):
        x = rand(b, *rest)
        jop = {"silu": nn.silu, "upsample": _nearest_up, "downsample": _mean_down}[kind]
        jf = jax_vjp(lambda p, x: jop(x), {}, jnp.asarray(x))
        if torch is None:
            return jf, None
        top = {
            "silu": F.silu,
            "upsample": lambda x: F.interpolate(x, scale_factor=2, mode="nearest"),
            "downsample": lambda x: F.avg_pool2d(x, 2),
        }[kind]
        return jf, torch_vjp(top, x.transpose(0, 3, 1, 2))
    if kind == "dropout":
        h, w, c, p = rest
        x = rand(b, h, w, c)
        impl = rng_impl or "threefry2x32"
        drop = nn.Dropout(p)
        jf = jax_vjp(
            lambda _, x, key: drop.apply({}, x, deterministic=False, rngs={"dropout": key}),
            {},
            jnp.asarray(x),
            (jax.random.key(0, impl=impl),),
        )
        return jf, torch_vjp(lambda x: F.dropout(x, p, training=True), x.transpose(0, 3, 1, 2)) if torch else None
    if kind == "attention":
        h, w, c = rest
        q, k_, v = (rand(b, h * w, c) for _ in range(3))

        def attn(p, qkv):
            q, k, v = qkv
            wts = jax.nn.softmax(jnp.einsum("bqc,bkc->bqk", q, k) / math.sqrt(c), axis=-1)
            return jnp.einsum("bqk,bkc->bqc", wts, v)

        jf = jax_vjp(attn, {}, tuple(map(jnp.asarray, (q, k_, v))))
        if torch is None:
            return jf, None
        tq, tk, tv = (torch.from_numpy(a).requires_grad_(True) for a in (q, k_, v))
        tattn = lambda: torch.bmm(torch.softmax(torch.bmm(tq, tk.transpose(1, 2)) / math.sqrt(c), -1), tv)  # noqa: E731
        g = torch.from_numpy(rand(b, h * w, c))
        return jf, lambda: (lambda y: (y, torch.autograd.grad(y, [tq, tk, tv], g)))(tattn())
    if kind == "time_embedding":
        nf, channels = rest[0], rest[1]  # channels: the output width of every block's projection

        class TimeEmbedding(nn.Module):
            @nn.compact
            def __call__(self, s):
                temb = nn.Dense(4 * nf)(sinusoidal_embedding(s, nf))
                temb = nn.silu(nn.Dense(4 * nf)(nn.silu(temb)))
                return [nn.Dense(c)(temb) for c in channels]

        s = jnp.asarray(999.0 * rng.uniform(size=b).astype(np.float32))
        mod = TimeEmbedding()
        params = jax.jit(mod.init)(jax.random.key(0), s)
        jf = jax_vjp(lambda p, s: mod.apply(p, s), params, s)
        if torch is None:
            return jf, None
        lins = [torch.nn.Linear(nf, 4 * nf), torch.nn.Linear(4 * nf, 4 * nf)] + [
            torch.nn.Linear(4 * nf, c) for c in channels
        ]
        half = nf // 2
        freqs = torch.exp(-math.log(10_000.0) / (half - 1) * torch.arange(half, dtype=torch.float32))

        def temb_fn(s):
            a = s[:, None] * freqs[None]
            t = lins[1](F.silu(lins[0](torch.cat([torch.sin(a), torch.cos(a)], 1))))
            return torch.cat([lin(F.silu(t)) for lin in lins[2:]], 1)

        weights = [p for lin in lins for p in lin.parameters()]
        return jf, torch_vjp(temb_fn, np.asarray(s), weights)
    raise ValueError(kind)


def section_blocks(name, repeats, torch):
    from jaxdiff.models import DDPMpp

    kw, shape = MODELS[name]
    model = DDPMpp(**kw)
    counts = record_blocks(model, shape)
    # The time embedding: once per forward, with a projection for every residual block.
    counts[("time_embedding", shape[0], kw["nf"], tuple(_temb_projections(model, shape)))] = 1
    totals: dict = {}
    for key, count in sorted(counts.items(), key=lambda kv: (kv[0][0], str(kv[0][1:]))):
        jf, tf = _block_fns(key, kw, torch)
        t = time_side_by_side({"jax": jf, "torch": tf}, repeats)
        jt, tt = t["jax"], t.get("torch")
        shape_desc = list(key[1:]) if key[0] != "time_embedding" else [key[1], key[2], f"{len(key[3])} projections"]
        _emit(
            {
                "section": "blocks",
                "model": name,
                "block": key[0],
                "shape": shape_desc,
                "count": count,
                "jax_ms": _ms(jt),
                "torch_ms": _ms(tt),
                "ratio": _ratio(jt, tt),
            }
        )
        tot = totals.setdefault(key[0], [0.0, 0.0 if tt is not None else None])
        tot[0] += count * jt
        if tt is not None:
            tot[1] += count * tt
    grand = [0.0, 0.0 if torch else None]
    for kind, (jt, tt) in sorted(totals.items(), key=lambda kv: -kv[1][0]):
        _emit(
            {
                "section": "blocks",
                "model": name,
                "block": f"{kind}_total",
                "jax_ms": _ms(jt),
                "torch_ms": _ms(tt),
                "ratio": _ratio(jt, tt),
            }
        )
        grand[0] += jt
        if tt is not None:
            grand[1] += tt
    _emit(
        {
            "section": "blocks",
            "model": name,
            "block": "sum_of_blocks",
            "jax_ms": _ms(grand[0]),
            "torch_ms": _ms(grand[1]),
            "ratio": _ratio(grand[0], grand[1]),
            "note": "count x time summed; residual sums, concatenations and the loss are not included",
        }
    )


def _temb_projections(model, shape):
    """Output widths of every ``temb_proj`` dense layer (one per residual block)."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    widths = []

    def interceptor(next_fun, args, kwargs, context):
        if (
            context.method_name == "__call__"
            and isinstance(context.module, nn.Dense)
            and context.module.name == "temb_proj"
        ):
            widths.append(context.module.features)
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor):
        jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(shape), jnp.zeros(shape[:1])))
    return widths


# ----------------------------------------------------------------------------------------------------------
# The loss's randomness
# ----------------------------------------------------------------------------------------------------------
KEY_IMPLS = ("threefry2x32", "rbg", "unsafe_rbg")


def section_rng(name, repeats, torch):
    import jax

    from jaxdiff.models import DDPMpp

    kw, shape = MODELS[name]
    b = shape[0]
    drops = [
        (k[1:-1], k[-1]) for k, c in record_blocks(DDPMpp(**kw), shape).items() if k[0] == "dropout" for _ in range(c)
    ]

    def times_noise(key):
        k_t, k_z = jax.random.split(key)
        return jax.random.uniform(k_t, (b,)), jax.random.normal(k_z, shape)

    def masks(key):
        return [jax.random.bernoulli(jax.random.fold_in(key, i), 1.0 - p, s) for i, (s, p) in enumerate(drops)]

    def everything(key):
        k_loss, k_drop = jax.random.split(key)
        return times_noise(k_loss), masks(k_drop)

    parts = {"times_noise": times_noise, "dropout_masks": masks, "all": everything}
    torch_parts = {}
    if torch is not None:
        tshape = (shape[0], shape[3], shape[1], shape[2])

        def t_times_noise():
            return torch.rand(b), torch.randn(tshape)

        def t_masks():
            return [torch.empty((s[0], s[3], s[1], s[2])).bernoulli_(1.0 - p) for s, p in drops]

        torch_parts = {
            "times_noise": t_times_noise,
            "dropout_masks": t_masks,
            "all": lambda: (t_times_noise(), t_masks()),
        }
    n_masks = sum(math.prod(s) for s, _ in drops)
    for part, fn in parts.items():
        fns = {}
        for impl in KEY_IMPLS:
            jf, key = jax.jit(fn), jax.random.key(0, impl=impl)
            fns[impl] = lambda jf=jf, key=key: jf(key)
        fns["torch"] = torch_parts.get(part)
        t = time_side_by_side(fns, repeats)
        row = {
            "section": "rng",
            "model": name,
            "part": part,
            "dropout_layers": len(drops),
            "mask_elements": n_masks,
            "noise_elements": math.prod(shape),
        }
        row.update({f"jax_{impl}_ms": _ms(t[impl]) for impl in KEY_IMPLS})
        row["torch_ms"] = _ms(t.get("torch"))
        row.update({f"ratio_{impl}": _ratio(t[impl], t.get("torch")) for impl in KEY_IMPLS})
        row["threefry_over_rbg"] = _ratio(t["threefry2x32"], t["rbg"])
        _emit(row)


# ----------------------------------------------------------------------------------------------------------
# Passes over all parameters: clipping, Adam, EMA, the guard
# ----------------------------------------------------------------------------------------------------------
def _param_arrays(name):
    """Random arrays with the model's parameter shapes (numpy), in Flax's tree and flat order."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxdiff.models import DDPMpp

    kw, shape = MODELS[name]
    abstract = jax.eval_shape(DDPMpp(**kw).init, jax.random.key(0), jnp.zeros(shape), jnp.zeros(shape[:1]))["params"]
    rng = np.random.default_rng(0)
    return jax.tree.map(lambda s: 0.01 * rng.standard_normal(s.shape, dtype=np.float32), abstract)


def _carried(fn, state, *args):
    """A zero-argument call of the donating ``fn(state, *args) -> state``, the output fed to the next call."""
    box = [state]

    def call():
        box[0] = fn(box[0], *args)
        return box[0]

    return call


def section_optim(name, repeats, torch):
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from jaxdiff.train import _global_norm, make_optimizer

    tree = _param_arrays(name)
    n_params = sum(a.size for a in jax.tree.leaves(tree))
    params = jax.tree.map(jnp.asarray, tree)
    grads = jax.tree.map(lambda a: jnp.asarray(a * 0.1), tree)
    copy = lambda t: jax.tree.map(jnp.copy, t)  # noqa: E731
    rate = 0.9999
    tx, adam, clip = make_optimizer(), optax.adam(2e-4), optax.clip_by_global_norm(1.0)

    def apply_tx(t):
        def f(carry, g):
            p, s = carry
            u, s = t.update(g, s, p)
            return optax.apply_updates(p, u), s

        return jax.jit(f, donate_argnums=0)

    ema = lambda e, p: jax.tree.map(lambda e, p: rate * e + (1.0 - rate) * p, e, p)  # noqa: E731

    def guard(old, new, finite):
        return jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)

    def tail(carry, g, loss, how="where"):  # what the library's step does after the gradient, in one computation
        p, e, s = carry
        u, s_new = tx.update(g, s, p)
        p_new = optax.apply_updates(p, u)
        e_new = ema(e, p_new)
        finite = jnp.isfinite(loss) & jnp.isfinite(_global_norm(g))
        if how == "none":
            return p_new, e_new, s_new
        if how == "cond":  # the same guard as a branch: no elementwise select over every parameter
            return jax.lax.cond(finite, lambda: (p_new, e_new, s_new), lambda: (p, e, s))
        return guard((p, e, s), (p_new, e_new, s_new), finite)

    adam_state = tx.init(params)
    norm_fn, clip_fn = jax.jit(_global_norm), jax.jit(lambda g: clip.update(g, clip.init(g))[0])
    jax_fns = {
        "global_norm": lambda: norm_fn(grads),
        "clip_by_global_norm": lambda: clip_fn(grads),
        "adam": _carried(apply_tx(adam), (copy(params), adam.init(params)), grads),
        "optax_chain": _carried(apply_tx(tx), (copy(params), adam_state), grads),
        "ema": _carried(jax.jit(ema, donate_argnums=0), copy(params), params),
        "guard": _carried(
            jax.jit(guard, donate_argnums=0),
            (copy(params), copy(params), copy(params), copy(params)),
            (params, params, params, params),
            jnp.asarray(True),
        ),
    }
    for how, part in (("where", "update_tail"), ("cond", "update_tail_guard_cond"), ("none", "update_tail_no_guard")):
        f = jax.jit(lambda c, g, loss, how=how: tail(c, g, loss, how), donate_argnums=0)
        jax_fns[part] = _carried(f, (copy(params), copy(params), tx.init(params)), grads, jnp.float32(1.0))
    torch_fns = {}
    if torch is not None:
        tp = [torch.from_numpy(np.array(a)).requires_grad_(True) for a in jax.tree.leaves(tree)]
        for p in tp:
            p.grad = 0.1 * p.detach().clone()
        shadow = [p.detach().clone() for p in tp]
        opt = torch.optim.Adam(tp, lr=2e-4)  # the default implementation, as the reference code uses

        def t_ema():  # score_sde_pytorch's ExponentialMovingAverage.update
            with torch.no_grad():
                for s, p in zip(shadow, tp, strict=True):
                    s.sub_((1.0 - rate) * (s - p))

        def t_norm():
            return torch.linalg.vector_norm(torch.stack(torch._foreach_norm([p.grad for p in tp])))

        def t_tail():
            torch.nn.utils.clip_grad_norm_(tp, 1.0, foreach=True)
            opt.step()
            t_ema()

        torch_fns = {
            "update_tail_guard_cond": t_tail,
            "update_tail_no_guard": t_tail,
            "global_norm": t_norm,
            "clip_by_global_norm": lambda: torch.nn.utils.clip_grad_norm_(tp, 1.0, foreach=True),
            "adam": opt.step,
            "optax_chain": lambda: (torch.nn.utils.clip_grad_norm_(tp, 1.0, foreach=True), opt.step()),
            "ema": t_ema,
            "update_tail": t_tail,
        }
    for part, jf in jax_fns.items():
        t = time_side_by_side({"jax": jf, "torch": torch_fns.get(part)}, repeats, target_s=0.2)
        _emit(
            {
                "section": "optim",
                "model": name,
                "part": part,
                "params": n_params,
                "jax_ms": _ms(t["jax"]),
                "torch_ms": _ms(t.get("torch")),
                "ratio": _ratio(t["jax"], t.get("torch")),
                "torch_equivalent": {
                    "global_norm": "_foreach_norm",
                    "clip_by_global_norm": "clip_grad_norm_(foreach)",
                    "adam": "Adam.step",
                    "optax_chain": "clip_grad_norm_ + Adam.step",
                    "ema": "reference EMA loop",
                    "guard": None,
                    "update_tail": "clip + Adam + EMA",
                }.get(part),
            }
        )


# ----------------------------------------------------------------------------------------------------------
# The library's train step against a plain JAX step
# ----------------------------------------------------------------------------------------------------------
def make_plain_step(model, tx, ema_rate=0.9999, beta_min=0.1, beta_max=20.0, eps=1e-5):
    """A hand-written JAX step: the continuous VP eps-loss (sum over dimensions, batch mean), the optax chain,
    the EMA; no checks, no guard, no metrics besides the loss."""
    import jax
    import jax.numpy as jnp
    import optax

    def loss_fn(params, key, x):
        k_t, k_z, k_drop = jax.random.split(key, 3)
        t = eps + jax.random.uniform(k_t, x.shape[:1]) * (1.0 - eps)
        z = jax.random.normal(k_z, x.shape)
        log_alpha = -0.25 * t**2 * (beta_max - beta_min) - 0.5 * t * beta_min
        alpha, sigma = jnp.exp(log_alpha), jnp.sqrt(-jnp.expm1(2.0 * log_alpha))
        xt = alpha[:, None, None, None] * x + sigma[:, None, None, None] * z
        eps_hat = model.apply({"params": params}, xt, 999.0 * t, train=True, rngs={"dropout": k_drop})
        return jnp.mean(jnp.sum(jnp.square(eps_hat - z), axis=(1, 2, 3)))

    def step(state, x):
        params, ema, opt_state, key, i = state
        loss, grads = jax.value_and_grad(loss_fn)(params, jax.random.fold_in(key, i), x)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        ema = jax.tree.map(lambda e, p: ema_rate * e + (1.0 - ema_rate) * p, ema, params)
        return (params, ema, opt_state, key, i + 1), loss

    return jax.jit(step, donate_argnums=0), loss_fn


def _library_state(model, shape, tx, impl):
    import jax
    import jax.numpy as jnp

    from jaxdiff.train import create_train_state

    return create_train_state(jax.random.key(0, impl=impl), model, jax.ShapeDtypeStruct(shape, jnp.float32), tx)


def section_step(name, repeats, torch, impls=("threefry2x32", "rbg")):
    import jax
    import numpy as np

    from jaxdiff.losses import make_loss_fn
    from jaxdiff.models import DDPMpp
    from jaxdiff.sde import VPSDE
    from jaxdiff.train import make_optimizer, make_train_step

    kw, shape = MODELS[name]
    model, tx = DDPMpp(**kw), make_optimizer()
    x = jax.device_put(np.random.default_rng(0).standard_normal(shape, dtype=np.float32))
    batch = {"x": x}
    lib_loss = make_loss_fn(VPSDE(), model)
    lib_step = make_train_step(lib_loss, tx)
    plain_step, plain_loss = make_plain_step(model, tx)
    fns, compile_s = {}, {}
    for impl in impls:
        state = _library_state(model, shape, tx, impl)
        copy = lambda tree: jax.tree.map(lambda a: a.copy(), tree)  # noqa: E731 (the steps donate their input)
        plain_state = (state.params, state.ema_params, state.opt_state, state.key, state.step)
        plain_state = copy(plain_state)
        t0 = time.perf_counter()
        jax.block_until_ready(lib_step(copy(state), batch))
        compile_s[f"library_{impl}"] = time.perf_counter() - t0
        fns[f"library_{impl}"] = _carried(lambda s: lib_step(s, batch)[0], state)
        t0 = time.perf_counter()
        jax.block_until_ready(plain_step(copy(plain_state), x))
        compile_s[f"plain_{impl}"] = time.perf_counter() - t0
        fns[f"plain_{impl}"] = _carried(lambda s: plain_step(s, x)[0], plain_state)
        if impl == impls[0]:
            key, grad_params = copy((state.key, state.params))
            lib_grad = jax.jit(jax.grad(lambda p, key, batch: lib_loss(p, key, batch)[0]))
            plain_grad = jax.jit(jax.grad(plain_loss))
            fns["library_loss_grad"] = lambda: lib_grad(grad_params, key, batch)
            fns["plain_loss_grad"] = lambda: plain_grad(grad_params, key, x)
    t = time_side_by_side(fns, repeats, target_s=0.0)
    b = shape[0]
    row = {"section": "step", "model": name, "batch": b}
    row.update({f"{k}_ms": _ms(v) for k, v in t.items()})
    row.update({f"{k}_first_call_s": round(v, 2) for k, v in compile_s.items()})
    for impl in impls:
        row[f"library_over_plain_{impl}"] = _ratio(t[f"library_{impl}"], t[f"plain_{impl}"])
    row["library_rbg_over_threefry"] = _ratio(t.get("library_rbg"), t["library_threefry2x32"])
    row["loss_grad_library_over_plain"] = _ratio(t["library_loss_grad"], t["plain_loss_grad"])
    row["examples_per_s_library"] = round(b / t["library_threefry2x32"], 2)
    _emit(row)


def section_torch_step(name, repeats, torch):
    import jax
    import numpy as np

    from jaxdiff.losses import make_loss_fn
    from jaxdiff.models import DDPMpp
    from jaxdiff.sde import VPSDE
    from jaxdiff.train import make_optimizer, make_train_step

    kw, shape = MODELS[name]
    if torch is None:
        _emit({"section": "torch_step", "model": name, "skipped": "torch not installed"})
        return
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import _torch_ddpmpp

    torch.manual_seed(0)
    tmodel = _torch_ddpmpp.DDPMpp(**kw, image_size=shape[1], channels=shape[3])
    tstep = _torch_ddpmpp.make_step(tmodel)
    model, tx = DDPMpp(**kw), make_optimizer()
    x = np.random.default_rng(0).standard_normal(shape, dtype=np.float32)
    batch = {"x": jax.device_put(x)}
    xt = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
    state = _library_state(model, shape, tx, "threefry2x32")
    n_jax = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(state.params))
    n_torch = sum(p.numel() for p in tmodel.parameters())
    step = make_train_step(make_loss_fn(VPSDE(), model), tx)
    with flax_group_norm():  # the same network and step with Flax's GroupNorm, as the networks had it before
        fast_step = make_train_step(make_loss_fn(VPSDE(), DDPMpp(**kw)), tx)
        fast_state = jax.tree.map(lambda a: a.copy(), state)
        jax.block_until_ready(fast_step(jax.tree.map(lambda a: a.copy(), state), batch))
    t0 = time.perf_counter()
    state, _ = step(state, batch)
    jax.block_until_ready(state)
    jax_first = time.perf_counter() - t0
    t0 = time.perf_counter()
    tstep(xt)
    torch_first = time.perf_counter() - t0
    t = time_side_by_side(
        {
            "jaxdiff": _carried(lambda s: step(s, batch)[0], state),
            "torch": lambda: tstep(xt),
            "jaxdiff_flax_group_norm": _carried(lambda s: fast_step(s, batch)[0], fast_state),
        },
        repeats,
        target_s=0.0,
    )
    b = shape[0]
    _emit(
        {
            "section": "torch_step",
            "model": name,
            "batch": b,
            "params_jax": n_jax,
            "params_torch": n_torch,
            "jaxdiff_ms": _ms(t["jaxdiff"]),
            "torch_ms": _ms(t["torch"]),
            "jaxdiff_examples_per_s": round(b / t["jaxdiff"], 2),
            "torch_examples_per_s": round(b / t["torch"], 2),
            "examples_per_s_ratio": _ratio(t["torch"], t["jaxdiff"]),
            "jaxdiff_flax_group_norm_ms": _ms(t["jaxdiff_flax_group_norm"]),
            "examples_per_s_ratio_flax_group_norm": _ratio(t["torch"], t["jaxdiff_flax_group_norm"]),
            "jaxdiff_first_step_s": round(jax_first, 2),
            "torch_first_step_s": round(torch_first, 2),
        }
    )


# ----------------------------------------------------------------------------------------------------------
# Convolution (and GroupNorm) formulations
# ----------------------------------------------------------------------------------------------------------
CONV_CASES = {  # (batch, height, width, in, out, kernel): the costliest convolutions of each model
    "small": ((32, 32, 32, 64, 64, 3), (32, 32, 32, 32, 32, 3), (32, 16, 16, 64, 64, 3), (32, 32, 32, 96, 32, 1)),
    "cifar": ((8, 32, 32, 128, 128, 3), (8, 16, 16, 256, 256, 3), (8, 8, 8, 256, 256, 3), (8, 32, 32, 256, 128, 1)),
}
GN_CASES = {"small": ((32, 32, 32, 32, 8), (32, 16, 16, 64, 16)), "cifar": ((8, 32, 32, 128, 32), (8, 16, 16, 256, 32))}


def _conv_variants(b, h, w, cin, cout, k):
    """``{name: (apply(kernel, x), kernel, x)}``: one convolution (no bias) written several ways."""
    import jax.numpy as jnp
    import numpy as np
    from jax import lax

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((b, h, w, cin), dtype=np.float32))
    kern = jnp.asarray(0.1 * rng.standard_normal((k, k, cin, cout), dtype=np.float32))
    nhwc = ("NHWC", "HWIO", "NHWC")

    def conv(dn, **kw):
        return lambda w_, x_: lax.conv_general_dilated(x_, w_, (1, 1), "SAME", dimension_numbers=dn, **kw)

    def im2col(w_, x_):  # 3x3 as one matmul over the nine shifted copies of the input
        xp = jnp.pad(x_, ((0, 0), (1, 1), (1, 1), (0, 0)))
        cols = jnp.concatenate([xp[:, i : i + h, j : j + w] for i in range(3) for j in range(3)], axis=-1)
        return jnp.einsum("bhwk,ko->bhwo", cols, w_.reshape(9 * cin, cout))

    def shifted(w_, x_):  # 3x3 as nine shifted 1x1 matmuls, summed
        xp = jnp.pad(x_, ((0, 0), (1, 1), (1, 1), (0, 0)))
        return sum(
            jnp.einsum("bhwc,co->bhwo", xp[:, i : i + h, j : j + w], w_[i, j]) for i in range(3) for j in range(3)
        )

    out = {
        "nhwc_hwio": (conv(nhwc), kern, x),
        "nchw_oihw": (conv(("NCHW", "OIHW", "NCHW")), kern.transpose(3, 2, 0, 1), x.transpose(0, 3, 1, 2)),
        "nhwc_precision_highest": (conv(nhwc, precision=lax.Precision.HIGHEST), kern, x),
        "nhwc_preferred_f32": (conv(nhwc, preferred_element_type=jnp.float32), kern, x),
    }
    if k == 1:
        out["einsum"] = (lambda w_, x_: jnp.einsum("bhwc,co->bhwo", x_, w_[0, 0]), kern, x)
    else:
        out["im2col_matmul"] = (im2col, kern, x)
        out["shifted_matmuls"] = (shifted, kern, x)
    return out


def section_conv(name, repeats, torch, only_baseline=False):
    import jax
    import jax.numpy as jnp

    for case in CONV_CASES[name]:
        b, h, w, cin, cout, k = case
        fns = {}
        for variant, (apply, kern, x) in _conv_variants(*case).items():
            if only_baseline and variant != "nhwc_hwio":
                continue
            g = jnp.ones(jax.eval_shape(apply, kern, x).shape)
            fb = jax.jit(lambda kern, x, g, apply=apply: (lambda yv: (yv[0], yv[1](g)))(jax.vjp(apply, kern, x)))
            fns[variant] = lambda fb=fb, kern=kern, x=x, g=g: fb(kern, x, g)
        if torch is not None:
            xt = torch.randn(b, cin, h, w)
            wt = (0.1 * torch.randn(cout, cin, k, k)).requires_grad_(True)
            for fmt in (("torch_nchw", torch.contiguous_format), ("torch_channels_last", torch.channels_last))[
                : 1 if only_baseline else 2
            ]:
                xf = xt.contiguous(memory_format=fmt[1]).requires_grad_(True)
                wf = wt.detach().contiguous(memory_format=fmt[1]).requires_grad_(True)
                y0 = torch.nn.functional.conv2d(xf, wf, padding=k // 2)
                gt = torch.ones_like(y0)

                def tfb(xf=xf, wf=wf, gt=gt):
                    y = torch.nn.functional.conv2d(xf, wf, padding=k // 2)
                    return y, torch.autograd.grad(y, [xf, wf], gt)

                fns[fmt[0]] = tfb
        t = time_side_by_side(fns, repeats)
        ref = t.get("torch_nchw")
        row = {
            "section": "conv",
            "model": name,
            "case": f"conv{k}x{k} b{b} {h}x{w} {cin}->{cout}",
            "xla_flags": os.environ.get("XLA_FLAGS", ""),
        }
        row.update({f"{v}_ms": _ms(s) for v, s in t.items()})
        row.update({f"{v}_over_torch": _ratio(s, ref) for v, s in t.items() if not v.startswith("torch_nchw")})
        _emit(row)
    if only_baseline:
        return
    for case in GN_CASES[name]:
        _group_norm_variants(name, case, repeats, torch)
    _checkpoint_policies(name, repeats)


def _group_norm(x, scale, bias, groups, eps=1e-6, two_pass=True):
    """GroupNorm over NHWC written directly: statistics over (H, W, C / groups)."""
    import jax.numpy as jnp
    from jax import lax

    b, h, w, c = x.shape
    xg = x.reshape(b, h * w, groups, c // groups)
    mean = jnp.mean(xg, axis=(1, 3), keepdims=True)
    if two_pass:
        var = jnp.mean(jnp.square(xg - mean), axis=(1, 3), keepdims=True)
    else:
        var = jnp.mean(jnp.square(xg), axis=(1, 3), keepdims=True) - jnp.square(mean)
    y = ((xg - mean) * lax.rsqrt(var + eps)).reshape(b, h, w, c)
    return y * scale + bias


def _group_norm_channel_stats(x, scale, bias, groups, eps=1e-6):
    """GroupNorm as a per-channel affine map ``x a + d``: the statistics are reduced over the pixels per channel
    (a contiguous reduction in NHWC), then over each group's channels (a tiny one)."""
    import jax.numpy as jnp
    from jax import lax

    b, h, w, c = x.shape
    n = h * w * (c // groups)
    s1 = jnp.sum(x, axis=(1, 2)).reshape(b, groups, c // groups).sum(-1, keepdims=True)
    s2 = jnp.sum(jnp.square(x), axis=(1, 2)).reshape(b, groups, c // groups).sum(-1, keepdims=True)
    mean = s1 / n
    inv = lax.rsqrt(jnp.maximum(s2 / n - jnp.square(mean), 0.0) + eps)
    a = jnp.broadcast_to(inv, (b, groups, c // groups)).reshape(b, c) * scale
    d = bias - jnp.broadcast_to(mean, (b, groups, c // groups)).reshape(b, c) * a
    return x * a[:, None, None, :] + d[:, None, None, :]


def _group_norm_variants(name, case, repeats, torch):
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import numpy as np

    b, h, w, c, groups = case
    x = jnp.asarray(np.random.default_rng(0).standard_normal((b, h, w, c), dtype=np.float32))
    scale, bias = jnp.ones((c,)), jnp.zeros((c,))
    flax_gn = nn.GroupNorm(num_groups=groups, epsilon=1e-6)
    variables = flax_gn.init(jax.random.key(0), x)
    applies = {
        "flax_group_norm": (lambda p, x: flax_gn.apply(p, x), variables),
        "direct_two_pass": (lambda p, x: _group_norm(x, p[0], p[1], groups), (scale, bias)),
        "direct_one_pass": (lambda p, x: _group_norm(x, p[0], p[1], groups, two_pass=False), (scale, bias)),
        "channel_stats_affine": (lambda p, x: _group_norm_channel_stats(x, p[0], p[1], groups), (scale, bias)),
        "direct_nchw": (
            lambda p, x: _group_norm(x.transpose(0, 2, 3, 1), p[0], p[1], groups).transpose(0, 3, 1, 2),
            (scale, bias),
        ),
    }
    fns = {}
    for variant, (apply, params) in applies.items():
        xin = x.transpose(0, 3, 1, 2) if variant == "direct_nchw" else x
        fb = jax.jit(lambda p, x, apply=apply: (lambda yv: (yv[0], yv[1](jnp.ones_like(yv[0]))))(jax.vjp(apply, p, x)))
        fns[variant] = lambda fb=fb, p=params, xin=xin: fb(p, xin)
    if torch is not None:
        gn = torch.nn.GroupNorm(groups, c, eps=1e-6)
        xt = torch.randn(b, c, h, w).requires_grad_(True)
        gt = torch.ones(b, c, h, w)
        fns["torch"] = lambda: (lambda y: (y, torch.autograd.grad(y, [xt, *gn.parameters()], gt)))(gn(xt))
    t = time_side_by_side(fns, repeats)
    row = {"section": "conv", "model": name, "case": f"group_norm b{b} {h}x{w} c{c} g{groups}"}
    row.update({f"{v}_ms": _ms(s) for v, s in t.items()})
    row.update({f"{v}_over_torch": _ratio(s, t.get("torch")) for v, s in t.items() if v != "torch"})
    _emit(row)


@contextlib.contextmanager
def flax_group_norm():
    """Within the block, networks built and traced use Flax's ``nn.GroupNorm`` (the networks' formulation before
    ``jaxdiff.models._layers.GroupNorm``) for every GroupNorm: ``group_norm`` replaced in this process only; the
    parameter tree is unchanged."""
    import flax.linen as nn
    import jax.numpy as jnp

    import jaxdiff.models._layers as layers
    import jaxdiff.models._ncsnpp as ncsnpp

    original = layers.group_norm

    def flax(channels):
        groups = layers.group_count(channels)
        return nn.GroupNorm(num_groups=groups, epsilon=1e-6, dtype=jnp.float32, param_dtype=jnp.float32)

    layers.group_norm = ncsnpp.group_norm = flax
    try:
        yield
    finally:
        layers.group_norm = ncsnpp.group_norm = original


@contextlib.contextmanager
def einsum_conv1x1():
    """Within the block, networks built use an ``einsum`` over the channel axis for every 1x1 convolution (a module
    named ``Conv`` with ``nn.Conv``'s 1x1 kernel and bias, so the parameter tree is unchanged)."""
    import flax.linen as nn
    import jax.numpy as jnp

    import jaxdiff.models._layers as layers
    from jaxdiff.models._init import default_init

    class Conv(nn.Module):
        features: int
        init_scale: float = 1.0
        dtype: object = jnp.float32

        @nn.compact
        def __call__(self, x):
            shape = (1, 1, x.shape[-1], self.features)
            kernel = self.param("kernel", default_init(self.init_scale), shape, jnp.float32)
            bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
            x = x.astype(self.dtype)
            return jnp.einsum("bhwc,co->bhwo", x, kernel[0, 0].astype(self.dtype)) + bias.astype(self.dtype)

    original = layers.conv1x1
    layers.conv1x1 = lambda features, init_scale=1.0, dtype=jnp.float32: Conv(features, init_scale, dtype)
    try:
        yield
    finally:
        layers.conv1x1 = original


def section_conv1x1_step(name, repeats, torch):
    """The library's step with ``nn.Conv`` 1x1 shortcuts against the same network with ``einsum`` shortcuts."""
    import jax
    import numpy as np

    from jaxdiff.losses import make_loss_fn
    from jaxdiff.models import DDPMpp
    from jaxdiff.sde import VPSDE
    from jaxdiff.train import make_optimizer, make_train_step

    kw, shape = MODELS[name]
    tx = make_optimizer()
    batch = {"x": jax.device_put(np.random.default_rng(0).standard_normal(shape, dtype=np.float32))}
    state = _library_state(DDPMpp(**kw), shape, tx, "threefry2x32")
    copy = lambda tree: jax.tree.map(lambda a: a.copy(), tree)  # noqa: E731
    fns, losses = {}, {}
    for variant, patch in (("conv_1x1", contextlib.nullcontext), ("einsum_1x1", einsum_conv1x1)):
        with patch():
            step = make_train_step(make_loss_fn(VPSDE(), DDPMpp(**kw)), tx)
            _, metrics = step(copy(state), batch)  # compiled while the replacement is in place
            losses[variant] = float(metrics["loss"])
        fns[variant] = _carried(lambda s, step=step: step(s, batch)[0], copy(state))
    t = time_side_by_side(fns, repeats, target_s=0.0)
    row = {"section": "conv1x1_step", "model": name, "batch": shape[0]}
    row.update({f"{k}_step_ms": _ms(v) for k, v in t.items()})
    row.update({f"{k}_first_loss": v for k, v in losses.items()})
    row["einsum_over_conv"] = _ratio(t["einsum_1x1"], t["conv_1x1"])
    _emit(row)


def section_group_norm_step(name, repeats, torch):
    """The library's step and loss gradient with Flax's GroupNorm, and with GroupNorm as a per-channel affine map."""
    import jax
    import numpy as np

    from jaxdiff.losses import make_loss_fn
    from jaxdiff.models import DDPMpp
    from jaxdiff.sde import VPSDE
    from jaxdiff.train import make_optimizer, make_train_step

    kw, shape = MODELS[name]
    tx = make_optimizer()
    batch = {"x": jax.device_put(np.random.default_rng(0).standard_normal(shape, dtype=np.float32))}
    fns = {}
    state = _library_state(DDPMpp(**kw), shape, tx, "threefry2x32")
    copy = lambda tree: jax.tree.map(lambda a: a.copy(), tree)  # noqa: E731
    for variant, patch in (
        ("flax_group_norm", flax_group_norm),
        ("channel_stats_group_norm", contextlib.nullcontext),  # the library's own
    ):
        with patch():
            model = DDPMpp(**kw)
            loss = make_loss_fn(VPSDE(), model)
            step, grad = make_train_step(loss, tx), jax.jit(jax.grad(lambda p, k, b, loss=loss: loss(p, k, b)[0]))
            params, key = copy((state.params, state.key))
            jax.block_until_ready(grad(params, key, batch))  # traced and compiled while the replacement is in place
            jax.block_until_ready(step(copy(state), batch))
        fns[f"{variant}_loss_grad"] = lambda grad=grad, params=params, key=key: grad(params, key, batch)
        fns[f"{variant}_step"] = _carried(lambda s, step=step: step(s, batch)[0], copy(state))
    t = time_side_by_side(fns, repeats, target_s=0.0)
    row = {"section": "group_norm_step", "model": name, "batch": shape[0]}
    row.update({f"{k}_ms": _ms(v) for k, v in t.items()})
    for what in ("loss_grad", "step"):
        row[f"{what}_channel_stats_over_flax"] = _ratio(
            t[f"channel_stats_group_norm_{what}"], t[f"flax_group_norm_{what}"]
        )
    _emit(row)


CHECKPOINT_POLICIES = ("none", "nothing_saveable", "dots_saveable", "dots_with_no_batch_dims_saveable")


def _checkpoint_policies(name, repeats):
    """The whole network's loss gradient with the network under ``jax.checkpoint`` and each policy."""
    import jax
    import numpy as np

    from jaxdiff.models import DDPMpp
    from jaxdiff.train import make_optimizer

    kw, shape = MODELS[name]
    model = DDPMpp(**kw)
    x = jax.device_put(np.random.default_rng(0).standard_normal(shape, dtype=np.float32))
    state = _library_state(model, shape, make_optimizer(), "threefry2x32")
    fns = {}
    for policy in CHECKPOINT_POLICIES:
        if policy == "none":
            m = model
        else:
            m = nn_remat(model, getattr(jax.checkpoint_policies, policy))
        _, loss_fn = make_plain_step(m, make_optimizer())
        grad = jax.jit(jax.grad(loss_fn))
        fns[policy] = lambda grad=grad: grad(state.params, state.key, x)
    t = time_side_by_side(fns, repeats, target_s=0.0)
    row = {"section": "conv", "model": name, "case": "loss gradient, network under jax.checkpoint"}
    row.update({f"{p}_ms": _ms(s) for p, s in t.items()})
    row.update({f"{p}_over_none": _ratio(s, t["none"]) for p, s in t.items() if p != "none"})
    _emit(row)


def nn_remat(model, policy):
    """The model's apply with its body under ``jax.checkpoint(policy=...)`` (a wrapper exposing ``apply``)."""
    import jax

    class Remat:
        def apply(self, variables, x, t, train=False, rngs=None):
            f = jax.checkpoint(lambda v, x, t, rngs: model.apply(v, x, t, train=train, rngs=rngs), policy=policy)
            return f(variables, x, t, rngs)

    return Remat()


def section_conv_baseline(name, repeats, torch):
    """The ``flags`` section's measurement in one subprocess: baseline convolutions, and the network's gradient."""
    import jax
    import numpy as np

    from jaxdiff.models import DDPMpp
    from jaxdiff.train import make_optimizer

    section_conv(name, repeats, torch, only_baseline=True)
    kw, shape = MODELS[name]
    model = DDPMpp(**kw)
    state = _library_state(model, shape, make_optimizer(), "threefry2x32")
    x = jax.device_put(np.random.default_rng(0).standard_normal(shape, dtype=np.float32))
    grad = jax.jit(jax.grad(make_plain_step(model, make_optimizer())[1]))
    t0 = time.perf_counter()
    jax.block_until_ready(grad(state.params, state.key, x))
    first = time.perf_counter() - t0
    fns = {"loss_grad": lambda: grad(state.params, state.key, x)}
    if torch is not None:  # a fixed amount of torch work, as the clock of this process
        b, h, w, cin, cout, k = CONV_CASES[name][0]
        xt, wt = torch.randn(b, cin, h, w), torch.randn(cout, cin, k, k)
        fns["torch_conv_fwd"] = lambda: torch.nn.functional.conv2d(xt, wt, padding=k // 2)
    t = time_side_by_side(fns, repeats, target_s=0.0)
    _emit(
        {
            "section": "conv",
            "model": name,
            "case": "loss gradient",
            "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "first_call_s": round(first, 2),
            "loss_grad_ms": _ms(t["loss_grad"]),
            "torch_conv_fwd_ms": _ms(t.get("torch_conv_fwd")),
            "loss_grad_over_torch_conv": _ratio(t["loss_grad"], t.get("torch_conv_fwd")),
        }
    )


def section_flags(args):
    """Each XLA CPU flag in its own process (flags are read when XLA starts)."""
    for flag in XLA_FLAG_VARIANTS if args.flags is None else args.flags.split(","):
        cmd = [
            sys.executable,
            os.path.abspath(__file__),
            "--models",
            args.models,
            "--sections",
            "conv_baseline",
            "--repeats",
            str(args.repeats),
            "--cpu",
            str(args.cpu),
            f"--xla-flag={flag}",
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
        for row in rows:
            if row["section"] != "setup":
                _emit(
                    {"section": "flags", "flag": flag or "(none)", **{k: v for k, v in row.items() if k != "section"}}
                )
        if proc.returncode != 0:
            tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
            _emit({"section": "flags", "flag": flag, "accepted": False, "error": tail[-300:]})


# ----------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="small,cifar", help="comma-separated: " + ", ".join(MODELS))
    parser.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated: " + ", ".join(SECTIONS))
    parser.add_argument("--repeats", type=int, default=7, help="repeats per measurement (the median is printed)")
    parser.add_argument("--cpu", type=int, default=0, help="the core to pin to (-1: no pinning)")
    parser.add_argument("--step-keys", default="threefry2x32,rbg", help="key implementations of the step section")
    parser.add_argument("--xla-flag", default="", help=argparse.SUPPRESS)  # set by the flags section
    parser.add_argument("--flags", help="comma-separated XLA flags for the flags section (default: all tried)")
    args = parser.parse_args(argv)
    _setup(None if args.cpu < 0 else args.cpu, args.xla_flag)
    torch = _torch()
    import jax

    header = {
        "section": "setup",
        "jax": jax.__version__,
        "torch": torch.__version__ if torch else "not installed",
        "xla_flags": os.environ["XLA_FLAGS"],
        "cpu": args.cpu,
        "repeats": args.repeats,
    }
    _emit(header)
    runners = {
        "blocks": section_blocks,
        "rng": section_rng,
        "optim": section_optim,
        "step": section_step,
        "torch_step": section_torch_step,
        "conv": section_conv,
        "conv_baseline": section_conv_baseline,
        "group_norm_step": section_group_norm_step,
        "conv1x1_step": section_conv1x1_step,
    }
    for section in args.sections.split(","):
        if section == "flags":
            section_flags(args)
            continue
        for name in args.models.split(","):
            if section == "step":
                section_step(name, args.repeats, torch, impls=tuple(args.step_keys.split(",")))
            else:
                runners[section](name, args.repeats, torch)
    return 0


if __name__ == "__main__":
    sys.exit(main())
