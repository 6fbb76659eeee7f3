"""Loading the reference score_sde checkpoints: the reference's own outputs, derived checkpoints of every
supported kind, the one-line errors, and import -> sample.py -> evaluate.py end to end.

``data/score_sde/ckpt_ve_ncsnpp_small`` was written by the reference implementation itself (its README says
how); the other checkpoints are written here in the same format from jaxdiff networks, by the inverse name
mapping, with their dicts key-sorted as flax 0.3.1 writes them (``ResnetBlockBigGANpp_10`` before ``_2``).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import serialization
from ml_collections import ConfigDict

from jaxdiff.compat import score_sde
from jaxdiff.parameterization import ScoreModel, make_score_fn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(ROOT, "tests", "data", "score_sde", "ckpt_ve_ncsnpp_small")
CHECKPOINT = os.path.join(FIXTURE, "checkpoints", "checkpoint_1")
CONFIG = os.path.join(FIXTURE, "config.json")
# Float32 networks of a few layers: the reference's outputs are reproduced to rounding.
ATOL = 1e-5


@pytest.fixture(scope="module")
def fixture_ckpt():
    return score_sde.load_checkpoint(CHECKPOINT, CONFIG)


@pytest.fixture(scope="module")
def reference_outputs():
    return dict(np.load(os.path.join(FIXTURE, "reference_outputs.npz")))


# -- the reference's own checkpoint ---------------------------------------------------------------------------


def test_fixture_network_outputs(fixture_ckpt, reference_outputs):
    r = reference_outputs
    x, labels = jnp.asarray(r["x"]), jnp.asarray(r["labels"])
    with jax.default_matmul_precision("highest"):
        for name, params in (("out_ema", fixture_ckpt.ema_params), ("out_target", fixture_ckpt.params)):
            out = score_sde.reference_network(fixture_ckpt.model, params, fixture_ckpt.reference_config)(x, labels)
            np.testing.assert_allclose(out, r[name], atol=ATOL, rtol=0, err_msg=name)


def test_fixture_score(fixture_ckpt, reference_outputs):
    r = reference_outputs
    with jax.default_matmul_precision("highest"):
        score = fixture_ckpt.score_fn(ema=True)(jnp.asarray(r["x"]), jnp.asarray(r["t"]))
    np.testing.assert_allclose(score, r["score_ema"], atol=ATOL, rtol=0)
    assert fixture_ckpt.step == 3
    assert not np.allclose(fixture_ckpt.params["conv_in"]["kernel"], fixture_ckpt.ema_params["conv_in"]["kernel"])


def test_fixture_workdir_score_is_the_reference_score_in_centred_coordinates(fixture_ckpt, reference_outputs):
    """jaxdiff's own score function on the exported config and parameters: y = 2x - 1, sigma doubled, and the
    score of y is half the reference's score of x."""
    import jaxdiff

    r = reference_outputs
    config, params = fixture_ckpt.workdir()
    assert config.data.centered and config.sde.sigma_max == 100.0 and config.sde.sigma_min == 0.02
    sde = jaxdiff.VESDE(config.sde.sigma_min, config.sde.sigma_max, config.sde.num_scales)
    score_fn = make_score_fn(fixture_ckpt.model, params, sde, parameterization="score", scale_by_sigma=True)
    with jax.default_matmul_precision("highest"):
        score_y = score_fn(2.0 * jnp.asarray(r["x"]) - 1.0, jnp.asarray(r["t"]))
    np.testing.assert_allclose(2.0 * score_y, r["score_ema"], atol=ATOL, rtol=0)


