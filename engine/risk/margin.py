"""Checked Python API over the Cython margin kernel (``engine._margin``, from ext/_margin.pyx).

Each function checks its arguments (row ranges, instrument indices, price snapshot
shapes and finiteness), then hands raw addresses to the kernel, which assumes clean
input and runs without the GIL. The live path, the what-if path and the liquidation
check all call these same functions.

Rules (the kernel's docstring has them in full): per position in its settle asset,
linear ``upnl = q cs p - cost``, inverse ``upnl = cost - q cs / p``; tiered
``MM = notional * mmr_k - maint_amount_k``; per account in USD,
``cross equity = collateral + sum(upnl * px_settle)``; liquidatable when
``equity < MM`` (strict).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from engine import _margin
from engine.codes import Code
from engine.risk.triggersort import TriggerSort
from engine.store.layout import Mode, Status
from engine.store.shm import PriceSnapshot, Store


@dataclass(frozen=True)
class PositionDetail:
    slot: int
    instrument: int
    mode: int
    qty_units: int
    notional: float              # settle asset
    unrealized_pnl: float        # settle asset
    initial_margin: float        # settle asset
    maintenance_margin: float    # settle asset
    liquidation_price: float | None
    bankruptcy_price: float | None


@dataclass(frozen=True)
class AccountDetail:
    row: int
    collateral_usd: float
    cross_upnl_usd: float
    cross_equity_usd: float
    cross_im_usd: float
    cross_mm_usd: float
    iso_margin_usd: float
    iso_upnl_usd: float
    iso_im_usd: float
    iso_mm_usd: float
    status: Status
    positions: tuple[PositionDetail, ...]

    @property
    def unrealized_pnl_usd(self) -> float:
        return self.cross_upnl_usd + self.iso_upnl_usd

    @property
    def equity_usd(self) -> float:
        """Collateral + isolated margins + all unrealized PnL."""
        return self.cross_equity_usd + self.iso_margin_usd + self.iso_upnl_usd

    @property
    def initial_margin_usd(self) -> float:
        return self.cross_im_usd + self.iso_im_usd

    @property
    def maintenance_margin_usd(self) -> float:
        return self.cross_mm_usd + self.iso_mm_usd

    @property
    def liquidatable(self) -> bool:
        return bool(self.status & (Status.LIQUIDATABLE | Status.ISOLATED_LIQUIDATABLE))


@dataclass(frozen=True)
class CheckResult:
    code: Code
    post_equity_usd: float
    post_initial_margin_usd: float

    @property
    def accepted(self) -> bool:
        return self.code == Code.OK


def _checked_snapshot(store: Store, snap: PriceSnapshot | None) -> PriceSnapshot:
    if snap is None:
        snap = store.price_snapshot()
    if snap.checked:
        return snap
    n_i = len(store.instruments)
    if snap.marks.shape != (n_i,) or snap.marks.dtype != np.float64:
        raise ValueError(f"price snapshot: need {n_i} float64 marks")
    if not np.all(np.isfinite(snap.marks)) or np.any(snap.marks <= 0):
        bad = int(np.flatnonzero(~(np.isfinite(snap.marks) & (snap.marks > 0)))[0])
        raise ValueError(f"price snapshot: mark of instrument {bad} is {snap.marks[bad]!r}; must be > 0")
    n_a = len(store.assets)
    if not np.all(np.isfinite(snap.asset_px[:n_a])) or np.any(snap.asset_px[:n_a] <= 0):
        raise ValueError("price snapshot: every asset price must be finite and > 0")
    snap.checked = True
    return snap


def full_pass(store: Store, partition: int, snap: PriceSnapshot | None = None,
              max_listed: int = 4096) -> tuple[int, np.ndarray]:
    """Re-margin every account of ``partition``; write results into their rows.

    Returns ``(n_liquidatable, rows)``: the count of accounts in breach (cross or
    isolated) and the first ``max_listed`` of their rows.
    """
    if not 0 <= partition < store.n_partitions:
        raise ValueError(f"partition {partition} outside 0..{store.n_partitions - 1}")
    snap = _checked_snapshot(store, snap)
    lo, hi = store.partition_rows(partition)
    out = np.empty(max_listed, np.int64)
    n = _margin.full_pass(store.addr(store.instruments), store.addr(store.accounts),
                          store.addr(store.positions), store.slots_per_account, lo, hi,
                          snap.marks, snap.asset_px, snap.asset_haircut, snap.asset_scale, out)
    return n, out[: min(n, max_listed)]


def _opt(x: float) -> float | None:
    return None if math.isnan(x) else float(x)


def account_detail(store: Store, row: int, snap: PriceSnapshot | None = None) -> AccountDetail:
    """Every figure of one account and its positions at the snapshot's prices."""
    if not 0 <= row < store.accounts_cap:
        raise ValueError(f"account row {row} outside 0..{store.accounts_cap - 1}")
    snap = _checked_snapshot(store, snap)
    n = int(store.accounts[row]["n_positions"])
    out = np.zeros((store.slots_per_account, 6))          # room for every slot: the kernel
                                                          # reads n_positions again
    vals = _margin.account_detail(store.addr(store.instruments), store.addr(store.accounts, row),
                                  store.addr(store.positions, row * store.slots_per_account),
                                  snap.marks, snap.asset_px, snap.asset_haircut, snap.asset_scale, out)
    slots = store.slots(row)[:n][["instrument", "mode", "qty"]].tolist()
    vals_out = out.tolist()
    positions = tuple(
        PositionDetail(i, ins, mode, qty, v[0], v[1], v[2], v[3], _opt(v[4]), _opt(v[5]))
        for i, ((ins, mode, qty), v) in enumerate(zip(slots, vals_out)))
    return AccountDetail(row, *[float(v) for v in vals[:9]], Status(int(vals[9])), positions)


