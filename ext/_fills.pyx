# cython: language_level=3
"""Fill application kernel: one trade leg moves a position, a balance and a fee pool, exactly.

All arithmetic is on integers (128-bit intermediates, no floating point after the
contract size is turned into a rational once). The checked Python API is
engine/accounting/fills.py; its plain-Python reference (``reference_apply_leg``) is the
oracle the tests hold this kernel to. Every function here assumes clean addresses and
runs without the GIL.

Units: ``δ`` quantity units (1/qty_scale contracts, signed: this account's side), ``P``
price units (1/price_scale quote), ``S`` settle units per 1 settle asset, ``cs`` the
contract size as an exact decimal ``num/den`` (``den = 10**k``, ``k <= 8``, else code 3004).

Trade value (settle units, unsigned, the same for both legs of one trade)::

    linear  (perp, future, option):  V = rhe(|δ| P cs S / (qty_scale price_scale))
    inverse:                         V = rhe(|δ| cs S price_scale / (qty_scale P))

``rhe`` rounds half to even. The constant ``K = Kn/Kd`` (``cs S / (qs ps)`` linear,
``cs S ps / qs`` inverse) is reduced to lowest terms; both parts must fit int64 (3004).

Position ``q`` (units), ``c`` cost (settle units), ``s(x)`` the sign of x:

1. Open / increase (``q == 0`` or ``s(q) == s(δ)``): ``c += s(δ) V``; ``q += δ``.
2. Reduce / close / flip: ``m = min(|δ|, |q|)``;
   ``V_close = V if m == |δ| else rhe(V m / |δ|)``; ``V_open = V - V_close``;
   ``cost_removed = c if m == |q| else rhe(c m / |q|)``;
   ``realized = s(q) V_close - cost_removed`` (linear) or
   ``cost_removed - s(q) V_close`` (inverse); ``c -= cost_removed``; ``q -= s(q) m``;
   if ``|δ| > m`` the rest opens the other way: ``c += s(δ) V_open``,
   ``q += s(δ) (|δ| - m)``. ``q == 0`` implies ``m == |q|`` hence ``c == 0``.
3. Isolated margin: ``isolated_margin += iso_delta`` and ``balance[settle] -= iso_delta``
   (a transfer; a cross position needs ``iso_delta == 0``; a transfer out, ``iso_delta <
   0``, must leave it ``>= 0``; else 3102).
4. Realized PnL: an isolated position's into its isolated margin (``isolated_margin +=
   realized``: its loss never reaches the cross balance while the margin covers it, and
   closing at the mark leaves ``isolated_margin + upnl`` as it was, the liquidation rule's
   premise), a cross position's into ``balance[settle]``. ``balance[settle] -= fee``;
   ``fee_pool[settle] += fee`` (fee < 0: rebate). When ``q`` becomes 0 the slot is
   removed (the last used slot moves into it) and its remaining isolated margin returns to
   ``balance[settle]`` (below zero only when closed past its bankruptcy price: that loss
   reaches the cross balance, as bad debt would).
5. Isolated auto funding (``auto_fund``: the workers' wire fills, ``drain_fill_legs``, and
   the journal replay): a leg given no isolated margin (``iso_delta == 0``) that opens,
   increases or flips an isolated, non-option position (a reduce is left alone, as the
   order check accepts it whatever the margin) moves into its isolated margin, from
   ``balance[settle]``, what it lacks of its initial margin at the trade price::

       N        = V(|q|) at P            (the trade-value formula on the whole new position)
       IM       = ceil(N imr_k - init_amount_k S)   tier k: the last with floor_k <= N / S
       equity   = isolated_margin + s(q) N - c      (linear; after rule 4's realized PnL)
                  isolated_margin + c - s(q) N      (inverse)
       transfer = max(0, IM - equity);  isolated_margin += transfer;  balance[settle] -= transfer

   The tier floats are taken exactly (``m 2**e``) and IM is computed in 128-bit integers
   (``isolated_im_units``), equal to the reference's ``Fraction`` arithmetic. Nothing
   is ever taken out (a reduce that leaves more than IM keeps it); a full close is rule
   4's (the margin comes home). The balance may go below zero (the order check decided
   the trade). An explicit ``iso_delta`` turns the rule off for that leg, as does
   ``auto_fund`` false (the checked API's default).

Conservation (per settle asset, over both legs of a trade)::

    linear:  Q = sum(balance) + sum(isolated_margin) + fee_pool - sum(cost)
    inverse: Q = sum(balance) + sum(isolated_margin) + fee_pool + sum(cost)

Proof: fee and isolated-margin moves (``iso_delta`` and rule 5's transfer, which adds to
``isolated_margin`` what it takes from ``balance``) are transfers inside Q. Linear open moves Q by
``-s(δ) V``; a reduce moves it by ``s(q) V_close - cost_removed + cost_removed - s(δ) V_open
= -s(δ) V`` since ``s(q) = -s(δ)``. Inverse likewise by ``+s(δ) V``. The two legs of one
trade have the same ``V`` and opposite ``δ``, so Q is unchanged exactly.

Checks, in order (a rejected leg changes nothing): ``δ == 0`` or ``δ == INT64_MIN``: 3005;
``P <= 0``: 3006; contract size not an exact decimal or ``K`` too wide: 3004; mode not
-1/0/1: 1008; no slot and none free: 3007; isolated margin rule broken: 3102; any result
(V, realized, q, c, balance, isolated margin, fee pool) outside int64, or q == INT64_MIN
(whose size, |q|, a liquidation must be able to state): 3005; then rule 5's: the
position's notional N outside int64: 3005; a tier floor (past the first), or the chosen
tier's imr or init_amount, not a finite number >= 0: 3004; ``floor(N imr_k)`` or
``floor(init_amount_k S)`` at 2**64 or more: 3005; the funded balance or isolated margin
outside int64: 3005.

Writes to the account row and its slots are bracketed by the account's seqlock; the fee
pool write by the partition row's seqlock (``fee_pool_seq``; NULL: the caller brackets it).
A rejected leg writes nothing, counters included. The caller must not be inside either
seqlock already (a nested write_begin would make the counter even mid-write).
"""