@pytest.mark.slow
def test_fixture_workdir_bits_per_dim_are_the_reference_definition(fixture_ckpt):
    """Bits/dim of the exported model on centred data (offset 7) equal those of the reference's score on [0, 1]
    data (offset 8), on the same dequantisation and probes: the change of coordinates y = 2x - 1 moves only the
    prior's centre, by one unit under a prior of standard deviation 2 sigma_max = 100."""
    import jaxdiff

    config, params = fixture_ckpt.workdir()
    sde = jaxdiff.VESDE(config.sde.sigma_min, config.sde.sigma_max, config.sde.num_scales)
    workdir_score = make_score_fn(fixture_ckpt.model, params, sde, parameterization="score", scale_by_sigma=True)
    images = np.random.default_rng(5).integers(0, 256, (2, 8, 8, 3)).astype(np.uint8)
    key, tol = jax.random.key(6), dict(rtol=1e-4, atol=1e-4)
    reference, _ = jaxdiff.likelihood.bits_per_dim(key, fixture_ckpt.score_fn(), fixture_ckpt.sde, images,
                                                   centered=False, **tol)  # fmt: skip
    exported, _ = jaxdiff.likelihood.bits_per_dim(key, workdir_score, sde, images, centered=True, **tol)
    np.testing.assert_allclose(exported, reference, atol=5e-3, rtol=0)


def test_config_as_dict_configdict_and_python_file(tmp_path, fixture_ckpt):
    with open(CONFIG) as f:
        as_dict = json.load(f)
    module = tmp_path / "reference_config.py"
    module.write_text(
        "import json\nfrom ml_collections import ConfigDict\n\n\n"
        f"def get_config():\n    return ConfigDict(json.load(open({CONFIG!r})))\n"
    )
    for config in (as_dict, ConfigDict(as_dict), str(module)):
        ckpt = score_sde.load_checkpoint(CHECKPOINT, config)
        np.testing.assert_array_equal(ckpt.ema_params["temb_dense_0"]["kernel"],
                                      fixture_ckpt.ema_params["temb_dense_0"]["kernel"])  # fmt: skip


# -- derived checkpoints: continuous VP / sub-VP DDPM++, discrete VE (SMLD) NCSN++, discrete VP DDPM ----------


def _reference_config(**changes) -> dict:
    with open(CONFIG) as f:
        config = json.load(f)
    for key, value in changes.items():
        section, name = key.split(".")
        config[section][name] = value
    return config


DDPMPP = dict(
    **{"model.embedding_type": "positional", "model.fir": False, "model.progressive_input": "none"},
    **{"model.scale_by_sigma": False, "data.centered": True, "training.continuous": True},
)
SMLD = dict(
    **{"model.embedding_type": "positional", "training.continuous": False},
    **{"model.progressive": "output_skip", "model.sigma_max": 20.0, "model.num_scales": 50},
)
CASES = {
    "vp_ddpmpp": _reference_config(**DDPMPP, **{"training.sde": "vpsde", "model.num_res_blocks": 2}),
    "subvp_ddpmpp": _reference_config(**DDPMPP, **{"training.sde": "subvpsde"}),
    # configs/ve/cifar10_ncsnpp.py: SMLD, positional embedding of integer labels, scale_by_sigma, [0, 1] data
    "smld_ncsnpp": _reference_config(**SMLD),
    # configs/vp/ddpm/cifar10.py at 4x4: 128 channels, where DDPM's 32 groups are jaxdiff's min(C // 4, 32)
    "ddpm": _reference_config(
        **{"model.name": "ddpm", "model.nf": 128, "model.ch_mult": [1, 1], "model.num_res_blocks": 1},
        **{"model.attn_resolutions": [2], "data.image_size": 4, "data.centered": True, "training.sde": "vpsde"},
        **{"training.continuous": False, "model.scale_by_sigma": False, "model.num_scales": 1000},
    ),
}


def _sorted(tree):
    """Key-sorted dicts, as flax 0.3.1 serialises them."""
    if isinstance(tree, dict):
        return {k: _sorted(tree[k]) for k in sorted(tree)}
    return np.asarray(tree)


