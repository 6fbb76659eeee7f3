"""Likelihood through the probability-flow ODE: jaxdiff vs. a host-side scipy loop vs. diffrax, work against precision.

Every method gets the same score (the exact score of a Gaussian mixture under the VP SDE), the same points and the
same divergence: Hutchinson's estimate with the same Rademacher probe per example (what the reference code
computes) or, with ``--trace exact``, the exact trace (forward-mode Jacobian):

* ``jaxdiff``: :func:`jaxdiff.likelihood.log_likelihood` with one step size for the batch (``per_example_steps=
  False``), one compiled program; ``jaxdiff_per_example`` is the library's default, an independent step size per
  example (the result of an example does not depend on its batch), which costs more;
* ``scipy_rk45``: the reference code's approach (yang-song/score_sde ``likelihood.py``): ``solve_ivp`` with RK45
  on the host, calling a jitted drift-and-divergence function on the flattened batch at every stage;
* ``diffrax``: ``diffeqsolve`` with ``Dopri5`` and a ``PIDController`` on the whole batch; ``diffrax_vmap``
  solves each example alone (vmapped), the counterpart of ``jaxdiff_per_example``.

Each method runs at every tolerance of ``--tols`` (``rtol = atol``) and prints one JSON line: wall time after
compilation (best of ``--repeats``), NFE, and ``solver_err``, the mean absolute difference in nats from a tight
reference solve of the same ODE with the same probes (scipy's DOP853 in float64 at ``rtol = atol = 1e-9``; the
float32 vector field limits its own accuracy to about 1e-6 nats), so the error is the solver's alone: neither the
Hutchinson noise nor the prior's mismatch at ``T`` enters it. ``mae_nats`` is the error to the mixture's exact
log-density, for reference.

The solvers do not make the same error at the same tolerance (their step-size controllers differ), so after each
problem a summary line compares them twice: at the same tolerance (``--tol``, default 1e-5) and at the same
accuracy, where a competitor's cost is its fastest run at least as accurate as jaxdiff's run at ``--tol`` (a
work-precision comparison).

What bounds the ratio to scipy: the host loop pays a fixed cost per evaluation (a Python RK45 stage, a dispatch, two
host copies), jaxdiff only the vector field itself. The speed-up is therefore large where the field is cheap beside
that cost (the small problem here; on an accelerator, where every host round trip also synchronises the device, any
problem) and falls towards the NFE ratio where the field's own arithmetic dominates (the 16-D problem on a CPU).
Run:

    python benchmarks/likelihood.py                     # 2-D / 64 points and 16-D / 256 points, Hutchinson
    python benchmarks/likelihood.py --trace exact --problems 16:256
    python benchmarks/likelihood.py --refill            # continuous batching: 2-D and 16-D, N = 1024 and 4096
    python benchmarks/likelihood.py --refill --digits --workdir runs/digits --slots 64,128 --tols 1e-3 --repeats 1

``--refill`` compares the ways of solving a data set of ``N`` points (exact trace, so that the error to the
mixture's exact log-density is the solver's and the prior's alone): ``refill_<S>`` (:mod:`jaxdiff.refill`,
``S`` slots), ``global`` (one step size for the batch), ``vmap`` (every example its own steps, the whole batch
stepped until its slowest example is done) and ``diffrax`` (one step size per batch). Each runs over the tolerance
sweep; a line per run gives ``evaluations`` (example evaluations of the vector field: batched calls times their
width, the work), the wall time and ``mean_err`` (mean absolute error in nats to the exact log-density), and a
summary line per problem compares them at ``--tol`` and at equal accuracy (the cheapest run of each method whose
``mean_err`` is at most ``--target-err``).

``--refill --digits`` solves the digits test set (300 images) for its bits/dim with a trained DDPM++ (Hutchinson,
one probe): the run in ``--workdir`` (``experiments/train.py --config experiments/configs/digits_vp_ddpmpp.py``),
or, without one, a network trained here for ``--train-steps`` steps and cached in /tmp. There is no oracle: the
lines compare evaluations, wall time and bits/dim at each tolerance, and each image's bits/dim with the vmapped
per-example solve's.
"""

from __future__ import annotations

