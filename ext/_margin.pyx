# cython: language_level=3
"""Margin kernel: pure, stateless functions over raw pointers into the shared-memory tables.

Every function here assumes clean input (the checked Python API is engine/risk/margin.py)
and runs without the GIL. Prices are read from a snapshot (``marks``, ``asset_px``) the
caller took through the seqlocks, so one pass sees one consistent set of prices.

Per position, in its settle asset, with ``q = qty / qty_scale`` contracts,
``c = cost / settle_scale``, ``cs`` the contract size and ``p`` the mark:

    linear (perp, future):  notional = |q| cs p        upnl = q cs p - c
    inverse:                notional = |q| cs / p      upnl = c - q cs / p
    option:                 notional = |q| cs S        upnl = q cs p - c   (S: underlying mark;
                            short: tiers on notional; long, q >= 0: IM = q cs p, MM = 0)
    IM = notional * imr_k - init_amount_k,  MM = notional * mmr_k - maint_amount_k  (tier k)

A long option's initial margin is its value at the mark: opening one at the mark leaves
equity unchanged and raises IM by the premium, so the pre-trade check asks the free
margin (equity - IM) to cover the premium; the option's value is not usable as initial
margin for anything else. It holds no maintenance margin (the most it can lose is that
value, which its IM reserved).

Per account, in USD, with settle-asset price ``px`` and haircut ``h``:

    collateral = sum_a bal_a * px_a * (1 - h_a if bal_a > 0 else 1)
    cross equity = collateral + sum_cross upnl * px_s
    cross IM, MM  = sum_cross IM * px_s, sum_cross MM * px_s
    liquidatable  <=> cross equity < cross MM (strict) and cross MM > 0, or an isolated
                      position with isolated_margin + upnl < MM and MM > 0 (with no
                      requirement there is nothing to liquidate: negative equity is bad
                      debt, flagged BANKRUPT)
"""

from libc.math cimport fabs, fmin, fmax, ceil, floor, NAN, INFINITY, isnan, isinf
from libc.stdint cimport int32_t, int64_t, uint64_t, INT64_MIN, INT64_MAX

from _types cimport (InstrumentRow, PosValues, AcctValues, AccountRow, PositionRow, MAX_ASSETS, MAX_TIERS,
                     KIND_PERP, KIND_FUTURE, KIND_OPTION, KIND_INVERSE_PERP, KIND_INVERSE_FUTURE,
                     MODE_CROSS, MODE_ISOLATED, ACCOUNT_FLAG_ISOLATED_DEFAULT, STATUS_BELOW_IM, STATUS_LIQUIDATABLE,
                     STATUS_ISOLATED_LIQUIDATABLE, STATUS_BANKRUPT)
from _seqlock cimport (me_seqlock_write_begin, me_seqlock_write_end, me_prefetch_rw,
                       me_seqlock_read_begin, me_seqlock_read_retry, me_seqlock_copy)
from libc.string cimport memcpy, memset
from libc.stdlib cimport malloc, free, calloc, realloc
from libc.math cimport isfinite
from libc.stdint cimport int8_t, uint8_t, uint32_t

from _types cimport PriceRow, AssetRow

include "_msgpack.pxi"

# Result codes (the numbers of engine.codes.Code).
cdef enum:
    MAX_SLOTS_DECIDE = 64               # position slots decide_orders works on at most
    CODE_OK = 0
    CODE_CHECK_INSUFFICIENT_MARGIN = 4001
    CODE_CHECK_POSITION_SLOTS_FULL = 4007



cdef inline bint is_inverse(int kind) noexcept nogil:
    return kind == KIND_INVERSE_PERP or kind == KIND_INVERSE_FUTURE


cdef inline int tier_index(const InstrumentRow *ins, double notional) noexcept nogil:
    """Return the last tier k with floor_k <= notional (tier 0 when none)."""
    cdef int k = 0
    cdef int t
    for t in range(1, ins.n_tiers):      # floors increase: count those at or below (no branch)
        k += ins.tier_floor[t] <= notional
    return k


ctypedef struct TierRates:               # one tier's rates and amounts, together on half a line
    double imr
    double init_amount
    double mmr
    double maint_amount

ctypedef struct InsPass:                # one instrument at one price snapshot, for a pass
    const InstrumentRow *ins
    double x_per_unit                   # upnl before cost, per qty unit (settle asset):
                                        #   linear, option: cs p / qs;  inverse: -cs / (p qs)
    double notional_per_unit            # linear: cs p / qs; inverse: cs / (p qs); option: cs S / qs
    double upnl_per_cost                # per cost unit: -1 / scale_s (linear, option), +1 / scale_s (inverse)
    double per_settle_unit              # 1 / scale_s (isolated margin units to settle asset)
    double px_settle                    # USD per settle asset
    int long_free                       # option: a long holds IM = its value, MM = 0
    int8_t k_lo[64]                     # by bit length b of |qty| (|qty| in [2**b, 2**(b+1))):
                                        #   the tier of the least notional there when those
                                        #   notionals span at most two tiers, else -1 (search);
                                        #   all -1 until tier_buckets fills them (pass_tier)
    double floor[MAX_TIERS + 1]         # tier floors, unused tiers and one past the last +inf
    TierRates tier[MAX_TIERS]           # copies of the instrument's tier columns, by tier

ctypedef struct AssetPass:              # collateral weights at one price snapshot
    double w_long[MAX_ASSETS]           # USD per balance unit when positive: px (1 - h) / scale
    double w_short[MAX_ASSETS]          # USD per balance unit when negative (borrowed): px / scale
    int n_assets                        # assets in the table (balances beyond are zero)


cdef inline void ins_pass_tiers(InsPass *e, const InstrumentRow *ins) noexcept nogil:
    """The price-free part of an InsPass: the instrument, its option flag, its tiers."""
    cdef int t
    e.ins = ins
    memset(e.k_lo, 0xff, 64)             # -1: every bucket searches
    e.long_free = ins.kind == KIND_OPTION
    e.floor[MAX_TIERS] = INFINITY
    for t in range(MAX_TIERS):
        e.floor[t] = ins.tier_floor[t] if t < ins.n_tiers else INFINITY
        e.tier[t].imr = ins.tier_imr[t]
        e.tier[t].init_amount = ins.tier_init_amount[t]
        e.tier[t].mmr = ins.tier_mmr[t]
        e.tier[t].maint_amount = ins.tier_maint_amount[t]


cdef inline void ins_pass_at(InsPass *e, const InstrumentRow *instruments, int i,
                             const double *marks, const double *asset_px,
                             const double *asset_scale) noexcept nogil:
    """Fold the per-instrument constants of the position rule (module docstring) at ``marks``:
    a pass then needs multiplies only, no division per position."""
    cdef const InstrumentRow *ins = &instruments[i]
    cdef double p = marks[i]
    cdef double per_qty = ins.contract_size / <double>ins.qty_scale
    cdef double inv_scale = 1.0 / asset_scale[ins.settle_asset]
    ins_pass_tiers(e, ins)
    e.per_settle_unit = inv_scale
    e.px_settle = asset_px[ins.settle_asset]
    if is_inverse(ins.kind):
        e.notional_per_unit = per_qty / p
        e.x_per_unit = -e.notional_per_unit
        e.upnl_per_cost = inv_scale
    else:
        e.x_per_unit = per_qty * p
        e.notional_per_unit = e.x_per_unit
        e.upnl_per_cost = -inv_scale
    if ins.kind == KIND_OPTION:          # requirement on the underlying's notional
        e.notional_per_unit = per_qty * marks[ins.underlying]


cdef void ins_pass_all(InsPass *table, const InstrumentRow *instruments, int n_instruments,
                       const double *marks, const double *asset_px, const double *asset_scale) noexcept nogil:
    cdef int i
    for i in range(n_instruments):
        ins_pass_at(&table[i], instruments, i, marks, asset_px, asset_scale)


cdef void ins_pass_held(InsPass *table, const InstrumentRow *instruments, const AccountRow *acct,
                        const PositionRow *slots, const double *marks, const double *asset_px,
                        const double *asset_scale) noexcept nogil:
    """Fill only the entries of the instruments one account holds (single-account callers)."""
    cdef int i
    for i in range(acct.n_positions):
        ins_pass_at(&table[slots[i].instrument], instruments, slots[i].instrument, marks, asset_px,
                    asset_scale)


cdef void asset_pass_fill(AssetPass *w, int n_assets, const double *asset_px,
                          const double *asset_haircut, const double *asset_scale) noexcept nogil:
    cdef int a
    w.n_assets = min(n_assets, <int>MAX_ASSETS)
    for a in range(MAX_ASSETS):
        if a < n_assets:
            w.w_long[a] = asset_px[a] * (1.0 - asset_haircut[a]) / asset_scale[a]
            w.w_short[a] = asset_px[a] / asset_scale[a]
        else:
            w.w_long[a] = 0.0
            w.w_short[a] = 0.0


cdef inline int tier_search(const double *floor, double notional) noexcept nogil:
    """Last tier k with floor_k <= notional over MAX_TIERS (16) floors padded with +inf:
    four branch-free halving steps, so no mispredicted loop exit whatever the tier count."""
    cdef int k = 0
    k += 8 * (floor[k + 8] <= notional)
    k += 4 * (floor[k + 4] <= notional)
    k += 2 * (floor[k + 2] <= notional)
    k += floor[k + 1] <= notional
    return k