def write_reference_checkpoint(path, params, ema_params, config, step=7):
    target = score_sde.to_reference_params(params, config)
    zeros = jax.tree.map(np.zeros_like, target)
    state = {
        "step": np.asarray(step),
        "optimizer": {"target": target, "state": {"step": np.asarray(step),
                                                  "param_states": jax.tree.map(
                                                      lambda z: {"grad_ema": z, "grad_sq_ema": z}, zeros)}},
        "lr": np.asarray(2e-4, np.float32),
        "model_state": {},
        "ema_rate": np.asarray(0.999, np.float32),
        "params_ema": score_sde.to_reference_params(ema_params, config),
        "rng": np.asarray([0, 1], np.uint32),
    }  # fmt: skip
    with open(path, "wb") as f:
        f.write(serialization.msgpack_serialize(_sorted(state)))


def write_derived_checkpoint(name, directory):
    """A checkpoint of ``CASES[name]`` with random weights in ``directory``: ``(config, model, params, ema,
    path, shape)``."""
    config = CASES[name]
    model = score_sde.network(config)
    size, channels = config["data"]["image_size"], config["data"]["num_channels"]
    x = jax.ShapeDtypeStruct((1, size, size, channels), jnp.float32)
    shapes = jax.eval_shape(model.init, jax.random.key(0), x, jax.ShapeDtypeStruct((1,), jnp.float32))["params"]
    # Random weights everywhere (the networks' own init_scale = 0 would leave the outputs near zero).
    leaves, tree = jax.tree.flatten(shapes)
    rng = np.random.default_rng(1)
    draw = lambda: jax.tree.unflatten(
        tree, [jnp.asarray(0.1 * rng.standard_normal(p.shape), jnp.float32) for p in leaves]
    )
    params, ema = draw(), draw()
    path = os.path.join(directory, "checkpoint_7")
    write_reference_checkpoint(path, params, ema, config)
    return config, model, params, ema, path, (size, size, channels)


@pytest.fixture(scope="module", params=sorted(CASES))
def derived(request, tmp_path_factory):
    return request.param, *write_derived_checkpoint(request.param, str(tmp_path_factory.mktemp(request.param)))


def test_derived_round_trip(derived):
    name, config, model, params, ema, path, _ = derived
    ckpt = score_sde.load_checkpoint(os.path.dirname(path), config)  # a directory: its newest checkpoint_<n>
    assert ckpt.step == 7
    for got, want in ((ckpt.params, params), (ckpt.ema_params, ema)):
        assert jax.tree.structure(got) == jax.tree.structure(want)
        jax.tree.map(np.testing.assert_array_equal, got, want)
    flat = score_sde.to_reference_params(params, config)
    if name == "vp_ddpmpp":  # 14 residual blocks: the file's order puts _10 before _2
        assert "ResnetBlockBigGANpp_10" in flat
        assert list(_sorted(flat)).index("ResnetBlockBigGANpp_10") < list(_sorted(flat)).index("ResnetBlockBigGANpp_2")


def _vp_std(t, beta_min, beta_max, sub=False):
    log_mean = -0.25 * t**2 * (beta_max - beta_min) - 0.5 * t * beta_min
    return 1.0 - np.exp(2 * log_mean) if sub else np.sqrt(1.0 - np.exp(2 * log_mean))