def pretrade_check(store: Store, row: int, instrument: int, qty_units: int, price: float,
                   snap: PriceSnapshot | None = None) -> CheckResult:
    """Would trading ``qty_units`` (signed) of ``instrument`` at ``price`` keep the account
    at or above initial margin? Bad arguments give a reason code, never an exception."""
    if not 0 <= row < store.accounts_cap:
        return CheckResult(Code.CHECK_UNKNOWN_ACCOUNT, math.nan, math.nan)
    s = store.slots_per_account
    return _pretrade(store, store.accounts[row: row + 1], store.positions[row * s: (row + 1) * s],
                     instrument, qty_units, price, snap)


def _check_order_args(store: Store, instrument: int, qty_units, price,
                      snap: PriceSnapshot | None) -> tuple[CheckResult | None, PriceSnapshot | None]:
    """``(reject, None)`` for a bad instrument, quantity or price or a frozen price;
    ``(None, checked snapshot)`` when the order may be checked."""
    def reject(code: Code):
        return CheckResult(code, math.nan, math.nan), None
    if not 0 <= instrument < len(store.instruments):
        return reject(Code.CHECK_UNKNOWN_INSTRUMENT)
    if isinstance(qty_units, bool) or not isinstance(qty_units, (int, np.integer)) or qty_units == 0 \
            or abs(int(qty_units)) >= 2**62:
        return reject(Code.CHECK_BAD_QTY)
    if isinstance(price, bool) or not isinstance(price, (int, float, np.floating)) \
            or not math.isfinite(price) or price <= 0:
        return reject(Code.CHECK_BAD_PRICE)
    snap = _checked_snapshot(store, snap)
    if snap.flags[instrument] & 1:
        return reject(Code.CHECK_PRICE_FROZEN)
    return None, snap


def _pretrade(store: Store, acct: np.ndarray, slots: np.ndarray, instrument: int, qty_units,
              price, snap: PriceSnapshot | None) -> CheckResult:
    """Checks then the kernel, on the account row ``acct[0]`` and its ``slots``."""
    bad, snap = _check_order_args(store, instrument, qty_units, price, snap)
    if bad is not None:
        return bad
    code, eq, im = _margin.pretrade_check(
        store.addr(store.instruments), acct.ctypes.data, slots.ctypes.data, store.slots_per_account,
        instrument, int(qty_units), float(price), snap.marks, snap.asset_px, snap.asset_haircut,
        snap.asset_scale)
    return CheckResult(Code(code), eq, im)


def holder_keys(mode: np.ndarray, qty: np.ndarray) -> np.ndarray:
    """A holder record's key: ``|qty|`` rounded *up* to float32 for a cross holder (so
    ``key < t`` implies ``|qty| < t``), +inf for an isolated one."""
    aq = np.abs(np.asarray(qty, np.float64))
    key = aq.astype(np.float32)
    key = np.where(key < aq, np.nextafter(key, np.float32(np.inf)), key)
    return np.where(np.asarray(mode) == int(Mode.ISOLATED), np.float32(np.inf), key).astype(np.float32)


def _crossed(tables: tuple, mark: float, prev_mark: float | None) -> np.ndarray:
    """Rows of trigger ``tables`` (longs ascending, their rows, shorts ascending, their
    rows) that ``mark`` has crossed, most breached first: with ``prev_mark``, only those
    crossed on the way from it (longs ``mark <= t <= prev``, shorts ``prev <= t <= mark``:
    both ends, as an account whose trigger is the previous mark was not in breach there,
    ``E < MM`` being strict); without, every trigger at or beyond ``mark``. Binary
    searches only."""
    long_t, long_rows, short_t, short_rows = tables
    if prev_mark is None:
        k = np.searchsorted(long_t, mark, side="left")        # long_t[k:] >= mark
        j = np.searchsorted(short_t, mark, side="right")      # short_t[:j] <= mark
        return np.concatenate([long_rows[k:][::-1], short_rows[:j]])
    if mark < prev_mark:                                      # longs: mark <= t <= prev
        k0 = np.searchsorted(long_t, mark, side="left")
        k1 = np.searchsorted(long_t, prev_mark, side="right")
        return long_rows[k0:k1][::-1]
    if mark > prev_mark:                                      # shorts: prev <= t <= mark
        j0 = np.searchsorted(short_t, prev_mark, side="left")
        j1 = np.searchsorted(short_t, mark, side="right")
        return short_rows[j0:j1]
    return long_rows[:0]


BASIS_DRIFT_COLUMNS = [1, 4]   # of a basis row (ext/_margin.pyx BASIS_*): notional per unit, settle price


