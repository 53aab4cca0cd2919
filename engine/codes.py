"""Numeric reject, action and event codes: one number range per subsystem, all in this file.

A code is stable once released: clients (the matching engine, operators' dashboards)
switch on the number, never on the text. Ranges:

====== =========================== ==========================================
range  subsystem                   examples
====== =========================== ==========================================
0      ok                          ``OK``
1xxx   wire / decoding             malformed msgpack, wrong type, oversized
2xxx   oracle / mark price         bad price, stale, backwards timestamp
3xxx   fills and collateral        duplicate, gap, unknown account
4xxx   order check (pre-trade)     insufficient initial margin
5xxx   store / capacity            table full, layout mismatch
6xxx   liquidation                 liquidation orders and their reasons
7xxx   engine events               price frozen, worker restarted
====== =========================== ==========================================

Each subsystem adds its codes only inside its own range.
"""

from __future__ import annotations

import enum


class Code(enum.IntEnum):
    """Every code the engine emits, by subsystem range."""

    OK = 0

    # 1xxx wire / decoding
    WIRE_MALFORMED = 1001          # body is not valid msgpack
    WIRE_NOT_A_MAP = 1002          # body decodes, but not to a map
    WIRE_BAD_VERSION = 1003        # protocol version field missing or unsupported
    WIRE_UNKNOWN_TYPE = 1004       # message type not known
    WIRE_MISSING_FIELD = 1005      # a required field is absent
    WIRE_BAD_FIELD_TYPE = 1006     # a field has the wrong type
    WIRE_OVERSIZED = 1007          # frame larger than the stream's limit
    WIRE_BAD_VALUE = 1008          # a field's value is out of its domain
    WIRE_UNKNOWN_FIELD = 1009      # a key that is not a field of the message's type
    WIRE_UNEXPECTED_TYPE = 1010    # a known message type that this stream does not accept

    # 2xxx oracle / mark price
    ORACLE_BAD_PRICE = 2001        # zero or negative price (NaN, infinity: 1008 at decoding)
    ORACLE_UNKNOWN_INSTRUMENT = 2002
    ORACLE_UNKNOWN_VENUE = 2003
    ORACLE_TS_BACKWARDS = 2004     # venue timestamp older than that venue's last tick
    ORACLE_STALE = 2005            # tick older than the staleness timeout on arrival
    ORACLE_NO_INDEX = 2006         # basis sample while no index is live (frozen or no venues)
    ORACLE_TS_FUTURE = 2007        # venue timestamp further ahead of the receive time than the clock-skew bound

    # 3xxx fills and collateral
    FILL_DUPLICATE = 3001          # sequence number already applied (acknowledged, dropped)
    FILL_GAP = 3002                # sequence number skips ahead (reported)
    FILL_UNKNOWN_ACCOUNT = 3003
    FILL_UNKNOWN_INSTRUMENT = 3004
    FILL_BAD_QTY = 3005            # zero quantity or not a multiple of the lot
    FILL_BAD_PRICE = 3006
    FILL_POSITION_SLOTS_FULL = 3007
    FILL_SAME_ACCOUNT = 3008       # maker and taker are the same account (a self-trade: nothing to apply)
    FILL_TOO_MANY_STREAMS = 3009   # a new acknowledged fills stream past the gateway's limit (1024)
    COLLATERAL_UNKNOWN_ASSET = 3101
    COLLATERAL_BAD_AMOUNT = 3102
    WITHDRAWAL_BELOW_INITIAL_MARGIN = 3103
    WITHDRAWAL_INSUFFICIENT_BALANCE = 3104
    TRANSFER_ALREADY_APPLIED = 3105  # this transfer_id was applied before: nothing applied now
    TRANSFER_ID_REUSED = 3106      # this transfer_id was applied to another account, asset, amount or kind
    TRANSFER_IN_FLIGHT = 3107      # a request with this transfer_id is being applied: ask again
    ACCOUNT_EXISTS = 3108          # OPEN_ACCOUNT of an account id in use: nothing changed
    ACCOUNTS_FULL = 3109           # OPEN_ACCOUNT: the id's partition has no free row
    NOT_ISOLATED = 3110            # ISOLATED_MARGIN: the account holds no isolated position in that instrument
    ISOLATED_BELOW_INITIAL_MARGIN = 3111   # ISOLATED_MARGIN: taking it out would leave the position below its IM

    # 4xxx order check (pre-trade)
    CHECK_INSUFFICIENT_MARGIN = 4001  # post-trade equity below post-trade initial margin
    CHECK_UNKNOWN_ACCOUNT = 4002
    CHECK_UNKNOWN_INSTRUMENT = 4003
    CHECK_BAD_QTY = 4004
    CHECK_BAD_PRICE = 4005
    CHECK_PRICE_FROZEN = 4006
    CHECK_POSITION_SLOTS_FULL = 4007
    CHECK_ACCOUNT_BUSY = 4008         # no consistent copy of the account (its writer stopped mid-write)

    # 5xxx store / capacity
    STORE_LAYOUT_MISMATCH = 5001
    STORE_CAPACITY_ACCOUNTS = 5002
    STORE_CAPACITY_POSITIONS = 5003
    STORE_CAPACITY_INSTRUMENTS = 5004
    STORE_CAPACITY_ASSETS = 5005

    # 6xxx liquidation
    LIQ_BELOW_MAINTENANCE = 6001   # cross equity strictly below maintenance
    LIQ_ISOLATED_BELOW_MAINTENANCE = 6002
    LIQ_BELOW_BANKRUPTCY = 6003    # equity below zero: close everything
    TAKEN_BY_BACKSTOP = 6101       # takeover: a backstop liquidity provider took the position
    TAKEN_BY_INSURANCE_FUND = 6102  # takeover: the insurance fund took it at the bankruptcy price
    AUTO_DELEVERAGED = 6103        # takeover: closed against an opposite position (ADL)
    TAKEOVER_NO_ROUTE = 6104       # takeover: no provider, fund or ADL counterparty took (all of) it

    # 7xxx engine events
    EVENT_PRICE_FROZEN = 7001      # below quorum of fresh venues: liquidations paused
    EVENT_PRICE_RESUMED = 7002
    EVENT_VENUE_EXCLUDED = 7003    # venue deviates from the others beyond the bound
    EVENT_VENUE_READMITTED = 7004
    EVENT_WORKER_RESTARTED = 7005