def test_derived_score_conventions(derived):
    """The score against the reference's conventions written out in float64 from its source."""
    name, config, model, _, ema, path, shape = derived
    ckpt = score_sde.load_checkpoint(path, config)
    m = config["model"]
    key = jax.random.key(2)
    x = jax.random.uniform(key, (3, *shape), minval=0.0 if name == "smld_ncsnpp" else -1.0, maxval=1.0)
    # 0.0999 (N - 1) = 99.8: DDPM's label indexes its std truncated (99), not rounded.
    t = np.array([1.0, 0.5, 0.0999]) if name != "smld_ncsnpp" else np.array([1.0, 0.6, 0.0])
    net = lambda h, cond: model.apply({"params": ema}, h, jnp.asarray(cond, jnp.float32))
    with jax.default_matmul_precision("highest"):
        score = ckpt.score_fn()(x, jnp.asarray(t, jnp.float32))
        if name in ("vp_ddpmpp", "subvp_ddpmpp"):
            std = _vp_std(t, m["beta_min"], m["beta_max"], sub=name.startswith("sub"))
            expected = -net(x, 999 * t) / std[:, None, None, None]
        elif name == "smld_ncsnpp":  # label k = round((1 - t)(N - 1)), counted from sigma_max
            n = m["num_scales"]
            k = np.round((1.0 - t) * (n - 1))
            assert k.tolist() == [0, 20, 49]
            sigma = m["sigma_max"] * (m["sigma_min"] / m["sigma_max"]) ** (k / (n - 1))
            expected = net(2.0 * x - 1.0, k) / sigma[:, None, None, None]
        else:  # DDPM: labels t (N - 1), std sqrt(1 - alphas_cumprod) of the discrete chain
            n = m["num_scales"]
            betas = np.linspace(m["beta_min"] / n, m["beta_max"] / n, n)
            std = np.sqrt(1.0 - np.cumprod(1.0 - betas))[(t * (n - 1)).astype(int)]
            expected = -net(x, t * (n - 1)) / std[:, None, None, None]
    np.testing.assert_allclose(score, expected, rtol=1e-5, atol=1e-5 * float(jnp.abs(expected).max()))
    assert float(jnp.abs(expected).max()) > 1e-2  # not a vanishing output


def _experiments_common(monkeypatch):
    monkeypatch.syspath_prepend(os.path.join(ROOT, "experiments"))
    import common

    return common


def _through_json(config: ConfigDict) -> ConfigDict:
    """The config as ``load_run`` reads it back from ``config.json`` (the batch size made valid on these devices,
    as import_score_sde.py does)."""
    config = ConfigDict(json.loads(config.to_json_best_effort()))
    config.training.batch_size = jax.device_count()
    return config


def test_derived_workdir(derived, monkeypatch):
    """The exported config and parameters, through the builders of sample.py / evaluate.py / edit.py, give the
    reference's score: continuous models in jaxdiff's own conventions, discrete ones through the reference's
    score function (the config's score_sde section), on the reference's data range and time grid."""
    common = _experiments_common(monkeypatch)
    name, config, model, _, ema, path, shape = derived
    ckpt = score_sde.load_checkpoint(path, config)
    jd_config, params = ckpt.workdir()
    jd_config = common.validate(_through_json(jd_config))
    discrete = name in ("smld_ncsnpp", "ddpm")
    assert ("score_sde" in jd_config) == discrete and ckpt.config is not None
    assert (score_sde.reference_only(config) or "").startswith("training.continuous") == discrete
    assert jd_config.training.continuous == (not discrete) and jd_config.data.centered == config["data"]["centered"]
    assert jd_config.sampling.steps == config["model"]["num_scales"] - discrete  # discrete: the N labels' grid
    sde = common.build_sde(jd_config)
    score_fn = common.build_score_fn(jd_config, sde, common.build_model(jd_config), params)
    low = 0.0 if name == "smld_ncsnpp" else -1.0
    x = jax.random.uniform(jax.random.key(3), (3, *shape), minval=low, maxval=1.0)
    t = jnp.array([1.0, 0.7, 0.05])
    with jax.default_matmul_precision("highest"):
        got, want = score_fn(x, t), ckpt.score_fn()(x, t)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6 * float(jnp.abs(want).max()))
    if name == "ddpm":  # as the reference's likelihood and ODE sampler call it: continuous=True, labels 999 t, std(t)
        jd_config.score_sde.training.continuous = True
        with jax.default_matmul_precision("highest"):
            got = common.build_score_fn(jd_config, sde, common.build_model(jd_config), params)(x, t)
            want = make_score_fn(model, params, sde, parameterization="eps")(x, t)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(jnp.abs(want).max()))