from libc.math cimport rint, isfinite, frexp, ldexp
from libc.stdint cimport int32_t, int64_t, uint64_t, INT64_MAX, INT64_MIN

from _types cimport (InstrumentRow, AssetRow, AccountRow, PositionRow, MAX_ASSETS, MAX_TIERS,
                     KIND_INVERSE_PERP, KIND_INVERSE_FUTURE, KIND_OPTION, MODE_CROSS, MODE_ISOLATED,
                     ACCOUNT_FLAG_ISOLATED_DEFAULT)
from _seqlock cimport me_seqlock_write_begin, me_seqlock_write_end, me_prefetch_rw

cdef extern from *:
    """
    typedef __int128 me_i128;
    typedef unsigned __int128 me_u128;
    """
    ctypedef long long me_i128             # C: signed 128-bit
    ctypedef unsigned long long me_u128    # C: unsigned 128-bit

# Result codes (the numbers of engine.codes.Code).
cdef enum:
    CODE_OK = 0
    CODE_BAD_VALUE = 1008                  # WIRE_BAD_VALUE: mode outside -1/0/1
    CODE_FILL_UNKNOWN_INSTRUMENT = 3004    # contract size not exact / K too wide
    CODE_FILL_BAD_QTY = 3005               # zero size, or any int64 overflow
    CODE_FILL_BAD_PRICE = 3006
    CODE_FILL_POSITION_SLOTS_FULL = 3007
    CODE_COLLATERAL_BAD_AMOUNT = 3102      # isolated margin rule

cdef enum:
    MODE_ACCOUNT_DEFAULT = -1              # mode argument: the account's ISOLATED_DEFAULT flag (options: cross)
    MAX_CS_DECIMALS = 8                    # den = 10**k, k <= 8

ctypedef struct Ratio:                     # K = kn / kd in lowest terms
    int64_t kn
    int64_t kd

ctypedef struct LegOut:
    int code
    int64_t realized                       # settle units
    int64_t value                          # settle units, V


cdef inline bint is_inverse(int kind) noexcept nogil:
    return kind == KIND_INVERSE_PERP or kind == KIND_INVERSE_FUTURE


cdef inline bint fits64(me_i128 x) noexcept nogil:
    return x >= <me_i128>INT64_MIN and x <= <me_i128>INT64_MAX


cdef inline me_u128 gcd_u(me_u128 a, me_u128 b) noexcept nogil:
    cdef me_u128 t
    while b != 0:
        t = a % b
        a = b
        b = t
    return a


cdef inline me_u128 rhe_div(me_u128 n, me_u128 d) noexcept nogil:
    """Return n / d rounded half to even (n < 2**127, 0 < d < 2**127)."""
    cdef me_u128 q = n / d
    cdef me_u128 r2 = (n % d) * 2          # < 2 d < 2**128
    if r2 > d or (r2 == d and (q & 1) == 1):
        q += 1
    return q


cdef inline me_i128 rhe_div_signed(me_i128 n, me_u128 d) noexcept nogil:
    """Signed n / d rounded half to even (symmetric: rhe(-x) == -rhe(x))."""
    if n < 0:
        return -<me_i128>rhe_div(<me_u128>(-n), d)
    return <me_i128>rhe_div(<me_u128>n, d)


