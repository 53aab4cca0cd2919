"""Index and mark price from oracle venue ticks: pure logic, no sockets, no clock reads.

Every method takes ``now_ns`` (UTC Unix nanoseconds) from the caller, so the live
mark-price process, the replay path and the tests drive the same code.

Rules (``docs/oracle.md`` repeats them with the parameters):

1. A venue is *fresh* at ``now_ns`` when ``now_ns - min(venue_ts_ns, now_ns) <= staleness_ns``
   (a venue clock running ahead never makes a quote fresher than "now").
2. Outliers: among the fresh venues, repeatedly compute for each remaining venue
   ``d_v = |p_v - m_v| / m_v`` with ``m_v`` the median of the OTHER remaining venues, and
   exclude the venue with the largest ``d_v`` while it exceeds ``max_deviation`` (when only
   two remain and disagree, both go: neither can be trusted). Excluding the worst first
   keeps one spike from dragging the others' reference (with three venues the "median
   of the other two" is their mean). A venue is readmitted as soon as it passes again.
   A stale venue cannot be judged and keeps its last status. A fresh venue with no
   fresh peer (the only fresh one) cannot be judged either, and it is readmitted: its
   exclusion could never be lifted while no peer is left to compare it with (with two
   venues, one glitch excludes both; had the glitching one gone silent, the good one
   stayed excluded for good), so the quorum decides -- it is the index with ``quorum``
   1, and the price stays frozen with more.
3. ``index = median(p_v for fresh, non-excluded v)``. With an even count the median is
   the mean of the two middle values ``a <= b``, computed as ``a + 0.5 * (b - a)`` (the
   sum ``a + b`` overflows for finite prices above half the largest float).
4. Below ``quorum`` fresh non-excluded venues the instrument is *frozen*: ``index`` is
   ``None`` and the mark stays at the last good mark. So is an instrument whose mark
   (rule 6) would not be a finite float (an index near the largest float plus a
   positive basis): a non-finite price is never live, so never published.
5. Basis: each matching-engine sample ``s = mid_or_last - index`` is clamped to
   ``[-max_basis * index, +max_basis * index]`` and smoothed by time,
   ``b <- b + a * (s - b)`` with ``a = 1 - 2 ** (-dt_ns / basis_halflife_ns)``; the first
   sample sets ``b = s``.
6. ``mark = index + clamp(b, -max_basis * index, +max_basis * index)`` (``b = 0`` before any
   sample), so ``|mark - index| <= max_basis * index`` always.

A tick whose ``venue_ts_ns`` is more than ``max_future_skew_ns`` ahead of the receive
time is refused (``ORACLE_TS_FUTURE``): venue and engine clocks differ a little, but one
tick accepted from a venue clock far ahead would make every later tick of that venue
look backwards, and the venue would be locked out.

Events (freeze/resume, venue excluded/readmitted) are emitted once per transition by
the calls that process input or time: ``on_tick``, ``on_basis_sample`` and ``on_timer``.
The queries ``index``, ``mark`` and ``state`` never change state.
"""

from __future__ import annotations

import math
import numbers
from collections import Counter
from dataclasses import dataclass, field
from typing import Mapping, NamedTuple

from engine.codes import Code

NS_PER_S = 1_000_000_000
INT64_MAX = 2**63 - 1
INT32_MAX = 2**31 - 1


class Tick(NamedTuple):
    """One normalized venue price, as the adapters and the replay produce it."""

    instrument: str
    venue: str
    price: float
    venue_ts_ns: int


