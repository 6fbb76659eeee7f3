"""The evaluation protocol, one code path for ``train.py``'s end-of-run summary and ``evaluate.py``.

With the same checkpoint and no flags, both draw the same samples (``config.eval.num_samples`` with the config's
sampler, in batches of ``BATCH``, batch ``b`` from ``fold_in(fold_in(key(seed), 0), b)`` with
``seed = config.seed + 1``), score the same held-out examples (``config.eval.likelihood_examples`` of the test
split) and compare with the same reference (the whole split) through the same classifier: the numbers agree,
and both state their sample counts. A metric computed from non-finite outputs is refused, never reported.
"""

from __future__ import annotations

import math
import os
import time

import common
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
from ml_collections import ConfigDict
from workdir import read_jsonl, require_finite, write_json_atomic

import jaxdiff
from jaxdiff.data import TOY_DATASETS

BATCH = 1000  # samples per sampler call: the memory of one call is bounded whatever the number asked for


def default_seed(config: ConfigDict) -> int:
    """The seed of the evaluation's samples, probes and dequantisation noise."""
    return int(config.seed) + 1


def plot_losses(workdir: str) -> bool:
    """``loss.png`` from ``metrics.jsonl``; ``False`` (and nothing written) if it has no rows."""
    rows = [r for r in read_jsonl(os.path.join(workdir, "metrics.jsonl")) if "loss" in r]
    if not rows:
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows])
    ax.set(xlabel="step", ylabel="loss (mean over the log interval)", yscale="log")
    fig.tight_layout()
    fig.savefig(os.path.join(workdir, "loss.png"), dpi=90)
    plt.close(fig)
    return True


def sampler_steps(config: ConfigDict, method: str | None, steps: int | None, options: dict) -> tuple[str, int | None]:
    """The sampler and its step count: the config's by default; no step count for an adaptive ODE solve."""
    s = config.sampling
    method = method or s.method
    if method not in jaxdiff.samplers.available_methods():
        valid = ", ".join(jaxdiff.samplers.available_methods())
        raise common.ConfigError(f"sampler {method!r}: unknown; valid: {valid}")
    if _adaptive(method, options):
        if steps is not None:
            raise common.ConfigError(f"--steps {steps}: the {method!r} sampler is adaptive and chooses its own steps "
                                     "(set its tolerances with --option rtol=... --option atol=...)")  # fmt: skip
        return method, None
    if steps is None:
        steps = s.steps if method == s.method else None
    return method, steps


def check_sampler(config: ConfigDict, sde) -> None:
    """Refuses, before any training, a sampler the config's SDE cannot run (a reverse-SDE predictor on the
    rectified-flow path, a grid that starts at log-SNR -inf, ...): the sampler's own checks run on an abstract
    trace with a stand-in score, nothing is compiled."""
    s = config.sampling
    opts = dict(s.options)
    method, steps = sampler_steps(config, None, None, opts)
    if steps is not None:
        opts["steps"] = steps
    run = lambda key: jaxdiff.sample(key, lambda x, t: -x, sde, (1, 2), method=method, **opts)  # noqa: E731
    try:
        jax.eval_shape(run, jax.random.key(0))
    except ValueError as e:
        raise common.ConfigError(f"config.sampling: {str(e).splitlines()[0]}") from None


def _adaptive(method: str, options: dict) -> bool:
    """Whether ``method`` with ``options`` is an adaptive ODE solve (which refuses a step count)."""
    if method != "ode":
        return False
    import inspect

    from jaxdiff import ode

    default = inspect.signature(jaxdiff.samplers.get_sampler("ode")).parameters["method"].default
    return options.get("method", default) in ode.ADAPTIVE