cdef int contract_ratio(const InstrumentRow *ins, int64_t settle_scale, Ratio *out) noexcept nogil:
    """Set ``out`` to K in lowest terms; return 0, or 3004 when cs is no exact decimal
    ``num/10**k`` (``k <= 8``, ``num < 2**53``) or a part of K does not fit int64.

    Steps: find the smallest k with ``rint(cs 10**k) / 10**k == cs`` (the same test as
    Python's ``round(cs * 10**k) / 10**k == cs``); reduce every numerator factor against
    every denominator factor (``gcd(a/g, b/g) == 1``, so the result is in lowest terms and
    no factor grows); multiply up, stopping as soon as a product passes INT64_MAX.
    """
    cdef double cs = ins.contract_size, x
    cdef int64_t den = 1
    cdef int k, i, j, n_num, n_den
    cdef me_u128 nums[3]
    cdef me_u128 dens[3]
    cdef me_u128 g, kn = 1, kd = 1
    if not (isfinite(cs) and cs > 0.0) or ins.qty_scale <= 0 or ins.price_scale <= 0 or settle_scale <= 0:
        return CODE_FILL_UNKNOWN_INSTRUMENT
    x = -1.0
    for k in range(MAX_CS_DECIMALS + 1):
        x = rint(cs * <double>den)
        if x >= 1.0 and x < 9007199254740992.0 and x / <double>den == cs:
            break
        x = -1.0
        den *= 10
    if x < 0.0:
        return CODE_FILL_UNKNOWN_INSTRUMENT
    nums[0] = <me_u128><int64_t>x
    nums[1] = <me_u128>settle_scale
    dens[0] = <me_u128>den
    dens[1] = <me_u128>ins.qty_scale
    if is_inverse(ins.kind):
        nums[2] = <me_u128>ins.price_scale     # K = cs S ps / qs
        dens[2] = 1
    else:
        nums[2] = 1                            # K = cs S / (qs ps)
        dens[2] = <me_u128>ins.price_scale
    n_num = 3
    n_den = 3
    for i in range(n_num):
        for j in range(n_den):
            g = gcd_u(nums[i], dens[j])
            nums[i] = nums[i] / g
            dens[j] = dens[j] / g
    for i in range(n_num):
        kn = kn * nums[i]                      # both < 2**63 before the check below
        if kn > <me_u128>INT64_MAX:
            return CODE_FILL_UNKNOWN_INSTRUMENT
    for j in range(n_den):
        kd = kd * dens[j]
        if kd > <me_u128>INT64_MAX:
            return CODE_FILL_UNKNOWN_INSTRUMENT
    out.kn = <int64_t>kn
    out.kd = <int64_t>kd
    return CODE_OK


cdef inline bint trade_value(bint inverse, Ratio r, uint64_t abs_delta, int64_t price,
                             int64_t *v_out) noexcept nogil:
    """Set ``v_out`` to V (module docstring); return False when V exceeds INT64_MAX.

    Linear: ``V = rhe(A kn / kd)`` with ``A = |δ| P < 2**126`` split as
    ``A = q1 kd + r1``: ``A kn / kd = q1 kn + r1 kn / kd`` (each product < 2**126).
    Inverse: ``V = rhe(|δ| kn / (kd P))``, numerator and denominator < 2**126.
    """
    cdef me_u128 a, q1, r1, hi, t, v, r2, kd = <me_u128>r.kd, kn = <me_u128>r.kn
    if inverse:
        v = rhe_div(<me_u128>abs_delta * kn, kd * <me_u128>price)
    else:
        a = <me_u128>abs_delta * <me_u128>price
        q1 = a / kd
        r1 = a % kd
        if q1 > <me_u128>INT64_MAX:
            return False                       # V >= q1 kn >= q1
        hi = q1 * kn
        if hi > <me_u128>INT64_MAX:
            return False
        t = r1 * kn
        v = hi + t / kd
        r2 = (t % kd) * 2                      # rounding: half to even on the remainder
        if r2 > kd or (r2 == kd and (v & 1) == 1):
            v += 1
    if v > <me_u128>INT64_MAX:
        return False
    v_out[0] = <int64_t>v
    return True


cdef inline int find_slot(const PositionRow *slots, int n, int instrument) noexcept nogil:
    cdef int i
    for i in range(n):
        if slots[i].instrument == instrument:
            return i
    return -1



# ---------------------------------------------------------------- isolated auto funding
cdef inline bint dbl_parts(double x, uint64_t *m, int *e) noexcept nogil:
    """``x = m 2**e`` exactly (``m < 2**53``); False when ``x`` is not finite or is < 0."""
    cdef int ex
    cdef double f
    if not (isfinite(x) and x >= 0.0):
        return False
    if x == 0.0:
        m[0] = 0
        e[0] = 0
        return True
    f = frexp(x, &ex)                      # x = f 2**ex, f in [0.5, 1), at most 53 bits
    m[0] = <uint64_t>ldexp(f, 53)          # exact: an integer below 2**53
    e[0] = ex - 53
    return True