def test_fourier_features_with_vp_use_the_reference_score(monkeypatch):
    """A continuous VP model with Fourier features (the fixture's network): its features see log(999 t), which
    jaxdiff's own conditioning (log sigma(t)) cannot express, so the workdir uses the reference's score."""
    common = _experiments_common(monkeypatch)
    config = _reference_config(**{"training.sde": "vpsde", "data.centered": True, "model.scale_by_sigma": False})
    assert score_sde.reference_only(config).startswith("model.embedding_type")
    ckpt = score_sde.load_checkpoint(CHECKPOINT, config)
    x = jax.random.uniform(jax.random.key(4), (2, 8, 8, 3), minval=-1.0, maxval=1.0)
    t = np.array([0.9, 0.2])
    m = config["model"]
    std = _vp_std(t, m["beta_min"], m["beta_max"])
    jd_config, params = ckpt.workdir()
    jd_config = common.validate(_through_json(jd_config))
    score_fn = common.build_score_fn(jd_config, common.build_sde(jd_config), common.build_model(jd_config), params)
    with jax.default_matmul_precision("highest"):
        net = ckpt.model.apply({"params": ckpt.ema_params}, x, jnp.log(999.0 * jnp.asarray(t, jnp.float32)))
        expected = -net / std[:, None, None, None]
        np.testing.assert_allclose(ckpt.score_fn()(x, jnp.asarray(t)), expected, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(score_fn(x, jnp.asarray(t)), expected, rtol=1e-5, atol=1e-5)


def test_workdir_config_without_score_sde_section_is_unchanged(monkeypatch):
    """Every config written before the score_sde section (and every continuous import) builds jaxdiff's own
    score; a damaged section is a one-line error naming its key."""
    common = _experiments_common(monkeypatch)
    config, params = score_sde.load_checkpoint(CHECKPOINT, CONFIG).workdir()
    assert "score_sde" not in config
    config = common.validate(_through_json(config))
    score_fn = common.build_score_fn(config, common.build_sde(config), common.build_model(config), params)
    assert isinstance(score_fn.func, ScoreModel)  # make_score_fn's, from model.parameterization
    discrete = _through_json(score_sde.workdir_config(_reference_config(**SMLD)))
    discrete.score_sde.model.name = "ncsnv2_64"
    with pytest.raises(common.ConfigError, match=r"^config\.score_sde\.model\.name: 'ncsnv2_64'"):
        common.validate(discrete)


# -- one-line errors ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "changes, key",
    [
        ({"model.name": "ncsnv2_64"}, "model.name"),
        ({"model.normalization": "InstanceNorm++"}, "model.normalization"),
        ({"model.nonlinearity": "elu"}, "model.nonlinearity"),
        ({"model.interpolation": "bilinear"}, "model.interpolation"),
        ({"training.sde": "cosine"}, "training.sde"),
        ({"training.continuous": False}, "model.embedding_type"),  # Fourier features of a discrete model
        ({"model.name": "ddpm", "model.nf": 32}, "model.nf"),  # 32 groups of 8 channels
    ],
)
def test_unsupported_config_is_one_line_naming_the_key(changes, key):
    with pytest.raises(score_sde.UnsupportedConfigError) as e:
        score_sde.load_checkpoint(CHECKPOINT, _reference_config(**changes))
    assert str(e.value).startswith(f"config.{key}:") and "\n" not in str(e.value)


def test_missing_key_and_bad_file_are_one_line(tmp_path):
    config = _reference_config()
    del config["model"]["nf"]
    with pytest.raises(score_sde.UnsupportedConfigError, match=r"^config\.model\.nf: missing"):
        score_sde.load_checkpoint(CHECKPOINT, config)
    module = tmp_path / "cifar10_ncsnpp_continuous.py"
    module.write_text("from configs.default_cifar10_configs import get_default_configs\n")
    with pytest.raises(score_sde.UnsupportedConfigError, match="sys.path") as e:
        score_sde.load_checkpoint(CHECKPOINT, str(module))
    assert "\n" not in str(e.value)
    with pytest.raises(score_sde.CheckpointMismatchError, match="not a msgpack|not a score_sde State"):
        score_sde.load_checkpoint(CONFIG, CONFIG)