cdef extern from *:
    int __builtin_clzll(unsigned long long x) noexcept nogil

cdef void tier_buckets(InsPass *e) noexcept nogil:
    """Fill ``e.k_lo``: 64 buckets of its tiers at its notional per unit ``n``, one per
    bit length of ``|qty|``: bucket ``b`` holds ``|qty|`` in ``[2**b, 2**(b+1))`` (bucket
    0 also 0), whose notionals lie in ``[2**b n, 2**(b+1) n]`` (``n >= 0``; rounding is
    monotonic), so in tiers ``k_lo..k_hi`` of those two ends. With ``k_hi <= k_lo + 1``
    the tier is ``k_lo + (notional >= floor_(k_lo+1))``: one compare instead of a search,
    and the same tier ``tier_search`` finds. Filled once per pass per instrument; 64
    bytes in the InsPass itself (one line), so the table stays in L1."""
    cdef int b, k_lo, k_hi
    cdef double lo, hi, n = e.notional_per_unit
    for b in range(64):
        lo = 0.0 if b == 0 else (<double>(1ULL << b)) * n
        hi = (2.0 * <double>(1ULL << b)) * n
        k_lo = tier_search(e.floor, lo)
        k_hi = tier_search(e.floor, hi)
        e.k_lo[b] = <int8_t>(k_lo if k_hi <= k_lo + 1 else -1)


cdef inline int pass_tier(const InsPass *e, int64_t qty, double notional) noexcept nogil:
    """``tier_search(e.floor, notional)`` for ``notional = |qty| n``: one compare in the
    bucket of ``|qty|`` (``tier_buckets``), the whole search when it is wide."""
    cdef int64_t sign = qty >> 63
    cdef uint64_t uq = <uint64_t>((qty ^ sign) - sign)     # |qty|, INT64_MIN included
    cdef int k = e.k_lo[63 - __builtin_clzll(uq | 1)]
    if k < 0:
        return tier_search(e.floor, notional)
    return k + (notional >= e.floor[k + 1])


cdef inline PosValues position_values(const InsPass *e, const PositionRow *pos) noexcept nogil:
    """Notional, upnl, IM and MM of one position, in its settle asset (module docstring):
    ``upnl = qty x_per_unit + cost upnl_per_cost``, ``notional = |qty| notional_per_unit``.
    An empty slot (qty 0) needs no test: notional 0 is in tier 0, whose amounts are 0."""
    cdef PosValues v
    cdef double qty = <double>pos.qty
    cdef int k
    v.upnl = qty * e.x_per_unit + <double>pos.cost * e.upnl_per_cost
    v.notional = fabs(qty) * e.notional_per_unit
    v.im = 0.0
    v.mm = 0.0
    if e.long_free and qty >= 0:
        v.im = qty * e.x_per_unit     # a long option: IM its value at the mark, no MM
        return v
    k = pass_tier(e, pos.qty, v.notional)
    v.im = v.notional * e.tier[k].imr - e.tier[k].init_amount
    v.mm = v.notional * e.tier[k].mmr - e.tier[k].maint_amount
    return v


cdef inline AcctValues account_values(const InsPass *table, const AssetPass *w, const AccountRow *acct,
                               const PositionRow *slots) noexcept nogil:
    """All account figures at the prices ``table`` and ``w`` were filled at (module docstring)."""
    cdef AcctValues r
    cdef int a, i
    cdef double bal, px_s, iso
    cdef const InsPass *e
    cdef const PositionRow *pos
    cdef PosValues v
    r.collateral_usd = 0.0
    r.cross_upnl_usd = 0.0
    r.cross_im_usd = 0.0
    r.cross_mm_usd = 0.0
    r.iso_margin_usd = 0.0
    r.iso_upnl_usd = 0.0
    r.iso_im_usd = 0.0
    r.iso_mm_usd = 0.0
    r.status = 0
    for a in range(w.n_assets):        # branch-free select of the weight (w finite)
        bal = <double>acct.balance[a]
        r.collateral_usd += (bal if bal > 0 else 0.0) * w.w_long[a] + (bal if bal < 0 else 0.0) * w.w_short[a]
    for i in range(acct.n_positions):
        pos = &slots[i]
        e = &table[pos.instrument]
        v = position_values(e, pos)
        px_s = e.px_settle
        if pos.mode == MODE_ISOLATED:
            iso = <double>pos.isolated_margin * e.per_settle_unit
            r.iso_margin_usd += iso * px_s
            r.iso_upnl_usd += v.upnl * px_s
            r.iso_im_usd += v.im * px_s
            r.iso_mm_usd += v.mm * px_s
            if iso + v.upnl < v.mm and v.mm > 0:
                r.status |= STATUS_ISOLATED_LIQUIDATABLE
        else:
            r.cross_upnl_usd += v.upnl * px_s
            r.cross_im_usd += v.im * px_s
            r.cross_mm_usd += v.mm * px_s
    r.cross_equity_usd = r.collateral_usd + r.cross_upnl_usd
    r.status |= cross_status(r.cross_equity_usd, r.cross_im_usd, r.cross_mm_usd)
    return r


cdef inline int cross_status(double equity, double im, double mm) noexcept nogil:
    """Status bits, branch-free (about a tenth of a stressed book breaches: a branch on it
    mispredicts). Liquidatable needs something to liquidate (mm > 0); else it is bad debt."""
    return (STATUS_BELOW_IM * (equity < im)
            | STATUS_LIQUIDATABLE * ((equity < mm) & (mm > 0))
            | STATUS_BANKRUPT * (equity < 0))


cdef inline void store_results(AccountRow *acct, const AcctValues *r) noexcept nogil:
    me_seqlock_write_begin(&acct.seq)
    acct.collateral_usd = r.collateral_usd
    acct.cross_equity_usd = r.cross_equity_usd
    acct.cross_im_usd = r.cross_im_usd
    acct.cross_mm_usd = r.cross_mm_usd
    acct.status = r.status
    me_seqlock_write_end(&acct.seq)


def full_pass(size_t instruments_addr, size_t accounts_addr, size_t positions_addr,
              int slots_per_account, int64_t row_start, int64_t row_end,
              const double[::1] marks, const double[::1] asset_px,
              const double[::1] asset_haircut, const double[::1] asset_scale,
              int64_t[::1] out_rows):
    """Re-margin accounts ``row_start <= r < row_end``; write results; list the liquidatable.

    Returns the number of liquidatable accounts (cross or isolated breach); the first
    ``len(out_rows)`` of their rows are written to ``out_rows``.
    """
    cdef const InstrumentRow *instruments = <const InstrumentRow *>instruments_addr
    cdef AccountRow *accounts = <AccountRow *>accounts_addr
    cdef const PositionRow *positions = <const PositionRow *>positions_addr
    cdef int64_t r, n_liq = 0, cap = out_rows.shape[0], sink = 0
    cdef int64_t *dst
    cdef AcctValues v
    cdef AssetPass w
    cdef int i, n_ins = <int>marks.shape[0]
    cdef InsPass *table = <InsPass *>malloc(n_ins * sizeof(InsPass))
    if table == NULL:
        raise MemoryError()
    with nogil:
        ins_pass_all(table, instruments, n_ins, &marks[0], &asset_px[0], &asset_scale[0])
        for i in range(n_ins):
            tier_buckets(&table[i])
        asset_pass_fill(&w, <int>asset_px.shape[0], &asset_px[0], &asset_haircut[0], &asset_scale[0])
        for r in range(row_start, row_end):
            if r + 16 < row_end:      # the row and slots 16 accounts ahead: hides the
                me_prefetch_rw(&accounts[r + 16])         # memory wait behind the compute
                me_prefetch_rw(<const char *>&accounts[r + 16] + 64)    # (4 KiB pages stop
                me_prefetch_rw(&positions[(r + 16) * slots_per_account])     # the hardware
                me_prefetch_rw(&positions[(r + 16) * slots_per_account + 2])  # prefetcher)
            v = account_values(table, &w, &accounts[r], &positions[r * slots_per_account])
            store_results(&accounts[r], &v)
            dst = &out_rows[n_liq] if n_liq < cap else &sink     # branch-free listing
            dst[0] = r
            n_liq += (v.status & (STATUS_LIQUIDATABLE | STATUS_ISOLATED_LIQUIDATABLE)) != 0
    free(table)
    return n_liq


cdef inline PosValues holder_values(const InstrumentRow *ins, double q, double c, double p,
                                    double s) noexcept nogil:
    """Position values from a holder entry: q contracts, c settle cost, mark p, underlying s."""
    cdef PosValues v
    cdef int k
    cdef double cs = ins.contract_size
    if is_inverse(ins.kind):
        v.notional = fabs(q) * cs / p
        v.upnl = c - q * cs / p
    elif ins.kind == KIND_OPTION:
        v.notional = fabs(q) * cs * s
        v.upnl = q * cs * p - c
    else:
        v.notional = fabs(q) * cs * p
        v.upnl = q * cs * p - c
    if ins.kind == KIND_OPTION and q >= 0:
        v.im = q * cs * p             # a long option: IM its value at the mark, no MM
        v.mm = 0.0
        return v
    k = tier_index(ins, v.notional)
    v.im = v.notional * ins.tier_imr[k] - ins.tier_init_amount[k]
    v.mm = v.notional * ins.tier_mmr[k] - ins.tier_maint_amount[k]
    return v