cdef inline int bitlen_u(me_u128 x) noexcept nogil:
    cdef int n = 0
    while x != 0:
        x >>= 1
        n += 1
    return n


cdef inline bint floor_at_or_below(uint64_t mf, int ef, int64_t scale, int64_t n) noexcept nogil:
    """``mf 2**ef <= n / scale`` exactly, i.e. ``mf scale 2**ef <= n`` (``0 <= n < 2**63``)."""
    cdef me_u128 pf = <me_u128>mf * <me_u128>scale       # < 2**116
    cdef me_u128 c
    cdef int k
    if pf == 0:
        return True
    if ef >= 0:
        if ef >= 63:
            return False                                  # pf 2**ef >= 2**63 > n
        return pf <= (<me_u128>n >> ef)                   # integers: x 2**e <= n <=> x <= floor(n / 2**e)
    k = -ef
    if k > 127:
        c = 1                                             # 0 < pf / 2**k < 1: its ceiling
    else:
        c = (pf + ((<me_u128>1) << k) - 1) >> k           # ceil(pf / 2**k) <= n <=> pf / 2**k <= n
    return c <= <me_u128>n


cdef inline bint split_dyadic(me_u128 p, int e, me_u128 *ip, me_u128 *r, int *k) noexcept nogil:
    """``p 2**e = ip + r / 2**k`` with ``0 <= r < 2**k`` (``p < 2**117``); False when
    ``ip >= 2**64``."""
    if e >= 0:
        if p != 0 and (e >= 64 or (p >> (64 - e)) != 0):
            return False
        ip[0] = p << e
        r[0] = 0
        k[0] = 0
        return True
    k[0] = -e
    if k[0] >= 128:
        ip[0] = 0
        r[0] = p
    else:
        ip[0] = p >> k[0]
        r[0] = p & (((<me_u128>1) << k[0]) - 1)
    return (ip[0] >> 64) == 0


cdef inline bint frac_gt(me_u128 ra, int ka, me_u128 rb, int kb) noexcept nogil:
    """``ra / 2**ka > rb / 2**kb`` exactly (both below 1, ``ra, rb < 2**117``)."""
    cdef int la, lb
    if ra == 0:
        return False
    if rb == 0:
        return True
    la = bitlen_u(ra) - ka                 # ra / 2**ka in [2**(la-1), 2**la)
    lb = bitlen_u(rb) - kb
    if la != lb:
        return la > lb
    if ka <= kb:                           # bitlen(ra) + kb - ka == bitlen(rb) <= 117: no overflow
        return (ra << (kb - ka)) > rb
    return ra > (rb << (ka - kb))


cdef int isolated_im_units(const InstrumentRow *ins, int64_t scale, int64_t n,
                           me_i128 *im_out) noexcept nogil:
    """``ceil(n imr_k - init_amount_k scale)``, exactly, for the tier ``k`` of notional
    ``n / scale`` (``n`` settle units, ``0 <= n < 2**63``): the last tier with
    ``floor_k <= n / scale`` (tier 0 when none). Each float64 is ``m 2**e`` exactly; the
    two products ``n m`` and ``m scale`` are below 2**116; each is split into its integer
    part and a binary fraction, so ``ceil(A - B) = floor(A) - floor(B) + (frac(A) > frac(B))``.
    Returns 0; 3004 when a tier floor (past the first) or the chosen tier's imr or
    init_amount is not a finite number >= 0; 3005 when ``floor(n imr)`` or
    ``floor(init_amount scale)`` is 2**64 or more.
    """
    cdef int t, kk = 0, nt = ins.n_tiers, ef, ea, eb, fa, fb
    cdef uint64_t mf, ma, mb
    cdef me_u128 ia, ra, ib, rb
    if nt > MAX_TIERS:
        nt = MAX_TIERS
    for t in range(1, nt):
        if not dbl_parts(ins.tier_floor[t], &mf, &ef):
            return CODE_FILL_UNKNOWN_INSTRUMENT
        if floor_at_or_below(mf, ef, scale, n):
            kk = t
    if not dbl_parts(ins.tier_imr[kk], &ma, &ea) or not dbl_parts(ins.tier_init_amount[kk], &mb, &eb):
        return CODE_FILL_UNKNOWN_INSTRUMENT
    if not split_dyadic(<me_u128>n * <me_u128>ma, ea, &ia, &ra, &fa):
        return CODE_FILL_BAD_QTY
    if not split_dyadic(<me_u128>mb * <me_u128>scale, eb, &ib, &rb, &fb):
        return CODE_FILL_BAD_QTY
    im_out[0] = <me_i128>ia - <me_i128>ib + (1 if frac_gt(ra, fa, rb, fb) else 0)
    return CODE_OK