def draw_samples(config, score_for, sde, shape, key, *, method=None, steps=None, batch_size=BATCH,
                 on_batch=None, start_batch=0, collect=True, **options):  # fmt: skip
    """Draws ``shape[0]`` samples in batches of ``batch_size``; batch ``b`` from ``fold_in(key, b)``.

    Args:
      score_for: ``(i0, i1) -> score_fn`` for samples ``i0:i1`` (labels of a class-conditional model).
      on_batch: called as ``on_batch(b, x, nonfinite)`` after every batch (to write it out at once), with the
        number of its samples that are not finite (``info["nonfinite"]`` of the sampler, or found in ``x``).
      start_batch: skip the batches before it (already written).
      collect: return the samples (``False`` when ``on_batch`` writes them and they would not fit in memory).

    Returns:
      ``(x or None, info)`` with ``info``: ``nfe`` (per sample), ``nonfinite`` (count), ``seconds``, ``method``,
      ``steps``, ``batch_size``.
    """
    s = config.sampling
    opts = dict(s.options) if (method or s.method) == s.method else {}
    opts.update(options)
    method, steps = sampler_steps(config, method, steps, opts)
    if steps is not None:
        opts["steps"] = steps
    n = shape[0]
    batches = math.ceil(n / batch_size)
    out, nfe, nonfinite, t0 = [], 0, 0, time.perf_counter()
    for b in range(start_batch, batches):
        i0, i1 = b * batch_size, min(n, (b + 1) * batch_size)
        try:
            x, info = jaxdiff.sample(jax.random.fold_in(key, b), score_for(i0, i1), sde, (i1 - i0, *shape[1:]),
                                     method=method, **opts)  # fmt: skip
        except ValueError as e:  # an unknown sampler or option
            raise common.ConfigError(str(e).splitlines()[0]) from None
        x = np.asarray(jax.block_until_ready(x))
        nfe = int(info["nfe"])
        bad = max(int(np.asarray(info.get("nonfinite", 0))), int(np.sum(~np.isfinite(x.reshape(len(x), -1)).all(-1))))
        nonfinite += bad
        if on_batch is not None:
            on_batch(b, x, bad)
        if collect:
            out.append(x)
    info = dict(nfe=nfe, nonfinite=nonfinite, seconds=time.perf_counter() - t0, method=method, steps=steps,
                batch_size=batch_size)  # fmt: skip
    return (np.concatenate(out) if collect and out else None), info


def likelihood(config, score_for, sde, split: str, n: int, key, *, num_probes: int) -> dict:
    """Test NLL (2-D, nats, exact trace) or bits/dim (images, Hutchinson) through the probability-flow ODE.

    Refuses (``workdir.Refused``) when any example's solve is not finite (``info["nonfinite"]``).
    """
    t0 = time.perf_counter()
    e = config.eval
    if config.data.dataset in TOY_DATASETS:
        batch = common.build_dataset(config, split, batch_size=n, shuffle=True, drop_remainder=False).batch(0)
        data = batch["x"][:n]
        logp, info = jaxdiff.likelihood.log_likelihood(key, score_for(batch.get("label")), sde, data, trace="exact")
        require_finite(logp, info, f"the likelihood of {len(data)} {split} examples")
        row = {"name": "nll_nats", "value": float(-jnp.mean(logp)), "method": "pf-ODE, exact trace", "num_probes": 0}
    else:
        # Uniformly dequantised images in [0, 1]; bits_per_dim's offset is for 256 levels, so log2(L / 256)
        # converts it to the data's own L levels (17 for digits).
        ds = common.build_dataset(config, split, batch_size=n, centered=False, dequantize=True, drop_remainder=False)
        batch = ds.batch(0)
        data = batch["x"]
        bpd, info = jaxdiff.likelihood.bits_per_dim(key, score_for(batch.get("label")), sde, data,
                                                    centered=config.data.centered, num_probes=num_probes,
                                                    rtol=e.ode_tol, atol=e.ode_tol)  # fmt: skip
        require_finite(bpd, info, f"the bits/dim of {len(data)} {split} examples")
        value = float(jnp.mean(bpd)) + float(np.log2(ds.info.num_levels / 256))
        row = {"name": "bits_per_dim", "value": value, "method": f"pf-ODE, Hutchinson x{num_probes}",
               "num_probes": num_probes}  # fmt: skip
    row.update(examples=int(len(data)), nfe=int(info["nfe"]), wall_s=round(time.perf_counter() - t0, 1))
    return row


def reference_images(config, split: str):
    """Every image of ``split`` in ``[-1, 1]``, in order: the reference set of FID/KID."""
    ref = common.build_dataset(config, split, batch_size=512, centered=True, dequantize=False, shuffle=False,
                               drop_remainder=False, num_epochs=1, random_flip=False)  # fmt: skip
    return np.concatenate([b["x"] for b in ref])


def sample_quality(config, workdir: str, samples, split: str, seed: int) -> dict:
    """FID / KID / classifier score of samples against the whole split, in the digits classifier's features."""
    from jaxdiff import metrics

    if config.data.dataset != "digits":
        print(f"sample quality: skipped (the metrics' classifier is for digits, not {config.data.dataset})")
        return {}
    reference = reference_images(config, split)
    x = np.clip(2 * common.to_unit_range(config, samples) - 1, -1.0, 1.0)  # the classifier's [-1, 1]
    clf = metrics.digits_classifier(seed=0, cache_dir=os.path.join(workdir, "classifier"))
    scores = metrics.evaluate_samples(x, reference, clf, seed=seed)
    return {k: (round(float(v), 4) if isinstance(v, float) else v) for k, v in scores.items()}


