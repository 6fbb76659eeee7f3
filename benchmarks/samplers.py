"""Error to the true mixture versus score evaluations (NFE), for every sampler and SDE.

Run:  python benchmarks/samplers.py [--quick] [--n 10000]   # --quick: VP and rectified flow, fewer budgets
      python benchmarks/samplers.py --target [--n 100000]   # DPM-Solver++(2M) at 20 NFE against EM at 500 NFE
      python benchmarks/samplers.py --dpm3m [--n 10000]     # DPM-Solver++(3M), both variants, error to the ODE

Prints one JSON line per (mixture, SDE, method, budget). The error statistic is the *sliced Kolmogorov–Smirnov
distance*: the mean, over 16 fixed random unit directions u, of sup_z |F_n(z) - F(z)|, where F_n is the
empirical CDF of the projected samples u.x and F the exact CDF of the projected mixture, a 1-D mixture of
N(u.m_k, u^T C_k u). Comparing against the exact CDF (not against another sample) keeps the noise floor small
and known: for n exact samples E[KS] ~ 0.87 / sqrt(n) per direction; the "exact" rows measure it.

The rectified-flow rows ("rf", ``x_t = (1 - t) x_0 + t eps``) use the same mixture's exact score under that path
(``gm.score_fn(RectifiedFlow())``), so they sit next to the VP rows with the same data and statistic. They run the
samplers that apply from T = 1 on that path, at NFE 5, 10, 20 and 50: ``flow_euler`` (the rectified-flow
sampler), DDIM, DPM-Solver++(2M) on a grid uniform in t (the log-SNR grid starts at -inf), EDM Heun from
``sigma_max = 80`` and the adaptive ODE; the reverse-SDE samplers are refused on this path.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import numpy as np

import jaxdiff
from jaxdiff.oracle import GaussianMixture
from jaxdiff.samplers.dpm_solver import LOWER_ORDER_FINAL_BELOW

MIXTURES = {
    # 4 components, unequal weights 0.1..0.4.
    "easy": lambda: GaussianMixture.grid(n_per_side=2, spacing=4.0, std=0.5),
    # 9 sharp, well-separated components: the score is steep near each mode and flat between them.
    "hard": lambda: GaussianMixture.grid(n_per_side=3, spacing=5.0, std=0.1),
}
SDES = {"vp": jaxdiff.VPSDE(), "rf": jaxdiff.RectifiedFlow(), "subvp": jaxdiff.SubVPSDE(), "ve": jaxdiff.VESDE()}
# Rectified flow: the samplers that apply from T = 1 (the reverse SDE is singular there), and their budgets.
RF_METHODS = ("flow_euler", "ddim", "dpm_solver++", "heun", "ode")
RF_BUDGETS = (5, 10, 20, 50)


def budgets_to_options(method: str, nfe: int, sde_name: str = "vp"):
    """Options giving about ``nfe`` score evaluations (on rectified flow, the grids that start at T = 1)."""
    if method == "flow_euler":
        return dict(steps=nfe)
    if sde_name == "rf" and method == "dpm_solver++":
        return dict(steps=nfe, order=2, time_schedule="uniform")
    if sde_name == "rf" and method == "heun":
        return dict(steps=max((nfe + 1) // 2, 1), sigma_max=80.0)
    if method in ("euler_maruyama", "reverse_diffusion", "ancestral"):
        return dict(steps=max(nfe - 1, 1))
    if method == "pc":
        return dict(steps=max((nfe - 1) // 2, 1))
    if method == "annealed_langevin":
        return dict(steps=max(nfe - 1, 1))
    if method == "ddim":
        return dict(steps=nfe, denoise=False)
    if method == "dpm_solver++":
        return dict(steps=nfe, order=2)
    if method == "heun":
        return dict(steps=max((nfe + 1) // 2, 1))
    raise ValueError(method)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10_000, help="samples per run")
    parser.add_argument("--quick", action="store_true", help="VP and rectified flow only, fewer budgets")
    parser.add_argument("--mixtures", default="easy,hard")
    parser.add_argument("--methods", default=None, help="comma-separated subset of methods")
    parser.add_argument(
        "--target",
        action="store_true",
        help="only the comparison of DPM-Solver++(2M) at 20 NFE (every grid, end time, final denoising) with "
        "Euler-Maruyama at 500 NFE, VP; use a large --n, since at 10k samples both sit at the noise floor",
    )
    parser.add_argument(
        "--dpm3m",
        action="store_true",
        help="only the error table of DPM-Solver++(3M), variants 'published' and 'taylor', at 10/20/40/80 steps: "
        "distance of each sample to the exact probability-flow ODE solution from the same prior draw (VP, easy)",
    )
    args = parser.parse_args()
    if args.target:
        return target(args)
    if args.dpm3m:
        return dpm3m_table(args)

    budgets = [10, 20, 50, 100] if args.quick else [5, 10, 20, 50, 100, 200, 500]
    sdes = {k: SDES[k] for k in ("vp", "rf")} if args.quick else SDES
    methods = [
        "euler_maruyama",
        "reverse_diffusion",
        "ancestral",
        "pc",
        "annealed_langevin",
        "ddim",
        "dpm_solver++",
        "heun",
        "flow_euler",
        "ode",
    ]
    if args.methods:
        methods = args.methods.split(",")
    methods = [m for m in methods if m in jaxdiff.samplers.available_methods()]

    for mix_name in args.mixtures.split(","):
        gm = MIXTURES[mix_name]()
        for seed in range(3):
            exact = gm.sample(jax.random.key(100 + seed), args.n)
            print(
                json.dumps(
                    {
                        "mixture": mix_name,
                        "sde": None,
                        "method": "exact",
                        "nfe": 0,
                        "seed": seed,
                        "sliced_ks": round(gm.sliced_ks(exact), 5),
                    }
                ),
                flush=True,
            )
        for sde_name, sde in sdes.items():
            score_fn = gm.score_fn(sde)
            for method in methods:
                if sde_name == "rf" and method not in RF_METHODS:
                    continue
                runs = (
                    [dict(rtol=r, atol=r) for r in (1e-2, 1e-3, 1e-4, 1e-5)]
                    if method == "ode"
                    else [
                        budgets_to_options(method, b, sde_name) for b in (RF_BUDGETS if sde_name == "rf" else budgets)
                    ]
                )
                if method == "annealed_langevin":
                    runs = [budgets_to_options(method, b) for b in (100, 500, 2000)]
                if method in ("euler_maruyama",):
                    runs.append(budgets_to_options(method, 1000))
                for opts in runs:
                    try:
                        t0 = time.perf_counter()
                        x, info = jaxdiff.sample(jax.random.key(0), score_fn, sde, (args.n, 2), method=method, **opts)
                        x = np.asarray(x)
                        wall = time.perf_counter() - t0
                        err = gm.sliced_ks(x)
                        row = {
                            "mixture": mix_name,
                            "sde": sde_name,
                            "method": method,
                            "nfe": int(info["nfe"]),
                            "options": opts,
                            "sliced_ks": round(err, 5),
                            "wall_s_incl_compile": round(wall, 2),
                        }
                    except ValueError as err:  # method not defined for this SDE or budget
                        row = {
                            "mixture": mix_name,
                            "sde": sde_name,
                            "method": method,
                            "options": opts,
                            "error": str(err),
                        }
                    print(json.dumps(row), flush=True)


def spread(gm: GaussianMixture, x) -> float:
    """RMS distance of the samples to their nearest component mean over the true one: 1 when the widths are right."""
    x = np.asarray(x, np.float64)
    means = np.asarray(gm.means, np.float64)
    nearest = np.argmin(((x[:, None] - means[None]) ** 2).sum(-1), axis=1)
    true = np.sqrt(np.mean([np.trace(c) for c in np.asarray(gm.covs, np.float64)]))
    return float(np.sqrt(np.mean(np.sum((x - means[nearest]) ** 2, -1))) / true)


def target(args):
    """DPM-Solver++(2M) at 20 NFE against Euler--Maruyama at 500 NFE, with the exact-sample floor beside them."""
    sde = SDES["vp"]
    for mix_name in args.mixtures.split(","):
        gm = MIXTURES[mix_name]()
        score_fn = gm.score_fn(sde)

        def row(method, nfe, x, **extra):
            x = np.asarray(x)
            out = {"mixture": mix_name, "n": args.n, "method": method, "nfe": int(nfe), **extra}
            out.update(sliced_ks=round(gm.sliced_ks(x), 5), spread=round(spread(gm, x), 4))
            print(json.dumps(out), flush=True)

        row("exact", 0, gm.sample(jax.random.key(100), args.n))
        key = jax.random.key(0)
        x, info = jaxdiff.sample(key, score_fn, sde, (args.n, 2), method="euler_maruyama", steps=499)
        row("euler_maruyama", info["nfe"], x)
        for schedule in ("logsnr", "quadratic", "uniform"):
            for eps in (1e-3, 1e-2):
                for denoise in (False, True):
                    opts = dict(steps=20 - denoise, order=2, time_schedule=schedule, eps=eps, denoise=denoise)
                    x, info = jaxdiff.sample(key, score_fn, sde, (args.n, 2), method="dpm_solver++", **opts)
                    row("dpm_solver++", info["nfe"], x, **opts)


def dpm3m_table(args, steps=(10, 20, 40, 80)):
    """Error of DPM-Solver++(3M) to the probability-flow ODE's solution, both variants, one JSON line per cell.

    The reference is the Taylor variant at 4000 steps from the same prior draws; the first line checks it against
    the adaptive Dormand--Prince solver at ``rtol = atol = 1e-6`` (an independent solver). The error of a sample
    is its Euclidean distance to the reference; the rows give the median and the 90th percentile over samples.
    Defaults of the sampler otherwise: log-SNR grid, ``eps = 1e-3``, ``lower_order_final`` (below 15 steps).
    """
    sde = SDES["vp"]
    gm = MIXTURES["easy"]()
    score_fn = gm.score_fn(sde)
    key, shape = jax.random.key(0), (args.n, 2)
    x, _ = jaxdiff.sample(key, score_fn, sde, shape, method="dpm_solver++", steps=4000, order=3, variant="taylor")
    reference = np.asarray(x, np.float64)

    def distances(x):
        return np.linalg.norm(np.asarray(x, np.float64) - reference, axis=-1)

    x, info = jaxdiff.sample(key, score_fn, sde, shape, method="ode", rtol=1e-6, atol=1e-6)
    d = distances(x)
    check = {"mixture": "easy", "sde": "vp", "n": args.n, "method": "ode", "rtol": 1e-6, "nfe": int(info["nfe"])}
    check.update(median_error=float(f"{np.median(d):.3g}"), p90_error=float(f"{np.quantile(d, 0.9):.3g}"))
    print(json.dumps({"reference_check": check}), flush=True)
    # lower_order_final only acts below 15 steps: there both settings are shown.
    cells = [(n, lof) for n in steps for lof in ((True, False) if n < LOWER_ORDER_FINAL_BELOW else (True,))]
    for n, lof in cells:
        for variant in ("taylor", "published"):
            options = dict(steps=n, order=3, variant=variant, lower_order_final=lof)
            x, info = jaxdiff.sample(key, score_fn, sde, shape, method="dpm_solver++", **options)
            d = distances(x)
            row = {"mixture": "easy", "sde": "vp", "n": args.n, "method": "dpm_solver++", **options}
            row.update(nfe=int(info["nfe"]))
            row.update(median_error=float(f"{np.median(d):.3g}"), p90_error=float(f"{np.quantile(d, 0.9):.3g}"))
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    jax.config.update("jax_platforms", "cpu")
    main()