cdef LegOut apply_leg_c(const InstrumentRow *instruments, const AssetRow *assets,
                        AccountRow *acct, PositionRow *slots, int slots_per_account,
                        int64_t *fee_pool, uint64_t *fee_pool_seq, int instrument,
                        int64_t delta, int64_t price, int64_t fee, int mode,
                        int64_t iso_delta, bint auto_fund) noexcept nogil:
    """Apply one leg (module docstring); on any reject change nothing.

    Steps: (1) check δ, P, the instrument ratio and the mode; (2) find or allocate the
    slot; (3) compute every new value in 128 bits and check it fits int64, then the
    isolated auto funding (rule 5: ``auto_fund``, ``iso_delta == 0``, an isolated non-option
    position left open); (4) write the account row and its slots under the account's
    seqlock, then the fee pool.
    """
    cdef LegOut out
    cdef const InstrumentRow *ins = &instruments[instrument]
    cdef int settle = ins.settle_asset
    cdef bint inv = is_inverse(ins.kind)
    cdef Ratio ratio
    cdef int n = acct.n_positions, slot, pos_mode, code
    cdef me_i128 q0 = 0, c0 = 0, iso0 = 0, q, c, iso, bal, pool, realized = 0
    cdef me_i128 sd, sq, cost_removed, v_close, v_open
    cdef uint64_t ad, aq, m
    cdef int64_t v, notional
    cdef me_i128 im, equity
    cdef bint closed
    out.code = CODE_OK
    out.realized = 0
    out.value = 0
    # (1) arguments
    if delta == 0 or delta == INT64_MIN:
        out.code = CODE_FILL_BAD_QTY
        return out
    if price <= 0:
        out.code = CODE_FILL_BAD_PRICE
        return out
    code = contract_ratio(ins, assets[settle].scale, &ratio)
    if code != CODE_OK:
        out.code = code
        return out
    if mode != MODE_ACCOUNT_DEFAULT and mode != MODE_CROSS and mode != MODE_ISOLATED:
        out.code = CODE_BAD_VALUE
        return out
    # (2) slot: an existing position keeps its mode; a new one takes ``mode``
    slot = find_slot(slots, n, instrument)
    if slot >= 0:
        q0 = slots[slot].qty
        c0 = slots[slot].cost
        iso0 = slots[slot].isolated_margin
        pos_mode = slots[slot].mode
    else:
        if n >= slots_per_account:
            out.code = CODE_FILL_POSITION_SLOTS_FULL
            return out
        if mode == MODE_ACCOUNT_DEFAULT:       # an option is cross whatever the account's default
            pos_mode = MODE_ISOLATED if ((acct.flags & ACCOUNT_FLAG_ISOLATED_DEFAULT)
                                         and ins.kind != KIND_OPTION) else MODE_CROSS
        else:
            pos_mode = mode
    iso = iso0 + <me_i128>iso_delta
    if (pos_mode != MODE_ISOLATED and iso_delta != 0) or (iso_delta < 0 and iso < 0):
        out.code = CODE_COLLATERAL_BAD_AMOUNT
        return out
    # (3) new values, 128-bit, then range checks
    ad = <uint64_t>(-delta) if delta < 0 else <uint64_t>delta
    if not trade_value(inv, ratio, ad, price, &v):
        out.code = CODE_FILL_BAD_QTY
        return out
    sd = 1 if delta > 0 else -1
    q = q0
    c = c0
    if q0 == 0 or (q0 > 0) == (delta > 0):
        c = c0 + sd * v                                   # open / increase
        q = q0 + <me_i128>delta
    else:
        sq = -sd
        aq = <uint64_t>(-q0) if q0 < 0 else <uint64_t>q0   # q0 != INT64_MIN: stored q fits
        m = ad if ad < aq else aq
        if m == ad:
            v_close = v
        else:
            v_close = <me_i128>rhe_div(<me_u128>v * <me_u128>m, <me_u128>ad)
        v_open = v - v_close
        if m == aq:
            cost_removed = c0
        else:
            cost_removed = rhe_div_signed(c0 * <me_i128>m, <me_u128>aq)
        if inv:
            realized = cost_removed - sq * v_close
        else:
            realized = sq * v_close - cost_removed
        c = c0 - cost_removed
        q = q0 - sq * <me_i128>m
        if ad > m:
            c = c + sd * v_open
            q = q + sd * <me_i128>(ad - m)
    closed = q == 0
    # q == 0 only when m == |q0| and m == |δ|: cost_removed == c0, nothing reopened.
    bal = <me_i128>acct.balance[settle] - <me_i128>fee - <me_i128>iso_delta
    if pos_mode == MODE_ISOLATED:
        iso = iso + realized                              # isolated PnL stays in its margin
    else:
        bal = bal + realized
    if closed:
        bal = bal + iso                                   # the isolated margin comes home
    pool = <me_i128>fee_pool[settle] + <me_i128>fee
    if not (fits64(realized) and fits64(q) and q != <me_i128>INT64_MIN and fits64(c) and fits64(iso)
            and fits64(bal) and fits64(pool)):        # q -2**63: |q| (a liquidation's size) is no int64
        out.code = CODE_FILL_BAD_QTY
        return out
    # (3b) isolated auto funding: the initial margin the position lacks at P, from the balance
    # (only a leg that opens, increases or flips the position: a reduce pulls nothing in)
    if (auto_fund and iso_delta == 0 and pos_mode == MODE_ISOLATED and not closed and ins.kind != KIND_OPTION
            and (q0 == 0 or (q0 > 0) == (delta > 0) or (q > 0) != (q0 > 0))):
        aq = <uint64_t>(-q) if q < 0 else <uint64_t>q     # q fits int64, not INT64_MIN
        if not trade_value(inv, ratio, aq, price, &notional):
            out.code = CODE_FILL_BAD_QTY
            return out
        code = isolated_im_units(ins, assets[settle].scale, notional, &im)
        if code != CODE_OK:
            out.code = code
            return out
        sq = 1 if q > 0 else -1
        if inv:
            equity = iso + c - sq * <me_i128>notional
        else:
            equity = iso + sq * <me_i128>notional - c
        if im > equity:
            iso = iso + (im - equity)
            bal = bal - (im - equity)
            if not (fits64(iso) and fits64(bal)):
                out.code = CODE_FILL_BAD_QTY
                return out
    # (4) writes
    me_seqlock_write_begin(&acct.seq)
    acct.balance[settle] = <int64_t>bal
    if closed:
        if slot >= 0:
            slots[slot] = slots[n - 1]                    # keep used slots compact
            slots[n - 1].instrument = 0
            slots[n - 1].mode = 0
            slots[n - 1].qty = 0
            slots[n - 1].cost = 0
            slots[n - 1].isolated_margin = 0
            acct.n_positions = n - 1
    else:
        if slot < 0:
            slot = n
            acct.n_positions = n + 1
            slots[slot].instrument = instrument
            slots[slot].mode = pos_mode
        slots[slot].qty = <int64_t>q
        slots[slot].cost = <int64_t>c
        slots[slot].isolated_margin = <int64_t>iso
    me_seqlock_write_end(&acct.seq)
    if fee_pool_seq != NULL:
        me_seqlock_write_begin(fee_pool_seq)
    fee_pool[settle] = <int64_t>pool
    if fee_pool_seq != NULL:
        me_seqlock_write_end(fee_pool_seq)
    out.realized = <int64_t>realized
    out.value = v
    return out