# How each code reaches anyone, in one line (docs/protocol.md section 8 is generated
# from it; a test holds every code to an entry). "REJECT": in a REJECT on the
# acknowledged fills stream or the checks socket; "event": an ENGINE_EVENT on the events
# PUB; "counted": in the process's counters only (``margin-engine status``, its log);
# "raised": an exception of the Python API (engine.store, engine.risk).
_WIRE = "REJECT (fills ROUTER, checks socket); event on the fills PULL; counted on the ticks stream"
REPORTED: dict[int, str] = {
    0: "OK: an answer's code when nothing is wrong",
    1001: "body not one valid msgpack object, or a limit of section 1 exceeded. " + _WIRE,
    1002: "body decodes, but not to a map. " + _WIRE,
    1003: "`v` missing, not an int, or not a supported version. " + _WIRE,
    1004: "`t` is not a known message type (also a BATCH's `of`). " + _WIRE,
    1005: "a required field (or header key) is missing. " + _WIRE,
    1006: "a field has the wrong msgpack type. " + _WIRE,
    1007: "frame larger than the stream's limit, before unpacking. " + _WIRE,
    1008: "a field's value outside its domain (also a BATCH whose numbers would pass 2**64-1, a mode "
          "the leg rule does not know). " + _WIRE,
    1009: "a key that is not a field of the type, in its version. " + _WIRE,
    1010: "a known type this stream does not take, decided before its fields. " + _WIRE,
    2001: "tick price zero or negative (NaN and infinity are refused at decoding, 1008). Counted; an event at most once per 10 s for each (code, venue, instrument), with how many were refused since",
    2002: "tick for an instrument or asset the engine does not know. Counted; an event at most once per 10 s for each (code, venue, instrument), with how many were refused since",
    2003: "a new venue for an instrument whose 16 places (OracleParams.max_venues) are all held by "
          "fresh venues (a stale one gives its place up); or, with a venue registry, a venue not in it. "
          "Counted; an event at most once per 10 s for each (code, venue, instrument), with how many were "
          "refused since",
    2004: "venue timestamp older than that venue's last tick. Counted; an event at most once per 10 s for each (code, venue, instrument), with how many were refused since",
    2005: "tick older than the staleness timeout when it arrives. Counted; an event at most once per 10 s for each (code, venue, instrument), with how many were refused since",
    2006: "basis sample while no index is live. Not produced by the engine (no basis samples "
          "are fed); the feeds.oracle library's `on_basis_sample`",
    2007: "venue timestamp more than the clock-skew bound (OracleParams.max_future_skew_ns, 1 s) ahead "
          "of the engine's receive time: accepted, it would make every later tick of that venue look "
          "backwards (2004). Counted; an event at most once per 10 s for each (code, venue, instrument), "
          "with how many were refused since",
    3001: "fill sequence number already accepted: dropped. ACK code 3001 (fills ROUTER); counted (PULL)",
    3002: "fill sequence number skips ahead: the missing range is reported, the fill applied. Event",
    3003: "account unknown: a fill's maker or taker; a DEPOSIT/WITHDRAWAL's account. Event (fills), "
          "COLLATERAL_REPLY (collateral)",
    3004: "instrument unknown (a fill's `instrument_id`); or a contract size the engine cannot "
          "value exactly (a fill leg). Event",
    3005: "fill quantity zero, -2**63 (its negation, the maker's leg, is no int64), of the wrong sign for "
          "`taker_side`, or a result outside int64 (a fill leg). Event",
    3006: "fill price not positive. Event",
    3007: "fill leg refused by the worker: the account has no free position slot for the "
          "instrument (the other leg is applied). Event, naming the account and trade",
    3008: "fill whose maker and taker are the same account: nothing applied. Event",
    3009: "a fills frame from a new routing id while the gateway already tracks 1,024 acknowledged fills "
          "streams (`fills_acks`; each one's last seq is kept for good): nothing applied or remembered. "
          "REJECT (fills ROUTER); event",
    3101: "DEPOSIT/WITHDRAWAL asset unknown. COLLATERAL_REPLY",
    3102: "an amount outside its rule: a deposit that would take the balance past 2**63-1 "
          "(COLLATERAL_REPLY); a fill leg's isolated margin (for a cross position, or below 0) or "
          "fee (outside int64) (event; the Python API returns it)",
    3103: "withdrawal would leave cross equity below cross initial margin: refused. COLLATERAL_REPLY",
    3104: "withdrawal larger than the balance: refused. COLLATERAL_REPLY",
    3105: "this `transfer_id` was applied before: nothing applied now. COLLATERAL_REPLY with the balance",
    3106: "this `transfer_id` was applied to another account, asset, amount or type. COLLATERAL_REPLY",
    3107: "a request with this `transfer_id` is being applied: ask again. COLLATERAL_REPLY",
    3108: "OPEN_ACCOUNT of an account id already in use (a retry of an open that was applied): "
          "nothing changed. OPEN_ACCOUNT_REPLY",
    3109: "OPEN_ACCOUNT: the id's partition (id mod `engine.partitions`) has no free row; raise "
          "`engine.accounts_capacity`. OPEN_ACCOUNT_REPLY",
    3110: "ISOLATED_MARGIN: the account holds no isolated position in that instrument. COLLATERAL_REPLY",
    3111: "ISOLATED_MARGIN out of a position: it would leave the position's isolated margin below 0, "
          "or its margin plus unrealized PnL below its initial margin at the mark. COLLATERAL_REPLY",
    4001: "post-trade equity below post-trade initial margin: the order would be refused. ORDER_CHECK_REPLY",
    4002: "account unknown. ORDER_CHECK_REPLY",
    4003: "instrument unknown. ORDER_CHECK_REPLY",
    4004: "quantity zero, or its size (abs(qty_units)) 2**62 or more. ORDER_CHECK_REPLY",
    4005: "price not positive. ORDER_CHECK_REPLY",
    4006: "the instrument's mark is frozen (oracle quorum lost). ORDER_CHECK_REPLY",
    4007: "the order would open a position the account has no free slot for. ORDER_CHECK_REPLY",
    4008: "no consistent copy of the account, or of the prices, could be read (a writer stopped "
          "mid-write: a worker, or worker 0 publishing a mark, killed until its restart). ORDER_CHECK_REPLY",
    5001: "a shared-memory segment of another layout version, or read-only where writing is "
          "needed. Raised (engine.store); `run` exits 2",
    5002: "accounts capacity reached. Raised; `run` exits 2",
    5003: "position slots of an account exhausted. Raised (engine.store API)",
    5004: "instruments table size. Raised (configuration load)",
    5005: "assets table size. Raised (configuration load)",
    6001: "a liquidation order's reason: cross equity strictly below maintenance. "
          "LIQUIDATION_ORDER `reason`; its event",
    6002: "a liquidation order's reason: an isolated position below its maintenance. "
          "LIQUIDATION_ORDER `reason`; its event",
    6003: "a liquidation order's reason: equity below zero, close everything. "
          "LIQUIDATION_ORDER `reason`; its event",
    6101: "takeover: a backstop liquidity provider took a position the market did not, at a discount "
          "to the mark (never past the bankruptcy price); booked as a fill on the internal takeover "
          "stream. Event (docs/protocol.md section 7)",
    6102: "takeover: the insurance fund took a position at its bankruptcy price. Event",
    6103: "takeover: auto-deleveraging closed part of a bankrupt account's position against an "
          "opposite position, at the bankruptcy price. Event (`account`: the deleveraged one)",
    6104: "takeover: nothing took (all of) the position: no provider or fund with the margin, no ADL "
          "counterparty; the account's orders go back to the market. Event",
    7001: "mark frozen: fewer fresh venues than the quorum; liquidations on it pause. Event",
    7002: "mark resumed. Event",
    7003: "a venue deviates from the others beyond the bound and is left out of the index. Event",
    7004: "a left-out venue agrees again and is back in the index. Event",
    7005: "the supervisor restarted a worker that died (which one, how, its new pid). Event",
}


def subsystem(code: int) -> str:
    """Name the subsystem of ``code`` from its thousands digit."""
    return {0: "ok", 1: "wire", 2: "oracle", 3: "fills", 4: "order_check",
            5: "store", 6: "liquidation", 7: "event"}.get(int(code) // 1000, "unknown")