import argparse
import json
import time

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
from scipy import integrate

from jaxdiff import VPSDE, GaussianMixture
from jaxdiff.likelihood import _drift_and_divergence, _probes, log_likelihood
from jaxdiff.samplers._common import example_keys

EPS = 1e-5


def make_mixture(dim: int) -> GaussianMixture:
    rng = np.random.default_rng(0)
    a = rng.normal(size=(3, dim, dim)) / np.sqrt(dim)
    covs = 0.3 * a @ np.swapaxes(a, -1, -2) + 0.1 * np.eye(dim)
    return GaussianMixture([0.5, 0.3, 0.2], 0.7 * rng.normal(size=(3, dim)), covs)


def interleaved_times(fns: dict, repeats: int, min_seconds: float = 0.05) -> dict:
    """Seconds per call of each function: the best of ``repeats`` rounds, each of enough calls to last ``min_seconds``.

    The rounds of the methods alternate, so a slow spell of the machine hits them all alike, and sub-millisecond
    solves are timed over many calls, so that timer and scheduler noise average out.
    """
    numbers = {}
    for name, fn in fns.items():
        jax.block_until_ready(fn())
        start = time.perf_counter()
        jax.block_until_ready(fn())
        numbers[name] = max(1, int(min_seconds / max(time.perf_counter() - start, 1e-6)))
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            for _ in range(numbers[name]):
                jax.block_until_ready(fn())
            best[name] = min(best[name], (time.perf_counter() - start) / numbers[name])
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problems", default="2:64,16:256", help="comma-separated dim:batch pairs")
    parser.add_argument("--trace", default="hutchinson", choices=("hutchinson", "exact"))
    parser.add_argument("--tols", default="1e-3,3e-4,1e-4,3e-5,1e-5,3e-6,1e-6", help="tolerances of the sweep")
    parser.add_argument("--tol", type=float, default=1e-5, help="the tolerance the summary compares at")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--refill", action="store_true", help="benchmark continuous batching (see the docstring)")
    parser.add_argument("--sizes", default="1024,4096", help="--refill: data set sizes N")
    parser.add_argument("--slots", default="64,256", help="--refill: slot counts")
    parser.add_argument("--target-err", type=float, default=1e-3, help="--refill: the accuracy compared at (nats)")
    parser.add_argument("--digits", action="store_true", help="--refill on the digits test set with a trained DDPM++")
    parser.add_argument("--workdir", default=None, help="--digits: a digits run of experiments/train.py")
    parser.add_argument("--train-steps", type=int, default=300, help="--digits without --workdir: steps to train")
    flags = parser.parse_args()
    if flags.digits:
        run_digits(flags)
        return
    if flags.refill:
        for problem in ("2", "16") if flags.problems == "2:64,16:256" else flags.problems.split(","):
            for n in (int(v) for v in flags.sizes.split(",")):
                slots = [int(v) for v in flags.slots.split(",")]
                run_refill(int(problem.split(":")[0]), n, slots, tols_for_refill(flags), flags)
        return
    tols = sorted({float(t) for t in flags.tols.split(",")} | {flags.tol}, reverse=True)
    for problem in flags.problems.split(","):
        dim, batch = (int(v) for v in problem.split(":"))
        run_problem(dim, batch, flags.trace, tols, flags.tol, flags.repeats)


