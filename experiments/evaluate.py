"""Evaluates a trained run: test bits/dim, and FID / KID / classifier score of samples (digits).

    python experiments/evaluate.py --workdir runs/digits
    python experiments/evaluate.py --workdir runs/digits --sampler dpm_solver++ --steps 20 --num_samples 1000

Reads ``WORKDIR/config.json`` and the newest EMA parameters in ``WORKDIR/checkpoints`` (as written by
``experiments/train.py``). Bits/dim come from the probability-flow ODE with Hutchinson's trace estimator
(``jaxdiff.likelihood.bits_per_dim``); sample quality compares samples with the chosen split through the
features of the digits classifier (``jaxdiff.metrics``; cached in ``WORKDIR/classifier``). Every score is
reported with its sampler or estimator, NFE and wall time, printed as a table and written to
``WORKDIR/eval.json``. A missing work directory or checkpoint is one line on stderr and exit code 2.
"""

from __future__ import annotations

import json
import os
import sys
import time

import common
import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from jaxdiff import likelihood, metrics

flags.DEFINE_string("workdir", None, "a training work directory (config.json and checkpoints/)")
flags.DEFINE_integer("num_samples", 1000, "samples drawn for FID / KID / classifier score")
flags.DEFINE_string("sampler", None, "sampler name (default: the config's sampling.method)")
flags.DEFINE_integer("steps", None, "sampler steps (default: the config's sampling.steps)")
flags.DEFINE_enum("split", "test", ["train", "test"], "the data split scored against")
flags.DEFINE_integer("num_probes", 1, "Hutchinson probes per example for bits/dim")
flags.DEFINE_integer("likelihood_examples", 300, "examples of the split whose bits/dim are averaged")
flags.DEFINE_integer("seed", 0, "seed of the samples, probes and dequantisation noise")
FLAGS = flags.FLAGS


def main(argv):
    common.parse_flags(argv)
    workdir = FLAGS.workdir
    if not os.path.isdir(workdir):
        raise common.ConfigError(f"--workdir {workdir}: no such directory")
    config, params, step = common.load_workdir(workdir)
    sde, model = common.build_sde(config), common.build_model(config)
    score_fn = common.build_score_fn(config, sde, model, params)
    key, split, toy = jax.random.key(FLAGS.seed), FLAGS.split, config.data.dataset not in common.IMAGE_DATASETS
    results = {"workdir": workdir, "step": step, "split": split}

    # Likelihood through the probability-flow ODE (Song et al., 2021, eqs. 39-40).
    t0, n_lik = time.perf_counter(), FLAGS.likelihood_examples
    if toy:  # 2-D: exact trace, nats
        data = common.build_dataset(config, split, batch_size=n_lik).batch(0)["x"]
        logp, info = likelihood.log_likelihood(jax.random.fold_in(key, 1), score_fn, sde, data, trace="exact")
        row = {"name": "nll_nats", "value": float(-jnp.mean(logp)), "method": "pf-ODE, exact trace"}
    else:  # uniformly dequantised images in [0, 1]; log2(L / 256) turns 256-level bits/dim into L levels
        ds = common.build_dataset(config, split, batch_size=n_lik, centered=False, dequantize=True)
        bpd, info = likelihood.bits_per_dim(jax.random.fold_in(key, 1), score_fn, sde, ds.batch(0)["x"],
                                            centered=config.data.centered, num_probes=FLAGS.num_probes,
                                            rtol=config.eval.ode_tol, atol=config.eval.ode_tol)  # fmt: skip
        value = float(jnp.mean(bpd)) + float(np.log2(ds.info.num_levels / 256))
        row = {"name": "bits_per_dim", "value": value, "method": f"pf-ODE, Hutchinson x{FLAGS.num_probes}"}
    row.update(num_probes=0 if toy else FLAGS.num_probes, nfe=int(info["nfe"]), examples=n_lik,
               wall_s=time.perf_counter() - t0)  # fmt: skip
    results["scores"] = [row]

    # Samples, then their quality against the split through the digits classifier's features.
    shape = (FLAGS.num_samples, *common.build_dataset(config, split, batch_size=1).info.shape)
    x, nfe, secs = common.draw_samples(config, score_fn, sde, shape, jax.random.fold_in(key, 0),
                                       method=FLAGS.sampler, steps=FLAGS.steps)  # fmt: skip
    sampler = f"{FLAGS.sampler or config.sampling.method}, {FLAGS.steps or config.sampling.steps} steps"
    results["sampling"] = {"sampler": sampler, "nfe": nfe, "num_samples": len(x), "wall_s": secs}
    if config.data.dataset == "digits":
        ref = common.build_dataset(config, split, batch_size=512, centered=True, dequantize=False, shuffle=False,
                                   drop_remainder=False, num_epochs=1)  # fmt: skip
        reference = np.concatenate([b["x"] for b in ref])
        samples = np.clip(x if config.data.centered else 2.0 * x - 1.0, -1.0, 1.0)  # the classifier's [-1, 1]
        t0 = time.perf_counter()
        clf = metrics.digits_classifier(seed=0, cache_dir=os.path.join(workdir, "classifier"))
        scores = metrics.evaluate_samples(samples, reference, clf, seed=FLAGS.seed)
        wall = secs + time.perf_counter() - t0  # sampling plus features and metrics
        for name in ("fid", "kid_mean", "kid_std", "classifier_score", "class_entropy", "reference_classifier_score"):
            results["scores"].append({"name": name, "value": scores[name], "method": sampler, "nfe": nfe,
                                      "examples": len(x), "wall_s": wall})  # fmt: skip
        results["class_histogram"] = scores["class_histogram"]
        test = common.build_dataset(config, "test", batch_size=300, centered=True, dequantize=False).batch(0)
        results["classifier_test_accuracy"] = clf.accuracy(test["x"], test["label"])
    else:
        print(f"sample quality: skipped (the digits classifier does not apply to {config.data.dataset})")

    with open(os.path.join(workdir, "eval.json"), "w") as f:
        json.dump(results, f, indent=1)
    print(f"\n{workdir} (step {step}, {split} split)\n{'score':<28}{'value':>10}  {'NFE':>6}  {'wall s':>7}  method")
    for r in results["scores"]:
        print(f"{r['name']:<28}{r['value']:>10.4g}  {r['nfe']:>6}  {r['wall_s']:>7.1f}  {r['method']}")
    print(f"wrote {os.path.join(workdir, 'eval.json')}")


if __name__ == "__main__":
    sys.exit(common.run_main(main))
