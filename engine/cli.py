"""``margin-engine`` command line.

Subcommands: ``evaluate`` (what-if on a JSON scenario), ``bench`` (kernel, feeds,
latency benchmarks), and the live engine's ``run``, ``status`` and ``demo`` as they land.
Bad input exits with status 2 and one line naming the problem, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from importlib import resources


def _cmd_evaluate(args) -> int:
    from engine.scenario import ScenarioError, evaluate

    try:
        if args.scenario == "-":
            doc = json.load(sys.stdin)
        elif args.scenario is None:
            doc = json.loads(resources.files("engine").joinpath("examples/scenario.json").read_text())
        else:
            with open(args.scenario) as f:
                doc = json.load(f)
    except OSError as e:
        print(f"margin-engine evaluate: cannot read {args.scenario}: {e.strerror}", file=sys.stderr)
        return 2
    except json.JSONDecodeError as e:
        print(f"margin-engine evaluate: {args.scenario}: not valid JSON: {e}", file=sys.stderr)
        return 2
    try:
        result = evaluate(doc)
    except ScenarioError as e:
        print(f"margin-engine evaluate: {e}", file=sys.stderr)
        return 2
    json.dump(result, sys.stdout, indent=2, allow_nan=False)
    sys.stdout.write("\n")
    return 0


def _cmd_bench_kernel(args) -> int:
    from bench import kernel

    kernel.run(accounts=args.accounts, positions=args.positions, json_out=args.json,
               plot_out=None, reference_sample=args.reference_sample)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="margin-engine", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    ev = sub.add_parser("evaluate", help="margins of a JSON scenario at one point in time (docs/evaluate.md)")
    ev.add_argument("scenario", nargs="?", default=None,
                    help="scenario JSON file, '-' for stdin; default: the bundled example")
    ev.set_defaults(func=_cmd_evaluate)

    bench = sub.add_parser("bench", help="benchmarks (results under bench/results/)")
    bsub = bench.add_subparsers(dest="bench", required=True)
    bk = bsub.add_parser("kernel", help="Cython full pass vs numpy, reference and the bandwidth floor")
    bk.add_argument("--accounts", type=int, default=1_000_000)
    bk.add_argument("--positions", type=int, default=4)
    bk.add_argument("--reference-sample", type=int, default=2000)
    bk.add_argument("--json", default="bench/results/kernel.json")
    bk.set_defaults(func=_cmd_bench_kernel)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
