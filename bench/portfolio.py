"""Portfolio-margin benchmark: the Cython scenario kernel against numpy and the reference.

One run, top to bottom:

1. build -- N portfolios x K legs on one underlying each (seeded): 80 % of the legs
   options (calls and puts, strikes 0.6-1.6 F, expiries 1 day to 1 year, vols 20-150 %),
   the rest perps/futures; one book in five coin-settled (inverse legs, Deribit-style),
   packed as engine.risk.portfolio.pack lays them out. The grid: the default
   ScenarioParams (7 moves x 3 vol shocks + 6 extremes = 27 scenarios).
2. cython -- ``engine._portfolio.scenario_requirements`` (the kernel itself, no checks).
3. numpy -- the same rule with whole-array operations over a legs x scenarios matrix
   (``numpy_requirements``); numpy has no erfc, so N(x) uses the Numerical Recipes
   ``erfcc`` Chebyshev fit (fractional error < 1.2e-7): it agrees with the kernel to
   ~1e-7 of a book's gross value, not bit for bit (checked: <= 1e-6).
4. reference -- ``requirement_reference`` (plain Python) on a random sample of books,
   extrapolated to N; checked against the kernel (<= 1e-9 of the gross value).
5. output -- medians, min and p99 of the repetitions, ratios against the numpy baseline
   measured in the same run, hardware; JSON and a PNG bar chart.

Usage::

    python -m bench.portfolio --portfolios 10000 --legs 10 --json bench/results/portfolio.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from bench.kernel import hardware
from engine import _portfolio
from engine.risk import portfolio as pm


# --------------------------------------------------------------------------- 1. build
def build(n: int, k: int, seed: int = 1) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """``(packed, raw)``: the kernel's arrays for ``n`` books of ``k`` legs, and per leg the
    integer ``qty`` / ``qty_scale`` / ``contract_size`` behind ``size`` (for the reference)."""
    rng = np.random.default_rng(seed)
    n_legs = n * k
    coin = (rng.random(n) < 0.2).astype(np.int8)
    book_of = np.repeat(np.arange(n), k)
    F = rng.choice([3_000.0, 65_000.0, 100_000.0], n)[book_of] * rng.uniform(0.98, 1.02, n_legs)
    option = rng.random(n_legs) < 0.8
    kind = np.where(option, pm.LEG_OPTION, np.where(coin[book_of] == 1, pm.LEG_INVERSE, pm.LEG_LINEAR)).astype(np.int8)
    qty_scale = np.where(kind == pm.LEG_INVERSE, 1, 1000).astype(np.int64)
    qty = rng.integers(-20, 21, n_legs).astype(np.int64) * 100   # 0.1-contract steps; inverse: 100s of contracts
    cs = np.where(kind == pm.LEG_INVERSE, 100.0, 1.0)
    packed = {
        "offsets": np.arange(0, n_legs + 1, k, dtype=np.int64),
        "coin": coin,
        "kind": kind,
        "size": qty / qty_scale * cs,
        "price": F,
        "strike": np.where(option, np.round(F * rng.uniform(0.6, 1.6, n_legs)), 0.0),
        "expiry_years": np.where(option, rng.uniform(1 / 365, 1.0, n_legs), 0.0),
        "sigma": np.where(option, rng.uniform(0.2, 1.5, n_legs), 0.0),
        "is_call": (rng.random(n_legs) < 0.5).astype(np.int8),
    }
    return packed, {"qty": qty, "qty_scale": qty_scale, "contract_size": cs}


def portfolios_of(packed, raw, rows) -> list[pm.Portfolio]:
    """The books ``rows`` as Portfolio objects (for the reference)."""
    out = []
    for p in rows:
        lo, hi = int(packed["offsets"][p]), int(packed["offsets"][p + 1])
        legs = tuple(pm.Leg(int(packed["kind"][i]), int(raw["qty"][i]), int(raw["qty_scale"][i]),
                            float(raw["contract_size"][i]), float(packed["price"][i]), float(packed["strike"][i]),
                            float(packed["expiry_years"][i]), float(packed["sigma"][i]), bool(packed["is_call"][i]))
                     for i in range(lo, hi))
        out.append(pm.Portfolio(pm.SETTLE_COIN if packed["coin"][p] else pm.SETTLE_USD, legs))
    return out


# --------------------------------------------------------------------------- 2. cython
def cython_requirements(packed, grid, params: pm.ScenarioParams) -> dict[str, np.ndarray]:
    n = len(packed["coin"])
    moves, vols, weights = grid
    out = {"requirement": np.zeros(n), "worst": np.zeros(n, np.int32), "worst_loss": np.zeros(n),
           "short_min": np.zeros(n)}
    _portfolio.scenario_requirements(
        packed["offsets"], packed["coin"], packed["kind"], packed["size"], packed["price"], packed["strike"],
        packed["expiry_years"], packed["sigma"], packed["is_call"], moves, vols, weights, params.rate,
        params.short_option_min, out["requirement"], out["worst"], out["worst_loss"], out["short_min"],
        np.zeros((0, len(moves))))
    return out


# --------------------------------------------------------------------------- 3. numpy
def _erfc(x: np.ndarray) -> np.ndarray:
    """Numerical Recipes ``erfcc``: erfc with fractional error < 1.2e-7 everywhere."""
    z = np.abs(x)
    t = 1.0 / (1.0 + 0.5 * z)
    r = t * np.exp(-z * z - 1.26551223 + t * (1.00002368 + t * (0.37409196 + t * (0.09678418 + t * (
        -0.18628806 + t * (0.27886807 + t * (-1.13520398 + t * (1.48851587 + t * (
            -0.82215223 + t * 0.17087277)))))))))
    return np.where(x >= 0, r, 2.0 - r)


def numpy_requirements(packed, grid, params: pm.ScenarioParams) -> dict[str, np.ndarray]:
    """The kernel's rule over a legs x scenarios matrix (column 0: the base, no move)."""
    moves, vols, weights = grid
    m = np.concatenate(([0.0], moves))[None, :]
    v = np.concatenate(([0.0], vols))[None, :]
    kind, size = packed["kind"][:, None], packed["size"][:, None]
    F = packed["price"][:, None] * (1.0 + m)
    K = packed["strike"][:, None]
    T = packed["expiry_years"][:, None]
    opt = kind == pm.LEG_OPTION
    Ks = np.where(opt, K, 1.0)
    Ts = np.where(T > 0, T, 0.0)
    sv = packed["sigma"][:, None] * (1.0 + v) * np.sqrt(Ts)
    live = opt & (T > 0) & (sv > 0)
    svs = np.where(live, sv, 1.0)
    d1 = np.log(F / Ks) / svs + 0.5 * svs
    d2 = d1 - svs
    call = packed["is_call"][:, None] == 1
    df = np.where(T > 0, np.exp(-params.rate * Ts), 1.0)
    n1 = 0.5 * _erfc(-np.where(call, d1, -d1) / np.sqrt(2.0))
    n2 = 0.5 * _erfc(-np.where(call, d2, -d2) / np.sqrt(2.0))
    b76 = df * np.where(call, F * n1 - Ks * n2, Ks * n2 - F * n1)
    intrinsic = np.where(call, np.maximum(F - Ks, 0.0), np.maximum(Ks - F, 0.0))
    b76 = np.where(live, b76, np.where(T > 0, df, 1.0) * intrinsic)
    u = np.where(kind == pm.LEG_LINEAR, size * F, np.where(kind == pm.LEG_INVERSE, -size, size * b76))
    coin = np.repeat(packed["coin"], np.diff(packed["offsets"]))[:, None] == 1
    val = np.where(coin, u / F, u)
    starts = packed["offsets"][:-1]
    book = np.add.reduceat(val, starts, axis=0)               # books x (1 + scenarios)
    losses = weights[None, :] * (book[:, :1] - book[:, 1:])
    short = (packed["kind"] == pm.LEG_OPTION) & (packed["size"] < 0)
    smin = np.add.reduceat(np.where(short, -packed["size"] * np.where(coin[:, 0], 1.0, packed["price"]), 0.0),
                           starts) * params.short_option_min
    worst = np.argmax(losses, axis=1)
    worst_loss = losses[np.arange(len(losses)), worst]
    return {"requirement": np.maximum(np.maximum(worst_loss, smin), 0.0), "worst": worst,
            "worst_loss": worst_loss, "short_min": smin}


