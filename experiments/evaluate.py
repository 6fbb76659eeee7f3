"""Evaluates a trained run: test bits/dim (or NLL), and FID / KID / classifier score of samples (digits).

    python experiments/evaluate.py --workdir runs/digits
    python experiments/evaluate.py --workdir runs/digits --sampler dpm_solver++ --steps 20 --num_samples 1000
    python experiments/evaluate.py --workdir runs/digits --sampler ode

Reads the run with the same fallback as ``train.py`` (the newest readable checkpoint; its config from
``config.json``, or from the checkpoint if that is unreadable); the run's config is not passed again. Without
flags this is the protocol of ``train.py``'s end-of-run summary (``experiments/evaluation.py``), on the same
samples and examples, so the two agree; every flag that departs from it is stated in the output together with
the sample counts. Bits/dim come from the probability-flow ODE with Hutchinson's trace estimator; sample quality
compares the samples with the whole split in the features of the digits classifier (cached in
``WORKDIR/classifier``). Results are printed and written to ``WORKDIR/eval.json``. Bad flags are refused before
any work; a metric from non-finite samples or likelihoods is refused (exit code 3), never reported.
"""

from __future__ import annotations

import sys

import common
import evaluation
import workdir as wd
from absl import flags

flags.DEFINE_string("workdir", None, "a training work directory (config.json and checkpoints/)")
flags.DEFINE_integer("num_samples", None, "samples drawn for FID / KID / classifier score (default: eval.num_samples)")
flags.DEFINE_string("sampler", None, "sampler name (default: the config's sampling.method)")
flags.DEFINE_integer("steps", None, "sampler steps (default: the config's sampling.steps; none for ode)")
flags.DEFINE_enum("split", "test", ["train", "test"], "the data split scored against")
flags.DEFINE_integer("num_probes", None, "Hutchinson probes per example (default: eval.hutchinson_probes)")
flags.DEFINE_integer("likelihood_examples", None, "examples whose bits/dim are averaged (default: eval's)")
flags.DEFINE_integer("batch_size", evaluation.BATCH, "samples per sampler call")
flags.DEFINE_integer("seed", None, "seed of the samples, probes and noise (default: the summary's, config.seed + 1)")
FLAGS = flags.FLAGS


def _at_least(name: str, value, low: int, why: str = "") -> None:
    if value is not None and value < low:
        raise common.ConfigError(f"--{name} must be >= {low}{why}, got {value}")


def main(argv):
    common.parse_flags(argv)
    _at_least("num_samples", FLAGS.num_samples, 2, " (FID and KID need two samples)")
    _at_least("likelihood_examples", FLAGS.likelihood_examples, 1)
    _at_least("num_probes", FLAGS.num_probes, 1)
    _at_least("steps", FLAGS.steps, 1)
    _at_least("batch_size", FLAGS.batch_size, 1)
    workdir = FLAGS.workdir
    config, params, step = common.load_workdir(workdir)
    evaluation.sampler_steps(config, FLAGS.sampler, FLAGS.steps, {})  # a bad sampler or step count: refused now
    wd.check_output(workdir + "/eval.json", "--workdir")
    results = evaluation.run(config, workdir, params, step=step, split=FLAGS.split, num_samples=FLAGS.num_samples,
                             likelihood_examples=FLAGS.likelihood_examples, method=FLAGS.sampler, steps=FLAGS.steps,
                             num_probes=FLAGS.num_probes, seed=FLAGS.seed, batch_size=FLAGS.batch_size,
                             images=False, quality=True)  # fmt: skip
    evaluation.write_summary(workdir, {"workdir": workdir, **results}, name="eval.json")
    print(f"wrote {workdir}/eval.json")


if __name__ == "__main__":
    sys.exit(common.run_main(main))
