#!/usr/bin/env bash
# The accelerator check (see benchmarks/gpu_check.py): CIFAR-10 DDPM++ at batch 128, train-step examples/s in
# float32 and bfloat16, compile times, peak memory, DPM-Solver++ samples/s at 20 NFE; JSON lines on stdout.
# Runs from a checkout without installing it (the library alone: jax, flax, optax, chex, jaxtyping).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec timeout 470 python3 benchmarks/gpu_check.py "$@"
