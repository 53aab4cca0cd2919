"""``margin-engine`` command line.

Subcommands: ``demo`` (the engine against simulated venues and a simulated matching
engine, live in the terminal), ``run`` (the engine on a configuration), ``status`` (a
running engine, or its state directory), ``evaluate`` (what-if on a JSON scenario),
``portfolio`` (what-if portfolio margin of options on a JSON scenario), ``keys`` (a CURVE
key pair for ``[security]``) and ``bench`` (kernel, feeds, latency,
acknowledgement and recovery benchmarks).
Bad input exits with status 2 and one line naming the problem, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from importlib import resources


# --------------------------------------------------------------------------- argument types
# Each raises ArgumentTypeError: argparse then prints the usage and one line
# "margin-engine CMD: error: argument --X: ..." and exits with status 2.
def _int_at_least(lo: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < lo:
            raise argparse.ArgumentTypeError(f"must be >= {lo}, got {value}")
        return value
    return parse


def _finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def _seconds(text: str) -> float:
    value = _finite_float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0 seconds, got {text}")
    return value


def _crash_percent(text: str) -> float:
    value = _finite_float(text)
    if not 0 <= value < 100:
        raise argparse.ArgumentTypeError(f"must be a percent in [0, 100) (0: no crash), got {text}")
    return value


def _directory(text: str) -> str:
    if not os.path.isdir(text):
        why = "does not exist" if not os.path.exists(text) else "is not a directory"
        raise argparse.ArgumentTypeError(f"{text} {why}")
    return text


def _key_name(text: str) -> str:
    if not text or "/" in text or text.startswith("."):
        raise argparse.ArgumentTypeError(f"a plain file name, got {text!r}")
    return text


def _cmd_keys(args) -> int:
    """A CURVE key pair: DIR/NAME.key (public: give it to the other side, or put it in
    the engine's allowlist) and DIR/NAME.key_secret (both keys, owner-only)."""
    import zmq.auth

    public, secret = (os.path.join(args.dir, args.name + s) for s in (".key", ".key_secret"))
    if os.path.lexists(public) or os.path.lexists(secret):        # a dangling link too: never written through
        print(f"margin-engine keys: {public} or {secret} exists; not overwritten", file=sys.stderr)
        return 2
    old = os.umask(0o077)                       # the secret is never readable by others, not even briefly
    try:
        zmq.auth.create_certificates(args.dir, args.name)
    finally:
        os.umask(old)
    os.chmod(public, 0o644)
    print(f"public key: {public}\nsecret key: {secret} (mode 600)")
    return 0


def _read_scenario(args, command: str, example: str):
    """The JSON document of ``args.scenario`` ('-': stdin, None: the bundled ``example``),
    or None after one line on stderr."""
    try:
        if args.scenario == "-":
            return json.load(sys.stdin)
        if args.scenario is None:
            return json.loads(resources.files("engine").joinpath(f"examples/{example}").read_text())
        with open(args.scenario) as f:
            return json.load(f)
    except OSError as e:
        print(f"margin-engine {command}: cannot read {args.scenario}: {e.strerror}", file=sys.stderr)
        return None
    except (ValueError, RecursionError) as e:   # JSONDecodeError, int literals past Python's
        # digit limit, and arrays or objects nested past the decoder's recursion limit
        print(f"margin-engine {command}: {args.scenario}: not valid JSON: {e}", file=sys.stderr)
        return None


def _cmd_scenario(args, command: str, example: str, evaluate) -> int:
    """Read a JSON scenario, ``evaluate(doc)`` it, print the result as JSON; exit 2 with
    one line for a document that is not valid (``ScenarioError``)."""
    from engine.scenario import ScenarioError

    doc = _read_scenario(args, command, example)
    if doc is None:
        return 2
    try:
        result = evaluate(doc)
    except ScenarioError as e:
        print(f"margin-engine {command}: {e}", file=sys.stderr)
        return 2
    json.dump(result, sys.stdout, indent=2, allow_nan=False)
    sys.stdout.write("\n")
    return 0


def _cmd_evaluate(args) -> int:
    from engine.scenario import evaluate
    return _cmd_scenario(args, "evaluate", "scenario.json", evaluate)


def _cmd_portfolio(args) -> int:
    from engine.scenario import evaluate_portfolio
    return _cmd_scenario(args, "portfolio", "portfolio.json", evaluate_portfolio)


def _cmd_bench_portfolio(args) -> int:
    from bench import portfolio

    portfolio.run(portfolios=args.portfolios, legs=args.legs, json_out=args.json, plot_out=None,
                  reference_sample=args.reference_sample, reps=args.reps)
    return 0


def _cmd_bench_kernel(args) -> int:
    from bench import kernel

    kernel.run(accounts=args.accounts, positions=args.positions, json_out=args.json,
               plot_out=None, reference_sample=args.reference_sample, threads=args.threads or None)
    return 0


PASS_THROUGH_BENCHES = ("acks", "curve", "feeds", "latency", "recovery")   # their options are bench/NAME.py's own


def _load_config(path):
    from engine.config import ConfigError, load, load_default

    try:
        return load(path) if path else load_default()
    except ConfigError as e:
        print(f"margin-engine: {e}", file=sys.stderr)
        return None


def _cmd_run(args) -> int:
    import signal
    import time

    from engine.runtime import recovery
    from engine.runtime.journal import write_fills_streams
    from engine.runtime.provision import provision
    from engine.runtime.supervisor import Engine
    from engine.store.shm import StoreError

    cfg = _load_config(args.config)
    if cfg is None:
        return 2
    if args.workers is not None and args.workers > cfg.engine.partitions:
        print(f"margin-engine run: --workers {args.workers}: at most engine.partitions "
              f"({cfg.engine.partitions}) workers (each owns at least one partition)", file=sys.stderr)
        return 2
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))   # handlers only enqueue
    signal.signal(signal.SIGINT, lambda *_: stop.append(1))
    eng = Engine(cfg, n_workers=args.workers, durable=True)
    if args.fresh:
        for path in recovery.set_aside(eng.state_dir):
            print(f"margin-engine run: --fresh: kept the old book's file as {path}", file=sys.stderr)

    def new_book(store) -> None:
        if args.demo_accounts:
            provision(store, cfg, args.demo_accounts)
        else:
            for acct in range(1, (args.accounts or 1000) + 1):
                store.add_account(acct)

    store = eng.create_state()
    try:                                       # 1. open the book (recover or provision), 2. re-base
        names = eng.asset_names
        opened = recovery.open_book(store, eng.state_dir, names, new_book, show_progress=True)
        eng.fills_last_seq = opened.fills_last_seq      # the gateway drops what it had taken before
        eng.ctl.seed_transfers(opened.transfers)        # and answers a retried transfer_id
        write_fills_streams(eng.state_dir, opened.fills_streams)    # the gateway's start (DEALER streams)
        recovery.rebase(store, eng.state_dir, names, eng.journal_generation, eng.fills_last_seq,
                        eng.ctl.transfers_in_order(), opened.fills_streams)
    except (StoreError, recovery.RecoveryError, OSError, ValueError) as e:   # e.g. more accounts than
                                                 # the capacity; a file that is no journal
        store.unlink()                         # nothing started yet: release the segments
        eng.ctl.unlink()
        print(f"margin-engine run: {e}", file=sys.stderr)
        return 2
    if opened.recovered:
        r = opened.replay
        print(f"margin-engine run: recovered {opened.snapshot_accounts:,} accounts from "
              f"{eng.state_dir}/{recovery.SNAPSHOT_FILE} ({opened.snapshot_age_s:.1f} s old, "
              f"loaded in {opened.load_seconds:.2f} s) and replayed {r.records:,} journal records "
              f"({r.generations} files) in "
              f"{r.seconds:.2f} s: {r.fills:,} fills ({r.fills_rejected} rejected by routing, "
              f"{r.legs_rejected} legs by the kernel), {r.deposits} deposits, {r.withdrawals} withdrawals, "
              f"{r.accounts_opened} accounts opened, {r.isolated_margin_moves} isolated margin moves"
              + (f", {r.unreadable} unreadable" if r.unreadable else "")
              + f"; fills stream goes on after seq {opened.fills_last_seq:,}", file=sys.stderr)
        if args.accounts or args.demo_accounts:
            print("margin-engine run: --accounts / --demo-accounts ignored: they shape a new book only "
                  "(--fresh starts one)", file=sys.stderr)
    try:
        eng.start()           # on failure it has stopped what it started and unlinked the memory
    except (RuntimeError, TimeoutError, OSError) as e:
        print(f"margin-engine run: the engine did not start: {e}", file=sys.stderr)
        return 1
    print(f"margin-engine {cfg.engine.name}: running with {eng.n_workers} workers; "
          f"oracle {cfg.endpoints.oracle}, fills {cfg.endpoints.fills}, checks {cfg.endpoints.checks}, "
          f"orders {cfg.endpoints.orders}, events {cfg.endpoints.events}", file=sys.stderr)
    from engine.runtime.supervisor import EngineFailure

    try:
        while not stop:
            for role in eng.watch_once():
                print(f"margin-engine: restarted {role}", file=sys.stderr)
            time.sleep(0.1)
    except EngineFailure as e:
        print(f"margin-engine run: {e}; stopping", file=sys.stderr)
        return 1
    finally:
        eng.stop()
    return 0