cdef enum:
    HOLD_AHEAD = 48                     # the tick prefetches this many holders ahead

HOLDER_PAD = HOLD_AHEAD                 # spare records a holder array carries (HolderIndex.PAD)


ctypedef struct HolderRec:              # 16 bytes: one holder of one instrument (HolderIndex.HOT)
    int32_t row                         # account row minus the partition's first row
    float key                           # cross: |qty| rounded up to float32; isolated: +inf
    double qty                          # quantity units, signed (exact below 2**53)

cdef enum:
    BASIS_X = 0                         # columns of a basis row: the InsPass scalars
    BASIS_NOTIONAL = 1
    BASIS_UPNL_PER_COST = 2
    BASIS_PER_SETTLE = 3
    BASIS_PX_SETTLE = 4
    BASIS_COLS = 8


cdef inline void basis_store(double *row, const InsPass *e) noexcept nogil:
    row[BASIS_X] = e.x_per_unit
    row[BASIS_NOTIONAL] = e.notional_per_unit
    row[BASIS_UPNL_PER_COST] = e.upnl_per_cost
    row[BASIS_PER_SETTLE] = e.per_settle_unit
    row[BASIS_PX_SETTLE] = e.px_settle


cdef inline void basis_load(InsPass *e, const InstrumentRow *ins, const double *row) noexcept nogil:
    ins_pass_tiers(e, ins)
    e.x_per_unit = row[BASIS_X]
    e.notional_per_unit = row[BASIS_NOTIONAL]
    e.upnl_per_cost = row[BASIS_UPNL_PER_COST]
    e.per_settle_unit = row[BASIS_PER_SETTLE]
    e.px_settle = row[BASIS_PX_SETTLE]


def instrument_basis(size_t instruments_addr, const double[::1] marks, const double[::1] asset_px,
                     const double[::1] asset_scale, double[:, ::1] out):
    """Row ``i`` of ``out``: instrument ``i``'s pass constants at these prices (the InsPass
    scalars ``x_per_unit, notional_per_unit, upnl_per_cost, per_settle_unit, px_settle``).

    The holder index keeps one such row per instrument: the prices its aggregates are at.
    """
    cdef const InstrumentRow *instruments = <const InstrumentRow *>instruments_addr
    cdef InsPass e
    cdef int i
    with nogil:
        for i in range(<int>marks.shape[0]):
            ins_pass_at(&e, instruments, i, &marks[0], &asset_px[0], &asset_scale[0])
            basis_store(&out[i, 0], &e)


def remargin_rows(size_t instruments_addr, size_t accounts_addr, size_t positions_addr,
                  int slots_per_account, const int64_t[::1] rows, const double[::1] marks,
                  const double[::1] asset_px, const double[::1] asset_haircut,
                  const double[::1] asset_scale, const double[:, ::1] basis,
                  const double[::1] basis_asset_px, double[:, ::1] agg, int64_t row_base,
                  int64_t[::1] out_rows):
    """Re-margin the accounts in ``rows`` (after their fills, or a slice of the periodic
    pass), in one call.

    Each row's shared-memory figures at the current prices (the full pass's rule and
    seqlock write), and its private aggregates ``agg[row - row_base]`` = (cross equity,
    IM, MM) at the holder index's basis (every instrument at its basis row, collateral
    at ``basis_asset_px``), so the pending incremental passes
    move it with the other holders -- and whatever float drift the incremental sums had
    is gone. Returns the number of rows in breach at the current prices; the first
    ``len(out_rows)`` of them are listed.
    """
    cdef const InstrumentRow *instruments = <const InstrumentRow *>instruments_addr
    cdef AccountRow *accounts = <AccountRow *>accounts_addr
    cdef const PositionRow *positions = <const PositionRow *>positions_addr
    cdef int n_ins = <int>marks.shape[0], i
    cdef int64_t j, r, r16, n_liq = 0, cap = out_rows.shape[0]
    cdef AcctValues v
    cdef AssetPass w_now, w_basis
    cdef InsPass *now = <InsPass *>malloc(n_ins * sizeof(InsPass))
    cdef InsPass *then = <InsPass *>malloc(n_ins * sizeof(InsPass))
    if now == NULL or then == NULL:
        free(now)
        free(then)
        raise MemoryError()
    if basis.shape[0] != n_ins or agg.shape[1] < 3:
        free(now)
        free(then)
        raise ValueError("basis: one row per instrument; agg: 3+ columns")
    with nogil:
        ins_pass_all(now, instruments, n_ins, &marks[0], &asset_px[0], &asset_scale[0])
        for i in range(n_ins):
            basis_load(&then[i], &instruments[i], &basis[i, 0])
        asset_pass_fill(&w_now, <int>asset_px.shape[0], &asset_px[0], &asset_haircut[0], &asset_scale[0])
        asset_pass_fill(&w_basis, <int>basis_asset_px.shape[0], &basis_asset_px[0], &asset_haircut[0],
                        &asset_scale[0])
        for j in range(rows.shape[0]):
            r = rows[j]
            if j + 16 < rows.shape[0]:          # as in full_pass: the row 16 ahead
                r16 = rows[j + 16]
                me_prefetch_rw(&accounts[r16])
                me_prefetch_rw(<const char *>&accounts[r16] + 64)
                me_prefetch_rw(&positions[r16 * slots_per_account])
                me_prefetch_rw(&positions[r16 * slots_per_account + 2])
                me_prefetch_rw(&agg[r16 - row_base, 0])
            v = account_values(now, &w_now, &accounts[r], &positions[r * slots_per_account])
            store_results(&accounts[r], &v)
            if v.status & (STATUS_LIQUIDATABLE | STATUS_ISOLATED_LIQUIDATABLE):
                if n_liq < cap:
                    out_rows[n_liq] = r
                n_liq += 1
            v = account_values(then, &w_basis, &accounts[r], &positions[r * slots_per_account])
            agg[r - row_base, 0] = v.cross_equity_usd
            agg[r - row_base, 1] = v.cross_im_usd
            agg[r - row_base, 2] = v.cross_mm_usd
    free(now)
    free(then)
    return n_liq


cdef inline void tier_amounts(const InsPass *e, double notional, double *im, double *mm) noexcept nogil:
    cdef int k = tier_search(e.floor, notional)
    im[0] = notional * e.tier[k].imr - e.tier[k].init_amount
    mm[0] = notional * e.tier[k].mmr - e.tier[k].maint_amount


cdef inline int tier0_move(double *row_agg, double q, double du_per_qty, double c_im, double k_im,
                           double c_mm, double k_mm) noexcept nogil:
    """One cross holder in the first tier at both prices: move its account's aggregates
    (equity by ``q du``, IM and MM by ``|q| c + k``); 1 when the account now breaches."""
    cdef double aq = fabs(q)
    row_agg[0] += q * du_per_qty
    row_agg[1] += aq * c_im + k_im
    row_agg[2] += aq * c_mm + k_mm
    return (row_agg[0] < row_agg[2]) & (row_agg[2] > 0)


