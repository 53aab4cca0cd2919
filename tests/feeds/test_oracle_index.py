"""MarkPriceCalculator: median index, outlier exclusion, staleness, quorum, basis, rejects."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.codes import Code
from feeds.oracle.index import MarkPriceCalculator, OracleParams, median

S = 1_000_000_000  # ns per second
BTC = "BTC-USD"
REGISTRY_BTC_ABCD = {BTC: frozenset({"a", "b", "c", "d"})}


def calc_with(ticks, params=None):
    """Build a calculator and apply ``(venue, price, ts_s)`` ticks (now = venue ts)."""
    calc = MarkPriceCalculator(params or OracleParams())
    for venue, price, ts_s in ticks:
        code, _ = calc.on_tick(BTC, venue, price, int(ts_s * S), int(ts_s * S))
        assert code is Code.OK
    return calc


@pytest.mark.parametrize("values, expected", [
    pytest.param([101.0], 101.0, id="one"),
    pytest.param([103.0, 100.0, 101.0], 101.0, id="odd-middle"),
    pytest.param([99.0, 101.0, 100.0, 100.5], 100.25, id="even-mean-of-two-middle"),
    # 1.7e308 + 0.5 * (1.71e308 - 1.7e308) = 1.705e308; 0.5 * (1.7e308 + 1.71e308) is inf
    # (the sum passes the largest float, 1.797e308)
    pytest.param([1.71e308, 1.7e308], 1.705e308, id="even-near-the-largest-float"),
])
def test_median_table(values, expected):
    assert median(values) == expected


def test_index_is_median_of_three_venues():
    calc = calc_with([("a", 100.0, 0), ("b", 103.0, 0), ("c", 101.0, 0)])
    state = calc.state(BTC, 1 * S)
    assert state.index == 101.0          # sorted 100, 101, 103 -> middle 101
    assert state.mark == 101.0           # no basis sample yet: mark = index
    assert (state.n_fresh, state.n_used, state.frozen) == (3, 3, False)


def test_index_even_count_is_mean_of_two_middle():
    calc = calc_with([("a", 99.0, 0), ("b", 100.0, 0), ("c", 100.5, 0), ("d", 101.0, 0)])
    assert calc.index(BTC, 0) == 100.25  # (100 + 100.5) / 2


def test_prices_near_the_largest_float_give_a_finite_index_and_basis():
    """Two venues at 1.70e308 and 1.71e308: the index is their mean 1.705e308 (it was
    inf: 0.5 * (a + b) overflowed) and live. A basis sample at 1.7e308 is
    1.7e308 - 1.705e308 = -5e305 (within the bound 0.005 * 1.705e308 = 8.5e305), so the
    basis is -5e305 and finite (it was -inf, from an inf index, and stayed so after the
    prices came back: a NaN mark later)."""
    calc = calc_with([("a", 1.70e308, 0), ("b", 1.71e308, 0)])
    state = calc.state(BTC, 0)
    assert (state.index, state.mark, state.frozen) == (1.705e308, 1.705e308, False)
    assert calc.on_basis_sample(BTC, 1.7e308, 0) == (Code.OK, [])
    assert calc._instruments[BTC].basis == 1.7e308 - 1.705e308 and math.isfinite(calc.mark(BTC, 0))
    for venue in ("a", "b"):                   # back to 100: bound 0.5 clamps the basis
        calc.on_tick(BTC, venue, 100.0, 1, 1)
    assert calc.mark(BTC, 1) == 99.5           # 100 + max(-0.5, -5e305)


def test_a_mark_that_would_overflow_freezes_and_is_never_live():
    """Three venues at 1e308, a basis sample at 1.1e308: sample 1e307 clamped to
    0.005 * 1e308 = 5e305, so basis 5e305 and mark 1.005e308. Then every venue goes to
    1.797e308 (max_deviation 1: no exclusion on the way): index 1.797e308, bound
    0.005 * 1.797e308 = 8.985e305 keeps the basis at 5e305, and 1.797e308 + 5e305 = 1.802e308
    is past the largest float (1.7977e308): inf. That mark is never live: the instrument
    freezes at its last good mark 1.005e308 (7001, saying why), and resumes once the venues
    come back down (1.5e308 + 5e305 = 1.505e308)."""
    calc = calc_with([("a", 1e308, 0), ("b", 1e308, 0), ("c", 1e308, 0)], OracleParams(max_deviation=1.0))
    assert calc.on_basis_sample(BTC, 1.1e308, 0) == (Code.OK, [])
    assert calc.mark(BTC, 0) == 1e308 + 5e305
    events = [calc.on_tick(BTC, v, 1.797e308, 1 * S, 1 * S)[1] for v in ("a", "b", "c")]
    assert events[0] == []                     # median(1.797e308, 1e308, 1e308) = 1e308
    assert [e.code for e in events[1]] == [Code.EVENT_PRICE_FROZEN]    # median 1.797e308
    assert "the mark would not be finite" in events[1][0].detail
    state = calc.state(BTC, 1 * S)
    assert (state.frozen, state.index, state.mark) == (True, None, 1e308 + 5e305)
    assert (state.n_used, events[2]) == (3, [])                         # still frozen: no event
    calc.on_tick(BTC, "a", 1.5e308, 2 * S, 2 * S)
    _, events = calc.on_tick(BTC, "b", 1.5e308, 2 * S, 2 * S)          # median 1.5e308
    assert [e.code for e in events] == [Code.EVENT_PRICE_RESUMED]
    assert calc.mark(BTC, 2 * S) == 1.5e308 + 5e305


def test_spike_on_one_venue_is_excluded_then_readmitted_and_mark_does_not_move():
    calc = calc_with([("a", 99.0, 0), ("b", 100.0, 0), ("c", 100.0, 0), ("d", 101.0, 0)])
    assert calc.mark(BTC, 0) == 100.0    # (100 + 100) / 2

    # d spikes +20%: 101 * 1.2 = 121.2; others' median = 100 -> deviation 0.212 > 0.05
    code, events = calc.on_tick(BTC, "d", 121.2, 1 * S, 1 * S)
    assert code is Code.OK
    assert [(e.code, e.venue) for e in events] == [(Code.EVENT_VENUE_EXCLUDED, "d")]
    state = calc.state(BTC, 1 * S)
    assert state.excluded == frozenset({"d"})
    assert state.mark == 100.0           # median(99, 100, 100) = 100: unmoved
    assert state.n_used == 3

    # a second spiked tick is no new transition: no event
    code, events = calc.on_tick(BTC, "d", 121.0, 2 * S, 2 * S)
    assert (code, events) == (Code.OK, [])

    # back within the bound (|101.5 - 100| / 100 = 0.015): readmitted once
    code, events = calc.on_tick(BTC, "d", 101.5, 3 * S, 3 * S)
    assert [(e.code, e.venue) for e in events] == [(Code.EVENT_VENUE_READMITTED, "d")]
    assert calc.state(BTC, 3 * S).excluded == frozenset()
    assert calc.mark(BTC, 3 * S) == 100.0  # median(99, 100, 100, 101.5) = (100 + 100) / 2


def test_spike_with_three_venues_does_not_drag_the_others_out():
    # Against the other two, a good venue's reference would be mean(100, 120) = 110;
    # excluding the worst venue first keeps a and b in.
    calc = calc_with([("a", 100.0, 0), ("b", 100.0, 0), ("c", 100.0, 0)])
    _, events = calc.on_tick(BTC, "c", 120.0, 1 * S, 1 * S)
    assert [(e.code, e.venue) for e in events] == [(Code.EVENT_VENUE_EXCLUDED, "c")]
    assert calc.mark(BTC, 1 * S) == 100.0  # median(100, 100)


def test_two_disagreeing_venues_are_both_excluded_and_freeze():
    calc = calc_with([("a", 100.0, 0), ("b", 100.0, 0)])
    _, events = calc.on_tick(BTC, "b", 110.0, 1 * S, 1 * S)  # 10% apart: who is right?
    assert [e.code for e in events] == [Code.EVENT_VENUE_EXCLUDED, Code.EVENT_VENUE_EXCLUDED,
                                        Code.EVENT_PRICE_FROZEN]
    state = calc.state(BTC, 1 * S)
    assert state.frozen and state.mark == 100.0 and state.index is None


def test_two_venues_quorum_1_the_survivor_of_a_glitch_is_readmitted_once_alone():
    """Quorum 1, venues a and b at 100. b glitches to 150 at 1 s: 50 % apart, both
    excluded, frozen. At 3 s b (age 2 s) is still fresh, so a at 100 is judged against it
    and both stay out. At 7 s b (last tick at 1 s: 6 s > 5 s) is stale: a is the only fresh
    venue, no peer can judge it, so it is readmitted and, quorum 1, the index: 100 (it
    stayed excluded and the price frozen for good, a fresh and right). b, stale, keeps its
    exclusion; back at 100 at 8 s it is judged against a (0 % apart) and readmitted."""
    calc = calc_with([("a", 100.0, 0), ("b", 100.0, 0)], OracleParams(quorum=1))
    _, events = calc.on_tick(BTC, "b", 150.0, 1 * S, 1 * S)
    assert [(e.code, e.venue) for e in events] == [(Code.EVENT_VENUE_EXCLUDED, "a"),
                                                   (Code.EVENT_VENUE_EXCLUDED, "b"),
                                                   (Code.EVENT_PRICE_FROZEN, None)]
    assert calc.on_tick(BTC, "a", 100.0, 3 * S, 3 * S) == (Code.OK, [])
    assert calc.state(BTC, 3 * S).frozen
    code, events = calc.on_tick(BTC, "a", 100.0, 7 * S, 7 * S)
    assert [(e.code, e.venue) for e in events] == [(Code.EVENT_VENUE_READMITTED, "a"),
                                                   (Code.EVENT_PRICE_RESUMED, None)]
    assert "the only fresh venue" in events[0].detail
    state = calc.state(BTC, 7 * S)
    assert (state.index, state.frozen, state.n_used, state.excluded) == (100.0, False, 1, frozenset({"b"}))
    _, events = calc.on_tick(BTC, "b", 100.0, 8 * S, 8 * S)
    assert [(e.code, e.venue) for e in events] == [(Code.EVENT_VENUE_READMITTED, "b")]
    assert calc.state(BTC, 8 * S).index == 100.0


def test_the_timer_readmits_the_only_fresh_venue():
    """The same glitch, with a's last tick at 3 s: no tick comes when b goes stale, and the
    staleness timer at 6.5 s (b 5.5 s old, a 3.5 s) readmits a and resumes the price."""
    calc = calc_with([("a", 100.0, 0), ("b", 100.0, 0)], OracleParams(quorum=1))
    calc.on_tick(BTC, "b", 150.0, 1 * S, 1 * S)
    calc.on_tick(BTC, "a", 100.0, 3 * S, 3 * S)
    assert calc.on_timer(6 * S) == []                       # b 5 s old: still fresh, both out
    events = calc.on_timer(int(6.5 * S))
    assert [(e.code, e.venue) for e in events] == [(Code.EVENT_VENUE_READMITTED, "a"),
                                                   (Code.EVENT_PRICE_RESUMED, None)]
    assert calc.mark(BTC, int(6.5 * S)) == 100.0


def test_a_readmitted_lone_venue_does_not_meet_a_larger_quorum():
    """Quorum 2: c spikes (120 against median(100, 100): 20 % > 5 %) and is excluded at 1 s;
    a and b stop at 0 s. At 5.5 s c is the only fresh venue and is readmitted, but one
    venue is below quorum 2: frozen at the last good mark 100. When a returns at 6 s it is
    judged against c (110 against 120: 8.3 % > 5 %): two that disagree, both out."""
    calc = calc_with([("a", 100.0, 0), ("b", 100.0, 0), ("c", 100.0, 0)])
    _, events = calc.on_tick(BTC, "c", 120.0, 1 * S, 1 * S)
    assert [(e.code, e.venue) for e in events] == [(Code.EVENT_VENUE_EXCLUDED, "c")]
    events = calc.on_timer(int(5.5 * S))
    assert [(e.code, e.venue) for e in events] == [(Code.EVENT_VENUE_READMITTED, "c"),
                                                   (Code.EVENT_PRICE_FROZEN, None)]
    state = calc.state(BTC, int(5.5 * S))
    assert (state.frozen, state.mark, state.n_used, state.excluded) == (True, 100.0, 1, frozenset())
    _, events = calc.on_tick(BTC, "a", 110.0, 6 * S, 6 * S)
    assert [(e.code, e.venue) for e in events] == [(Code.EVENT_VENUE_EXCLUDED, "a"),
                                                   (Code.EVENT_VENUE_EXCLUDED, "c")]
    assert calc.state(BTC, 6 * S).frozen


def test_stale_venue_drops_out():
    calc = calc_with([("a", 100.0, 0), ("b", 101.0, 0), ("c", 105.0, 0),
                      ("a", 100.0, 4), ("b", 101.0, 4)])
    assert calc.index(BTC, 5 * S) == 101.0   # c's age 5 s <= 5 s: still fresh
    state = calc.state(BTC, int(5.5 * S))    # c's age 5.5 s > 5 s: out
    assert state.n_fresh == 2
    assert state.index == 100.5              # (100 + 101) / 2


def test_quorum_loss_freezes_once_and_resumes():
    calc = calc_with([("a", 100.0, 0), ("b", 102.0, 0), ("a", 100.0, 1)])
    assert calc.mark(BTC, 1 * S) == 101.0    # (100 + 102) / 2

    events = calc.on_timer(int(5.5 * S))     # b is 5.5 s old: 1 venue < quorum 2
    assert [e.code for e in events] == [Code.EVENT_PRICE_FROZEN]
    assert events[0].instrument == BTC and events[0].venue is None
    assert events[0].ts_ns == int(5.5 * S)
    assert calc.on_timer(int(5.6 * S)) == []  # once per transition

    state = calc.state(BTC, int(5.6 * S))
    assert state.frozen and state.index is None
    assert state.mark == state.last_good_mark == 101.0

    _, events = calc.on_tick(BTC, "b", 103.0, 6 * S, 6 * S)
    assert [e.code for e in events] == [Code.EVENT_PRICE_RESUMED]
    assert calc.mark(BTC, 6 * S) == 101.5    # (100 + 103) / 2


def fresh_three_venue_calc(params=None):
    return calc_with([("a", 100.0, 0), ("b", 101.0, 0), ("c", 102.0, 0)],
                     params or OracleParams(registry=REGISTRY_BTC_ABCD))


@pytest.mark.parametrize("instrument, venue, price, venue_ts_ns, expected", [
    pytest.param(BTC, "a", float("nan"), 2 * S, Code.ORACLE_BAD_PRICE, id="nan"),
    pytest.param(BTC, "a", 0.0, 2 * S, Code.ORACLE_BAD_PRICE, id="zero"),
    pytest.param(BTC, "a", -1.0, 2 * S, Code.ORACLE_BAD_PRICE, id="negative"),
    pytest.param(BTC, "a", float("inf"), 2 * S, Code.ORACLE_BAD_PRICE, id="inf"),
    pytest.param(BTC, "a", -float("inf"), 2 * S, Code.ORACLE_BAD_PRICE, id="minus-inf"),
    pytest.param(BTC, "a", 10 ** 400, 2 * S, Code.ORACLE_BAD_PRICE, id="int-overflows-float"),
    pytest.param(BTC, "a", "100.5", 2 * S, Code.WIRE_BAD_FIELD_TYPE, id="price-str"),
    pytest.param(BTC, "a", None, 2 * S, Code.WIRE_BAD_FIELD_TYPE, id="price-none"),
    pytest.param(BTC, "a", True, 2 * S, Code.WIRE_BAD_FIELD_TYPE, id="price-bool"),
    pytest.param(7, "a", 100.0, 2 * S, Code.WIRE_BAD_FIELD_TYPE, id="instrument-int"),
    pytest.param(BTC, None, 100.0, 2 * S, Code.WIRE_BAD_FIELD_TYPE, id="venue-none"),
    pytest.param(BTC, "a", 100.0, 2.5 * S, Code.WIRE_BAD_FIELD_TYPE, id="ts-float"),
    pytest.param(BTC, "a", 100.0, -1, Code.ORACLE_TS_BACKWARDS, id="ts-before-last"),
    # now 2 s: 3 s + 1 ns is 1 s + 1 ns ahead > max_future_skew_ns 1 s
    pytest.param(BTC, "a", 100.0, 3 * S + 1, Code.ORACLE_TS_FUTURE, id="ts-future"),
    pytest.param(BTC, "a", 100.0, 2**63 - 1, Code.ORACLE_TS_FUTURE, id="ts-int64-max"),
    pytest.param("ETH-USD", "a", 100.0, 2 * S, Code.ORACLE_UNKNOWN_INSTRUMENT,
                 id="unknown-instrument"),
    pytest.param(BTC, "zz", 100.0, 2 * S, Code.ORACLE_UNKNOWN_VENUE, id="unknown-venue"),
])
def test_bad_tick_is_rejected_and_changes_no_state(instrument, venue, price, venue_ts_ns,
                                                   expected):
    calc = fresh_three_venue_calc()
    now_ns = 2 * S
    before = [calc.state(BTC, t) for t in (now_ns, 4 * S, 6 * S)]

    code, events = calc.on_tick(instrument, venue, price, venue_ts_ns, now_ns)

    assert (code, events) == (expected, [])
    assert calc.reject_counts[expected] == 1
    assert [calc.state(BTC, t) for t in (now_ns, 4 * S, 6 * S)] == before
    assert calc.state("ETH-USD", now_ns).mark is None


def test_tick_stale_on_arrival_is_rejected():
    calc = fresh_three_venue_calc()
    before = calc.state(BTC, 7 * S)
    # sent at 1 s, arrives at 7 s: age 6 s > 5 s
    assert calc.on_tick(BTC, "d", 100.0, 1 * S, 7 * S) == (Code.ORACLE_STALE, [])
    assert calc.state(BTC, 7 * S) == before


def test_a_far_future_tick_is_refused_and_does_not_lock_its_venue_out():
    """Venues a and b quote at 0. b's clock glitches: venue_ts_ns 2**63 - 1 at now 1 ns is
    refused 2007 (it was accepted, and then every later b tick was older than 2**63 - 1:
    2004 for good, and the instrument froze once a alone was left below quorum 2). At 3 s
    and 6 s both venues' ordinary ticks are taken and the index stays live: median(101, 102)
    = 101.5 at 3 s, median(102, 103) = 102.5 at 6 s (the 0 s quotes are stale by then)."""
    calc = calc_with([("a", 100.0, 0), ("b", 100.0, 0)])
    assert calc.on_tick(BTC, "b", 100.0, 2**63 - 1, 1) == (Code.ORACLE_TS_FUTURE, [])
    assert calc.reject_counts == {Code.ORACLE_TS_FUTURE: 1}
    for t, pa, pb, index in ((3, 101.0, 102.0, 101.5), (6, 102.0, 103.0, 102.5)):
        assert calc.on_tick(BTC, "b", pb, t * S, t * S) == (Code.OK, [])
        assert calc.on_tick(BTC, "a", pa, t * S, t * S) == (Code.OK, [])
        state = calc.state(BTC, t * S)
        assert (state.index, state.frozen, state.n_used) == (index, False, 2)


def test_future_skew_boundary():
    """max_future_skew_ns 1 s (the default): a venue clock exactly 1 s ahead of the
    receive time is taken, 1 s + 1 ns is refused; 0 allows no lead at all."""
    calc = MarkPriceCalculator()
    assert calc.on_tick(BTC, "a", 100.0, 1 * S + 1, 1) == (Code.OK, [])                 # lead 1 s
    assert calc.on_tick(BTC, "b", 100.0, 1 * S + 2, 1)[0] is Code.ORACLE_TS_FUTURE   # 1 s + 1 ns
    strict = MarkPriceCalculator(OracleParams(max_future_skew_ns=0))
    assert strict.on_tick(BTC, "a", 100.0, 5, 5)[0] is Code.OK
    assert strict.on_tick(BTC, "a", 100.0, 6, 5)[0] is Code.ORACLE_TS_FUTURE


def test_reject_counts_accumulate_per_code():
    calc = fresh_three_venue_calc()
    for price in (float("nan"), 0.0, -1.0):
        calc.on_tick(BTC, "a", price, 2 * S, 2 * S)
    calc.on_tick(BTC, "a", "x", 2 * S, 2 * S)
    assert calc.reject_counts == {Code.ORACLE_BAD_PRICE: 3, Code.WIRE_BAD_FIELD_TYPE: 1}


def test_basis_sample_is_clamped_so_mark_stays_within_max_basis():
    calc = calc_with([("a", 100.0, 0), ("b", 100.0, 0), ("c", 100.0, 0)])
    # sample 110 - 100 = +10, clamped to 0.005 * 100 = +0.5
    assert calc.on_basis_sample(BTC, 110.0, 0) == (Code.OK, [])
    assert calc.mark(BTC, 0) == 100.5          # 100 + 0.5 = 100 * (1 + 0.005)


def test_basis_is_smoothed_by_half_life():
    params = OracleParams(staleness_ns=120 * S, basis_halflife_ns=60 * S)
    calc = calc_with([("a", 100.0, 0), ("b", 100.0, 0), ("c", 100.0, 0)], params)
    calc.on_basis_sample(BTC, 100.2, 0)        # first sample sets basis = 0.2
    assert calc.mark(BTC, 0) == pytest.approx(100.2)
    calc.on_basis_sample(BTC, 100.4, 60 * S)   # weight 1 - 2**-1 = 0.5: 0.2 + 0.5 * 0.2
    assert calc.mark(BTC, 60 * S) == pytest.approx(100.3)
    calc.on_basis_sample(BTC, 99.0, 120 * S)   # clamp(-1.0) = -0.5: 0.3 + 0.5 * (-0.8)
    assert calc.mark(BTC, 120 * S) == pytest.approx(99.9)


def test_basis_clamp_follows_the_current_index():
    calc = calc_with([("a", 100.0, 0), ("b", 100.0, 0), ("c", 100.0, 0)])
    calc.on_basis_sample(BTC, 100.5, 0)        # basis 0.5 = the bound at index 100
    for venue in ("a", "b", "c"):              # index halves: bound 0.005 * 50 = 0.25
        calc.on_tick(BTC, venue, 50.0, 1 * S, 1 * S)
    assert calc.mark(BTC, 1 * S) == 50.25      # 50 + min(0.5, 0.25)


def test_basis_sample_without_index_is_rejected():
    calc = MarkPriceCalculator()
    assert calc.on_basis_sample(BTC, 100.0, 0) == (Code.ORACLE_NO_INDEX, [])
    assert calc.on_basis_sample(BTC, float("nan"), 0) == (Code.ORACLE_BAD_PRICE, [])
    assert calc.on_basis_sample(BTC, "100", 0) == (Code.WIRE_BAD_FIELD_TYPE, [])


# -- property: any sequence of (possibly garbage) ticks keeps the mark in bounds ------

VENUES = ["a", "b", "c", "d", "e"]
GARBAGE = st.one_of(st.none(), st.text(max_size=3), st.booleans(),
                    st.lists(st.integers(), max_size=2))
GOOD_PRICES = st.one_of(st.floats(min_value=95.0, max_value=105.0),
                        st.floats(min_value=50.0, max_value=200.0))
BAD_PRICES = st.one_of(st.floats(allow_nan=True, allow_infinity=True),
                       st.integers(min_value=-10, max_value=10 ** 400), GARBAGE)
STEP_NS = st.integers(-1 * S, 3 * S)           # the caller's clock may even step back
VALID_TICK = st.tuples(st.just("tick"), st.just(BTC), st.sampled_from(VENUES), GOOD_PRICES,
                       st.integers(-2 * S, 0), STEP_NS)
GARBAGE_TICK = st.tuples(st.just("tick"), st.sampled_from([BTC, "ETH-USD", 3]),
                         st.one_of(st.sampled_from(VENUES), GARBAGE),
                         st.one_of(GOOD_PRICES, BAD_PRICES),
                         st.one_of(st.integers(-9 * S, 3 * S), GARBAGE), STEP_NS)
BASIS = st.tuples(st.just("basis"), st.just(BTC), st.none(),
                  st.one_of(GOOD_PRICES, BAD_PRICES), st.just(0), STEP_NS)
TIMER = st.tuples(st.just("timer"), st.none(), st.none(), st.none(), st.just(0),
                  st.integers(0, 7 * S))
# valid ticks listed three times: one_of picks branches evenly, so most ops are valid
OPS = st.lists(st.one_of(VALID_TICK, VALID_TICK, VALID_TICK, GARBAGE_TICK, BASIS, TIMER),
               max_size=60)


@settings(max_examples=300, deadline=None)
@given(OPS)
def test_mark_stays_within_fresh_prices_expanded_by_max_basis(ops):
    params = OracleParams(registry={BTC: frozenset(VENUES)})
    calc = MarkPriceCalculator(params)
    accepted: dict[str, tuple[float, int]] = {}    # venue -> (price, min(venue ts, now))
    now_ns = 10 * S
    for kind, instrument, venue, price, ts_offset_ns, step_ns in ops:
        now_ns += step_ns
        if kind == "tick":
            venue_ts_ns = now_ns + ts_offset_ns if isinstance(ts_offset_ns, int) \
                and not isinstance(ts_offset_ns, bool) else ts_offset_ns
            code, _ = calc.on_tick(instrument, venue, price, venue_ts_ns, now_ns)
            if code is Code.OK:
                accepted[venue] = (float(price), min(venue_ts_ns, now_ns))
        elif kind == "basis":
            calc.on_basis_sample(instrument, price, now_ns)
        else:
            calc.on_timer(now_ns)
        state = calc.state(BTC, now_ns)
        fresh = [p for p, ts in accepted.values() if now_ns - ts <= params.staleness_ns]
        if state.frozen:
            assert state.mark == state.last_good_mark
            continue
        low = min(fresh) * (1 - params.max_basis)
        high = max(fresh) * (1 + params.max_basis)
        assert low * (1 - 1e-12) <= state.mark <= high * (1 + 1e-12)
        assert abs(state.mark - state.index) <= params.max_basis * state.index * (1 + 1e-12)
        assert math.isfinite(state.mark)


def test_venues_beyond_max_venues_take_a_stale_place_or_are_refused():
    """max_venues 3: venues a, b, c quote at t = 0; d at t = 1 finds every place taken by
    a fresh venue (staleness 5 s): refused 2003, nothing changed. At t = 6 only c has
    quoted again (t = 5): a and b are stale (6 - 0 > 5); d takes the place of the
    longest-stale, a, and the index is the median of the fresh c and d (101, 104 ->
    102.5). The state never holds more than three venues, whatever names a feed sends."""
    calc = calc_with([("a", 100.0, 0), ("b", 100.0, 0), ("c", 100.0, 0)], OracleParams(max_venues=3))
    code, events = calc.on_tick(BTC, "d", 200.0, 1 * S, 1 * S)
    assert (code, events) == (Code.ORACLE_UNKNOWN_VENUE, [])
    assert calc.state(BTC, 1 * S).index == 100.0
    assert calc.on_tick(BTC, "c", 101.0, 5 * S, 5 * S)[0] is Code.OK
    assert calc.on_tick(BTC, "b", 100.0, 0, 6 * S)[0] is Code.ORACLE_STALE   # (b's own tick, stale)
    assert calc.on_tick(BTC, "d", 104.0, 6 * S, 6 * S)[0] is Code.OK
    assert sorted(calc._instruments[BTC].quotes) == ["b", "c", "d"]         # a, the stalest, gone
    assert calc.state(BTC, 6 * S).index == 102.5
    for k in range(100):                                                    # a flood of new names
        calc.on_tick(BTC, f"x{k}", 100.0, 7 * S, 7 * S)
    assert len(calc._instruments[BTC].quotes) == 3


@pytest.mark.parametrize("field, value, says", [
    # max_venues 0: the first new venue took min() of no quotes (ValueError: empty sequence)
    pytest.param("max_venues", 0, "must be in 1..2147483647, got 0", id="max_venues-0"),
    # basis_halflife_ns 0: the second basis sample divided by it (ZeroDivisionError)
    pytest.param("basis_halflife_ns", 0, "must be in 1..9223372036854775807, got 0", id="halflife-0"),
    pytest.param("staleness_ns", -1, "must be in 0..9223372036854775807, got -1", id="staleness-negative"),
    pytest.param("staleness_ns", 2**63, "must be in 0..9223372036854775807", id="staleness-past-int64"),
    pytest.param("staleness_ns", 1.5, "must be an integer, got 1.5", id="staleness-float"),
    pytest.param("max_future_skew_ns", -1, "must be in 0..9223372036854775807, got -1", id="skew-negative"),
    pytest.param("quorum", 0, "must be in 1..16 (max_venues), got 0", id="quorum-0"),
    pytest.param("quorum", 17, "must be in 1..16 (max_venues), got 17", id="quorum-above-max-venues"),
    pytest.param("quorum", True, "must be an integer, got True", id="quorum-bool"),
    pytest.param("max_deviation", float("nan"), "must be a finite number >= 0, got nan", id="deviation-nan"),
    pytest.param("max_deviation", -0.01, "must be a finite number >= 0, got -0.01", id="deviation-negative"),
    pytest.param("max_basis", float("inf"), "must be a finite number >= 0, got inf", id="basis-inf"),
    pytest.param("max_basis", "0.005", "must be a finite number >= 0, got '0.005'", id="basis-str"),
    pytest.param("max_basis", False, "must be a finite number >= 0, got False", id="basis-bool"),
    pytest.param("registry", [BTC], "must be None or a mapping", id="registry-list"),
    # a str of venues would have let any substring of it through ("in" on a str)
    pytest.param("registry", {BTC: "abcd"}, "must map instrument names to sets of venue names",
                 id="registry-str-venues"),
])
def test_invalid_params_are_refused_naming_the_field(field, value, says):
    with pytest.raises(ValueError) as e:
        OracleParams(**{field: value})
    assert str(e.value).startswith(f"OracleParams.{field}: ") and says in str(e.value)


def test_params_at_the_edges_of_their_domains_are_accepted():
    # the smallest values each rule still works with: a tick fresh only at its own instant,
    # no deviation tolerated, no basis, one venue
    p = OracleParams(staleness_ns=0, quorum=1, max_deviation=0, basis_halflife_ns=1, max_basis=0.0,
                     max_venues=1, registry={BTC: {"a"}})
    calc = MarkPriceCalculator(p)
    assert calc.on_tick(BTC, "a", 100.0, 5, 5)[0] is Code.OK
    assert calc.on_basis_sample(BTC, 101.0, 5) == (Code.OK, [])
    assert calc.on_basis_sample(BTC, 101.0, 6)[0] is Code.ORACLE_NO_INDEX  # 1 ns old > 0: stale
    assert calc.on_tick(BTC, "a", 100.0, 6, 6)[0] is Code.OK
    assert calc.on_basis_sample(BTC, 101.0, 6) == (Code.OK, [])           # dt / halflife = 1
    assert calc.mark(BTC, 6) == 100.0                                       # max_basis 0: mark = index
