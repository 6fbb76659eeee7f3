"""The train-step breakdown benchmark: its census of the network's blocks and its PyTorch reference network."""

import importlib.util
import pathlib
import sys

import pytest

BENCHMARKS = pathlib.Path(__file__).parents[1] / "benchmarks"


def _load(name):
    sys.path.insert(0, str(BENCHMARKS))
    try:
        spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCHMARKS))


def test_block_census_of_the_small_ddpmpp():
    from jaxdiff.models import DDPMpp

    breakdown = _load("train_breakdown")
    kw, shape = breakdown.MODELS["small"]
    per_kind = {}
    for key, count in breakdown.record_blocks(DDPMpp(**kw), shape).items():
        assert key[1] == shape[0]
        per_kind[key[0]] = per_kind.get(key[0], 0) + count
    # 21 residual blocks (two 3x3 convolutions and one dropout each) plus the stem and output convolutions;
    # attention after the two encoder blocks and the decoder level at 16x16, and once in the bottleneck.
    assert per_kind["conv3x3"] == 2 * 21 + 2
    assert per_kind["dropout"] == 21
    assert per_kind["attention"] == 4
    assert per_kind["silu"] == per_kind["group_norm"] == 2 * 21 + 4 + 1
    assert per_kind["upsample"] == per_kind["downsample"] == 2 * 2


def test_side_by_side_timing_returns_every_function():
    breakdown = _load("train_breakdown")
    times = breakdown.time_side_by_side({"a": lambda: 1, "b": lambda: 2, "none": None}, repeats=3, target_s=1e-3)
    assert sorted(times) == ["a", "b"] and all(t > 0 for t in times.values())


def test_torch_reference_has_the_parameters_of_the_jax_model():
    torch = pytest.importorskip("torch")
    reference = _load("_torch_ddpmpp")
    kw, shape = _load("train_breakdown").MODELS["small"]
    model = reference.DDPMpp(**kw, image_size=shape[1], channels=shape[3])
    assert sum(p.numel() for p in model.parameters()) == 1_754_147  # jaxdiff's DDPMpp with the same settings
    out = model(torch.zeros(2, shape[3], shape[1], shape[2]), torch.zeros(2))
    assert tuple(out.shape) == (2, shape[3], shape[1], shape[2])