def gross(packed) -> np.ndarray:
    """Per book ``sum |size| F`` (USD) or ``sum |size|`` (coin: sizes of options in base,
    inverse in USD over F): the scale agreement is measured against."""
    coin = np.repeat(packed["coin"], np.diff(packed["offsets"])) == 1
    inv = packed["kind"] == pm.LEG_INVERSE
    per = np.where(coin, np.where(inv, np.abs(packed["size"]) / packed["price"], np.abs(packed["size"])),
                   np.abs(packed["size"]) * packed["price"])
    return np.add.reduceat(per, packed["offsets"][:-1])


# --------------------------------------------------------------------------- timing
def _time(fn, reps: int, warmup: int = 1) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def _stats_ms(seconds: list[float]) -> dict:
    ms = np.array(seconds) * 1e3
    return {"median": float(np.median(ms)), "min": float(ms.min()), "p99": float(np.percentile(ms, 99)),
            "reps": len(ms)}


# --------------------------------------------------------------------------- run
def run(portfolios: int = 10_000, legs: int = 10, json_out: str | os.PathLike | None = None,
        plot_out: str | os.PathLike | None = None, reference_sample: int = 200, *, reps: int = 15,
        seed: int = 1, quiet: bool = False) -> dict:
    """Run the benchmark; write ``json_out`` and the PNG (by default next to it). Returns the result."""
    say = (lambda *a: None) if quiet else print
    n, k = int(portfolios), int(legs)
    params = pm.DEFAULT_PARAMS
    grid = pm.scenario_grid(params)
    load_start = os.getloadavg()[0]
    packed, raw = build(n, k, seed)                                        # 1
    pm.requirements_packed(packed, params)                                 # the checks pass on it
    cy = _stats_ms(_time(lambda: cython_requirements(packed, grid, params), reps))        # 2
    cy_out = cython_requirements(packed, grid, params)
    np_reps = max(3, reps // 3)
    npy = _stats_ms(_time(lambda: numpy_requirements(packed, grid, params), np_reps))     # 3
    np_out = numpy_requirements(packed, grid, params)
    scale = np.maximum(gross(packed), 1e-12)
    np_rel = float(np.max(np.abs(np_out["requirement"] - cy_out["requirement"]) / scale))
    sample = min(int(reference_sample), n)                                 # 4
    rows = np.sort(np.random.default_rng(seed + 1).choice(n, sample, replace=False))
    books = portfolios_of(packed, raw, rows)
    ref_times = _time(lambda: [pm.requirement_reference(b, params) for b in books], max(1, min(3, reps)), warmup=0)
    ref = _stats_ms(ref_times)
    ref_req = np.array([pm.requirement_reference(b, params).requirement for b in books])
    ref_rel = float(np.max(np.abs(cy_out["requirement"][rows] - ref_req) / scale[rows]))
    ref_ms = ref["median"] * n / sample
    cells = n * k * len(grid[0])
    result = {
        "portfolios": n, "legs": k, "scenarios": len(grid[0]), "leg_scenarios": cells,
        "cython_ms": cy["median"], "cython_ms_min": cy["min"], "cython_ms_p99": cy["p99"],
        "numpy_ms": npy["median"], "numpy_ms_min": npy["min"], "numpy_ms_p99": npy["p99"],
        "reference_ms": ref_ms, "reference_sample": sample, "reference_sample_ms": ref["median"],
        "ns_per_leg_scenario": {"cython": cy["median"] * 1e6 / cells, "numpy": npy["median"] * 1e6 / cells,
                                "reference": ref_ms * 1e6 / cells},
        "ratios": {"numpy_over_cython": npy["median"] / cy["median"],
                   "reference_over_numpy": ref_ms / npy["median"],
                   "reference_over_cython": ref_ms / cy["median"]},
        "agreement": {"numpy_max_rel_to_gross": np_rel, "reference_max_rel_to_gross": ref_rel,
                      "agree": np_rel <= 1e-6 and ref_rel <= 1e-9},
        "books_with_requirement_at_short_minimum": int(np.count_nonzero(
            (cy_out["short_min"] >= cy_out["worst_loss"]) & (cy_out["short_min"] > 0))),
        "hardware": hardware(),
        "settings": {"seed": seed, "reps": reps, "numpy_reps": np_reps, "params": {
            "price_range": params.price_range, "price_steps": params.price_steps,
            "vol_shocks": list(params.vol_shocks), "extreme_multiple": params.extreme_multiple,
            "extreme_fraction": params.extreme_fraction, "short_option_min": params.short_option_min},
            "threads": 1, "load_average_1m": [load_start, os.getloadavg()[0]]},
    }
    if not result["agreement"]["agree"]:
        raise AssertionError(f"disagreement: numpy {np_rel:.3g}, reference {ref_rel:.3g} of the gross value")
    say(summary(result))
    if json_out is not None:
        path = Path(json_out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2, allow_nan=False) + "\n")
        png = Path(plot_out) if plot_out is not None else path.with_suffix(".png")
        plot(result, png)
        say(f"wrote {path} and {png}")
    elif plot_out is not None:
        plot(result, Path(plot_out))
    return result