def run_problem(dim: int, batch: int, trace: str, tols: list[float], tol_at: float, repeats: int) -> None:
    sde, gm = VPSDE(), make_mixture(dim)
    score_fn = gm.score_fn(sde)
    x = gm.at_time(EPS, sde).sample(jax.random.key(0), batch)
    exact = np.asarray(gm.marginal_log_prob(x, EPS, sde), np.float64)
    probes = None
    if trace == "hutchinson":
        probes = _probes(example_keys(jax.random.key(1), batch), "rademacher", 1, x.shape[1:])

    # The drift and its divergence on a batch, shared by scipy, diffrax and the reference solve.
    def drift_div(t, state, pb=probes):
        xb, _ = state
        return _drift_and_divergence(score_fn, sde, xb, jnp.full((xb.shape[0],), t, jnp.float32), pb)

    @jax.jit
    def flat_field(t, flat):
        drift, div = drift_div(t, (flat[: batch * dim].reshape(batch, dim), None))
        return jnp.concatenate([drift.reshape(-1), div])

    def host_solve(method, rtol, atol, dtype):
        init = np.concatenate([np.asarray(x, np.float64).reshape(-1), np.zeros(batch)])
        fun = lambda t, y: np.asarray(flat_field(jnp.float32(t), jnp.asarray(y, jnp.float32)), dtype)
        sol = integrate.solve_ivp(fun, (EPS, sde.T), init.astype(dtype), rtol=rtol, atol=atol, method=method)
        z = sol.y[: batch * dim, -1].reshape(batch, dim)
        logp = np.asarray(sde.prior_logp(jnp.asarray(z, jnp.float32)), np.float64) + sol.y[batch * dim :, -1]
        return logp, sol.nfev

    reference, _ = host_solve("DOP853", 1e-9, 1e-9, np.float64)
    rows = []

    def report(name, tol, logp, seconds, nfe, **extra):
        logp = np.asarray(logp, np.float64)
        row = {
            "problem": f"{dim}-D x {batch}",
            "trace": trace,
            "method": name,
            "tol": tol,
            "seconds": round(seconds, 5),
            "nfe": int(nfe),
            "solver_err": float(np.mean(np.abs(logp - reference))),
            "mae_nats": float(np.mean(np.abs(logp - exact))),
            **extra,
        }
        rows.append(row)
        print(json.dumps(row), flush=True)

    counter = []

    def diffrax_solve(x0, field, tol, count=False):
        def vf(t, y, args):
            if count:
                jax.debug.callback(lambda: counter.append(1))
            return field(t, y)

        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(vf),
            diffrax.Dopri5(),
            t0=EPS,
            t1=sde.T,
            dt0=None,
            y0=(x0, jnp.zeros(x0.shape[:1], jnp.float32)),
            stepsize_controller=diffrax.PIDController(rtol=tol, atol=tol),
            max_steps=4096,
        )
        z, delta = sol.ys
        return sde.prior_logp(z[-1]) + delta[-1]

    diffrax_variants = {
        "diffrax": lambda tol, count=False: diffrax_solve(x, drift_div, tol, count),
        "diffrax_vmap": lambda tol, count=False: jax.vmap(
            lambda xi, pi: diffrax_solve(
                xi[None], lambda t, y: drift_div(t, y, None if pi is None else pi[None]), tol, count
            )[0]
        )(x, probes),
    }

    for tol in tols:
        runs = {}  # name -> (timed callable, logp, nfe, extra columns)
        for per_example in (False, True):
            run = lambda pe=per_example, tol=tol: log_likelihood(
                jax.random.key(1), score_fn, sde, x, trace=trace, rtol=tol, atol=tol, eps=EPS, per_example_steps=pe
            )
            logp, info = jax.block_until_ready(run())
            name = "jaxdiff_per_example" if per_example else "jaxdiff"
            runs[name] = (run, logp, info["nfe"], {"success": bool(np.all(info["success"]))})

        run = lambda tol=tol: host_solve("RK45", tol, tol, np.float64)
        runs["scipy_rk45"] = (run, *run(), {})

        for name, fn in diffrax_variants.items():
            run = jax.jit(lambda fn=fn, tol=tol: fn(tol))
            logp = jax.block_until_ready(run())
            counter.clear()
            jax.block_until_ready(jax.jit(lambda fn=fn, tol=tol: fn(tol, True))())
            jax.effects_barrier()
            runs[name] = (run, logp, len(counter), {})

        seconds = interleaved_times({name: r[0] for name, r in runs.items()}, repeats)
        for name, (_, logp, nfe, extra) in runs.items():
            report(name, tol, logp, seconds[name], nfe, **extra)

    print(json.dumps(summarize(rows, tol_at)), flush=True)


def tols_for_refill(flags) -> list[float]:
    return sorted({float(t) for t in flags.tols.split(",")} | {flags.tol}, reverse=True)


