"""The experiment scripts end to end: two-step training runs, sampling from them, resuming, the error paths,
and every config file building its network (shapes only, no compute).

The scripts run as subprocesses with this interpreter; they inherit the eight virtual CPU devices of
``conftest.py``, so the training runs here are data-parallel over a mesh.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

import jaxdiff
from jaxdiff.losses import make_loss_fn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPERIMENTS = os.path.join(ROOT, "experiments")
CONFIGS = os.path.join(EXPERIMENTS, "configs")
CONFIG_FILES = sorted(f for f in os.listdir(CONFIGS) if f.endswith(".py") and not f.startswith("_"))

# Tiny runs: two steps, a few samples, a loose ODE tolerance, no classifier-based metrics.
TINY = [
    "--config.training.n_iters=2",
    "--config.training.batch_size=16",
    "--config.training.log_every=1",
    "--config.training.progress_bar=False",
    "--config.sampling.steps=3",
    "--config.eval.num_samples=8",
    "--config.eval.grid_size=8",
    "--config.eval.likelihood_examples=8",
    "--config.eval.ode_tol=0.01",
    "--config.eval.quality=False",
]
TINY_MODEL = {
    "toy_vp_mlp.py": ["--config.model.hidden_sizes=(16,16)", "--config.eval.density_grid=4"],
    # class-conditional, trained for classifier-free guidance
    "toy_vp_mlp.py+cond": ["--config.model.num_classes=2", "--config.training.label_dropout=0.2"],
    "digits_vp_ddpmpp.py": ["--config.model.nf=8", "--config.model.ch_mult=(1,)", "--config.model.attn_resolutions=()"],
    "toy_rf_mlp.py": ["--config.model.hidden_sizes=(16,16)", "--config.eval.density_grid=4"],
    "digits_rf_ddpmpp.py": ["--config.model.nf=8", "--config.model.ch_mult=(1,)", "--config.model.attn_resolutions=()"],
}
# Input shapes of the data sets the configs use (the TFDS ones need not be on disk for this).
SHAPES = {
    "two_moons": (2,),
    "digits": (8, 8, 1),
    "mnist": (28, 28, 1),
    "cifar10": (32, 32, 3),
    "celeba": (64, 64, 3),
}
# Parameter counts of the paper's CIFAR-10 networks (jaxdiff/models/PARAMS.md).
PAPER_PARAMS = {
    "cifar10_vp_ddpmpp.py": 61_804_419,
    "cifar10_subvp_ddpmpp.py": 61_804_419,
    "cifar10_vp_ddpmpp_deep.py": 106_632_579,
    "cifar10_subvp_ddpmpp_deep.py": 106_632_579,
    "cifar10_ve_ncsnpp.py": 62_758_915,
    "cifar10_ve_ncsnpp_deep.py": 107_587_075,
}


def run(script, *args, timeout=240):
    return subprocess.run(
        [sys.executable, os.path.join(EXPERIMENTS, script), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


def train(workdir, config, *extra):
    path = os.path.join(CONFIGS, config)
    proc = run("train.py", f"--config={path}", f"--workdir={workdir}", *TINY, *TINY_MODEL[config], *extra)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def read_metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def load_config(name):
    spec = importlib.util.spec_from_file_location(name[:-3], os.path.join(CONFIGS, name))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


@pytest.fixture(scope="module")
def common():
    sys.path.insert(0, EXPERIMENTS)
    try:
        import common

        yield common
    finally:
        sys.path.remove(EXPERIMENTS)


@pytest.mark.parametrize("config, conditional", [("toy_vp_mlp.py", True), ("digits_vp_ddpmpp.py", False)])
def test_train_then_sample(tmp_path, config, conditional):
    workdir = tmp_path / "run"
    proc = train(workdir, config, *(TINY_MODEL[config + "+cond"] if conditional else []))
    for name in ("config.json", "metrics.jsonl", "loss.png", "samples.png", "summary.json"):
        assert (workdir / name).is_file(), name
    assert [r["step"] for r in read_metrics(workdir)] == [1, 2]
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["step"] == 2 and summary["sampler_nfe"] > 0 and summary["likelihood_nfe"] > 0
    assert ("test_nll_nats" if config.startswith("toy") else "test_bits_per_dim") in summary
    assert "summary" in proc.stdout

    out = tmp_path / "drawn"
    guided = ["--label=1", "--guidance=1.5"] if conditional else []
    proc = run("sample.py", f"--workdir={workdir}", "--n=8", "--method=ddim", "--steps=2", f"--out={out}", *guided)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "NFE 2" in proc.stdout
    drawn = jnp.load(f"{out}.npz")
    assert drawn["samples"].shape[0] == 8 and int(drawn["nfe"]) == 2
    assert (tmp_path / "drawn.png").is_file()
    if conditional:
        return

    # The other two scripts on the same tiny run: editing and evaluation.
    proc = run("edit.py", f"--workdir={workdir}", "--task=inpaint", "--mask=center", "--steps=3", "--num_images=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (workdir / "edit_inpaint_center.png").is_file()
    proc = run("evaluate.py", f"--workdir={workdir}", "--num_samples=16", "--steps=2", "--likelihood_examples=4")
    assert proc.returncode == 0, proc.stderr[-3000:]
    scores = json.loads((workdir / "eval.json").read_text())
    assert {"test_bits_per_dim", "fid", "kid_mean", "kid_std", "classifier_score"} <= set(scores)
    assert scores["num_samples"] == 16 and scores["likelihood_examples"] == 4 and scores["sampler_steps"] == 2
    assert scores["kid_subset_size"] < 16 and scores["kid_std"] > 0  # subsets smaller than the sets
    assert scores["sampler_nfe"] > 0 and scores["likelihood_nfe"] > 0


@pytest.mark.parametrize(
    "config",
    ["toy_rf_mlp.py", pytest.param("digits_rf_ddpmpp.py", marks=pytest.mark.slow)],
)
def test_rectified_flow_trains_by_flow_matching_then_samples(tmp_path, common, config):
    """The rectified-flow configs from the command line: flow matching on a velocity network, then sampling."""
    cfg = common.validate(load_config(config))
    assert isinstance(common.build_sde(cfg), jaxdiff.RectifiedFlow)
    assert cfg.training.objective == "flow_matching" and cfg.model.parameterization == "velocity"
    workdir = tmp_path / "run"
    train(workdir, config)
    assert [r["step"] for r in read_metrics(workdir)] == [1, 2]
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["step"] == 2 and summary["sampler"] == cfg.sampling.method and summary["sampler_nfe"] == 3
    assert summary["likelihood_nfe"] > 0
    assert jnp.isfinite(summary["test_nll_nats" if config.startswith("toy") else "test_bits_per_dim"])
    saved = json.loads((workdir / "config.json").read_text())
    assert saved["sde"]["name"] == "rectified_flow" and saved["training"]["objective"] == "flow_matching"

    out = tmp_path / "drawn"
    proc = run("sample.py", f"--workdir={workdir}", "--n=8", "--method=flow_euler", "--steps=2", f"--out={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    drawn = jnp.load(f"{out}.npz")
    assert drawn["samples"].shape[0] == 8 and int(drawn["nfe"]) == 2
    assert jnp.all(jnp.isfinite(drawn["samples"]))


def test_a_sampler_the_sde_cannot_run_is_refused_before_training(tmp_path):
    """A reverse-SDE predictor on the rectified-flow path would fail only at the end of the run: refused up front,
    with one line, and the workdir is not created."""
    workdir = tmp_path / "run"
    proc = run("train.py", f"--config={os.path.join(CONFIGS, 'toy_rf_mlp.py')}", f"--workdir={workdir}",
               "--config.sampling.method=pc", *TINY)  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: config.sampling: predictor 'reverse_diffusion'")
    assert not workdir.exists()


def test_loss_objective_keys_are_optional(common):
    """Configs without ``training.objective`` and its companions (all the score-SDE ones) train DSM, unchanged."""
    config = load_config("toy_vp_mlp.py")
    assert "objective" not in config.training
    sde, model = common.build_sde(config), common.build_model(config)
    batch = {"x": jnp.ones((4, 2)), "label": jnp.zeros((4,), jnp.int32)}
    params = model.init(jax.random.key(0), batch["x"], jnp.ones((4,)))["params"]
    dsm = make_loss_fn(sde, model, reduce_mean=False)
    loss, _ = common.build_loss_fn(config, sde, model)(params, jax.random.key(1), batch)
    assert jnp.allclose(loss, dsm(params, jax.random.key(1), batch)[0], rtol=1e-6, atol=0.0)


def test_resume_continues_from_saved_step(tmp_path):
    workdir = tmp_path / "run"
    off = ["--config.eval.enabled=False", "--config.training.save_every=1"]
    train(workdir, "toy_vp_mlp.py", *off)
    train(workdir, "toy_vp_mlp.py", *off, "--config.training.n_iters=4")
    assert [r["step"] for r in read_metrics(workdir)] == [1, 2, 3, 4]
    steps = sorted(int(d) for d in os.listdir(workdir / "checkpoints") if d.isdigit())
    assert steps[-1] == 4
    from jaxdiff.checkpoint import Checkpointer

    assert Checkpointer(workdir / "checkpoints").metadata()["data"]["step"] == 4  # the data order continues


@pytest.mark.parametrize(
    "args, message",
    [
        (["--config.training.bogus=1"], "training.bogus"),
        (["--config.sde.name=foo"], "config.sde.name"),
        (["--config.training.n_iters=abc"], "n_iters"),
    ],
)
def test_config_errors_are_one_line(tmp_path, args, message):
    path = os.path.join(CONFIGS, "toy_vp_mlp.py")
    proc = run("train.py", f"--config={path}", f"--workdir={tmp_path}", *args)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and message in proc.stderr
    assert "Traceback" not in proc.stderr


def test_missing_workdir_is_one_line(tmp_path):
    proc = run("sample.py", f"--workdir={tmp_path / 'missing'}")
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "no such directory" in proc.stderr


@pytest.mark.parametrize("name", CONFIG_FILES)
def test_config_builds_its_model(common, name):
    config = common.validate(load_config(name))
    sde, model = common.build_sde(config), common.build_model(config)
    assert sde.N == config.sde.num_scales
    shape = (1, *SHAPES[config.data.dataset])
    if config.data.image_size is not None:
        shape = (1, config.data.image_size, config.data.image_size, shape[-1])
    params = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros(shape), jnp.zeros((1,)))["params"]
    count = sum(p.size for p in jax.tree.leaves(params))
    if name in PAPER_PARAMS:
        assert count == PAPER_PARAMS[name]
    common.build_loss_fn(config, sde, model)


def test_readme_quickstart_and_data_preparation():
    readme = open(os.path.join(ROOT, "README.md")).read()
    quickstart = readme[readme.index("## Quickstart") : readme.index("## A tour")]
    # A virtual environment comes before the first install.
    assert quickstart.index("python -m venv .venv && . .venv/bin/activate") < quickstart.index("pip install -e .")
    # The documented data preparation names an extra that exists and a script that exists.
    tomllib = pytest.importorskip("tomllib")
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        extras = tomllib.load(f)["project"]["optional-dependencies"]
    assert 'pip install -e ".[data]"' in readme and any(d.startswith("tensorflow") for d in extras["data"])
    assert "python experiments/prepare_data.py --dataset mnist" in readme
    if importlib.util.find_spec("tensorflow") is None:  # without the extra: one line that names it
        proc = run("prepare_data.py", "--dataset=mnist", "--data_dir=/nonexistent/tfds")
        assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
        assert 'pip install -e ".[data]"' in proc.stderr