def summary(r: dict) -> str:
    hw, ra, ns = r["hardware"], r["ratios"], r["ns_per_leg_scenario"]
    return "\n".join([
        f"portfolio-margin benchmark: {r['portfolios']:,} books x {r['legs']} legs x {r['scenarios']} scenarios "
        f"({r['leg_scenarios']:,} leg revaluations), one thread",
        f"hardware: {hw['cpu']}, {hw['cores']} cores; python {hw['python']}, numpy {hw['numpy']}, "
        f"cython {hw['cython']}; load average {r['settings']['load_average_1m'][0]:.2f} -> "
        f"{r['settings']['load_average_1m'][1]:.2f}",
        f"  cython kernel   {r['cython_ms']:10.2f} ms  (min {r['cython_ms_min']:.2f}, p99 {r['cython_ms_p99']:.2f} "
        f"of {r['settings']['reps']} reps; {ns['cython']:.1f} ns/leg-scenario)",
        f"  numpy baseline  {r['numpy_ms']:10.2f} ms  (min {r['numpy_ms_min']:.2f}, p99 {r['numpy_ms_p99']:.2f} "
        f"of {r['settings']['numpy_reps']} reps; max diff {r['agreement']['numpy_max_rel_to_gross']:.2g} of gross)",
        f"  reference       {r['reference_ms']:10.1f} ms  (extrapolated from {r['reference_sample']} books: "
        f"{r['reference_sample_ms']:.1f} ms; max diff {r['agreement']['reference_max_rel_to_gross']:.2g} of gross)",
        f"ratios: numpy/cython {ra['numpy_over_cython']:.1f}x, reference/numpy {ra['reference_over_numpy']:.0f}x, "
        f"reference/cython {ra['reference_over_cython']:.0f}x",
    ])


