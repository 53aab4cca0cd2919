"""Read-only view of a running engine: ``margin-engine status``.

Attaches to the engine's shared memory read-only, copies rows under their seqlocks,
and summarizes prices, accounts at risk and the partitions' counters.
"""

from __future__ import annotations

import time

import numpy as np

from engine.store.layout import PRICE_FROZEN, Status
from engine.store.shm import Store


def _age_ms(ts_ns: int) -> float:
    """How long ago ``ts_ns`` was, in ms, by the clock read now: after the row holding it
    was read, so a heartbeat written while the snapshot is taken is not in the future
    (a clock read once at the start gave -2.5 ms: a flaky test, session 16)."""
    return round((time.time_ns() - ts_ns) / 1e6, 1)


def snapshot(store: Store, near_ratio: float = 0.8, top: int = 10) -> dict:
    """Prices, account counts by status, the accounts nearest liquidation, partition counters."""
    prices = []
    for i, ins in enumerate(store.instruments):
        p = store.read(store.prices, i)
        prices.append({"instrument": bytes(ins["name"]).rstrip(b"\0").decode(), "mark": float(p["mark"]),
                       "index": float(p["index"]), "price_seq": int(p["price_seq"]),
                       "frozen": bool(int(p["flags"]) & PRICE_FROZEN),
                       "age_ms": _age_ms(int(p["ts_ns"]))})
    rows = np.concatenate([np.arange(*store.partition_rows(p)) for p in range(store.n_partitions)])
    acc = store.accounts[rows]       # a racy bulk copy for counting; the top list is re-read below
    eq, mm = acc["cross_equity_usd"], acc["cross_mm_usd"]
    # margin ratio MM / equity: inf when equity <= 0 under a requirement; an account with
    # no requirement has nothing to liquidate (0), and if its equity is negative that is
    # bad debt, counted apart (the insurance fund's to cover).
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(mm <= 0, 0.0, np.where(eq > 0, mm / eq, np.inf))
    bad_debt = (mm <= 0) & (eq < 0)
    st = acc["status"]
    worst = rows[np.argsort(-ratio)[:top]]
    near = []
    for r in worst.tolist():
        a = store.read(store.accounts, r)
        e, m = float(a["cross_equity_usd"]), float(a["cross_mm_usd"])
        near.append({"account": int(a["account_id"]), "equity_usd": round(e, 2), "maintenance_usd": round(m, 2),
                     "margin_ratio": round(m / e, 4) if e > 0 else None, "status": Status(int(a["status"])).name or "HEALTHY"})
    parts = []
    for p in range(store.n_partitions):
        row = store.read(store.partitions, p)
        parts.append({"partition": p, "accounts": int(row["n_accounts"]), "records_applied": int(row["fills_applied"]),
                      "heartbeat_age_ms": _age_ms(int(row["heartbeat_ns"])),
                      "worker_pid": int(row["worker_pid"])})
    return {
        "engine": store.name, "accounts": int(len(rows)),
        "liquidatable": int(np.count_nonzero(st & (Status.LIQUIDATABLE | Status.ISOLATED_LIQUIDATABLE))),
        "below_initial_margin": int(np.count_nonzero(st & Status.BELOW_IM)),
        "near_liquidation": int(np.count_nonzero((ratio >= near_ratio) & (ratio < 1))),
        "bad_debt_accounts": int(np.count_nonzero(bad_debt)),
        "bad_debt_usd": round(0.0 - float(eq[bad_debt].sum()), 2),   # 0.0 - x: no "-0" when none
        "prices": prices, "nearest_liquidation": near, "partitions": parts,
    }


def render_durability(d: dict) -> str:
    """The lines of ``recovery.durability``: what a restart would start from."""
    s, j = d["snapshot"], d["journal"]
    if s is None:
        head = f"state {d['state_dir']}: no snapshot"
    else:
        head = (f"state {d['state_dir']}: snapshot {s['age_s']} s old, {s['accounts']:,} accounts, "
                f"{s['bytes'] / 2**20:.1f} MiB, at journal {s['journal_generation']} byte {s['journal_offset']}; "
                f"fills stream at seq {s['fills_last_seq']:,}, {s['acknowledged_streams']} acknowledged "
                f"streams, {s['transfers_remembered']:,} transfer ids remembered")
    return (head + f"\n  a restart now would replay {j['to_replay_bytes']:,} journal bytes in "
            f"{j['to_replay_files']} file(s)")


def render(s: dict) -> str:
    lines = [f"engine {s['engine']}: {s['accounts']:,} accounts, {s['liquidatable']} liquidatable, "
             f"{s['near_liquidation']} near liquidation (margin ratio >= 0.8), "
             f"{s['below_initial_margin']} below initial margin, {s['bad_debt_accounts']} with bad debt "
             f"({s['bad_debt_usd']:,.2f} USD: negative equity, nothing left to liquidate)", "",
             f"{'instrument':<24}{'mark':>14}{'index':>14}{'seq':>8}  state"]
    for p in s["prices"]:
        lines.append(f"{p['instrument']:<24}{p['mark']:>14.2f}{p['index']:>14.2f}{p['price_seq']:>8}  "
                     f"{'FROZEN' if p['frozen'] else 'live'} ({p['age_ms']} ms)")
    lines += ["", f"{'account':>10}{'equity USD':>16}{'maint USD':>14}{'ratio':>9}  status"]
    for a in s["nearest_liquidation"]:
        lines.append(f"{a['account']:>10}{a['equity_usd']:>16,.2f}{a['maintenance_usd']:>14,.2f}"
                     f"{a['margin_ratio'] if a['margin_ratio'] is not None else 'inf':>9}  {a['status']}")
    lines += ["", f"{'partition':>10}{'accounts':>10}{'records':>10}{'heartbeat':>12}{'pid':>9}"]
    for p in s["partitions"]:
        lines.append(f"{p['partition']:>10}{p['accounts']:>10}{p['records_applied']:>10}"
                     f"{p['heartbeat_age_ms']:>10} ms{p['worker_pid']:>9}")
    if "durability" in s:
        lines += ["", render_durability(s["durability"])]
    return "\n".join(lines)