def tick_holders(size_t instruments_addr, int instrument, const double[::1] marks,
                 const double[::1] asset_px, const double[::1] asset_scale, double[:, ::1] basis,
                 size_t holders_addr, const double[::1] h_cost, const double[::1] h_iso, int64_t n,
                 double[:, ::1] agg, int64_t[::1] out_rows, bint store_basis=True):
    """Incremental pass for one instrument's new prices: touch only its holders.

    Each holder is 16 bytes (row, key, qty units; the key is ``|qty|`` rounded up to
    float32 for a cross holder, +inf for an isolated one, so one compare picks the common
    case), and the array has 16 spare records after the last (the prefetch reads ahead
    unchecked); ``agg[row]`` is the owning worker's private ``(cross equity, cross IM,
    cross MM, spare)`` in USD (32 bytes, one line per holder). The aggregates hold every position at its instrument's basis row ``b``
    (``basis[instrument]``); the pass moves them to ``b'`` at the new prices, with
    ``x = x_per_unit``, ``n = notional_per_unit``, ``px`` the settle price:

        equity += qty (x' px' - x px) + cost upnl_per_cost (px' - px)   (cost read only when px moved)
        IM     += IM(|qty| n') px' - IM(|qty| n) px,   MM likewise      (tiers at both notionals)

    then ``b = b'`` (unless ``store_basis`` is false: a pass run in slices over
    consecutive holder ranges, every slice at the same prices, stores it with its last
    slice; each holder's move depends only on the two price rows, so the slices give the
    whole pass's figures bit for bit). A cross holder in the first tier at both prices (``key`` below the
    second tier's floor in quantity at both prices) moves IM and MM by ``|qty| c + k``
    with ``c``, ``k`` computed once per tick. Breach: cross ``equity < MM and MM > 0``;
    isolated (aggregates untouched) ``iso + upnl' < MM'`` in the settle asset. Returns
    the number of breaching holders; their rows (relative to the partition's first row;
    the caller adds it) go to ``out_rows``, the first ``len`` of them, in holder order.
    """
    cdef const InstrumentRow *instruments = <const InstrumentRow *>instruments_addr
    cdef const HolderRec *hold = <const HolderRec *>holders_addr
    cdef InsPass e0, e1
    cdef int64_t h, r, lim, n_breach = 0, cap = out_rows.shape[0]
    cdef double q, aq, du_per_qty, du_cost, im0, mm0, im1, mm1, px0, px1, up1, tier1_qty, c_im, k_im, c_mm, k_mm, d_im, d_mm, n0, n1
    cdef int k0 = 0, k1 = 0
    cdef double *row_agg
    cdef int64_t *dst
    cdef int64_t sink = 0
    cdef int breach
    cdef bint px_moved, free_long, long_free
    cdef double *agg_p = &agg[0, 0]
    if agg.shape[1] != 4:
        raise ValueError("agg: 4 columns")
    with nogil:
        ins_pass_at(&e1, instruments, instrument, &marks[0], &asset_px[0], &asset_scale[0])
        basis_load(&e0, &instruments[instrument], &basis[instrument, 0])
        px0 = e0.px_settle
        px1 = e1.px_settle
        px_moved = px1 != px0
        long_free = e1.long_free
        du_per_qty = e1.x_per_unit * px1 - e0.x_per_unit * px0
        du_cost = e1.upnl_per_cost * (px1 - px0)
        # |qty| below which both notionals are under the second tier's floor: tier 0 at
        # both prices without a search (the same amounts the search would pick).
        tier1_qty = fmin(e0.floor[1] / e0.notional_per_unit, e1.floor[1] / e1.notional_per_unit)
        tier1_qty = tier1_qty * (1.0 - 1e-12)     # margin: the product may round up
        # Tier 0 at both prices: IM' px' - IM px = |qty| c_im + k_im (and MM likewise), two
        # constants per tick, so most holders cost one multiply-add per figure.
        c_im = e1.notional_per_unit * e1.tier[0].imr * px1 - e0.notional_per_unit * e0.tier[0].imr * px0
        k_im = e0.tier[0].init_amount * px0 - e1.tier[0].init_amount * px1
        c_mm = e1.notional_per_unit * e1.tier[0].mmr * px1 - e0.notional_per_unit * e0.tier[0].mmr * px0
        k_mm = e0.tier[0].maint_amount * px0 - e1.tier[0].maint_amount * px1
        if long_free or px_moved:
            tier1_qty = -1.0                      # options, settle price moved: the general path
        h = 0
        while h < n:
            # (a) the run of cross holders in the first tier at both prices: the common
            # case, one small loop (holders are ordered cross first by |qty|, so it is
            # long). The listing is branch-free (a breach is data, not a predictable
            # branch): the row is written at the next free slot either way and counted
            # only on a breach; a run stops before ``out_rows`` could overflow, and once it
            # is full the runs only count.
            if n_breach < cap:
                lim = min(n, h + (cap - n_breach))
                while h < lim and hold[h].key < tier1_qty:
                    # (the holder arrays carry HOLD_AHEAD spare records: hold[h + HOLD_AHEAD] is readable)
                    me_prefetch_rw(&agg_p[<int64_t>hold[h + HOLD_AHEAD].row * 4])
                    r = hold[h].row
                    out_rows[n_breach] = r
                    n_breach += tier0_move(&agg_p[r * 4], hold[h].qty, du_per_qty, c_im, k_im, c_mm, k_mm)
                    h += 1
                if h >= n:
                    break
                if h == lim:
                    continue                      # the run used up out_rows' room
            else:
                while h < n and hold[h].key < tier1_qty:
                    me_prefetch_rw(&agg_p[<int64_t>hold[h + HOLD_AHEAD].row * 4])
                    n_breach += tier0_move(&agg_p[<int64_t>hold[h].row * 4], hold[h].qty, du_per_qty,
                                           c_im, k_im, c_mm, k_mm)
                    h += 1
                if h >= n:
                    break
            # (b) any other holder: tiers searched, options, isolated
            me_prefetch_rw(&agg_p[<int64_t>hold[h + HOLD_AHEAD].row * 4])
            q = hold[h].qty
            aq = fabs(q)
            free_long = long_free and q >= 0
            if not isinf(hold[h].key):           # cross
                if free_long:
                    d_im = q * du_per_qty         # a long option's IM is its value
                    d_mm = 0.0
                else:
                    # Tier cursors: the holders are sorted by |qty| (HolderIndex), so the
                    # tier only steps up along the pass; the loops stay correct in any order.
                    n0 = aq * e0.notional_per_unit
                    n1 = aq * e1.notional_per_unit
                    while k0 + 1 < MAX_TIERS and n0 >= e0.floor[k0 + 1]:
                        k0 += 1
                    while k0 > 0 and n0 < e0.floor[k0]:
                        k0 -= 1
                    while k1 + 1 < MAX_TIERS and n1 >= e1.floor[k1 + 1]:
                        k1 += 1
                    while k1 > 0 and n1 < e1.floor[k1]:
                        k1 -= 1
                    d_im = ((n1 * e1.tier[k1].imr - e1.tier[k1].init_amount) * px1
                            - (n0 * e0.tier[k0].imr - e0.tier[k0].init_amount) * px0)
                    d_mm = ((n1 * e1.tier[k1].mmr - e1.tier[k1].maint_amount) * px1
                            - (n0 * e0.tier[k0].mmr - e0.tier[k0].maint_amount) * px0)
                row_agg = &agg_p[<int64_t>hold[h].row * 4]
                row_agg[0] += q * du_per_qty + (h_cost[h] * du_cost if px_moved else 0.0)
                row_agg[1] += d_im
                row_agg[2] += d_mm
                breach = (row_agg[0] < row_agg[2]) & (row_agg[2] > 0)
            else:
                mm1 = 0.0
                if not free_long:
                    tier_amounts(&e1, aq * e1.notional_per_unit, &im1, &mm1)
                up1 = q * e1.x_per_unit + h_cost[h] * e1.upnl_per_cost
                breach = (h_iso[h] * e1.per_settle_unit + up1 < mm1) & (mm1 > 0)
            dst = &out_rows[n_breach] if n_breach < cap else &sink
            dst[0] = hold[h].row
            n_breach += breach
            h += 1
        if store_basis:
            basis_store(&basis[instrument, 0], &e1)
    return n_breach


cdef double liquidation_price(const InstrumentRow *ins, double q, double c, double px_s,
                              double e0_usd, double m0_usd) noexcept nogil:
    """Mark of ``ins`` at which ``e0 + px_s*upnl(p) = m0 + px_s*MM(p)``; NaN where none.

    ``e0``/``m0``: the backing equity and requirement without this position (USD).
    The requirement is piecewise linear in p (linear) or in x = 1/p (inverse); solve each
    tier's piece and keep the root that lies inside that tier's notional range:

        linear:  p = (m0 - e0 + px_s (c - maint_k)) / (px_s cs (q - |q| mmr_k))
        inverse: x = (e0 - m0 + px_s (c + maint_k)) / (px_s cs (q + |q| mmr_k)),  p = 1/x

    The equity-minus-requirement function is continuous and monotonic in p (mmr < 1),
    so at most one root exists.
    """
    cdef int k
    cdef double cs = ins.contract_size, denom, root, notional, lo, hi
    cdef bint inv = is_inverse(ins.kind)
    if q == 0 or ins.kind == KIND_OPTION or px_s <= 0:
        return NAN
    for k in range(ins.n_tiers):
        if inv:
            denom = px_s * cs * (q + fabs(q) * ins.tier_mmr[k])
            if denom == 0:
                continue
            root = (e0_usd - m0_usd + px_s * (c + ins.tier_maint_amount[k])) / denom
        else:
            denom = px_s * cs * (q - fabs(q) * ins.tier_mmr[k])
            if denom == 0:
                continue
            root = (m0_usd - e0_usd + px_s * (c - ins.tier_maint_amount[k])) / denom
        if not root > 0:
            continue
        notional = fabs(q) * cs * root
        lo = ins.tier_floor[k]
        hi = ins.tier_floor[k + 1] if k + 1 < ins.n_tiers else INFINITY
        # Closed below, open above; a relative 1e-12 slack keeps a root sitting exactly
        # on a boundary (both pieces agree there, by continuity).
        if notional >= lo * (1.0 - 1e-12) and notional < hi * (1.0 + 1e-12):
            return 1.0 / root if inv else root
    return NAN


cdef double bankruptcy_price(const InstrumentRow *ins, double q, double c, double px_s,
                             double e0_usd) noexcept nogil:
    """Mark at which the backing equity is zero: ``e0 + px_s * upnl(p) = 0``; NaN where none.

        linear:  p = (c - e0 / px_s) / (q cs)
        inverse: x = (e0 / px_s + c) / (q cs),  p = 1/x
    """
    cdef double root
    if q == 0 or ins.kind == KIND_OPTION or px_s <= 0:
        return NAN
    if is_inverse(ins.kind):
        root = (e0_usd / px_s + c) / (q * ins.contract_size)
        return 1.0 / root if root > 0 else NAN
    root = (c - e0_usd / px_s) / (q * ins.contract_size)
    return root if root > 0 else NAN


cdef void position_prices(const InstrumentRow *ins, const PositionRow *pos, const PosValues *v,
                          const AcctValues *r, double px_s, double scale_s, double *liq,
                          double *bankrupt) noexcept nogil:
    """A position's liquidation price (into ``liq`` unless NULL) and bankruptcy price, with
    what backs it held fixed: its isolated margin (``e0 = iso px_s``, ``m0 = 0``), or the
    rest of the cross account (``e0 = E - upnl px_s``, ``m0 = MM - mm px_s``). NaN: none."""
    cdef double q = <double>pos.qty / <double>ins.qty_scale
    cdef double c = <double>pos.cost / scale_s
    cdef double e0, m0
    if pos.mode == MODE_ISOLATED:
        e0 = <double>pos.isolated_margin / scale_s * px_s
        m0 = 0.0
    else:
        e0 = r.cross_equity_usd - v.upnl * px_s
        m0 = r.cross_mm_usd - v.mm * px_s
    if liq != NULL:
        liq[0] = liquidation_price(ins, q, c, px_s, e0, m0)
    bankrupt[0] = bankruptcy_price(ins, q, c, px_s, e0)