def plot(r: dict, path: Path) -> None:
    """Bar chart of the three timings (log scale), each labelled with its ratio to numpy."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ["Cython kernel", "numpy\nvectorized (baseline)", "Python reference\n(extrapolated)"]
    vals = [r["cython_ms"], r["numpy_ms"], r["reference_ms"]]
    p99 = [r["cython_ms_p99"], r["numpy_ms_p99"], r["reference_ms"]]
    fig, ax = plt.subplots(figsize=(8, 4.6), dpi=120)
    bars = ax.bar(names, vals, color=["#2b6cb0", "#dd6b20", "#718096"])
    ax.scatter([b.get_x() + b.get_width() / 2 for b in bars[:2]], p99[:2], marker="_", s=400, color="black",
               label="p99", zorder=3)
    ax.set_yscale("log")
    ax.set_ylabel("all books, one pass (ms, log scale)")
    for b, v in zip(bars, vals):
        ratio = v / r["numpy_ms"]
        ax.annotate(f"{v:,.1f} ms\n{ratio:,.3g}x numpy", (b.get_x() + b.get_width() / 2, v), ha="center",
                    va="bottom", fontsize=8, xytext=(0, 2), textcoords="offset points")
    ax.set_ylim(min(vals) / 3, max(vals) * 8)
    ax.legend(loc="upper left", fontsize=8)
    hw = r["hardware"]
    ax.set_title(f"Portfolio margin: {r['portfolios']:,} books x {r['legs']} legs x {r['scenarios']} scenarios\n"
                 f"{hw['cpu']}, numpy {hw['numpy']}, one thread", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.portfolio", description=__doc__.splitlines()[0])
    ap.add_argument("--portfolios", type=int, default=10_000)
    ap.add_argument("--legs", type=int, default=10)
    ap.add_argument("--reference-sample", type=int, default=200)
    ap.add_argument("--json", default="bench/results/portfolio.json")
    ap.add_argument("--plot", default=None, help="PNG path (default: next to the JSON)")
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args(argv)
    if args.portfolios < 1 or args.legs < 1 or args.reference_sample < 1 or args.reps < 1:
        ap.error("need --portfolios, --legs, --reference-sample and --reps >= 1")
    run(args.portfolios, args.legs, args.json, args.plot, args.reference_sample, reps=args.reps, seed=args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