@dataclass(frozen=True)
class OracleParams:
    """Parameters of the index and mark rules (units in the names).

    ``registry`` maps each known instrument to the venues allowed to quote it; ``None``
    accepts any instrument and venue. ``max_venues``: the venues one instrument keeps
    quotes of; a new venue beyond them takes the place of the longest-stale one, and is
    refused (``ORACLE_UNKNOWN_VENUE``) while every one is fresh -- so a feed sending ever
    new venue names cannot grow the state or the outlier rule's work without bound.
    ``max_future_skew_ns``: how far a tick's ``venue_ts_ns`` may be ahead of its receive
    time (the venue's clock ahead of the engine's); further is ``ORACLE_TS_FUTURE``.

    Every field is checked on construction, and a wrong type or a value outside its
    domain raises ``ValueError`` naming the field (``OracleParams.quorum: ...``):
    durations are int nanoseconds in ``0 .. 2**63 - 1`` (the C fast path holds them in
    int64), ``basis_halflife_ns`` > 0 (it divides); ``max_venues`` in ``1 .. 2**31 - 1``
    and ``quorum`` in ``1 .. max_venues`` (more could never be live; C holds it in an
    int); ``max_deviation`` and ``max_basis`` finite and >= 0; ``registry`` ``None`` or a
    mapping of instrument names to sets of venue names. A bool is not an int here.
    """

    staleness_ns: int = 5 * NS_PER_S
    quorum: int = 2
    max_deviation: float = 0.05
    basis_halflife_ns: int = 60 * NS_PER_S
    max_basis: float = 0.005
    registry: Mapping[str, frozenset[str]] | None = None
    max_venues: int = 16            # the C fast path's table (OF_MAX_VENUES) holds as many
    max_future_skew_ns: int = NS_PER_S

    def __post_init__(self) -> None:
        def integer(name: str, lo: int, hi: int = INT64_MAX, hi_name: str = "") -> None:
            v = getattr(self, name)
            if not _is_int(v):
                raise ValueError(f"OracleParams.{name}: must be an integer, got {v!r}")
            if not lo <= v <= hi:
                raise ValueError(f"OracleParams.{name}: must be in {lo}..{hi}{hi_name}, got {v}")

        def real(name: str) -> None:
            v = getattr(self, name)
            if not (_is_real(v) and (v == 0 or _finite_positive(v))):
                raise ValueError(f"OracleParams.{name}: must be a finite number >= 0, got {v!r}")

        integer("staleness_ns", 0)
        integer("basis_halflife_ns", 1)
        integer("max_future_skew_ns", 0)
        integer("max_venues", 1, INT32_MAX)
        integer("quorum", 1, self.max_venues, " (max_venues)")
        real("max_deviation")
        real("max_basis")
        registry = self.registry
        if registry is not None:
            if not isinstance(registry, Mapping):
                raise ValueError(f"OracleParams.registry: must be None or a mapping, got {registry!r}")
            for name, venues in registry.items():
                if not (isinstance(name, str) and isinstance(venues, (set, frozenset))
                        and all(isinstance(v, str) for v in venues)):
                    raise ValueError(f"OracleParams.registry: must map instrument names to sets of "
                                     f"venue names, got {name!r}: {venues!r}")


@dataclass(frozen=True)
class Event:
    """A state transition worth telling operators about (codes 7xxx)."""

    code: Code
    instrument: str
    venue: str | None
    ts_ns: int
    detail: str


@dataclass(frozen=True)
class PriceState:
    """Snapshot of one instrument at ``now_ns``.

    ``index`` and ``mark`` are ``None`` while frozen and never live; ``mark`` equals
    ``last_good_mark`` while frozen.
    """

    index: float | None
    mark: float | None
    n_fresh: int                 # fresh venues, excluded ones included
    n_used: int                  # fresh, non-excluded venues: the index's constituents
    frozen: bool
    excluded: frozenset[str]
    last_good_mark: float | None


@dataclass
class _Quote:
    price: float
    venue_ts_ns: int             # as the venue sent it: the backwards check uses it
    fresh_ts_ns: int             # min(venue_ts_ns, now_ns at arrival): staleness uses it


@dataclass
class _Instrument:
    quotes: dict[str, _Quote] = field(default_factory=dict)
    excluded: set[str] = field(default_factory=set)
    frozen: bool | None = None   # None until the first live evaluation
    last_good_mark: float | None = None
    basis: float = 0.0           # smoothed basis, price units
    basis_ts_ns: int | None = None
    committed: tuple | None = None   # (now_ns, _Evaluation) of the last commit: state() at that
                                     # instant reuses it instead of evaluating again


@dataclass(frozen=True)
class _Evaluation:
    index: float | None
    mark: float | None
    n_fresh: int
    n_used: int
    excluded: frozenset[str]     # committed exclusions updated for the fresh venues
    deviations: dict[str, tuple[float, float]]  # venue -> (price, reference median)