def run(config, workdir: str, params, *, step: int, split="test", num_samples=None, likelihood_examples=None,
        method=None, steps=None, num_probes=None, seed=None, batch_size=BATCH, images=True,
        quality=None) -> dict:  # fmt: skip
    """The whole protocol: samples (and their grid or scatter plot), the likelihood, and sample quality.

    ``quality`` (default: ``config.eval.quality``) adds FID / KID / classifier score. Every count is stated in
    the result: ``num_samples`` (samples drawn and scored), ``likelihood_examples``,
    and for sample quality ``num_reference`` and ``kid_subset_size``.
    """
    e = config.eval
    num_samples = e.num_samples if num_samples is None else num_samples
    likelihood_examples = e.likelihood_examples if likelihood_examples is None else likelihood_examples
    num_probes = e.hutchinson_probes if num_probes is None else num_probes
    seed = default_seed(config) if seed is None else seed
    sde, model = common.build_sde(config), common.build_model(config)
    num_classes = getattr(model, "num_classes", None)

    def score_for(labels):  # a class-conditional model is evaluated with labels (unguided)
        y = None if num_classes is None or labels is None else jnp.asarray(labels, jnp.int32)
        return common.build_score_fn(config, sde, model, params, y=y)

    labels = np.arange(num_samples) % (num_classes or 1)  # every class in turn
    key = jax.random.key(seed)
    info_shape = common.build_dataset(config, split, batch_size=1).info.shape
    x, sinfo = draw_samples(config, lambda i0, i1: score_for(labels[i0:i1]), sde, (num_samples, *info_shape),
                            jax.random.fold_in(key, 0), method=method, steps=steps, batch_size=batch_size)  # fmt: skip
    require_finite(x, sinfo, f"{num_samples} samples ({sinfo['method']})")
    result = {
        "step": step,
        "split": split,
        "seed": seed,
        "sampler": sinfo["method"],
        "sampler_steps": sinfo["steps"],
        "sampler_nfe": sinfo["nfe"],
        "num_samples": num_samples,
        "sampling_s": round(sinfo["seconds"], 1),
    }
    if images:
        title = f"{sinfo['method']}, NFE {sinfo['nfe']}, step {step}"
        path = os.path.join(workdir, "samples.png")
        if config.data.dataset in TOY_DATASETS:
            data = common.build_dataset(config, split, batch_size=min(num_samples, 2000)).batch(0)["x"]
            common.save_toy_plot(path, x, data, density=_density(config, score_for, sde, key), title=title,
                                 lim=e.plot_range)  # fmt: skip
        else:
            common.save_image_grid(path, common.to_unit_range(config, x[: e.grid_size]), title=title)
    row = likelihood(config, score_for, sde, split, likelihood_examples, jax.random.fold_in(key, 1),
                     num_probes=num_probes)  # fmt: skip
    result[f"{split}_{row['name']}"] = round(row["value"], 4)
    result.update(likelihood_examples=row["examples"], likelihood_nfe=row["nfe"], likelihood_s=row["wall_s"],
                  likelihood_method=row["method"])  # fmt: skip
    if (e.quality if quality is None else quality) and config.data.dataset not in TOY_DATASETS:
        scores = sample_quality(config, workdir, x, split, seed)
        for k in ("fid", "kid_mean", "kid_std", "kid_subset_size", "num_reference", "classifier_score",
                  "class_entropy", "reference_classifier_score", "class_histogram"):  # fmt: skip
            if k in scores:
                result[k] = scores[k]
    return result


def _density(config, score_for, sde, key):
    e = config.eval
    if not e.density_grid or getattr(common.build_model(config), "num_classes", None) is not None:
        return None
    xs = np.linspace(*e.plot_range, e.density_grid, dtype=np.float32)
    grid = np.stack(np.meshgrid(xs, xs), -1).reshape(-1, 2)
    logp, _ = jaxdiff.likelihood.log_likelihood(jax.random.fold_in(key, 2), score_for(None), sde, grid,
                                                trace="exact", rtol=1e-3, atol=1e-3)  # fmt: skip
    return xs, xs, np.exp(np.asarray(logp)).reshape(len(xs), len(xs))


def write_summary(workdir: str, summary: dict, name: str = "summary.json") -> None:
    """Prints the summary as a table and writes it (atomically) to ``WORKDIR/name``."""
    write_json_atomic(os.path.join(workdir, name), summary)
    width = max(map(len, summary))
    print("\n".join(["", f"{os.path.splitext(name)[0]:<{width}}  {workdir}", "-" * (width + 30)]))
    for k, v in summary.items():
        print(f"{k:<{width}}  {v}")