class HolderIndex:
    """Per-partition instrument -> holders index, compact for the incremental tick.

    For each instrument, its holders as 16-byte records (``HOT``: account row relative to
    the partition's first row, a key -- ``|qty|`` rounded up to float32 when cross, +inf
    when isolated, see ``holder_keys`` -- and the quantity units), ordered at build cross
    holders first, in two groups: A, those well inside the first tier (``_first_tier_keys``)
    by account row, so the pass's one hot loop walks the aggregates in address order;
    B, the rest by ``|qty|``, isolated last, so the pass's branches (mode, tier) switch
    once instead of at random and its tier cursor only steps up (holders that fills add
    later go at the end; order never affects the result), plus two cold
    columns read only for isolated holders and settle-price moves: cost and isolated
    margin (settle units). The
    aggregates (``agg``: cross equity, IM, MM, spare in USD; 32 bytes a row) hold every
    position at its instrument's *basis* (``basis[i]``: the pass constants of the last
    prices the instrument's holders were moved to, see ``_margin.instrument_basis``) and
    collateral at ``asset_px``; a tick moves them by the change from the old basis to
    the new one, so nothing per holder is cached but its quantity.

    The index is derived state: built from the positions in shared memory, owned by the
    partition's worker (the only writer of those positions), rebuilt on restart.
    """

    HOT = np.dtype([("row", np.int32), ("key", np.float32), ("qty", np.float64)])
    PAD = _margin.HOLDER_PAD    # spare records after the last holder: the pass prefetches this far ahead unchecked

    def __init__(self, store: Store, partition: int):
        self.store = store
        self.partition = partition
        n_i = len(store.instruments)
        self.counts = np.zeros(n_i, np.int64)
        self._scratch = np.empty(1, np.int64)
        self.row_base = partition * store.per_partition
        if store.per_partition >= 2 ** 31:
            raise ValueError("partition too large for 32-bit holder rows")
        self.dependents: dict[int, list[int]] = {}     # underlying -> options written on it
        for j, r in enumerate(store.instruments):
            if int(r["underlying"]) >= 0:
                self.dependents.setdefault(int(r["underlying"]), []).append(j)
        # Private, compact account aggregates (cross equity, IM, MM, spare) in USD: what the
        # incremental pass moves tick by tick (see _margin.tick_holders).
        self.agg = np.zeros((store.per_partition, 4))
        self.basis = np.zeros((n_i, 8))          # per instrument: the prices agg is at
        self.asset_px = np.ones(len(store.assets))  # the collateral prices agg is at
        empty = (np.empty(0), np.empty(0, np.int64), np.empty(0), np.empty(0, np.int64))
        self.triggers = [empty] * n_i
        self.dirty = np.ones(n_i, bool)
        # What each table's triggers hold the other prices at: the basis columns
        # (notional per unit, settle price) of every instrument, and the collateral prices,
        # when its refresh started (``mark_drifted`` compares them with the current ones).
        self.solved_at = np.full((n_i, n_i, 2), np.nan)
        self.solved_asset_px = np.full((n_i, 0), np.nan)
        self.asset_triggers: dict[int, tuple] = {}   # asset -> collateral trigger tables (solve_asset_triggers)
        self.on_triggers = None                  # called with each refreshed table (see refresh_triggers)
        self._trigger_job: list | None = None    # the table refresh_triggers_slice is solving
        self.rebuild()

    def rebuild(self) -> None:
        """Rebuild every instrument's holder arrays from the partition's positions."""
        st = self.store
        self._trigger_job = None                 # its holder indices mean nothing now
        self.dirty[:] = True
        lo, hi = st.partition_rows(self.partition)
        s = st.slots_per_account
        pos = st.positions[lo * s: hi * s]
        used = np.zeros(len(pos), bool)
        if hi > lo:
            npos = st.accounts["n_positions"][lo:hi]
            used = (np.arange(s)[None, :] < npos[:, None]).ravel()
        rows = np.repeat(np.arange(lo, hi, dtype=np.int64), s)[used]
        p = pos[used]
        self.hot: list[np.ndarray] = []
        self.cost: list[np.ndarray] = []
        self.iso: list[np.ndarray] = []
        self.where: dict[tuple[int, int], int] = {}    # (row, instrument) -> holder index
        small = self._first_tier_keys()
        for i in range(len(st.instruments)):
            m = np.flatnonzero(p["instrument"] == i)
            key = holder_keys(p["mode"][m], p["qty"][m])
            # Group A (by row): cross holders well inside the first tier; group B (by key):
            # the rest, cross by |qty|, isolated last.
            in_a = key < small[i]
            o = np.lexsort((np.where(in_a, rows[m], 0), np.where(in_a, 0, key), ~in_a))
            m, key = m[o], key[o]
            n = len(m)
            cap = max(16, 2 * n) + self.PAD
            hot = np.zeros(cap, self.HOT)
            hot["row"][:n] = rows[m] - self.row_base
            hot["key"][:n] = key
            hot["qty"][:n] = p["qty"][m]
            cost = np.zeros(cap)
            cost[:n] = p["cost"][m]
            iso = np.zeros(cap)
            iso[:n] = p["isolated_margin"][m]
            self.hot.append(hot)
            self.cost.append(cost)
            self.iso.append(iso)
            self.counts[i] = n
            self.where.update(((int(r), i), h) for h, r in enumerate(rows[m].tolist()))
        self._rows: dict[int, set[int]] = {}        # row -> instruments it holds
        # Collateral holders per asset (rows with a balance in it); rows that gain one later
        # are appended by update_account. A row whose balance went back to zero may stay:
        # its delta is then zero.
        bal = st.accounts["balance"][lo:hi]
        self.asset_rows = [lo + np.flatnonzero(bal[:, a]) for a in range(bal.shape[1])]
        self._asset_extra: list[set[int]] = [set() for _ in range(bal.shape[1])]
        for (r, i) in self.where:
            self._rows.setdefault(r, set()).add(i)

    FIRST_TIER_SHARE = 0.8   # group A: |qty| under this share of the first tier's limit at build

    def _first_tier_keys(self) -> np.ndarray:
        """Per instrument, the key below which a cross holder goes in group A: 0.8 x the
        |qty| at which its notional reaches the second tier's floor at the current marks
        (``floor_1 / notional_per_unit``), so a tick finds it in the first tier unless the
        mark moved by a quarter since the build; 0 (no group A) without a usable mark."""
        st = self.store
        n_i = len(st.instruments)
        out = np.zeros(n_i, np.float32)
        snap = st.price_snapshot()
        marks = np.where(np.isfinite(snap.marks) & (snap.marks > 0), snap.marks, 0.0)
        basis = np.zeros((n_i, 8))
        _margin.instrument_basis(st.addr(st.instruments), np.where(marks > 0, marks, 1.0), snap.asset_px,
                                 snap.asset_scale, basis)
        per_unit = basis[:, 1]
        n_tiers = st.instruments["n_tiers"]
        floor1 = st.instruments["tier_floor"][:, 1]
        usable = (marks > 0) & (st.instruments["underlying"] < 0)   # options take the general path
        ok = usable & (n_tiers > 1) & (per_unit > 0) & np.isfinite(per_unit)
        out[ok] = (self.FIRST_TIER_SHARE * floor1[ok] / per_unit[ok]).astype(np.float32)
        out[usable & (n_tiers <= 1)] = np.inf     # one tier: every cross holder is in it
        return out

    def holder_rows(self, instrument: int) -> np.ndarray:
        """Absolute account rows of ``instrument``'s holders, in holder order."""
        n = int(self.counts[instrument])
        return self.hot[instrument]["row"][:n].astype(np.int64) + self.row_base

    # ------------------------------------------------------------------ trigger prices
    def refresh_triggers(self, instrument: int, snap: PriceSnapshot | None = None) -> None:
        """Recompute and sort one instrument's trigger prices (off the hot path), at the
        prices the aggregates are at (``snap`` is accepted for the callers' symmetry), in
        one call. ``refresh_triggers_slice`` does the same in steps.

        Longs sorted ascending by trigger (they breach when ``mark <= trigger``), shorts
        likewise (breach when ``mark >= trigger``); each with its account rows.
        """
        if self._trigger_job is not None and self._trigger_job[0] == instrument:
            self._trigger_job = None            # superseded; another table's steps go on
        self._refresh_at_once(self._new_trigger_job(instrument))

    # A step solves this many holders' triggers (~40 ns each: ~85 us a step at 1M accounts),
    # so that a tick arriving meanwhile waits about as long as behind an upkeep slice. Then
    # the sort runs in steps of the same size (``TriggerSort``: runs of 4k holders, merges
    # of 16k pairs) and the last one installs (measured in docs/architecture.md; the whole
    # table at once held the worker 7.5 ms, one argsort of a side of 100k holders ~1.2 ms).
    TRIGGER_SLICE_HOLDERS = 2_048
    RESTARTS_BEFORE_BLOCKING = 2     # a table whose holders keep changing is then done at once

    def refresh_triggers_slice(self, holders: int | None = None) -> bool:
        """One step of refreshing the stale trigger tables: solve the next ``holders``
        triggers of the table in progress (or of the next stale one); once all are solved,
        one step of sorting them (``TriggerSort.step``), and with the last one install the
        table. Returns False when nothing was stale.

        The table in use stays until the new one is installed whole. A table is solved
        from scratch again when its holders change meanwhile (a fill marks it stale), and
        after ``RESTARTS_BEFORE_BLOCKING`` such restarts finished in one go, so a busy
        instrument's table is not starved. Between steps the aggregates may move with
        ticks of this instrument: each trigger stays exact while only its own mark moves,
        as in a refresh done at once."""
        holders = self.TRIGGER_SLICE_HOLDERS if holders is None else int(holders)
        job = self._trigger_job
        if job is None:
            todo = np.flatnonzero(self.dirty)
            if len(todo) == 0:
                return False
            job = self._trigger_job = self._new_trigger_job(int(todo[0]))
        elif self.dirty[job[0]] or job[1].shape[0] != int(self.counts[job[0]]):
            restarts = job[3] + 1                       # its holders changed since the start
            job = self._trigger_job = self._new_trigger_job(job[0])
            job[3] = restarts
            if restarts > self.RESTARTS_BEFORE_BLOCKING:
                self._refresh_at_once(job)
                return True
        n = job[1].shape[0]
        if job[2] < n:
            self._trigger_step(job, holders)            # solve
        else:
            if job[4] is None:
                job[4] = self._trigger_sort(job)
            if job[4].step():                           # sort; the last step installs
                self._install_triggers(job)
        return True

    @property
    def refreshing(self) -> bool:
        """A trigger table is half done (``refresh_triggers_slice`` has more to do)."""
        return self._trigger_job is not None

    def _new_trigger_job(self, instrument: int) -> list:
        """[instrument, triggers, holders solved, restarts, its TriggerSort once solved]:
        marked clean now, so that a change of its holders during the refresh shows as
        stale again; the prices it is solved at noted for ``mark_drifted``."""
        self.dirty[instrument] = False
        self.solved_at[instrument] = self.basis[:, BASIS_DRIFT_COLUMNS]
        if self.solved_asset_px.shape[1] != len(self.asset_px):    # the snapshot's asset count
            self.solved_asset_px = np.full((len(self.dirty), len(self.asset_px)), np.nan)
        self.solved_asset_px[instrument] = self.asset_px
        return [instrument, np.empty(int(self.counts[instrument])), 0, 0, None]

    def _refresh_at_once(self, job: list) -> None:
        self._trigger_step(job, job[1].shape[0])
        job[4] = self._trigger_sort(job)
        job[4].run()
        self._install_triggers(job)

    def _trigger_step(self, job: list, holders: int) -> None:
        """Solve the next ``holders`` triggers of ``job``."""
        st = self.store
        i, trig, h0 = job[0], job[1], job[2]
        h1 = min(trig.shape[0], h0 + max(1, holders))
        if h1 > h0:
            hot = self.hot[i]
            _margin.holder_triggers(st.addr(st.instruments), i, self.basis,
                                    hot.ctypes.data + h0 * hot.itemsize, self.cost[i][h0:h1],
                                    self.iso[i][h0:h1], h1 - h0, self.agg, trig[h0:h1])
        job[2] = h1

    def _trigger_sort(self, job: list) -> TriggerSort:
        """The sort of ``job``'s solved triggers into its tables (``TriggerSort``): longs
        and shorts each ascending by trigger (-inf first, +inf then NaN last), with their
        account rows."""
        n = job[1].shape[0]
        return TriggerSort(job[1], self.hot[job[0]]["qty"][:n], self.holder_rows(job[0]))

    def _install_triggers(self, job: list) -> None:
        instrument = job[0]
        self.triggers[instrument] = job[4].tables()
        if self._trigger_job is job:
            self._trigger_job = None
        if self.on_triggers is not None:        # a C copy of the tables (the worker's TickPath)
            self.on_triggers(instrument, *self.triggers[instrument])

    def candidates(self, instrument: int, mark: float, prev_mark: float | None = None) -> np.ndarray:
        """Account rows whose trigger the mark has crossed, most breached first.

        Binary searches only: the cost does not depend on the number of holders. With
        ``prev_mark`` (the mark the last pass saw), only the triggers crossed on the way
        from it to ``mark`` -- the accounts this move put in breach; without it, every
        trigger at or beyond ``mark``. Exact while only this instrument has moved since
        the triggers were refreshed; the incremental pass that follows catches what stale
        triggers miss.
        """
        return _crossed(self.triggers[instrument], mark, prev_mark)

    # ------------------------------------------------------------------ collateral triggers
    def asset_candidates(self, asset: int, px: float, prev_px: float) -> np.ndarray:
        """Account rows whose collateral trigger for ``asset`` the move from ``prev_px``
        to ``px`` crossed (``solve_asset_triggers``), most breached first: the hot path's
        answer to a collateral price move, before the whole collateral pass (which
        stays, as the holders' pass does for marks, for what stale triggers miss)."""
        tables = self.asset_triggers.get(asset)
        return _crossed(tables, px, prev_px) if tables is not None else np.empty(0, np.int64)

    def solve_asset_triggers(self, assets: list[int]) -> None:
        """Re-solve the collateral triggers of ``assets`` from the aggregates (consistent
        at ``asset_px``). Cross equity is linear in a collateral price (no tiers), so for
        a holder of ``bal`` units, ``w = bal / scale x (1 - haircut if bal > 0 else 1)``
        USD per USD of price, with cross equity ``E`` and maintenance ``MM``::

            E + w (p - p0) < MM   <=>   p < t = p0 - (E - MM) / w    (w > 0: a long holder)
                                        p > t                        (w < 0: borrowed)

        exact while no other price moves. Left out: holders with no maintenance (never in
        breach) and holders of an instrument settled in the asset (its USD value moves
        with the asset price too: not linear); the collateral pass finds those."""
        st = self.store
        base = self.row_base
        for a in assets:
            rows = self.asset_rows[a]
            if not len(rows):
                self.asset_triggers.pop(a, None)
                continue
            settled = [self.holder_rows(i) for i in np.flatnonzero(st.instruments["settle_asset"] == a).tolist()]
            ag = self.agg[rows - base]
            bal = st.accounts["balance"][rows, a] / float(st.assets["scale"][a])
            w = bal * np.where(bal > 0, 1.0 - float(st.assets["haircut"][a]), 1.0)
            ok = (ag[:, 2] > 0) & (w != 0)
            if settled:
                ok &= ~np.isin(rows, np.concatenate(settled))
            with np.errstate(divide="ignore", invalid="ignore"):
                t = float(self.asset_px[a]) - (ag[:, 0] - ag[:, 2]) / w
            lo, sh = ok & (w > 0), ok & (w < 0)
            ol, os_ = np.argsort(t[lo], kind="stable"), np.argsort(t[sh], kind="stable")
            self.asset_triggers[a] = (t[lo][ol], rows[lo][ol], t[sh][os_], rows[sh][os_])

    # A table's triggers are exact while only its own mark moves. Once another price they
    # hold fixed -- another instrument's (its notional per unit) or a settle or collateral
    # asset's -- has moved by more than this share since the table was solved, it is
    # marked stale, and idle time re-solves it: in a correlated move 1a then finds most
    # breaches itself instead of leaving them to the holders' pass (1b), ~1 ms later.
    DRIFT_REL = 0.005

    def mark_drifted(self, moved: list[int] | None = None) -> int:
        """Mark stale every table with holders whose other prices moved by more than
        ``DRIFT_REL`` (relative) since it was solved (``solved_at``); returns how many it
        newly marked. ``moved``: the instruments whose basis moved since the last call
        (only their columns and the collateral prices are compared; None: all). The
        table being solved in steps is left alone (marking it would restart it, and a
        table that keeps restarting is finally done at once); the next call after it is
        installed compares it afresh. Cost (40 instruments): ~20 us all compared, ~18 us one."""
        if moved is None:
            cols, solved = np.arange(len(self.dirty)), self.solved_at
        else:
            cols = np.unique(np.asarray(moved, np.int64))
            solved = self.solved_at[:, cols]
        cur = self.basis[cols][:, BASIS_DRIFT_COLUMNS]
        with np.errstate(divide="ignore", invalid="ignore"):
            rel = np.abs(cur[None, :, :] / solved - 1.0)                    # [table, moved, column]
            rel_a = np.abs(self.asset_px[None, :] / self.solved_asset_px - 1.0)
        rel[cols, np.arange(len(cols)), 0] = 0.0          # a table's own mark: exact
        drifted = ((rel > self.DRIFT_REL).any(axis=(1, 2)) | (rel_a > self.DRIFT_REL).any(axis=1)) \
            & (self.counts > 0) & ~self.dirty             # (NaN, never solved: already dirty)
        if self._trigger_job is not None:
            drifted[self._trigger_job[0]] = False
        self.dirty |= drifted
        return int(np.count_nonzero(drifted))

    def refresh_dirty_triggers(self, snap: PriceSnapshot, limit: int | None = None) -> int:
        """Refresh up to ``limit`` stale trigger tables; return how many were refreshed."""
        todo = np.flatnonzero(self.dirty).tolist()[:limit]
        for i in todo:
            self.refresh_triggers(i, snap)
        return len(todo)

    def collateral_tick(self, snap: PriceSnapshot, out: np.ndarray) -> int:
        """Bring the aggregates to ``snap``'s collateral prices; return breaches (rows in ``out``).

        For each asset whose price moved since the aggregates were last consistent
        (``asset_px``): every holder's cross equity moves by
        ``bal * (1 - haircut if bal > 0 else 1) * (px' - px)`` (the collateral rule of the
        full pass), and the instruments settled in that asset are re-ticked (their upnl
        and requirements are valued in USD at the settle price). Call before applying
        fills at ``snap`` (their re-margin is at ``snap``'s prices).
        """
        st = self.store
        moved = np.flatnonzero(snap.asset_px != self.asset_px).tolist()
        if not moved:
            return 0
        base = self.row_base
        touched = []
        for a in moved:
            if self._asset_extra[a]:
                self.asset_rows[a] = np.union1d(self.asset_rows[a], np.fromiter(self._asset_extra[a], np.int64))
                self._asset_extra[a].clear()
            rows = self.asset_rows[a]
            if len(rows):
                bal = st.accounts["balance"][rows, a] / float(snap.asset_scale[a])
                keep = np.where(bal > 0, 1.0 - float(snap.asset_haircut[a]), 1.0)
                self.agg[rows - base, 0] += bal * keep * (float(snap.asset_px[a]) - float(self.asset_px[a]))
                touched.append(rows)
            self.asset_px[a] = snap.asset_px[a]
        n = 0
        for i in np.flatnonzero(np.isin(st.instruments["settle_asset"], moved)).tolist():
            n += self._tick_one(i, snap, out[min(n, len(out)):])
        if touched:
            rows = np.unique(np.concatenate(touched))
            ag = self.agg[rows - base]
            hit = rows[(ag[:, 0] < ag[:, 2]) & (ag[:, 2] > 0)]
            k = min(len(hit), max(0, len(out) - n))
            out[n:n + k] = hit[:k]
            n += len(hit)
        self.solve_asset_triggers(moved)          # at the new prices, for the hot path's next move
        return n

    def _load_agg(self, lo: int, hi: int) -> None:
        acc = self.store.accounts[lo:hi]
        b = self.row_base
        self.agg[lo - b:hi - b, 0] = acc["cross_equity_usd"]
        self.agg[lo - b:hi - b, 1] = acc["cross_im_usd"]
        self.agg[lo - b:hi - b, 2] = acc["cross_mm_usd"]

    def _grow(self, instrument: int) -> None:
        cap = 2 * len(self.hot[instrument])
        for cols in (self.hot, self.cost, self.iso):
            bigger = np.zeros(cap, cols[instrument].dtype)
            bigger[: len(cols[instrument])] = cols[instrument]
            cols[instrument] = bigger

    def update_account(self, row: int, snap: PriceSnapshot) -> None:
        """``update_accounts`` for one row."""
        self.update_accounts(np.array([row], np.int64), snap)

    def update_accounts(self, rows: np.ndarray, snap: PriceSnapshot) -> None:
        """Re-read the positions of ``rows`` (distinct, this partition's) after their fills.

        Upserts or removes their holder entries; re-margins each row in shared memory at
        ``snap`` and sets its aggregates to the same rule at the index's basis (each
        instrument at the prices its holders were last moved to), so the next tick of any
        instrument moves it with the others (``_margin.remargin_rows``, one call).
        """
        st = self.store
        rows = np.ascontiguousarray(rows, dtype=np.int64)
        if len(rows) == 0:
            return
        s = st.slots_per_account
        npos = st.accounts["n_positions"][rows].tolist()
        pos = st.positions.reshape(-1, s)[rows]
        ins_l = pos["instrument"].tolist()
        base, where, counts = self.row_base, self.where, self.counts
        upd: dict[int, tuple[list, list]] = {}           # instrument -> (holder indices, (row, slot))
        touched_ins: set[int] = set()
        for j, row in enumerate(rows.tolist()):
            held = ins_l[j][: npos[j]]
            before = self._rows.get(row)
            if before:
                for i in before.difference(held):
                    self._remove(row, i)
            for t, i in enumerate(held):
                h = where.get((row, i))
                if h is None:
                    h = int(counts[i])
                    if h + self.PAD >= len(self.hot[i]):
                        self._grow(i)
                    counts[i] = h + 1
                    where[(row, i)] = h
                    self._rows.setdefault(row, set()).add(i)
                    self.hot[i]["row"][h] = row - base
                hs, src = upd.setdefault(i, ([], []))
                hs.append(h)
                src.append((j, t))
            touched_ins.update(held)
            if before:
                touched_ins.update(before)
        for i, (hs, src) in upd.items():               # the entries' values, per instrument
            jj, tt = np.array(src).T
            p = pos[jj, tt]
            hot = self.hot[i]
            hot["key"][hs] = holder_keys(p["mode"], p["qty"])
            hot["qty"][hs] = p["qty"]
            self.cost[i][hs] = p["cost"]
            self.iso[i][hs] = p["isolated_margin"]
        _margin.remargin_rows(st.addr(st.instruments), st.addr(st.accounts), st.addr(st.positions), s, rows,
                              snap.marks, snap.asset_px, snap.asset_haircut, snap.asset_scale,
                              self.basis, self.asset_px, self.agg, base, self._scratch)
        bal = st.accounts["balance"][rows]
        for a in np.flatnonzero(bal.any(axis=0)).tolist():
            self._asset_extra[a].update(rows[bal[:, a] != 0].tolist())
        if touched_ins:                                 # their other positions' triggers moved
            self.dirty[list(touched_ins)] = True

    def remargin_range(self, lo: int, hi: int, snap: PriceSnapshot, out: np.ndarray) -> int:
        """The periodic pass over rows ``lo <= r < hi`` of this partition: their shared rows
        at ``snap`` and their aggregates recomputed at the basis (no drift left); returns
        the number in breach at ``snap``, their rows in ``out`` (the first ``len(out)``)."""
        p_lo, p_hi = self.store.partition_rows(self.partition)
        if not p_lo <= lo <= hi <= p_hi:
            raise ValueError(f"rows {lo}..{hi} outside partition {self.partition} ({p_lo}..{p_hi})")
        return self.remargin_rows(np.arange(lo, hi, dtype=np.int64), snap, out)

    def remargin_rows(self, rows: np.ndarray, snap: PriceSnapshot, out: np.ndarray) -> int:
        """``remargin_range`` for the given rows of this partition (int64, each once)."""
        st = self.store
        p_lo, p_hi = st.partition_rows(self.partition)
        rows = np.ascontiguousarray(rows, np.int64)
        if len(rows) and not (p_lo <= int(rows.min()) and int(rows.max()) < p_hi):
            raise ValueError(f"rows outside partition {self.partition} ({p_lo}..{p_hi})")
        snap = _checked_snapshot(st, snap)
        return _margin.remargin_rows(st.addr(st.instruments), st.addr(st.accounts), st.addr(st.positions),
                                     st.slots_per_account, rows, snap.marks, snap.asset_px,
                                     snap.asset_haircut, snap.asset_scale, self.basis, self.asset_px,
                                     self.agg, self.row_base, out)

    def _remove(self, row: int, instrument: int) -> None:
        h = self.where.pop((row, instrument))
        self._rows[row].discard(instrument)
        self.dirty[instrument] = True
        last = int(self.counts[instrument]) - 1
        if h != last:
            for cols in (self.hot, self.cost, self.iso):
                cols[instrument][h] = cols[instrument][last]
            self.where[(int(self.hot[instrument]["row"][h]) + self.row_base, instrument)] = h
        self.counts[instrument] = last

    def holders(self, instrument: int) -> int:
        return int(self.counts[instrument])

    def refresh(self, snap: PriceSnapshot) -> None:
        """Set the basis to ``snap`` and reload the aggregates from the account rows (call
        right after the full pass, with its snapshot)."""
        st = self.store
        lo, hi = st.partition_rows(self.partition)
        self._load_agg(lo, hi)
        self.asset_px = snap.asset_px.copy()      # the collateral prices ``agg`` reflects
        _margin.instrument_basis(st.addr(st.instruments), snap.marks, snap.asset_px,
                                 snap.asset_scale, self.basis)
        self.dirty[:] = True
        self.solve_asset_triggers(list(range(len(self.asset_rows))))

    def tick(self, instrument: int, snap: PriceSnapshot, out: np.ndarray) -> int:
        """Incremental pass for ``instrument`` at ``snap``, then for the options written on
        it (their requirement is on the underlying's notional): returns the number of
        breaching holders, their rows in ``out`` (the first ``len(out)``)."""
        if not 0 <= instrument < len(self.hot):
            raise ValueError(f"instrument {instrument} outside 0..{len(self.hot) - 1}")
        if out.dtype != np.int64 or not out.flags.c_contiguous:
            raise ValueError("out: a C-contiguous int64 array")
        n = self._tick_one(instrument, snap, out)
        for j in self.dependents.get(instrument, ()):
            n += self._tick_one(j, snap, out[min(n, len(out)):])
        return n

    def tick_slice(self, instrument: int, snap: PriceSnapshot, out: np.ndarray, start: int,
                   holders: int) -> tuple[int, int]:
        """Holders ``start <= h < start + holders`` of ``instrument``'s incremental pass
        at ``snap`` (``tick`` of one instrument, in slices, so that a worker answers a
        new tick between them): returns (breaching holders of the slice, next start). The
        slice that reaches the last holder moves the instrument's basis to ``snap``; the
        slices together give the whole pass's aggregates and listing bit for bit.

        Between the first and the last slice of a pass the caller must use the same
        ``snap`` and change nothing else in this index (no fills, upkeep, trigger
        refresh, collateral pass): the holders not yet passed are still at the basis."""
        if not 0 <= instrument < len(self.hot):
            raise ValueError(f"instrument {instrument} outside 0..{len(self.hot) - 1}")
        if out.dtype != np.int64 or not out.flags.c_contiguous:
            raise ValueError("out: a C-contiguous int64 array")
        n_h = self.holders(instrument)
        if not 0 <= start <= n_h or holders < 1:
            raise ValueError(f"slice {start}+{holders} outside 0..{n_h} holders")
        stop = min(n_h, start + holders)
        return self._tick_one(instrument, snap, out, start, stop, store_basis=stop == n_h), stop

    def _tick_one(self, instrument: int, snap: PriceSnapshot, out: np.ndarray,
                  start: int = 0, stop: int | None = None, store_basis: bool = True) -> int:
        st = self.store
        mark = float(snap.marks[instrument])
        if not (math.isfinite(mark) and mark > 0):
            raise ValueError(f"mark of instrument {instrument} is {mark!r}")
        n_h = int(self.counts[instrument]) if stop is None else stop
        if not 0 <= start <= n_h <= len(self.hot[instrument]) - self.PAD:
            raise ValueError(f"holders {start}..{n_h} outside 0..{len(self.hot[instrument]) - self.PAD}")
        hot = self.hot[instrument]
        n = _margin.tick_holders(st.addr(st.instruments), instrument, snap.marks, snap.asset_px,
                                 snap.asset_scale, self.basis, hot.ctypes.data + start * hot.itemsize,
                                 self.cost[instrument][start:], self.iso[instrument][start:], n_h - start,
                                 self.agg, out, store_basis)
        if n and self.row_base:
            out[: min(n, len(out))] += self.row_base
        return n


