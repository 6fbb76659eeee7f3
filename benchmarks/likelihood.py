"""Likelihood through the probability-flow ODE: jaxdiff vs. a host-side scipy loop vs. diffrax.

The same score (the exact score of a 16-D Gaussian mixture under the VP SDE), the same 256 points, the same
tolerances (rtol = atol = 1e-5) and the same divergence: Hutchinson's estimate with the same Rademacher probe
per example (what the reference code computes) and, in a second table, the exact trace (forward-mode Jacobian):

* ``jaxdiff``: :func:`jaxdiff.likelihood.log_likelihood`, one compiled program (per-example step sizes,
  and one shared step size for the batch);
* ``scipy_rk45``: the reference code's approach (yang-song/score_sde ``likelihood.py``): ``solve_ivp`` with
  RK45 on the host, calling a jitted drift-and-divergence function on the flattened batch at every stage;
* ``diffrax``: ``diffeqsolve`` with ``Dopri5`` and a ``PIDController`` on the whole batch (and vmapped
  per example).

Prints one JSON line per method (wall time after compilation, best of ``--repeats``; NFE; mean absolute
error to the exact log-density) and a summary line per trace with the speed ratios. The like-for-like rows
are ``jaxdiff_shared_step`` (one step size for the batch, as scipy and diffrax use here); ``jaxdiff``'s default
steps each example independently, which costs more but makes an example's result independent of its batch.
Run:

    python benchmarks/likelihood.py
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


def best_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=16)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--tol", type=float, default=1e-5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--trace", default="hutchinson,exact", help="comma-separated: hutchinson, exact")
    flags = parser.parse_args()
    for trace in flags.trace.split(","):
        run_table(flags, trace)


def run_table(flags, trace: str) -> None:

    sde, gm = VPSDE(), make_mixture(flags.dim)
    score_fn = gm.score_fn(sde)
    x = gm.at_time(EPS, sde).sample(jax.random.key(0), flags.batch)
    exact = np.asarray(gm.marginal_log_prob(x, EPS, sde), np.float64)
    batch, dim, tol = flags.batch, flags.dim, flags.tol
    results = {}
    # Every method evaluates the prior N(0, I) where p_T belongs; that gap, log p_T(z) - log N(z; 0, I),
    # is the same for all and larger than their solver errors, so the solver error is also reported
    # against the ODE's own exact target, log p_eps(x) minus the gap (at a tightly solved latent z).
    _, ref = log_likelihood(jax.random.key(1), score_fn, sde, x, trace="exact", rtol=1e-7, atol=1e-7, eps=EPS)
    gap = np.asarray(gm.marginal_log_prob(ref["z"], sde.T, sde) - sde.prior_logp(ref["z"]), np.float64)
    target = exact - gap

    probes = None
    if trace == "hutchinson":
        probes = _probes(example_keys(jax.random.key(1), batch), "rademacher", 1, x.shape[1:])

    def report(name, logp, seconds, nfe, **extra):
        logp = np.asarray(logp, np.float64)
        row = {
            "method": name,
            "trace": trace,
            "seconds": round(seconds, 4),
            "nfe": int(nfe),
            "mae_nats": float(np.mean(np.abs(logp - exact))),
            "solver_mae_nats": float(np.mean(np.abs(logp - target))),
            **extra,
        }
        results[name] = row
        print(json.dumps(row), flush=True)

    # (a) jaxdiff ---------------------------------------------------------------------------------
    for per_example in (True, False):
        name = "jaxdiff" if per_example else "jaxdiff_shared_step"
        run = lambda pe=per_example: log_likelihood(
            jax.random.key(1),
            score_fn,
            sde,
            x,
            trace=trace,
            rtol=tol,
            atol=tol,
            eps=EPS,
            per_example_steps=pe,
        )
        logp, info = jax.block_until_ready(run())
        report(name, logp, best_time(run, flags.repeats), info["nfe"], success=bool(np.all(info["success"])))

    # The drift and its exact divergence on a batch, shared by (b) and (c).
    def drift_div(t, state, pb=probes):
        xb, _ = state
        return _drift_and_divergence(score_fn, sde, xb, jnp.full((xb.shape[0],), t, jnp.float32), pb)

    # (b) scipy RK45 on the host, as in the reference implementation --------------------------------
    @jax.jit
    def ode_func_jit(t, flat):
        xb = flat[: batch * dim].reshape(batch, dim)
        drift, div = drift_div(t, (xb, None))
        return jnp.concatenate([drift.reshape(-1), div])

    def scipy_run():
        init = np.concatenate([np.asarray(x, np.float64).reshape(-1), np.zeros(batch)])
        fun = lambda t, y: np.asarray(ode_func_jit(jnp.float32(t), jnp.asarray(y, jnp.float32)), np.float64)
        sol = integrate.solve_ivp(fun, (EPS, sde.T), init, rtol=tol, atol=tol, method="RK45")
        z = sol.y[: batch * dim, -1].reshape(batch, dim)
        logp = np.asarray(sde.prior_logp(jnp.asarray(z, jnp.float32))) + sol.y[batch * dim :, -1]
        return logp, sol.nfev

    scipy_run()  # compiles
    start = time.perf_counter()
    logp_b, nfe_b = scipy_run()
    seconds = time.perf_counter() - start
    for _ in range(flags.repeats - 1):
        start = time.perf_counter()
        scipy_run()
        seconds = min(seconds, time.perf_counter() - start)
    report("scipy_rk45", logp_b, seconds, nfe_b)

    # (c) diffrax Dopri5 + PID controller ------------------------------------------------------------
    counter = []

    def diffrax_solve(x0, field, count=False):
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

    variants = {
        "diffrax": lambda count=False: diffrax_solve(x, drift_div, count),
        # One solve per example (batch of one inside), like jaxdiff's default.
        "diffrax_vmap": lambda count=False: jax.vmap(
            lambda xi, pi: diffrax_solve(
                xi[None], lambda t, y: drift_div(t, y, None if pi is None else pi[None]), count
            )[0]
        )(x, probes),
    }
    for name, fn in variants.items():
        run = jax.jit(fn)
        logp = jax.block_until_ready(run())
        seconds = best_time(run, flags.repeats)
        counter.clear()
        jax.block_until_ready(jax.jit(lambda f=fn: f(True))())
        jax.effects_barrier()
        report(name, logp, seconds, len(counter))

    a, b = results["jaxdiff"], results["scipy_rk45"]
    summary = {
        "summary": True,
        "trace": trace,
        "speedup_vs_scipy_rk45": round(b["seconds"] / a["seconds"], 2),
        "speedup_vs_diffrax": round(results["diffrax"]["seconds"] / a["seconds"], 2),
        "speedup_vs_diffrax_vmap": round(results["diffrax_vmap"]["seconds"] / a["seconds"], 2),
        "shared_step_speedup_vs_scipy_rk45": round(b["seconds"] / results["jaxdiff_shared_step"]["seconds"], 2),
        "shared_step_speedup_vs_diffrax": round(
            results["diffrax"]["seconds"] / results["jaxdiff_shared_step"]["seconds"], 2
        ),
        "device": str(jax.devices()[0].platform),
        "batch": batch,
        "dim": dim,
        "tol": tol,
    }
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