def account_detail(size_t instruments_addr, size_t account_addr, size_t slots_addr,
                   const double[::1] marks, const double[::1] asset_px,
                   const double[::1] asset_haircut, const double[::1] asset_scale,
                   double[:, ::1] out_positions):
    """Every figure of one account, and per position (row i of ``out_positions``):
    notional, upnl, IM, MM (settle asset), liquidation price, bankruptcy price (NaN: none).

    Returns ``(collateral, cross_upnl, cross_equity, cross_im, cross_mm, iso_margin,
    iso_upnl, iso_im, iso_mm, status)`` in USD.
    """
    cdef const InstrumentRow *instruments = <const InstrumentRow *>instruments_addr
    cdef const AccountRow *acct = <const AccountRow *>account_addr
    cdef const PositionRow *slots = <const PositionRow *>slots_addr
    cdef const InstrumentRow *ins
    cdef const PositionRow *pos
    cdef AcctValues r
    cdef PosValues v
    cdef int i
    cdef double px_s, scale_s
    cdef AssetPass w
    cdef InsPass *table = <InsPass *>malloc(marks.shape[0] * sizeof(InsPass))
    if table == NULL:
        raise MemoryError()
    with nogil:
        ins_pass_held(table, instruments, acct, slots, &marks[0], &asset_px[0], &asset_scale[0])
        asset_pass_fill(&w, <int>asset_px.shape[0], &asset_px[0], &asset_haircut[0], &asset_scale[0])
        r = account_values(table, &w, acct, slots)
        for i in range(min(acct.n_positions, <int>out_positions.shape[0])):   # the row may grow
            pos = &slots[i]                                                    # under a reader
            ins = &instruments[pos.instrument]
            scale_s = asset_scale[ins.settle_asset]
            px_s = asset_px[ins.settle_asset]
            v = position_values(&table[pos.instrument], pos)
            out_positions[i, 0] = v.notional
            out_positions[i, 1] = v.upnl
            out_positions[i, 2] = v.im
            out_positions[i, 3] = v.mm
            position_prices(ins, pos, &v, &r, px_s, scale_s, &out_positions[i, 4], &out_positions[i, 5])
    free(table)
    return (r.collateral_usd, r.cross_upnl_usd, r.cross_equity_usd, r.cross_im_usd,
            r.cross_mm_usd, r.iso_margin_usd, r.iso_upnl_usd, r.iso_im_usd, r.iso_mm_usd,
            r.status)


# ------------------------------------------------------------------ partial liquidation

cdef enum:
    CODE_LIQ_BELOW_MAINTENANCE = 6001          # engine.codes.Code (held equal by a test)
    CODE_LIQ_ISOLATED_BELOW_MAINTENANCE = 6002
    CODE_LIQ_BELOW_BANKRUPTCY = 6003

#: Reason codes compiled into ``decide_orders``, for the test that holds them to engine.codes.
LIQ_CODES = {"LIQ_BELOW_MAINTENANCE": CODE_LIQ_BELOW_MAINTENANCE,
             "LIQ_ISOLATED_BELOW_MAINTENANCE": CODE_LIQ_ISOLATED_BELOW_MAINTENANCE,
             "LIQ_BELOW_BANKRUPTCY": CODE_LIQ_BELOW_BANKRUPTCY}


cdef double close_qty(const InstrumentRow *ins, double q, double p, double px_s, double e_usd,
                      double m_other_usd, double h) noexcept nogil:
    """Contracts to close so that ``e >= h (m_other + MM_position(|q| - x))``: the largest
    notional kept, tier by tier from the top (engine/liquidation/decide.py)."""
    cdef int k, n_t = ins.n_tiers
    cdef double budget = e_usd / h - m_other_usd, nk, upper, n_keep = 0.0, keep
    for k in range(n_t - 1, -1, -1):
        nk = (budget + px_s * ins.tier_maint_amount[k]) / (px_s * ins.tier_mmr[k])
        if nk >= ins.tier_floor[k]:
            upper = ins.tier_floor[k + 1] if k + 1 < n_t else INFINITY
            n_keep = fmax(0.0, fmin(nk, upper))
            break
    if is_inverse(ins.kind):
        keep = n_keep * p / ins.contract_size
    else:
        keep = n_keep / (ins.contract_size * p)
    return fmax(0.0, fabs(q) - keep)


cdef double mm_at(const InstrumentRow *ins, double q_abs, double p) noexcept nogil:
    """Tiered maintenance requirement of ``q_abs`` contracts at mark ``p`` (settle asset)."""
    cdef double n
    cdef int t, k = 0
    if is_inverse(ins.kind):
        n = q_abs * ins.contract_size / p
    else:
        n = q_abs * ins.contract_size * p
    for t in range(1, ins.n_tiers):
        if ins.tier_floor[t] <= n:
            k = t
    return n * ins.tier_mmr[k] - ins.tier_maint_amount[k]


cdef int put_order(int64_t *o, const InstrumentRow *ins, int instrument, int64_t qty_units,
                   double qty_contracts, double bankruptcy, double mark, int reason) noexcept nogil:
    """One order row ``(instrument, signed qty units, limit price units, reason)``: the
    quantity rounded up to a unit (at most the position), the limit the bankruptcy price
    (else the mark) rounded away from the account's favour, then held to 1..2**63-1 units
    (a bankruptcy price past what an int64 carries -- an account whose equity nearly
    cancels its position's value -- is a sell no book fills, limited at 2**63-1). 0 when
    the quantity would not fit an int64, or a position is -2**63 (no int64 order closes
    it): the caller falls back to the reference."""
    cdef double want = qty_contracts * <double>ins.qty_scale - 1e-9
    cdef double limit = mark if isnan(bankruptcy) else bankruptcy
    cdef double lu
    cdef int64_t units, aq
    cdef int side = -1 if qty_units > 0 else 1           # sell a long, buy back a short
    if not (want < 4.0e18) or qty_units == INT64_MIN:
        return 0
    aq = qty_units if qty_units >= 0 else -qty_units
    units = <int64_t>ceil(want)
    units = min(aq, max(<int64_t>1, units))
    if side < 0:
        lu = ceil(limit * <double>ins.price_scale - 1e-9)
    else:
        lu = floor(limit * <double>ins.price_scale + 1e-9)
    o[0] = instrument
    o[1] = side * units
    if not (lu < 9.223372036854775807e18):              # 2**63 as a double, or NaN
        o[2] = INT64_MAX if not isnan(lu) else 1
    else:
        o[2] = max(<int64_t>1, <int64_t>lu)
    o[3] = reason
    return 1


def decide_orders(size_t instruments_addr, size_t account_addr, size_t slots_addr,
                  const double[::1] marks, const double[::1] asset_px, const double[::1] asset_haircut,
                  const double[::1] asset_scale, double health_factor, int64_t[:, ::1] out):
    """Partial liquidation of one account (the rule of engine/liquidation/decide.py, which
    is its reference): rows of ``out`` = ``(instrument, signed qty units, limit price
    units, reason)``. Returns the number of orders, or -1 when a number leaves the range
    this kernel handles (the caller then runs the reference). See ``decide_core``.
    """
    cdef const AccountRow *acct = <const AccountRow *>account_addr
    cdef int n
    cdef InsPass *table
    if acct.n_positions > MAX_SLOTS_DECIDE or out.shape[1] != 4 or out.shape[0] < acct.n_positions:
        return -1
    if acct.n_positions == 0:
        return 0
    table = <InsPass *>malloc(marks.shape[0] * sizeof(InsPass))
    if table == NULL:
        raise MemoryError()
    with nogil:
        n = decide_core(<const InstrumentRow *>instruments_addr, acct, <const PositionRow *>slots_addr,
                        &marks[0], &asset_px[0], &asset_haircut[0], &asset_scale[0], <int>asset_px.shape[0],
                        health_factor, &out[0, 0], table)
    free(table)
    return n


cdef inline double realize_cost(double haircut, double px, double r, double bal) noexcept nogil:
    """Equity that realizing ``r`` (settle asset) into a balance ``bal`` of a haircut asset
    takes: ``haircut px max(0, min(r, bal + r))``; 0 for a loss (decide.py's module doc)."""
    return haircut * px * fmax(0.0, fmin(r, bal + r))