@pytest.mark.parametrize(
    "changes, first",
    [
        ({"model.nf": 16}, "AttnBlockpp_0/GroupNorm_0/bias has shape (16,), the config needs (32,)"),
        ({"model.num_res_blocks": 2}, "AttnBlockpp_3/GroupNorm_0/bias (16,) is missing"),
        ({"model.progressive_input": "none"}, "Downsample_0/Conv2d_0/bias (8,) is not in the configured network"),
    ],
)
def test_mismatching_checkpoint_names_the_first_parameters(changes, first):
    with pytest.raises(score_sde.CheckpointMismatchError) as e:
        score_sde.load_checkpoint(CHECKPOINT, _reference_config(**changes))
    message = str(e.value)
    assert "\n" not in message and "optimizer.target does not match the config" in message
    assert first in message, message


# -- the command line, end to end -----------------------------------------------------------------------------

# sample.py and evaluate.py read the test split of CIFAR-10; TFDS's mock data stands in for it.
MOCK_RUN = """
import os, runpy, sys
sys.path.insert(0, os.path.join(os.getcwd(), "experiments"))
import tensorflow_datasets as tfds
sys.argv = sys.argv[1:]
with tfds.testing.mock_data(num_examples=8, policy=tfds.testing.MockPolicy.USE_CODE):
    runpy.run_path(sys.argv[0], run_name="__main__")
"""


# The scripts compile a few programs of the network each (the likelihood's has eight); XLA's optimisations of them
# would take most of the test's time, for programs that run a handful of steps. Only long-standing XLA flags: an
# unknown one would stop XLA at start-up.
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def _run(*args, mock_data=False, timeout=300):
    script = os.path.join(ROOT, "experiments", args[0])
    command = [sys.executable, "-c", MOCK_RUN, script] if mock_data else [sys.executable, script]
    env = dict(os.environ, XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE}".strip())
    return subprocess.run([*command, *args[1:]], capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)


def _import(checkpoint, config, workdir):
    """import_score_sde.py, then the likelihood's ODE tolerance of the test (1e-2) in the written config."""
    proc = _run("import_score_sde.py", f"--checkpoint={checkpoint}", f"--config={config}", f"--workdir={workdir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    path = os.path.join(workdir, "config.json")
    with open(path) as f:
        written = json.load(f)
    written["eval"]["ode_tol"] = 1e-2
    with open(path, "w") as f:
        json.dump(written, f)
    return proc.stdout


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("imported"))
    _import(CHECKPOINT, CONFIG, workdir)
    return workdir


@pytest.fixture(scope="module")
def imported_smld(tmp_path_factory):
    """The derived discrete VE (SMLD) checkpoint, imported."""
    directory = tmp_path_factory.mktemp("smld")
    config, _, _, _, checkpoint, _ = write_derived_checkpoint("smld_ncsnpp", str(directory))
    (directory / "config.json").write_text(json.dumps(config))
    workdir = str(tmp_path_factory.mktemp("imported_smld"))
    return workdir, _import(checkpoint, str(directory / "config.json"), workdir)


def test_import_writes_a_workdir(imported, fixture_ckpt, monkeypatch):
    """What sample.py, evaluate.py and edit.py read: the config and the EMA parameters of the newest step."""
    common = _experiments_common(monkeypatch)
    config, params, step = common.load_workdir(imported)
    assert step == 3 and config.sde.name == "vesde" and config.data.centered and "score_sde" not in config
    _, want = fixture_ckpt.workdir()
    jax.tree.map(np.testing.assert_array_equal, params, jax.tree.map(np.asarray, want))