def apply_leg(size_t instruments_addr, size_t assets_addr, size_t account_addr, size_t slots_addr,
              int slots_per_account, size_t fee_pool_addr, int instrument, int64_t delta_units,
              int64_t price_units, int64_t fee_units, int mode=-1,
              int64_t isolated_margin_delta_units=0, size_t fee_pool_seq_addr=0, bint auto_fund=False):
    """Apply one trade leg to one account; return ``(code, realized_units, value_units)``.

    ``fee_pool_addr`` points at the partition's ``fee_pool[MAX_ASSETS]``,
    ``fee_pool_seq_addr`` at that partition row's seqlock counter (0: the caller brackets
    the fee pool write). ``mode`` -1 takes the account's ISOLATED_DEFAULT flag for a new
    position, but for an option, which is then cross: an isolated long option's initial
    margin (its premium) would be reserved by nothing, since the order check and
    withdrawals weigh cross figures. ``auto_fund``: a leg given no isolated margin
    (``isolated_margin_delta_units == 0``) that leaves an isolated position open funds it
    from the balance up to its initial margin at the trade price (rule 5 of the module
    docstring). See the module docstring.
    """
    cdef LegOut r
    with nogil:
        r = apply_leg_c(<const InstrumentRow *>instruments_addr, <const AssetRow *>assets_addr,
                        <AccountRow *>account_addr, <PositionRow *>slots_addr, slots_per_account,
                        <int64_t *>fee_pool_addr, <uint64_t *>fee_pool_seq_addr, instrument,
                        delta_units, price_units, fee_units, mode, isolated_margin_delta_units,
                        auto_fund)
    return r.code, r.realized, r.value


cdef enum:
    LEGS_AHEAD = 16                 # apply_legs_batch prefetches the account this many legs ahead
    DRAIN_AHEAD = 4                 # drain_fill_legs, this many records ahead