def pretrade_check_consistent(store: Store, row: int, instrument: int, qty_units: int, price: float,
                              snap: PriceSnapshot | None = None) -> CheckResult:
    """``pretrade_check`` for a process that is not the account's writer (the order-check
    gateway): the kernel copies the row and its slots under the seqlock into a scratch
    buffer and runs the rule on the copy, in one call without the GIL."""
    if not 0 <= row < store.accounts_cap:
        return CheckResult(Code.CHECK_UNKNOWN_ACCOUNT, math.nan, math.nan)
    bad, snap = _check_order_args(store, instrument, qty_units, price, snap)
    if bad is not None:
        return bad
    scratch = store.__dict__.get("_check_scratch")
    if scratch is None:
        scratch = np.zeros(store.accounts.dtype.itemsize + store.positions.dtype.itemsize * store.slots_per_account,
                           np.uint8)
        store.__dict__["_check_scratch"] = scratch
    s = store.slots_per_account
    code, eq, im = _margin.pretrade_check_shared(
        store.addr(store.instruments), store.addr(store.accounts, row), store.addr(store.positions, row * s),
        s, scratch.ctypes.data, instrument, int(qty_units), float(price), snap.marks, snap.asset_px,
        snap.asset_haircut, snap.asset_scale)
    if code < 0:        # its writer stopped mid-write; the restarted worker repairs the row
        return CheckResult(Code.CHECK_ACCOUNT_BUSY, math.nan, math.nan)
    return CheckResult(Code(code), eq, im)