cdef int decide_core(const InstrumentRow *instruments, const AccountRow *acct, const PositionRow *slots,
                     const double *marks, const double *asset_px, const double *asset_haircut,
                     const double *asset_scale, int n_assets, double h, int64_t *out,
                     InsPass *table) noexcept nogil:
    """``decide_orders`` on raw pointers: ``out`` has room for ``n_positions`` rows of 4,
    ``table`` for every instrument. -1 when a number leaves the kernel's range.

    Steps: (1) every figure of the account at the prices (``account_values``, per position
    its values and bankruptcy price); (2) isolated positions in breach, each its own
    scope: all of it below bankruptcy, else the least that restores ``iso + upnl >= h MM``;
    (3) when the cross scope is liquidatable: everything below bankruptcy (``E < 0``), else
    positions by benefit ``h MM_usd - realize_cost(upnl)``, largest first (those of
    benefit <= 0 last, by ``MM_usd``; stable), each closed by the least that restores
    ``E - realize_cost(upnl) >= h MM``, until ``E >= h MM`` holds; after each order ``E``
    drops by the cost of the profit it realizes, and the settle balance grows by it
    (decide.py's module doc). With no haircut (or no profit) the benefit is ``h MM_usd``:
    largest requirement first.
    """
    cdef const PositionRow *pos
    cdef const InstrumentRow *ins
    cdef AssetPass w
    cdef AcctValues r
    cdef PosValues v[MAX_SLOTS_DECIDE]
    cdef double bp[MAX_SLOTS_DECIDE]
    cdef double key[MAX_SLOTS_DECIDE]
    cdef int order_of[MAX_SLOTS_DECIDE]
    cdef int group[MAX_SLOTS_DECIDE]
    cdef int n_pos = acct.n_positions, i, j, t, n_cross = 0, n_out = 0
    cdef int ok = 1
    cdef double e, m_total, m_pos, q, x, px_s, iso, kept, mark_n, hc, up, realized
    cdef double bal[MAX_ASSETS]
    cdef int notional_of, s_a
    if n_pos > MAX_SLOTS_DECIDE:
        return -1
    if n_pos == 0:
        return 0
    if True:
        ins_pass_held(table, instruments, acct, slots, marks, asset_px, asset_scale)
        asset_pass_fill(&w, n_assets, asset_px, asset_haircut, asset_scale)
        r = account_values(table, &w, acct, slots)
        for i in range(n_pos):                              # (1) per position, as account_detail
            pos = &slots[i]
            ins = &instruments[pos.instrument]
            px_s = asset_px[ins.settle_asset]
            v[i] = position_values(&table[pos.instrument], pos)
            position_prices(ins, pos, &v[i], &r, px_s, asset_scale[ins.settle_asset], NULL, &bp[i])
        for i in range(n_pos):                              # (2) isolated scopes
            pos = &slots[i]
            if pos.mode != MODE_ISOLATED or not ok:
                continue
            ins = &instruments[pos.instrument]
            iso = <double>pos.isolated_margin / asset_scale[ins.settle_asset]
            e = iso + v[i].upnl
            if e >= v[i].mm or v[i].mm <= 0:
                continue
            q = <double>pos.qty / <double>ins.qty_scale
            if e < 0:
                ok = put_order(out + 4 * n_out, ins, pos.instrument, pos.qty, fabs(q), bp[i],
                               marks[pos.instrument], CODE_LIQ_BELOW_BANKRUPTCY)
            else:
                notional_of = ins.underlying if ins.kind == KIND_OPTION else pos.instrument
                x = close_qty(ins, q, marks[notional_of], 1.0, e, 0.0, h)
                ok = put_order(out + 4 * n_out, ins, pos.instrument, pos.qty, x, bp[i],
                               marks[pos.instrument], CODE_LIQ_ISOLATED_BELOW_MAINTENANCE)
            n_out += ok
        if ok and (r.status & STATUS_LIQUIDATABLE):         # (3) the cross scope
            for t in range(n_assets):
                bal[t] = <double>acct.balance[t] / asset_scale[t]
            for i in range(n_pos):
                if slots[i].mode == MODE_CROSS and slots[i].qty != 0:
                    # the order: largest benefit first, h MM - realize_cost (USD); those whose
                    # closing costs at least what it frees, last, largest MM first
                    s_a = instruments[slots[i].instrument].settle_asset
                    px_s = asset_px[s_a]
                    up = v[i].upnl
                    x = h * v[i].mm * px_s - realize_cost(asset_haircut[s_a], px_s, up, bal[s_a])
                    order_of[n_cross] = i
                    group[n_cross] = 0 if x > 0 else 1
                    key[n_cross] = -x if x > 0 else -v[i].mm * px_s
                    n_cross += 1
            e = r.cross_equity_usd
            if e < 0:
                for j in range(n_cross):
                    i = order_of[j]
                    pos = &slots[i]
                    ins = &instruments[pos.instrument]
                    q = <double>(pos.qty if pos.qty >= 0 else -pos.qty) / <double>ins.qty_scale
                    ok = put_order(out + 4 * n_out, ins, pos.instrument, pos.qty, q, bp[i],
                                   marks[pos.instrument], CODE_LIQ_BELOW_BANKRUPTCY)
                    if not ok:
                        break
                    n_out += 1
            else:
                for j in range(1, n_cross):                 # stable insertion sort, (group, key) ascending
                    t = j
                    while t > 0 and (group[t - 1] > group[t] or (group[t - 1] == group[t] and key[t - 1] > key[t])):
                        key[t - 1], key[t] = key[t], key[t - 1]
                        group[t - 1], group[t] = group[t], group[t - 1]
                        order_of[t - 1], order_of[t] = order_of[t], order_of[t - 1]
                        t -= 1
                m_total = r.cross_mm_usd
                for j in range(n_cross):
                    if e >= h * m_total:
                        break
                    i = order_of[j]
                    pos = &slots[i]
                    ins = &instruments[pos.instrument]
                    s_a = ins.settle_asset
                    px_s = asset_px[s_a]
                    hc = asset_haircut[s_a]
                    up = v[i].upnl
                    q = <double>pos.qty / <double>ins.qty_scale
                    m_pos = v[i].mm * px_s
                    notional_of = ins.underlying if ins.kind == KIND_OPTION else pos.instrument
                    mark_n = marks[notional_of]
                    x = close_qty(ins, q, mark_n, px_s, e - realize_cost(hc, px_s, up, bal[s_a]),
                                  m_total - m_pos, h)
                    if x <= 0:
                        continue
                    ok = put_order(out + 4 * n_out, ins, pos.instrument, pos.qty, x, bp[i],
                                   marks[pos.instrument], CODE_LIQ_BELOW_MAINTENANCE)
                    if not ok:
                        break
                    kept = fmax(0.0, fabs(q) - <double>(out[4 * n_out + 1] if out[4 * n_out + 1] >= 0 else -out[4 * n_out + 1])
                                / <double>ins.qty_scale)
                    n_out += 1
                    m_total = m_total - m_pos + px_s * mm_at(ins, kept, mark_n)
                    realized = up * (1.0 - kept / fabs(q))          # at the mark
                    e -= realize_cost(hc, px_s, realized, bal[s_a])     # 0 for a loss
                    bal[s_a] += realized
    return n_out if ok else -1


ctypedef struct CheckOut:
    int code
    double post_equity_usd
    double post_im_usd


cdef CheckOut pretrade_core(const InstrumentRow *instruments, const AccountRow *acct,
                            const PositionRow *slots, int slots_per_account, int instrument,
                            int64_t dqty, double price, const double *marks, const double *asset_px,
                            const double *asset_haircut, const double *asset_scale,
                            int n_assets, InsPass *table) noexcept nogil:
    """The pre-trade rule (see ``pretrade_check``) on one account row and its slots;
    ``table``: scratch of one InsPass per instrument."""
    cdef const InstrumentRow *ins = &instruments[instrument]
    cdef AcctValues r
    cdef PosValues old, new
    cdef CheckOut out
    cdef int i, slot = -1, mode
    cdef double q_old = 0.0, c_old = 0.0, dq, pnl, px_s, scale_s, iso = 0.0, lack
    cdef double mark = marks[instrument], under = 0.0
    cdef bint reducing, ok
    cdef int64_t qo
    cdef AssetPass w
    ins_pass_held(table, instruments, acct, slots, marks, asset_px, asset_scale)
    asset_pass_fill(&w, n_assets, asset_px, asset_haircut, asset_scale)
    r = account_values(table, &w, acct, slots)
    for i in range(acct.n_positions):
        if slots[i].instrument == instrument:
            slot = i
            break
    scale_s = asset_scale[ins.settle_asset]
    px_s = asset_px[ins.settle_asset]
    if ins.kind == KIND_OPTION:
        under = marks[ins.underlying]
    if slot >= 0:
        q_old = <double>slots[slot].qty / <double>ins.qty_scale
        c_old = <double>slots[slot].cost / scale_s
        mode = slots[slot].mode
        iso = <double>slots[slot].isolated_margin / scale_s
    else:                               # a new position: as the fill rule opens it
        mode = MODE_ISOLATED if ((acct.flags & ACCOUNT_FLAG_ISOLATED_DEFAULT)
                                 and ins.kind != KIND_OPTION) else MODE_CROSS
    out.post_equity_usd = r.cross_equity_usd
    out.post_im_usd = r.cross_im_usd
    if slot < 0 and acct.n_positions >= slots_per_account:
        out.code = CODE_CHECK_POSITION_SLOTS_FULL
        return out
    dq = <double>dqty / <double>ins.qty_scale
    if is_inverse(ins.kind):
        pnl = dq * ins.contract_size * (1.0 / price - 1.0 / mark)
    else:
        pnl = dq * ins.contract_size * (mark - price)
    old = holder_values(ins, q_old, c_old, mark, under)
    new = holder_values(ins, q_old + dq, c_old, mark, under)
    # A pure reduction (no flip), decided in integer units: in doubles, a small order on a
    # position past 2**53 units rounds away (q_old + dq == q_old) and read as one
    qo = slots[slot].qty if slot >= 0 else 0
    reducing = (dqty != 0 and qo != 0 and (dqty < 0) != (qo < 0)
                and (<uint64_t>0 - <uint64_t>dqty if dqty < 0 else <uint64_t>dqty)
                <= (<uint64_t>0 - <uint64_t>qo if qo < 0 else <uint64_t>qo))
    if mode == MODE_CROSS:
        out.post_equity_usd = r.cross_equity_usd + pnl * px_s
        out.post_im_usd = r.cross_im_usd + (new.im - old.im) * px_s
        ok = out.post_equity_usd >= out.post_im_usd
    else:
        lack = new.im - (iso + old.upnl + pnl)
        out.post_equity_usd = r.cross_equity_usd + (iso + old.upnl + pnl) * px_s
        out.post_im_usd = r.cross_im_usd + new.im * px_s
        ok = lack * px_s <= r.cross_equity_usd - r.cross_im_usd
    out.code = CODE_OK if (ok or reducing) else CODE_CHECK_INSUFFICIENT_MARGIN
    return out