def _sample_and_evaluate(workdir, shape, *, method="ancestral", steps=2):
    """sample.py, then evaluate.py with the same sampler (its program then comes from the compilation cache the
    tests' scripts share), on two samples and the likelihood of two examples."""
    proc = _run("sample.py", f"--workdir={workdir}", "--n=2", f"--method={method}", f"--steps={steps}", mock_data=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = os.path.join(workdir, f"samples_{method}_{steps}")
    samples = np.load(out + ".npz")
    assert samples["samples"].shape == (2, *shape) and int(samples["nfe"]) == steps + 1  # + the denoising step
    assert np.all(np.isfinite(samples["samples"])) and os.path.getsize(out + ".png") > 0

    proc = _run("evaluate.py", f"--workdir={workdir}", "--num_samples=2", f"--sampler={method}", f"--steps={steps}",
                "--likelihood_examples=2", mock_data=True)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(os.path.join(workdir, "eval.json")) as f:
        results = json.load(f)
    assert results["sampler_nfe"] == steps + 1 and results["num_samples"] == 2 and results["likelihood_examples"] == 2
    bpd = next(_find(results, "bits_per_dim"))
    # The reference's bits/dim of uniformly dequantised 8-bit data (offset 8 on [0, 1], 7 on [-1, 1]): the mock
    # images are uniform noise, whose entropy is 8 bits/dim, so no model's expected bits/dim is lower (Gibbs),
    # and these untrained networks are far from it.
    assert math.isfinite(bpd) and bpd > 8.0 and results["likelihood_nfe"] > 0
    return results


def _find(tree, name):
    """Numbers under a key (or a ``{"name": ..., "value": ...}`` row) whose name contains ``name``."""
    if isinstance(tree, dict):
        if name in str(tree.get("name", "")) and isinstance(tree.get("value"), (int, float)):
            yield tree["value"]
        for k, v in tree.items():
            if name in k and isinstance(v, (int, float)):
                yield v
            yield from _find(v, name)
    elif isinstance(tree, list):
        for v in tree:
            yield from _find(v, name)


def test_import_then_sample_and_evaluate(imported):
    """The fixture (continuous VE, exported in jaxdiff's conventions on centred data)."""
    _sample_and_evaluate(imported, (8, 8, 3))


@pytest.mark.slow
def test_import_discrete_then_sample_and_evaluate(imported_smld, monkeypatch):
    """A discrete SMLD model: the reference's score function on [0, 1] data, on its labels' time grid."""
    workdir, out = imported_smld
    assert "the reference's score function: training.continuous" in out
    common = _experiments_common(monkeypatch)
    config, _, step = common.load_workdir(workdir)
    assert step == 7 and not config.data.centered and config.sampling.steps == 49 and "score_sde" in config
    _sample_and_evaluate(workdir, (8, 8, 3))
    proc = _run("edit.py", f"--workdir={workdir}", "--method=ancestral", "--steps=2", "--num_images=2", mock_data=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert os.path.getsize(os.path.join(workdir, "edit_inpaint_center.png")) > 0


@pytest.mark.parametrize(
    "changes, first",
    [
        # Fourier features of a discrete model, refused before the checkpoint is read
        ({"training.continuous": False}, "error: config.model.embedding_type: 'fourier' needs training.continuous"),
        # a discrete SMLD config for the fixture's continuous checkpoint (no Fourier features)
        (
            {"training.continuous": False, "model.embedding_type": "positional"},
            "optimizer.target does not match the config: Dense_0/kernel has shape (16, 32), the config needs",
        ),
    ],
)
def test_import_errors_are_one_line(tmp_path, changes, first):
    """An unsupported config or a checkpoint that does not fit it: one line, exit code 2, nothing written."""
    config = tmp_path / "config.json"
    config.write_text(json.dumps(_reference_config(**changes)))
    proc = _run("import_score_sde.py", f"--checkpoint={CHECKPOINT}", f"--config={config}", f"--workdir={tmp_path}/w")
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and first in proc.stderr, proc.stderr
    assert proc.stderr.count("\n") == 1
    assert not os.path.exists(tmp_path / "w")