def apply_legs_batch(size_t instruments_addr, size_t assets_addr, size_t accounts_addr,
                     size_t positions_addr, int slots_per_account, size_t partitions_addr,
                     int64_t partition_stride, int64_t fee_pool_offset, const int64_t[::1] rows,
                     const int32_t[::1] instruments, const int64_t[::1] deltas,
                     const int64_t[::1] prices, const int64_t[::1] fees, const int32_t[::1] modes,
                     const int64_t[::1] iso_deltas, int32_t[::1] out_codes,
                     int64_t[::1] out_realized, int64_t[::1] out_value, bint auto_fund=False):
    """Apply legs ``0..n-1`` in order (each as ``apply_leg``, ``auto_fund`` for every
    leg); return how many were OK.

    Leg ``i`` acts on account row ``rows[i]``; its fees go to the fee pool of that
    account's partition row (``partitions_addr + partition * partition_stride``, the pool
    ``fee_pool_offset`` bytes into it), written under that row's seqlock (its first field).
    Invariant: after leg ``i`` the store equals applying legs ``0..i`` one by one.
    """
    cdef Py_ssize_t i, n = rows.shape[0]
    cdef int64_t n_ok = 0
    cdef AccountRow *acct
    cdef LegOut r
    cdef size_t prow
    cdef const InstrumentRow *ins_tab = <const InstrumentRow *>instruments_addr
    cdef const AssetRow *asset_tab = <const AssetRow *>assets_addr
    cdef size_t ahead
    with nogil:
        for i in range(n):
            if i + LEGS_AHEAD < n:       # legs of a replay hit random accounts: ask for the
                ahead = <size_t>rows[i + LEGS_AHEAD]     # rows 8 legs ahead (~3x the legs/s)
                me_prefetch_rw(<void *>(accounts_addr + ahead * sizeof(AccountRow)))
                me_prefetch_rw(<void *>(accounts_addr + ahead * sizeof(AccountRow) + 64))
                me_prefetch_rw(<void *>(positions_addr + ahead * <size_t>slots_per_account * sizeof(PositionRow)))
                me_prefetch_rw(<void *>(positions_addr + ahead * <size_t>slots_per_account * sizeof(PositionRow)
                                        + 64))
            acct = <AccountRow *>(accounts_addr + <size_t>rows[i] * sizeof(AccountRow))
            prow = partitions_addr + <size_t>acct.partition * <size_t>partition_stride
            r = apply_leg_c(ins_tab, asset_tab, acct,
                            <PositionRow *>(positions_addr + <size_t>rows[i] * <size_t>slots_per_account
                                            * sizeof(PositionRow)),
                            slots_per_account,
                            <int64_t *>(prow + <size_t>fee_pool_offset), <uint64_t *>prow,
                            instruments[i], deltas[i], prices[i], fees[i], modes[i], iso_deltas[i],
                            auto_fund)
            out_codes[i] = r.code
            out_realized[i] = r.realized
            out_value[i] = r.value
            if r.code == CODE_OK:
                n_ok += 1
    return n_ok


def contract_ratio_of(size_t instrument_addr, size_t assets_addr):
    """``(code, kn, kd)``: the instrument's K in lowest terms (for the checked API and tests)."""
    cdef const InstrumentRow *ins = <const InstrumentRow *>instrument_addr
    cdef Ratio r
    cdef int code
    r.kn = 0
    r.kd = 0
    code = contract_ratio(ins, (<const AssetRow *>assets_addr)[ins.settle_asset].scale, &r)
    return code, r.kn, r.kd


def isolated_im_of(size_t instrument_addr, size_t assets_addr, int64_t notional_units):
    """``(code, im_units)``: ``isolated_im_units`` of one instrument row (tests; the
    reference is ``engine.accounting.fills.reference_isolated_im``)."""
    cdef const InstrumentRow *ins = <const InstrumentRow *>instrument_addr
    cdef me_i128 im = 0
    cdef int code
    if notional_units < 0:
        raise ValueError("notional_units must be >= 0")
    code = isolated_im_units(ins, (<const AssetRow *>assets_addr)[ins.settle_asset].scale,
                             notional_units, &im)
    return code, (int(<int64_t>(im >> 64)) << 64) + int(<uint64_t>im)   # exact, im >= -2**65


# ---------------------------------------------------------------- ring drain (worker)
from libc.string cimport memcpy
from _types cimport RingRecord, RingHeader
from _seqlock cimport me_atomic_load_u64, me_atomic_store_u64

cdef enum:
    RECORD_FILL_LEG = 1                    # engine.runtime.ctl.RecordKind.FILL_LEG
    UNDO_IDLE = 0
    UNDO_APPLYING = 1