def pretrade_check(size_t instruments_addr, size_t account_addr, size_t slots_addr,
                   int slots_per_account, int instrument, int64_t dqty, double price,
                   const double[::1] marks, const double[::1] asset_px,
                   const double[::1] asset_haircut, const double[::1] asset_scale):
    """May the account trade ``dqty`` units of ``instrument`` at ``price``?

    Steps: (1) the account at the current marks; (2) the slot holding the instrument, or
    a free slot (none: POSITION_SLOTS_FULL); (3) the trade's immediate PnL at the mark,
    ``dq cs (mark - price)`` (linear) or ``dq cs (1/price - 1/mark)`` (inverse);
    (4) post-trade requirement with the position at ``q + dq``;
    (5) cross: accept iff ``equity + pnl >= IM - IM_old + IM_new``; isolated: accept iff
    the initial margin the position lacks, ``IM_new - (iso + upnl + pnl)``, fits in the
    free cross margin ``equity - IM``. An order that only reduces a position (no flip)
    is always accepted.

    Returns ``(code, post_equity_usd, post_initial_margin_usd)``.
    """
    cdef CheckOut out
    cdef InsPass *table = <InsPass *>malloc(marks.shape[0] * sizeof(InsPass))
    if table == NULL:
        raise MemoryError()
    with nogil:
        out = pretrade_core(<const InstrumentRow *>instruments_addr, <const AccountRow *>account_addr,
                            <const PositionRow *>slots_addr, slots_per_account, instrument, dqty, price,
                            &marks[0], &asset_px[0], &asset_haircut[0], &asset_scale[0],
                            <int>asset_px.shape[0], table)
    free(table)
    return (out.code, out.post_equity_usd, out.post_im_usd)


def pretrade_check_shared(size_t instruments_addr, size_t account_addr, size_t slots_addr,
                          int slots_per_account, size_t scratch_addr, int instrument, int64_t dqty,
                          double price, const double[::1] marks, const double[::1] asset_px,
                          const double[::1] asset_haircut, const double[::1] asset_scale,
                          int64_t max_tries=100000):
    """``pretrade_check`` for a reader that is not the account's writer (the gateway).

    Copies the account row and its slots into ``scratch`` (one AccountRow followed by
    ``slots_per_account`` PositionRows) under the row's seqlock -- retrying while the
    owner writes -- then runs the rule on the copy. Returns ``(code, equity, IM)``, code
    -1 when no consistent copy was had in ``max_tries``.
    """
    cdef const AccountRow *acct = <const AccountRow *>account_addr
    cdef AccountRow *copy = <AccountRow *>scratch_addr
    cdef PositionRow *slots_copy = <PositionRow *>(scratch_addr + sizeof(AccountRow))
    cdef uint64_t s
    cdef int64_t t
    cdef bint got = False
    cdef CheckOut out
    cdef InsPass *table = <InsPass *>malloc(marks.shape[0] * sizeof(InsPass))
    if table == NULL:
        raise MemoryError()
    out.code = -1
    out.post_equity_usd = 0.0
    out.post_im_usd = 0.0
    with nogil:
        for t in range(max_tries):
            s = me_seqlock_read_begin(&acct.seq)
            if s & 1:
                continue
            memcpy(copy, acct, sizeof(AccountRow))
            memcpy(slots_copy, <const void *>slots_addr, <size_t>slots_per_account * sizeof(PositionRow))
            if not me_seqlock_read_retry(&acct.seq, s):
                got = True
                break
        if got:
            out = pretrade_core(<const InstrumentRow *>instruments_addr, copy, slots_copy,
                                slots_per_account, instrument, dqty, price, &marks[0], &asset_px[0],
                                &asset_haircut[0], &asset_scale[0], <int>asset_px.shape[0], table)
    free(table)
    return (out.code, out.post_equity_usd, out.post_im_usd)


def holder_triggers(size_t instruments_addr, int instrument, const double[:, ::1] basis,
                    size_t holders_addr, const double[::1] h_cost, const double[::1] h_iso, int64_t n,
                    const double[:, ::1] agg, double[::1] out_trigger):
    """Trigger price of every holder of one instrument: the mark at which it breaches.

    At the instrument's basis row (the prices the aggregates are at). Cross:
    ``liquidation_price`` with the rest of the account held at its aggregates,
    ``e0 = equity - upnl``, ``m0 = MM - mm`` in USD (both unchanged by this instrument's
    own moves, so the trigger stays exact while only this mark moves). Isolated:
    ``e0 = iso px_s``, ``m0 = 0``. A long breaches at ``mark <= trigger``, a short at
    ``mark >= trigger``; no trigger is written as -inf (long) / +inf (short). An account
    already in breach at the basis gets its trigger all the same (above the mark for a
    long, below for a short): a tick that moves away from it after it recovered and back
    across it finds it again. (It was written +inf / -inf, "so any tick finds it"; but
    stage 1a searches between the previous mark and the new one, where an infinite
    trigger never is, so once such an account was healthy again only the holders' pass
    found its next breach: at 20 ticks/s most of the benchmark's, 0.5-1.6 ms late.) An
    account in breach with no trigger at all (no root) stays +inf (long) / -inf (short).
    """
    cdef const InstrumentRow *ins = &(<const InstrumentRow *>instruments_addr)[instrument]
    cdef const HolderRec *hold = <const HolderRec *>holders_addr
    cdef InsPass e
    cdef int64_t h, a
    cdef double e0, m0, t, q, px, up, im, mm, c
    cdef bint breached
    with nogil:
        basis_load(&e, ins, &basis[instrument, 0])
        px = e.px_settle
        for h in range(n):
            q = hold[h].qty
            a = hold[h].row
            up = (q * e.x_per_unit + h_cost[h] * e.upnl_per_cost) * px
            if e.long_free and q >= 0:
                mm = 0.0
            else:
                tier_amounts(&e, fabs(q) * e.notional_per_unit, &im, &mm)
                mm = mm * px
            if not isinf(hold[h].key):           # cross
                e0 = agg[a, 0] - up
                m0 = agg[a, 2] - mm
                breached = agg[a, 0] < agg[a, 2] and agg[a, 2] > 0
            else:
                e0 = h_iso[h] * e.per_settle_unit * px
                m0 = 0.0
                breached = e0 + up < mm and mm > 0
            c = h_cost[h] * e.per_settle_unit
            t = liquidation_price(ins, q / <double>ins.qty_scale, c, px, e0, m0)
            if isnan(t):                         # no trigger: never (or, in breach, always)
                t = (INFINITY if q > 0 else -INFINITY) if breached else (-INFINITY if q > 0 else INFINITY)
            out_trigger[h] = t


# ------------------------------------------------------------------ the order-check desk

cdef enum:
    CODE_CHECK_ACCOUNT_BUSY = 4008
    CHECK_COPY_TRIES = 100000


cdef int read_prices(const PriceRow *prices, int n_ins, const AssetRow *assets, int n_assets, int64_t tries,
                     double *marks, uint32_t *flags, uint64_t *price_seqs, uint64_t *tick_seqs, int64_t *tick_ns,
                     double *asset_px, double *asset_haircut, double *asset_scale, bint *assets_moved) noexcept nogil:
    """Every mark and asset price, each row copied under its seqlock (``_checked_snapshot``
    in engine/risk/margin.py is the Python rule): 1 when all are readable, finite and
    > 0, else 0. Assets past ``n_assets`` read as price 0, haircut 0, scale 1. The
    optional outputs (NULL: not wanted) take each row's price sequence number, the tick
    that made the mark, and whether an asset price differs from the one already held."""
    cdef PriceRow pr
    cdef AssetRow ar
    cdef int i
    for i in range(n_ins):
        if me_seqlock_copy(&prices[i], &pr, sizeof(PriceRow), tries) < 0:
            return 0
        if not (isfinite(pr.mark) and pr.mark > 0):
            return 0
        marks[i] = pr.mark
        flags[i] = pr.flags
        if price_seqs != NULL:
            price_seqs[i] = pr.price_seq
        if tick_seqs != NULL:
            tick_seqs[i], tick_ns[i] = pr.tick_seq, pr.ts_ns
    for i in range(MAX_ASSETS):
        if i >= n_assets:
            asset_px[i], asset_haircut[i], asset_scale[i] = 0.0, 0.0, 1.0
            continue
        if me_seqlock_copy(&assets[i], &ar, sizeof(AssetRow), tries) < 0:
            return 0
        if not (isfinite(ar.price_usd) and ar.price_usd > 0):
            return 0
        if assets_moved != NULL and ar.price_usd != asset_px[i]:
            assets_moved[0] = True
        asset_px[i] = ar.price_usd
        asset_haircut[i] = ar.haircut
        asset_scale[i] = <double>ar.scale
    return 1