def median(values: list[float]) -> float:
    """Return the median of a non-empty list; the mean of the two middle values if even.

    The mean of the middle values ``a <= b`` is ``a + 0.5 * (b - a)``: finite whenever
    ``a`` and ``b`` are finite and of one sign (``0.5 * (a + b)`` is inf above half the
    largest float). The C fast path (``median_sorted``, ext/_oracle.pxi) does the same
    float operations, so both give the same bits.
    """
    ordered = sorted(values)
    mid = len(ordered) // 2
    if len(ordered) % 2:
        return ordered[mid]
    low, high = ordered[mid - 1], ordered[mid]
    return low + 0.5 * (high - low)


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _finite_positive(value: numbers.Real) -> bool:
    try:
        as_float = float(value)
    except (OverflowError, ValueError):
        return False
    return math.isfinite(as_float) and as_float > 0


def _outliers(prices: dict[str, float], max_deviation: float
              ) -> tuple[set[str], dict[str, tuple[float, float]]]:
    """Return the venues to exclude and each judged venue's (price, reference median).

    Loop invariant: ``remaining`` holds the venues not yet excluded. Each round computes,
    for every remaining venue, ``d_v = |p_v - m_v| / m_v`` with ``m_v`` the median of the
    OTHER remaining venues; if the largest ``d_v`` exceeds ``max_deviation`` that venue is
    excluded (both when only two remain: neither can be trusted) and the round repeats.
    """
    remaining = dict(prices)
    excluded: set[str] = set()
    judged: dict[str, tuple[float, float]] = {}
    while len(remaining) >= 2:
        worst, worst_dev = "", -1.0
        for venue, price in sorted(remaining.items()):
            reference = median([q for v, q in remaining.items() if v != venue])
            judged[venue] = (price, reference)
            dev = abs(price - reference) / reference
            if dev > worst_dev:
                worst, worst_dev = venue, dev
        if worst_dev <= max_deviation:
            break
        dropped = list(remaining) if len(remaining) == 2 else [worst]
        for venue in dropped:
            excluded.add(venue)
            del remaining[venue]
    return excluded, judged


def _clamp(value: float, bound: float) -> float:
    return max(-bound, min(bound, value))


