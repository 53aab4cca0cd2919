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
    ORACLE_BAD_PRICE = 2001        # NaN, infinite, zero or negative price
    ORACLE_UNKNOWN_INSTRUMENT = 2002
    ORACLE_UNKNOWN_VENUE = 2003
    ORACLE_TS_BACKWARDS = 2004     # venue timestamp older than that venue's last tick
    ORACLE_STALE = 2005            # tick older than the staleness timeout on arrival
    ORACLE_NO_INDEX = 2006         # basis sample while no index is live (frozen or no venues)

    # 3xxx fills and collateral
    FILL_DUPLICATE = 3001          # sequence number already applied (acknowledged, dropped)
    FILL_GAP = 3002                # sequence number skips ahead (reported)
    FILL_UNKNOWN_ACCOUNT = 3003
    FILL_UNKNOWN_INSTRUMENT = 3004
    FILL_BAD_QTY = 3005            # zero quantity or not a multiple of the lot
    FILL_BAD_PRICE = 3006
    FILL_POSITION_SLOTS_FULL = 3007
    COLLATERAL_UNKNOWN_ASSET = 3101
    COLLATERAL_BAD_AMOUNT = 3102
    WITHDRAWAL_BELOW_INITIAL_MARGIN = 3103
    WITHDRAWAL_INSUFFICIENT_BALANCE = 3104
    TRANSFER_ALREADY_APPLIED = 3105  # this transfer_id was applied before: nothing applied now
    TRANSFER_ID_REUSED = 3106      # this transfer_id was applied to another account, asset, amount or kind
    TRANSFER_IN_FLIGHT = 3107      # a request with this transfer_id is being applied: ask again

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

    # 7xxx engine events
    EVENT_PRICE_FROZEN = 7001      # below quorum of fresh venues: liquidations paused
    EVENT_PRICE_RESUMED = 7002
    EVENT_VENUE_EXCLUDED = 7003    # venue deviates from the others beyond the bound
    EVENT_VENUE_READMITTED = 7004
    EVENT_WORKER_RESTARTED = 7005


def subsystem(code: int) -> str:
    """Name the subsystem of ``code`` from its thousands digit."""
    return {0: "ok", 1: "wire", 2: "oracle", 3: "fills", 4: "order_check",
            5: "store", 6: "liquidation", 7: "event"}.get(int(code) // 1000, "unknown")