def drain_fill_legs(size_t instruments_addr, size_t assets_addr, size_t accounts_addr,
                    size_t positions_addr, int slots_per_account, size_t partition_addr,
                    int64_t fee_pool_offset, size_t ring_addr, size_t records_addr,
                    size_t undo_addr, int64_t undo_account_offset, int64_t undo_slots_offset,
                    int64_t undo_fee_offset, int64_t max_records, int64_t[::1] out_rows,
                    int32_t[::1] out_codes, size_t out_records_addr):
    """Apply the run of FILL_LEG records at the head of a partition's ring (worker side).

    For each record, the undo protocol of engine/runtime/ctl.py, in C: (1) copy the
    account row, its slots and the partition's fee pool into the undo area, note the
    row and the ring index, mark it *applying*; (2) apply the leg (``apply_leg_c``);
    (3) commit the ring's read index past the record; (4) mark the undo area *idle*.
    A crash between (1) and (3) is rolled back by the next owner and the record applied
    again; after (3) the record is done. Each leg takes the account's default mode and
    is auto funded (rule 5 of the module docstring: the wire carries no isolated margin).
    Stops at the first record of another kind, at
    ``max_records``, or at the producer's write index.

    Returns ``(n_applied, n_ok)``; ``out_rows[i]``/``out_codes[i]`` are record ``i``'s
    account row and result code, and ``out_records_addr`` (an array of at least
    ``len(out_rows)`` ring records, ``engine.runtime.ctl.RECORD``) takes a copy of each
    record, made before (3): once the read index passes a slot the producer may write
    it again, so nothing is read from the ring after (3) -- the caller reads the copies.
    """
    cdef const InstrumentRow *ins_tab = <const InstrumentRow *>instruments_addr
    cdef const AssetRow *asset_tab = <const AssetRow *>assets_addr
    cdef RingHeader *ring = <RingHeader *>ring_addr
    cdef const RingRecord *recs = <const RingRecord *>records_addr
    cdef RingRecord *copies = <RingRecord *>out_records_addr
    cdef const RingRecord *rec
    cdef uint64_t *undo_state = <uint64_t *>undo_addr
    cdef uint64_t *undo_ref = <uint64_t *>(undo_addr + 8)
    cdef int64_t *undo_row = <int64_t *>(undo_addr + 16)
    cdef uint64_t r, w, mask = <uint64_t>(ring.capacity - 1)
    cdef int64_t n = 0, n_ok = 0, cap = min(max_records, out_rows.shape[0])
    cdef AccountRow *acct
    cdef PositionRow *slots
    cdef int64_t *fee_pool = <int64_t *>(partition_addr + <size_t>fee_pool_offset)
    cdef LegOut res
    cdef size_t ahead
    with nogil:
        r = ring.read_idx
        w = me_atomic_load_u64(&ring.write_idx)
        while r < w and n < cap:
            if recs[r & mask].kind != RECORD_FILL_LEG:
                break
            memcpy(&copies[n], &recs[r & mask], sizeof(RingRecord))   # before (3): the slot is
            rec = &copies[n]                                           # the producer's after it
            if r + DRAIN_AHEAD < w:        # the account DRAIN_AHEAD records on (random rows)
                ahead = <size_t>recs[(r + DRAIN_AHEAD) & mask].row
                me_prefetch_rw(<void *>(accounts_addr + ahead * sizeof(AccountRow)))
                me_prefetch_rw(<void *>(accounts_addr + ahead * sizeof(AccountRow) + 64))
                me_prefetch_rw(<void *>(positions_addr + ahead * <size_t>slots_per_account * sizeof(PositionRow)))
                me_prefetch_rw(<void *>(positions_addr + ahead * <size_t>slots_per_account * sizeof(PositionRow)
                                        + 64))
            acct = <AccountRow *>(accounts_addr + <size_t>rec.row * sizeof(AccountRow))
            slots = <PositionRow *>(positions_addr + <size_t>rec.row * <size_t>slots_per_account
                                    * sizeof(PositionRow))
            undo_row[0] = rec.row                                          # (1)
            undo_ref[0] = r
            memcpy(<void *>(undo_addr + <size_t>undo_account_offset), acct, sizeof(AccountRow))
            memcpy(<void *>(undo_addr + <size_t>undo_slots_offset), slots,
                   <size_t>slots_per_account * sizeof(PositionRow))
            memcpy(<void *>(undo_addr + <size_t>undo_fee_offset), fee_pool, MAX_ASSETS * sizeof(int64_t))
            me_atomic_store_u64(undo_state, UNDO_APPLYING)
            res = apply_leg_c(ins_tab, asset_tab, acct, slots, slots_per_account, fee_pool,   # (2)
                              <uint64_t *>partition_addr, rec.instrument, rec.delta, rec.price,
                              rec.fee, MODE_ACCOUNT_DEFAULT, 0, True)   # auto funding: the wire carries
                                                                         # no isolated margin
            r += 1
            me_atomic_store_u64(&ring.read_idx, r)                         # (3)
            me_atomic_store_u64(undo_state, UNDO_IDLE)                     # (4)
            out_rows[n] = rec.row
            out_codes[n] = res.code
            if res.code == CODE_OK:
                n_ok += 1
            n += 1
    return n, n_ok