class MarkPriceCalculator:
    """Median-of-venues index and bounded-basis mark price for many instruments."""

    def __init__(self, params: OracleParams | None = None) -> None:
        self.params = params or OracleParams()
        self.reject_counts: Counter[Code] = Counter()
        self._instruments: dict[str, _Instrument] = {}

    # -- input ---------------------------------------------------------------------

    def on_tick(self, instrument: str, venue: str, price: float, venue_ts_ns: int,
                now_ns: int) -> tuple[Code, list[Event]]:
        """Validate and apply one venue price; return a code and the transitions it caused.

        Checks, in order: field types (``WIRE_BAD_FIELD_TYPE``), finite positive price
        (``ORACLE_BAD_PRICE``), registry (``ORACLE_UNKNOWN_INSTRUMENT`` / ``_VENUE``),
        ``venue_ts_ns - now_ns <= max_future_skew_ns`` (``ORACLE_TS_FUTURE``), not older
        than that venue's last accepted tick (``ORACLE_TS_BACKWARDS``), not stale on
        arrival (``ORACLE_STALE``); then a new venue needs a place (``max_venues``:
        ``ORACLE_UNKNOWN_VENUE``). A rejected tick changes nothing but
        ``reject_counts``.
        """
        code = self._validate_tick(instrument, venue, price, venue_ts_ns, now_ns)
        inst = self._instruments.setdefault(instrument, _Instrument()) if code is Code.OK else None
        if inst is not None and venue not in inst.quotes and len(inst.quotes) >= self.params.max_venues:
            stalest = min(inst.quotes, key=lambda v: inst.quotes[v].fresh_ts_ns)
            if now_ns - inst.quotes[stalest].fresh_ts_ns > self.params.staleness_ns:
                del inst.quotes[stalest]            # stale: it counted for nothing
                inst.excluded.discard(stalest)
            else:
                code = Code.ORACLE_UNKNOWN_VENUE    # every place taken by a fresh venue
        if code is not Code.OK:
            self.reject_counts[code] += 1
            return code, []
        inst.quotes[venue] = _Quote(float(price), int(venue_ts_ns),
                                    min(int(venue_ts_ns), int(now_ns)))
        return Code.OK, self._commit(instrument, inst, int(now_ns))

    def on_basis_sample(self, instrument: str, venue_mid_or_last: float,
                        now_ns: int) -> tuple[Code, list[Event]]:
        """Fold the matching engine's own mid or last trade into the smoothed basis.

        ``s = clamp(venue_mid_or_last - index, max_basis * index)``;
        ``b <- b + (1 - 2 ** (-dt_ns / basis_halflife_ns)) * (s - b)``, first sample
        ``b = s``; ``dt_ns <= 0`` gives weight 0. Rejected with ``ORACLE_NO_INDEX``
        while the instrument has no live index, and with ``ORACLE_BAD_PRICE`` when the
        sample or the new basis would not be finite (the basis would poison every later
        mark; with a finite index neither can happen, the check keeps it so).
        """
        code = self._validate_basis_sample(instrument, venue_mid_or_last, now_ns)
        inst = self._instruments.get(instrument) if code is Code.OK else None
        index = self._evaluate(inst, now_ns).index if inst is not None else None
        if code is Code.OK and index is None:
            code = Code.ORACLE_NO_INDEX
        if code is not Code.OK:
            self.reject_counts[code] += 1
            return code, []
        sample = _clamp(float(venue_mid_or_last) - index, self.params.max_basis * index)
        now_ns = int(now_ns)
        if inst.basis_ts_ns is None:
            basis = sample
        else:
            dt_ns = max(0, now_ns - inst.basis_ts_ns)
            weight = 1.0 - 2.0 ** (-dt_ns / self.params.basis_halflife_ns)
            basis = inst.basis + weight * (sample - inst.basis)
        if not (math.isfinite(sample) and math.isfinite(basis)):
            self.reject_counts[Code.ORACLE_BAD_PRICE] += 1
            return Code.ORACLE_BAD_PRICE, []
        inst.basis = basis
        inst.basis_ts_ns = now_ns if inst.basis_ts_ns is None else max(now_ns, inst.basis_ts_ns)
        return Code.OK, self._commit(instrument, inst, now_ns)

    def on_timer(self, now_ns: int) -> list[Event]:
        """Re-evaluate every instrument at ``now_ns``: emits freezes caused by staleness."""
        events: list[Event] = []
        for name, inst in self._instruments.items():
            events.extend(self._commit(name, inst, int(now_ns)))
        return events

    # -- queries (no state change) -------------------------------------------------

    def index(self, instrument: str, now_ns: int) -> float | None:
        """Median of the fresh, non-excluded venues' prices; ``None`` below quorum."""
        return self.state(instrument, now_ns).index

    def mark(self, instrument: str, now_ns: int) -> float | None:
        """``index + clamp(basis, max_basis * index)``; the last good mark while frozen."""
        return self.state(instrument, now_ns).mark

    def state(self, instrument: str, now_ns: int) -> PriceState:
        """Snapshot of ``instrument`` at ``now_ns`` (an unknown one reads as frozen, empty)."""
        inst = self._instruments.get(instrument)
        if inst is None:
            return PriceState(None, None, 0, 0, True, frozenset(), None)
        c = inst.committed
        ev = c[1] if c is not None and c[0] == now_ns else self._evaluate(inst, now_ns)
        frozen = ev.index is None
        return PriceState(
            index=ev.index,
            mark=inst.last_good_mark if frozen else ev.mark,
            n_fresh=ev.n_fresh,
            n_used=ev.n_used,
            frozen=frozen,
            excluded=ev.excluded,
            last_good_mark=inst.last_good_mark if frozen else ev.mark,
        )

    def export(self, instrument: str) -> tuple[list[tuple[str, float, int, int]], bool, float]:
        """``(quotes, clean, basis)`` of ``instrument`` for a fast path that mirrors it:
        quotes as ``(venue, price, venue_ts_ns, fresh_ts_ns)``; ``clean`` when the last
        commit left it live with no venue excluded (the only state such a path may act
        in: a tick there can change nothing but one quote and the mark)."""
        inst = self._instruments.get(instrument)
        if inst is None:
            return [], False, 0.0
        quotes = [(v, q.price, q.venue_ts_ns, q.fresh_ts_ns) for v, q in inst.quotes.items()]
        return quotes, inst.frozen is False and not inst.excluded, inst.basis

    # -- internals -----------------------------------------------------------------

    def _unknown_instrument(self, instrument: str) -> bool:
        registry = self.params.registry
        return registry is not None and instrument not in registry

    def _validate_basis_sample(self, instrument: object, mid_or_last: object,
                               now_ns: object) -> Code:
        if not (isinstance(instrument, str) and _is_int(now_ns) and _is_real(mid_or_last)):
            return Code.WIRE_BAD_FIELD_TYPE
        if not _finite_positive(mid_or_last):
            return Code.ORACLE_BAD_PRICE
        if self._unknown_instrument(instrument):
            return Code.ORACLE_UNKNOWN_INSTRUMENT
        return Code.OK

    def _validate_tick(self, instrument: object, venue: object, price: object,
                       venue_ts_ns: object, now_ns: object) -> Code:
        if not (isinstance(instrument, str) and isinstance(venue, str)
                and _is_int(venue_ts_ns) and _is_int(now_ns)):
            return Code.WIRE_BAD_FIELD_TYPE
        if not _is_real(price):
            return Code.WIRE_BAD_FIELD_TYPE
        if not _finite_positive(price):
            return Code.ORACLE_BAD_PRICE
        registry = self.params.registry
        if registry is not None:
            if instrument not in registry:
                return Code.ORACLE_UNKNOWN_INSTRUMENT
            if venue not in registry[instrument]:
                return Code.ORACLE_UNKNOWN_VENUE
        if venue_ts_ns - now_ns > self.params.max_future_skew_ns:
            return Code.ORACLE_TS_FUTURE
        inst = self._instruments.get(instrument)
        last = inst.quotes.get(venue) if inst is not None else None
        if last is not None and venue_ts_ns < last.venue_ts_ns:
            return Code.ORACLE_TS_BACKWARDS
        if now_ns - min(venue_ts_ns, now_ns) > self.params.staleness_ns:
            return Code.ORACLE_STALE
        return Code.OK

    def _evaluate(self, inst: _Instrument, now_ns: int) -> _Evaluation:
        """Apply rules 1-6 to the stored quotes at ``now_ns`` without changing them."""
        p = self.params
        fresh = {v: q.price for v, q in inst.quotes.items()
                 if now_ns - q.fresh_ts_ns <= p.staleness_ns}
        judged, deviations = _outliers(fresh, p.max_deviation)
        # rule 2: with two or more fresh venues every fresh one was judged; a stale venue
        # keeps its status; the only fresh venue (no peer to judge it) is readmitted
        excluded = {v for v in inst.excluded if v not in fresh} | judged
        used = [price for venue, price in fresh.items() if venue not in excluded]
        if len(used) < max(1, p.quorum):
            return _Evaluation(None, None, len(fresh), len(used), frozenset(excluded),
                               deviations)
        index = median(used)
        mark = index + _clamp(inst.basis, p.max_basis * index)
        if not (math.isfinite(index) and math.isfinite(mark)):   # rule 4: never live
            return _Evaluation(None, None, len(fresh), len(used), frozenset(excluded),
                               deviations)
        return _Evaluation(index, mark, len(fresh), len(used), frozenset(excluded),
                           deviations)

    def _commit(self, name: str, inst: _Instrument, now_ns: int) -> list[Event]:
        """Store the evaluation at ``now_ns`` and return one event per transition."""
        ev = self._evaluate(inst, now_ns)
        inst.committed = (now_ns, ev)
        events: list[Event] = []
        for venue in sorted(ev.excluded - inst.excluded):
            price, reference = ev.deviations[venue]
            events.append(Event(Code.EVENT_VENUE_EXCLUDED, name, venue, now_ns,
                                f"price={price:.10g} ref_median={reference:.10g} "
                                f"bound={self.params.max_deviation:g}"))
        for venue in sorted(inst.excluded - ev.excluded):
            if venue in ev.deviations:
                price, reference = ev.deviations[venue]
                detail = f"price={price:.10g} ref_median={reference:.10g}"
            else:
                detail = (f"price={inst.quotes[venue].price:.10g} the only fresh venue: "
                          f"no peer to judge it by")
            events.append(Event(Code.EVENT_VENUE_READMITTED, name, venue, now_ns, detail))
        inst.excluded = set(ev.excluded)
        frozen = ev.index is None
        if frozen and inst.frozen is False:
            why = "" if ev.n_used < self.params.quorum else " (the mark would not be finite)"
            events.append(Event(Code.EVENT_PRICE_FROZEN, name, None, now_ns,
                                f"n_used={ev.n_used} quorum={self.params.quorum} "
                                f"last_good_mark={inst.last_good_mark:.10g}{why}"))
        elif not frozen and inst.frozen is True:
            events.append(Event(Code.EVENT_PRICE_RESUMED, name, None, now_ns,
                                f"n_used={ev.n_used} mark={ev.mark:.10g}"))
        if not frozen:
            inst.last_good_mark = ev.mark
            inst.frozen = False
        elif inst.frozen is not None:
            inst.frozen = True
        return events