def run_refill(dim: int, n: int, slot_counts: list[int], tols: list[float], flags) -> None:
    """Continuous batching against batch-global stepping, vmapped per-example stepping and diffrax."""
    sde, gm = VPSDE(), make_mixture(dim)
    score_fn = gm.score_fn(sde)
    x = gm.at_time(EPS, sde).sample(jax.random.key(0), n)
    exact = np.asarray(gm.marginal_log_prob(x, EPS, sde), np.float64)

    def prior_gap(z):
        # The model's density uses N(0, I) for p_T; take that known difference out, so that the error is the solver's.
        return np.asarray(sde.prior_logp(z), np.float64) - np.asarray(gm.marginal_log_prob(z, sde.T, sde), np.float64)

    def drift_div(t, state):
        xb, _ = state
        return _drift_and_divergence(score_fn, sde, xb, jnp.full((xb.shape[0],), t, jnp.float32), None)

    @jax.jit
    def diffrax_run(tol):
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(lambda t, y, args: drift_div(t, y)),
            diffrax.Dopri5(),
            t0=EPS,
            t1=sde.T,
            dt0=None,
            y0=(x, jnp.zeros((n,), jnp.float32)),
            stepsize_controller=diffrax.PIDController(rtol=tol, atol=tol),
            max_steps=4096,
        )
        z, delta = sol.ys
        return sde.prior_logp(z[-1]) + delta[-1], sol.stats["num_steps"], z[-1]

    def ours(**kw):
        return lambda tol: log_likelihood(
            jax.random.key(1), score_fn, sde, x, trace="exact", rtol=tol, atol=tol, eps=EPS, **kw
        )

    methods = {f"refill_{s}": ours(slots=s) for s in slot_counts}
    methods["global"] = ours(per_example_steps=False)
    methods["vmap"] = ours(slots=n)  # one slot per example: every example stepped until the slowest is done
    rows = []
    for tol in tols:
        runs = {}
        for name, fn in methods.items():
            run = lambda fn=fn, tol=tol: fn(tol)
            logp, info = jax.block_until_ready(run())
            calls = int(info["batched_calls"])
            runs[name] = (run, logp - prior_gap(info["z"]), int(info["evaluations"]), calls, int(info["nonfinite"]))
        run = lambda tol=tol: diffrax_run(tol)
        logp, steps, z = jax.block_until_ready(run())
        nfe = 6 * int(steps) + 2  # Dopri5 with FSAL: 6 evaluations per step, 2 for the first step
        runs["diffrax"] = (run, logp - prior_gap(z), nfe * n, nfe, 0)
        seconds = interleaved_times({name: r[0] for name, r in runs.items()}, flags.repeats, min_seconds=0.2)
        for name, (_, logp, evaluations, calls, nonfinite) in runs.items():
            row = {
                "problem": f"{dim}-D, N={n}",
                "method": name,
                "tol": tol,
                "evaluations": evaluations,
                "batched_calls": calls,
                "seconds": round(seconds[name], 5),
                "mean_err": float(np.mean(np.abs(np.asarray(logp, np.float64) - exact))),
                "nonfinite": nonfinite,
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    summary = {"summary": True, "problem": rows[0]["problem"], "tol": flags.tol, "target_err": flags.target_err}
    at_tol = {r["method"]: r for r in rows if r["tol"] == flags.tol}
    accurate = {}
    for r in rows:
        if r["mean_err"] <= flags.target_err and (
            r["method"] not in accurate or r["seconds"] < accurate[r["method"]]["seconds"]
        ):
            accurate[r["method"]] = r
    best = min((m for m in methods if m.startswith("refill")), key=lambda m: at_tol[m]["seconds"])
    summary["best_refill"] = best
    for other in ("global", "vmap", "diffrax"):
        summary[f"{best}_vs_{other}_same_tol"] = {
            "evaluations": round(at_tol[best]["evaluations"] / at_tol[other]["evaluations"], 3),
            "seconds": round(at_tol[best]["seconds"] / at_tol[other]["seconds"], 3),
        }
        if best in accurate and other in accurate:
            summary[f"{best}_vs_{other}_same_accuracy"] = {
                "evaluations": round(accurate[best]["evaluations"] / accurate[other]["evaluations"], 3),
                "seconds": round(accurate[best]["seconds"] / accurate[other]["seconds"], 3),
                "tols": [accurate[best]["tol"], accurate[other]["tol"]],
            }
    # The sweep's grid is coarse (each method's cheapest accurate run may be up to a grid step more accurate than
    # needed): also interpolate each method's cost at exactly the target error, log-linearly between the two runs
    # of the sweep whose errors bracket it (absent where the sweep does not bracket it).
    at_target = {m: interpolate_at_error(rows, m, flags.target_err) for m in list(methods) + ["diffrax"]}
    summary["at_target_err"] = {m: v for m, v in at_target.items() if v is not None}
    for other in ("global", "vmap", "diffrax"):
        if at_target.get(best) and at_target.get(other):
            summary[f"{best}_vs_{other}_interpolated_same_accuracy"] = {
                k: round(at_target[best][k] / at_target[other][k], 3) for k in ("evaluations", "seconds")
            }
    summary["global_vs_diffrax_same_tol_seconds"] = round(at_tol["global"]["seconds"] / at_tol["diffrax"]["seconds"], 3)
    summary["device"] = str(jax.devices()[0].platform)
    print(json.dumps(summary), flush=True)


def interpolate_at_error(rows: list[dict], method: str, target: float) -> dict | None:
    """``method``'s evaluations and seconds at a mean error of exactly ``target``, interpolated log-linearly.

    Between the two runs of adjacent tolerances whose errors bracket ``target``; ``None`` if none do.
    """
    runs = sorted((r for r in rows if r["method"] == method), key=lambda r: -r["tol"])
    for loose, tight in zip(runs, runs[1:], strict=False):
        e0, e1 = loose["mean_err"], tight["mean_err"]
        if e1 <= target <= e0 and e0 > e1 > 0:
            w = (np.log(e0) - np.log(target)) / (np.log(e0) - np.log(e1))
            return {
                k: float(np.exp((1 - w) * np.log(loose[k]) + w * np.log(tight[k]))) for k in ("evaluations", "seconds")
            } | {"tols": [loose["tol"], tight["tol"]]}
    return None


DIGITS_CONFIG = "experiments/configs/digits_vp_ddpmpp.py"


def digits_model(flags):
    """``(score_fn, sde, config)`` of a digits DDPM++: from ``--workdir``, or trained here and cached under /tmp."""
    import importlib.util
    import os
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path.insert(0, os.path.join(root, "experiments"))
    import common

    if flags.workdir:
        config, params, step = common.load_workdir(flags.workdir)
        source = f"{flags.workdir} (step {step})"
    else:
        spec = importlib.util.spec_from_file_location("digits_config", os.path.join(root, DIGITS_CONFIG))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        config = module.get_config()
        params, source = train_digits(config, flags.train_steps, common)
    sde, model = common.build_sde(config), common.build_model(config)
    return common.build_score_fn(config, sde, model, params), sde, config, source, common


def train_digits(config, steps: int, common):
    """EMA parameters of ``steps`` training steps of the digits config, cached in /tmp by the step count."""
    import os

    import flax.serialization

    from jaxdiff import train

    path = f"/tmp/jaxdiff_benchmark_digits_{steps}.msgpack"
    model, sde, tx = common.build_model(config), common.build_sde(config), common.build_optimizer(config)
    ds = common.build_dataset(config, "train")
    state = train.create_train_state(jax.random.key(config.seed), model, ds.batch(0)["x"], tx)
    if os.path.exists(path):
        with open(path, "rb") as f:
            return flax.serialization.from_bytes(state.ema_params, f.read()), path
    train_step = train.make_train_step(common.build_loss_fn(config, sde, model), tx, ema_rate=config.model.ema_rate)
    for _, batch in zip(range(steps), ds, strict=False):
        state, _ = train_step(state, batch)
    with open(path + ".tmp", "wb") as f:
        f.write(flax.serialization.to_bytes(state.ema_params))
    os.replace(path + ".tmp", path)
    return state.ema_params, f"trained {steps} steps here, cached at {path}"


def run_digits(flags) -> None:
    """Test-set bits/dim of a trained DDPM++: refilled slots vs batch-global and vmapped per-example stepping.

    No oracle here: the rows compare work (``evaluations``), wall time and the bits/dim each method finds at the same
    tolerance; ``max_diff_vs_vmap`` is the largest per-image difference from the vmapped per-example solve, which
    refilled slots should match to the solver's tolerance (same dequantisation noise and probes per image).
    """
    from jaxdiff.likelihood import bits_per_dim

    score_fn, sde, config, source, common = digits_model(flags)
    ds = common.build_dataset(config, "test", batch_size=10_000, centered=False, dequantize=True, drop_remainder=False)
    data = ds.batch(0)["x"]
    n, offset = data.shape[0], float(np.log2(ds.info.num_levels / 256))

    def ours(**kw):
        return lambda tol: bits_per_dim(
            jax.random.key(1), score_fn, sde, data, centered=config.data.centered, rtol=tol, atol=tol, **kw
        )

    methods = {f"refill_{s}": ours(slots=s) for s in (int(v) for v in flags.slots.split(",")) if s < n}
    methods["global"] = ours(per_example_steps=False)
    methods["vmap"] = ours(slots=n)
    rows = []
    for tol in sorted({float(t) for t in flags.tols.split(",")}, reverse=True):
        runs = {}
        for name, fn in methods.items():
            run = lambda fn=fn, tol=tol: fn(tol)
            bpd, info = jax.block_until_ready(run())  # compiles
            runs[name] = (run, np.asarray(bpd, np.float64) + offset, info)
        # Each solve takes seconds to minutes: the best of --repeats single runs, the methods interleaved.
        seconds = dict.fromkeys(runs, float("inf"))
        for _ in range(flags.repeats):
            for name, (run, *_) in runs.items():
                start = time.perf_counter()
                jax.block_until_ready(run())
                seconds[name] = min(seconds[name], time.perf_counter() - start)
        for name, (_, bpd, info) in runs.items():
            row = {
                "problem": f"digits DDPM++, N={n}",
                "method": name,
                "tol": tol,
                "evaluations": int(info["evaluations"]),
                "batched_calls": int(info["batched_calls"]),
                "seconds": round(seconds[name], 3),
                "bits_per_dim": float(np.mean(bpd)),
                "max_diff_vs_vmap": float(np.max(np.abs(bpd - runs["vmap"][1]))),
                "nonfinite": int(info["nonfinite"]),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
        best = min((m for m in methods if m.startswith("refill")), key=lambda m: seconds[m])
        at = {r["method"]: r for r in rows if r["tol"] == tol}
        summary = {"summary": True, "problem": rows[0]["problem"], "model": source, "tol": tol, "best_refill": best}
        for other in ("global", "vmap"):
            summary[f"{best}_vs_{other}"] = {
                "evaluations": round(at[best]["evaluations"] / at[other]["evaluations"], 3),
                "seconds": round(at[best]["seconds"] / at[other]["seconds"], 3),
            }
        summary["device"] = str(jax.devices()[0].platform)
        print(json.dumps(summary), flush=True)


def summarize(rows: list[dict], tol_at: float) -> dict:
    """Speed-ups of jaxdiff at the same tolerance and at the same (or better) accuracy."""
    by = {(r["method"], r["tol"]): r for r in rows}
    summary = {"summary": True, "problem": rows[0]["problem"], "trace": rows[0]["trace"], "tol": tol_at}
    for ours, others in (("jaxdiff", ("scipy_rk45", "diffrax")), ("jaxdiff_per_example", ("diffrax_vmap",))):
        mine = by[(ours, tol_at)]
        summary[f"{ours}_seconds"] = mine["seconds"]
        summary[f"{ours}_solver_err"] = mine["solver_err"]
        for other in others:
            theirs = by[(other, tol_at)]
            summary[f"{ours}_vs_{other}_same_tol"] = round(theirs["seconds"] / mine["seconds"], 2)
            # Equal accuracy: the other method's fastest run whose error is no larger than ours.
            good = [r for r in rows if r["method"] == other and r["solver_err"] <= mine["solver_err"]]
            summary[f"{ours}_vs_{other}_same_accuracy"] = (
                round(min(r["seconds"] for r in good) / mine["seconds"], 2) if good else "not reached in the sweep"
            )
    summary["device"] = str(jax.devices()[0].platform)
    return summary


if __name__ == "__main__":
    main()
