"""Load accounts into a fresh store: vectorized, with a progress bar for large books.

``provision(store, config, n_accounts, seed)`` creates accounts ``1..n`` with USDT
(and some BTC) collateral and up to three cross positions at leverages drawn from 2x
to 25x (split over the positions), entries near the current marks; a house account (``HOUSE_ACCOUNT``, the
backstop liquidity provider) holds the opposite of every position, so open interest
nets to zero per instrument and money is conserved from the first fill on.
"""

from __future__ import annotations

import numpy as np

from engine.config import Config
from engine.instruments import Kind
from engine.runtime.progress import ProgressBar
from engine.store.shm import Store

HOUSE_ACCOUNT = 999_999


def provision(store: Store, config: Config, n_accounts: int, seed: int = 7,
              instruments: list[str] | None = None, max_leverage: float = 25.0) -> None:
    """Create ``n_accounts`` trading accounts and the house account (see module doc)."""
    rng = np.random.default_rng(seed)
    names = instruments or [i.name for i in config.instruments if i.kind in (Kind.PERP, Kind.FUTURE)]
    ins = [config.instrument(n) for n in names]
    usdt = config.asset("USDT")
    btc = config.asset("BTC")
    house = store.add_account(HOUSE_ACCOUNT)
    store.set_balance(house, usdt.index, 10**12 * usdt.scale // 10**3)   # 1e9 USDT
    house_pos = {i.index: [0, 0] for i in ins}
    bar = ProgressBar("loading accounts", n_accounts, min_total=20_000)
    chunk = 10_000
    for start in range(0, n_accounts, chunk):
        ids = np.arange(start + 1, min(n_accounts, start + chunk) + 1)
        for acct_id in ids.tolist():
            row = store.add_account(acct_id)
            collateral = float(rng.uniform(500, 50_000))
            store.set_balance(row, usdt.index, int(collateral * usdt.scale))
            if rng.random() < 0.2:
                store.set_balance(row, btc.index, int(rng.uniform(0.01, 0.5) * btc.scale))
            k = int(rng.integers(1, 4))
            for j in rng.choice(len(ins), size=min(k, len(ins)), replace=False).tolist():
                instr = ins[j]
                lev = float(rng.uniform(2, max_leverage)) / k
                side = 1 if rng.random() < 0.5 else -1
                entry = instr.mark_price * float(rng.uniform(0.995, 1.005))
                contracts = collateral * lev / (entry * instr.contract_size)
                qty = side * max(1, int(contracts * instr.qty_scale))
                settle = config.asset(instr.settle)
                cost = round(qty / instr.qty_scale * instr.contract_size * entry * settle.scale)
                store.set_position(row, instr.index, qty, cost)
                house_pos[instr.index][0] -= qty
                house_pos[instr.index][1] -= cost
        bar.update(int(ids[-1]))
    for i, (qty, cost) in house_pos.items():
        if qty:
            store.set_position(house, i, qty, cost)