def merge_runs(const double[::1] src_key, const int64_t[::1] src_val, double[::1] dst_key,
               int64_t[::1] dst_val, int64_t lo, int64_t mid, int64_t hi, int64_t i, int64_t j,
               int64_t limit):
    """Merge the ascending runs ``src[lo:mid]`` and ``src[mid:hi]`` (keys and their values)
    into ``dst[lo:hi]``, resuming with the left run at ``i`` and the right at ``j``, and
    writing at most ``limit`` pairs. A tie takes the left run's pair first (a stable merge).
    Returns ``(i, j)`` after the step: the merge is whole when ``i == mid and j == hi``.

    Out position of the next pair: ``lo + (i - lo) + (j - mid)``. The compare is the one
    branch-free select ``right = key[j] < key[i]`` (sorted triggers interleave at random:
    a branch would mispredict about every other pair). Keys must not be NaN. The caller
    checks ``0 <= lo <= i <= mid <= j <= hi`` within both arrays (``engine.risk.triggersort``).
    """
    cdef int64_t k = lo + (i - lo) + (j - mid)
    cdef int64_t end = k + limit if limit < hi - k else hi
    cdef bint right
    cdef int64_t src
    with nogil:
        while k < end and i < mid and j < hi:
            right = src_key[j] < src_key[i]
            src = j if right else i
            dst_key[k] = src_key[src]
            dst_val[k] = src_val[src]
            j += right
            i += 1 - right
            k += 1
        while k < end and i < mid:
            dst_key[k] = src_key[i]
            dst_val[k] = src_val[i]
            i += 1
            k += 1
        while k < end and j < hi:
            dst_key[k] = src_key[j]
            dst_val[k] = src_val[j]
            j += 1
            k += 1
    return i, j


cdef class CheckDesk:
    """An ORDER_CHECK answered in one C call: the order-check gateway's hot path.

    ``answer(frame, seq, ts_ns)``: (1) parse a well-formed ORDER_CHECK (the strict reader
    of ext/_msgpack.pxi); (2) its account's row (sorted ids, binary search); (3) the
    instrument known, quantity nonzero and below 2**62, price units in 1..2**53 (so the
    price ``units / price_scale`` is the same double Python's true division gives);
    (4) every mark and asset price copied under its seqlock, all finite and > 0, the
    instrument not frozen; (5) the account row and its slots copied under the row's
    seqlock; (6) ``pretrade_core`` on the copy; (7) the ORDER_CHECK_REPLY encoded with
    sequence number ``seq``. Returns the reply's bytes, or None whenever any step does
    not go the common way: the caller then answers through the reference path
    (feeds.protocol decode, engine.risk.margin.pretrade_check_consistent), which gives
    the exact reject. Tests hold the two paths to the same replies.
    """
    cdef object _keep
    cdef const InstrumentRow *instruments
    cdef const AccountRow *accounts
    cdef const PositionRow *positions
    cdef const PriceRow *prices
    cdef const AssetRow *assets
    cdef int slots, n_ins, n_assets
    cdef const int64_t *ids
    cdef const int64_t *rows
    cdef const int64_t *price_scale
    cdef int64_t n_ids, max_size
    cdef double *marks
    cdef uint32_t *flags
    cdef double *asset_px
    cdef double *asset_haircut
    cdef double *asset_scale
    cdef InsPass *table
    cdef uint8_t *scratch

    def __init__(self, size_t instruments_addr, size_t accounts_addr, size_t positions_addr,
                 size_t prices_addr, size_t assets_addr, int slots_per_account, int n_instruments,
                 int n_assets, ids, rows, price_scale, int64_t max_size):
        cdef const int64_t[::1] i = ids
        cdef const int64_t[::1] r = rows
        cdef const int64_t[::1] ps = price_scale
        if i.shape[0] != r.shape[0] or ps.shape[0] != n_instruments or n_instruments < 1 \
                or not 0 <= n_assets <= MAX_ASSETS:
            raise ValueError("CheckDesk: ids/rows of one length, one price scale per instrument")
        self._keep = (ids, rows, price_scale)
        self.instruments = <const InstrumentRow *>instruments_addr
        self.accounts = <const AccountRow *>accounts_addr
        self.positions = <const PositionRow *>positions_addr
        self.prices = <const PriceRow *>prices_addr
        self.assets = <const AssetRow *>assets_addr
        self.slots = slots_per_account
        self.n_ins = n_instruments
        self.n_assets = n_assets
        self.ids = &i[0] if i.shape[0] else NULL
        self.rows = &r[0] if r.shape[0] else NULL
        self.n_ids = i.shape[0]
        self.price_scale = &ps[0]
        self.max_size = max_size
        self.marks = <double *>calloc(n_instruments, sizeof(double))
        self.flags = <uint32_t *>calloc(n_instruments, sizeof(uint32_t))
        self.asset_px = <double *>calloc(MAX_ASSETS, sizeof(double))
        self.asset_haircut = <double *>calloc(MAX_ASSETS, sizeof(double))
        self.asset_scale = <double *>calloc(MAX_ASSETS, sizeof(double))
        self.table = <InsPass *>calloc(n_instruments, sizeof(InsPass))
        self.scratch = <uint8_t *>calloc(1, sizeof(AccountRow) + slots_per_account * sizeof(PositionRow))
        if not (self.marks and self.flags and self.asset_px and self.asset_haircut and self.asset_scale and self.table
                and self.scratch):
            raise MemoryError()

    def __dealloc__(self):
        free(self.marks)
        free(self.flags)
        free(self.asset_px)
        free(self.asset_haircut)
        free(self.asset_scale)
        free(self.table)
        free(self.scratch)

    cdef int _prices(self) noexcept nogil:
        """Step 4: 1 when every price is readable, finite and > 0."""
        return read_prices(self.prices, self.n_ins, self.assets, self.n_assets, CHECK_COPY_TRIES, self.marks,
                           self.flags, NULL, NULL, NULL, self.asset_px, self.asset_haircut, self.asset_scale, NULL)

    def answer(self, frame, uint64_t seq, int64_t ts_ns):
        """The reply's bytes, or None: answer through the reference path (class doc)."""
        cdef bytes raw = frame_bytes(frame)
        cdef const uint8_t *data = <const uint8_t *><const char *>raw
        cdef Py_ssize_t size = len(raw), n_out = 0
        cdef CheckIn c
        cdef CheckOut out
        cdef int64_t row, lo, hi, mid, t
        cdef uint64_t s
        cdef bint ok = False
        cdef uint8_t buf[160]
        cdef AccountRow *copy = <AccountRow *>self.scratch
        cdef PositionRow *slots_copy = <PositionRow *>(self.scratch + sizeof(AccountRow))
        cdef const AccountRow *acct
        cdef double price, eq, im
        with nogil:
            while True:                                            # once; break = fall back
                if size == 0 or not parse_order_check_c(data, size, self.max_size, &c):
                    break
                lo, hi = 0, self.n_ids                              # 2. the account
                while lo < hi:
                    mid = (lo + hi) >> 1
                    if self.ids[mid] < c.account:
                        lo = mid + 1
                    else:
                        hi = mid
                if lo >= self.n_ids or self.ids[lo] != c.account:
                    break
                row = self.rows[lo]
                if not (0 <= c.instrument_id < self.n_ins) or c.qty_units == 0 \
                        or c.qty_units >= (<int64_t>1 << 62) or c.qty_units <= -(<int64_t>1 << 62) \
                        or not (0 < c.price_units <= (<int64_t>1 << 53)):
                    break
                price = <double>c.price_units / <double>self.price_scale[c.instrument_id]
                if not self._prices() or (self.flags[c.instrument_id] & 1):     # frozen
                    break
                acct = &self.accounts[row]                          # 5. consistent copy
                for t in range(CHECK_COPY_TRIES):
                    s = me_seqlock_read_begin(&acct.seq)
                    if s & 1:
                        continue
                    memcpy(copy, acct, sizeof(AccountRow))
                    memcpy(slots_copy, &self.positions[row * self.slots],
                           <size_t>self.slots * sizeof(PositionRow))
                    if not me_seqlock_read_retry(&acct.seq, s):
                        ok = True
                        break
                if not ok:
                    break
                out = pretrade_core(self.instruments, copy, slots_copy, self.slots, <int>c.instrument_id,
                                    c.qty_units, price, self.marks, self.asset_px, self.asset_haircut,
                                    self.asset_scale, MAX_ASSETS, self.table)
                eq = out.post_equity_usd if out.post_equity_usd == out.post_equity_usd else 0.0
                im = out.post_im_usd if out.post_im_usd == out.post_im_usd else 0.0
                n_out = encode_check_reply_c(buf, seq, ts_ns, c.request_id, out.code, eq, im)
                break
        if n_out == 0:
            return None
        return (<char *>buf)[:n_out]


include "_tickpath.pxi"