def _cmd_status(args) -> int:
    from engine.runtime.status import render, render_durability, snapshot
    from engine.store.shm import Store, StoreError

    try:
        store = Store.attach(args.name, readonly=True)
    except (StoreError, ValueError) as e:     # ValueError: not a valid segment name ("a/b")
        if not args.state_dir:
            print(f"margin-engine status: {e}", file=sys.stderr)
            return 2
        store = None                           # a stopped engine: its state directory alone
        print(f"margin-engine status: not running ({e}); the state directory only", file=sys.stderr)
    s = snapshot(store) if store is not None else {"running": False}
    if args.state_dir:
        from engine.runtime.recovery import RecoveryError, durability
        try:
            s["durability"] = durability(args.state_dir)
        except RecoveryError as e:
            print(f"margin-engine status: {e}", file=sys.stderr)
            return 2
    if args.json:
        print(json.dumps(s, indent=2))
    else:
        print(render(s) if store is not None else render_durability(s["durability"]))
    return 0


def _cmd_demo(args) -> int:
    from engine.demo import DemoError, DemoInterrupted, run_demo

    try:
        summary = run_demo(duration_s=args.duration, accounts=args.accounts, workers=args.workers,
                           crash_pct=args.crash / 100.0, seed=args.seed)
    except DemoInterrupted:
        print("margin-engine demo: interrupted while starting; stopped, nothing left behind", file=sys.stderr)
        return 130
    except DemoError as e:
        print(f"margin-engine demo: {e}; stopped", file=sys.stderr)
        return 1
    codes = set(summary["engine_exit_codes"].values())
    return 0 if codes <= {0} else 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="margin-engine", description=" ".join(__doc__.replace("``", "").split()))
    sub = p.add_subparsers(dest="command", required=True)

    ev = sub.add_parser("evaluate", help="margins of a JSON scenario at one point in time (docs/evaluate.md)")
    ev.add_argument("scenario", nargs="?", default=None,
                    help="scenario JSON file, '-' for stdin; default: the bundled example")
    ev.set_defaults(func=_cmd_evaluate)

    pf = sub.add_parser("portfolio", help="standard margin beside portfolio margin (scenario grid, VaR) of "
                                          "option books in a JSON scenario (docs/portfolio.md); what-if only")
    pf.add_argument("scenario", nargs="?", default=None,
                    help="scenario JSON file with a 'portfolio' object, '-' for stdin; default: the bundled "
                         "example (engine/examples/portfolio.json)")
    pf.set_defaults(func=_cmd_portfolio)

    run = sub.add_parser("run", help="run the engine on a configuration until SIGTERM / Ctrl-C")
    run.add_argument("--config", default=None, help="TOML file; default: the embedded default")
    run.add_argument("--workers", type=_int_at_least(1), default=None,
                     help="margin worker processes, 1..engine.partitions; default min(engine.partitions, "
                          "the CPUs in engine.cpus, or 1 when it is empty)")
    run.add_argument("--accounts", type=_int_at_least(1), default=None,
                     help="a new book: empty accounts 1..N (default 1000)")
    run.add_argument("--demo-accounts", type=_int_at_least(0), default=0,
                     help="a new book: instead, N funded accounts with positions (demo data)")
    run.add_argument("--fresh", action="store_true",
                     help="set the state directory's (engine.state_dir) snapshot and journal aside "
                          "(renamed, not deleted) and start a new book; without it a restart recovers "
                          "the book from them")
    run.set_defaults(func=_cmd_run)

    demo_help = ("the engine on its embedded default against simulated venues and a simulated "
                 "matching engine, live in the terminal")
    demo = sub.add_parser("demo", help=demo_help, formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                          description=demo_help.capitalize() + ". Ctrl-C ends it early (exit 0 once it runs, "
                                      "130 while it starts); everything it created is removed.")
    demo.add_argument("--duration", type=_seconds, default=30.0, help="seconds (Ctrl-C ends it early)")
    demo.add_argument("--accounts", type=_int_at_least(1), default=5000,
                      help="leveraged accounts loaded into the book (plus the house account)")
    demo.add_argument("--workers", type=_int_at_least(1), default=1,
                      help="margin workers (1 suits a 2-core machine)")
    demo.add_argument("--crash", type=_crash_percent, default=12.0,
                      help="percent BTC and ETH fall at 30%% of the run (0: no crash)")
    demo.add_argument("--seed", type=_int_at_least(0), default=7,
                      help="seeds the book, the venues and the matching engine")
    demo.set_defaults(func=_cmd_demo)

    keys = sub.add_parser("keys", help="make a CURVE key pair for [security] (docs/configuration.md)")
    keys.add_argument("dir", type=_directory, help="where to write NAME.key and NAME.key_secret")
    keys.add_argument("name", type=_key_name, help="the key pair's file name, e.g. engine or matching-1")
    keys.set_defaults(func=_cmd_keys)

    st = sub.add_parser("status", help="attach read-only to a running engine and summarize it")
    st.add_argument("--name", default="margin-engine", help="the engine's shared-memory name")
    st.add_argument("--json", action="store_true")
    st.add_argument("--state-dir", type=_directory, default=None,
                    help="the engine's engine.state_dir: also show its snapshot's age and what a restart "
                         "would replay")
    st.set_defaults(func=_cmd_status)

    bench = sub.add_parser("bench", help="benchmarks (results under bench/results/)")
    bsub = bench.add_subparsers(dest="bench", required=True)
    bk = bsub.add_parser("kernel", help="Cython full pass vs numpy, reference and the bandwidth floor")
    bk.add_argument("--accounts", type=int, default=1_000_000)
    bk.add_argument("--positions", type=int, default=4)
    bk.add_argument("--reference-sample", type=int, default=2000)
    bk.add_argument("--json", default="bench/results/kernel.json")
    bk.add_argument("--threads", type=int, default=0,
                    help="threads of the split pass and floor (default: the CPUs this process may use)")
    bk.set_defaults(func=_cmd_bench_kernel)
    bp = bsub.add_parser("portfolio", help="portfolio-margin scenario kernel: Cython vs numpy vs the reference")
    bp.add_argument("--portfolios", type=_int_at_least(1), default=10_000)
    bp.add_argument("--legs", type=_int_at_least(1), default=10)
    bp.add_argument("--reference-sample", type=_int_at_least(1), default=200)
    bp.add_argument("--reps", type=_int_at_least(1), default=15)
    bp.add_argument("--json", default="bench/results/portfolio.json")
    bp.set_defaults(func=_cmd_bench_portfolio)
    bsub.add_parser("acks", help="what a durable acknowledgement costs: fills ACK and deposit round trips, "
                                 "acknowledged fills/s, journal_sync interval vs ack (options: margin-engine "
                                 "bench acks --help)")
    bsub.add_parser("curve", help="what CURVE costs: order-check and bare-echo round trips over tcp with and "
                                  "without it (options: margin-engine bench curve --help)")
    bsub.add_parser("feeds", help="order-check round trip vs a bare ZeroMQ echo; fills/s through the "
                                  "gateway (options: margin-engine bench feeds --help)")
    bsub.add_parser("latency", help="tick-to-decision vs a bare relay, HdrHistogram percentiles, rate "
                                    "sweep (options: margin-engine bench latency --help)")
    bsub.add_parser("recovery", help="restart recovery: snapshot write/load vs raw bytes, journal replay vs "
                                     "decoding alone (options: margin-engine bench recovery --help)")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) >= 2 and argv[0] == "bench" and argv[1] in PASS_THROUGH_BENCHES:
        import importlib

        return importlib.import_module(f"bench.{argv[1]}").main(argv[2:]) or 0
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print(f"margin-engine {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
