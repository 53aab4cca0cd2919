"""Wire protocol: msgpack bodies over ZeroMQ frames, one schema for encoder and decoder.

Every message is one ZeroMQ frame holding one msgpack map with short string keys.
Four header keys are in every body::

    v      int    protocol version: 1 or 2 accepted (``SUPPORTED_VERSIONS``); the engine
                  writes 1 (``VERSION``: version 2 only added ``transfer_id`` to requests)
    t      int    message type (``MsgType``)
    seq    uint64 per-stream sequence number, 1, 2, 3, ... (a BATCH of n takes n numbers)
    ts_ns  int64  sender's UTC clock, nanoseconds since the Unix epoch

The other keys are the type's fields, declared once in ``SCHEMAS`` and used by both
``encode`` and ``decode`` so that the two cannot drift. ``docs/protocol.md`` is the
document for clients in other languages; ``python -m feeds.protocol`` prints the
generated parts of it (example hex dumps, the code table).

Decoding is the hot path of the fills gateway (200k fills/s), so ``decode`` is one
``msgpack.unpackb`` call plus a flat validation loop over precompiled field specs; it
never raises for any input and never descends into values it does not expect (a nested
container where a scalar belongs is a type error, found without walking it).
"""

from __future__ import annotations

import enum
import numbers
import time
from typing import NamedTuple, Union

import msgpack

from engine.codes import Code

VERSION = 1                    # what the engine writes: none of the messages it sends changed in 2
SUPPORTED_VERSIONS = frozenset({1, 2})
LATEST_VERSION = 2

INT64_MIN = -(1 << 63)
INT64_MAX = (1 << 63) - 1
UINT64_MAX = (1 << 64) - 1

MAX_FRAME_BYTES = 1 << 20      # default frame limit, checked before unpacking (a full batch fits)
MAX_BATCH_MSGS = 4096          # messages in one BATCH frame
MAX_NAME_CHARS = 64            # venue, instrument, asset: ASCII, 1..64 bytes
MAX_DETAIL_CHARS = 1024        # free text: 0..1024 code points
MAX_CODE = 9999                # reason codes are 0..9999 (engine/codes.py ranges)

# Safety net for the unpacker itself: no valid body comes near these.
_MAX_STR_BYTES = 4 * MAX_DETAIL_CHARS   # UTF-8 is at most 4 bytes per code point
_MAX_MAP_LEN = 32
_MAX_EXT_BYTES = 16
_DETAIL_LIMIT = 200            # a Rejected's detail is kept short enough to echo in a REJECT


class MsgType(enum.IntEnum):
    """Message types. A number is stable once released; 0 means "unknown" in REJECT."""

    ORACLE_TICK = 1             # oracle venue -> mark-price process
    FILL = 10                   # matching engine -> fills gateway
    DEPOSIT = 11                # custody -> fills gateway
    WITHDRAWAL = 12             # custody -> fills gateway
    COLLATERAL_REPLY = 13       # fills gateway -> custody
    OPEN_ACCOUNT = 14           # custody / account admin -> fills gateway
    OPEN_ACCOUNT_REPLY = 15     # fills gateway -> custody / account admin
    ISOLATED_MARGIN = 16        # custody / the account -> fills gateway: margin into / out of a position
    ORDER_CHECK = 20            # matching engine -> order-check gateway
    ORDER_CHECK_REPLY = 21      # order-check gateway -> matching engine
    LIQUIDATION_ORDER = 30      # liquidation gateway -> matching engine
    ENGINE_EVENT = 40           # engine -> operators
    BATCH = 90                  # n bodies of one type in one frame (v1: FILL only)
    ACK = 91                    # receiver -> sender: message accepted (or duplicate)
    REJECT = 92                 # receiver -> sender: message rejected, with a code


class SeqStatus(enum.IntEnum):
    """How a receiver classifies an incoming sequence number."""

    NEW = 0          # the next number expected: apply
    DUPLICATE = 1    # at or below the last seen: acknowledge and drop
    GAP = 2          # skips ahead: report the missing range, then apply


# ---------------------------------------------------------------------------------------
# Field kinds and schemas (the single declaration both directions use)
# ---------------------------------------------------------------------------------------

class Kind(NamedTuple):
    """The wire domain of a field: a Python type and its bounds.

    For ``int`` kinds ``lo``/``hi`` bound the value; for ``str`` kinds they bound the
    length in characters. ``float`` kinds must be finite; an int on the wire is accepted
    and converted. ``choices`` restricts a string to a set, ``ascii`` requires ASCII,
    ``nullable`` accepts msgpack nil (``None``).
    """

    py: type
    lo: int = 0
    hi: int = 0
    choices: frozenset | None = None
    ascii: bool = False
    nullable: bool = False
    doc: str = ""


I64 = Kind(int, INT64_MIN, INT64_MAX, doc="int64")
ID = Kind(int, 0, INT64_MAX, doc="int64, >= 0")
POS = Kind(int, 1, INT64_MAX, doc="int64, > 0")
REF_SEQ = Kind(int, 0, UINT64_MAX, doc="uint64 (0 = unknown)")
ACK_SEQ = Kind(int, 1, UINT64_MAX, doc="uint64, >= 1")
CODE = Kind(int, 0, MAX_CODE, doc="int, 0..9999 (reason code)")
MSG_TYPE = Kind(int, 0, 255, doc="int, 0..255 (0 = unknown)")
F64 = Kind(float, doc="float64, finite (an int is accepted)")
NAME = Kind(str, 1, MAX_NAME_CHARS, ascii=True, doc="str, ASCII, 1..64 bytes")
TEXT = Kind(str, 0, MAX_DETAIL_CHARS, doc="str, UTF-8, 0..1024 code points")
SIDE = Kind(str, 3, 4, choices=frozenset({"buy", "sell"}), doc='str, "buy" or "sell"')
MODE = Kind(str, 5, 8, choices=frozenset({"cross", "isolated"}), doc='str, "cross" or "isolated"')
NAME_OR_NIL = NAME._replace(nullable=True, doc="str (as NAME) or nil")
ID_OR_NIL = ID._replace(nullable=True, doc="int64 >= 0, or nil")

REQ, OPT = True, False

HEADER_KEYS = ("v", "t", "seq", "ts_ns")

#: Per-type schemas: field name -> (kind, required). Key order is the encoding order.
#: A BATCH's ``msgs`` hold bodies of the type ``of`` without the header keys.
SCHEMAS: dict[MsgType, dict[str, tuple[Kind, bool]]] = {
    MsgType.ORACLE_TICK: {
        "venue": (NAME, REQ),              # venue name, e.g. "binance"
        "instrument": (NAME, REQ),         # oracle symbol, e.g. "BTC-USD"
        "price": (F64, REQ),               # quote units per base unit
        "venue_ts_ns": (I64, REQ),         # venue's own timestamp, UTC ns
    },
    MsgType.FILL: {
        "trade_id": (ID, REQ),
        "instrument_id": (ID, REQ),
        "maker_account": (ID, REQ),
        "taker_account": (ID, REQ),
        "qty_units": (I64, REQ),           # taker's side: + buy, - sell; instrument qty units
        "price_units": (I64, REQ),         # price * price_scale of the instrument
        "maker_fee_units": (I64, REQ),     # settle-asset units; negative = rebate
        "taker_fee_units": (I64, REQ),     # settle-asset units; negative = rebate
        "taker_side": (SIDE, REQ),         # must agree with the sign of qty_units
    },
    MsgType.DEPOSIT: {
        "request_id": (ID, REQ),
        "account": (ID, REQ),
        "asset": (NAME, REQ),              # collateral asset, e.g. "USDT"
        "amount_units": (POS, REQ),        # asset integer units, > 0
        "transfer_id": (POS, OPT),         # (version 2) custody's id of this transfer, never
                                           #   reused: a retry carries it again, applied once
    },
    MsgType.WITHDRAWAL: {
        "request_id": (ID, REQ),
        "account": (ID, REQ),
        "asset": (NAME, REQ),
        "amount_units": (POS, REQ),
        "transfer_id": (POS, OPT),
    },
    MsgType.COLLATERAL_REPLY: {
        "request_id": (ID, REQ),
        "code": (CODE, REQ),               # 0 = applied, else 31xx
        "balance_units": (I64, REQ),       # balance of that asset after the request
    },
    MsgType.OPEN_ACCOUNT: {
        "request_id": (ID, REQ),
        "account": (ID, REQ),              # the new account's id (its partition: id mod partitions)
        "mode": (MODE, OPT),               # its new positions' margin mode: "cross" (absent) or "isolated"
    },
    MsgType.ISOLATED_MARGIN: {
        "request_id": (ID, REQ),
        "account": (ID, REQ),
        "instrument_id": (ID, REQ),        # its isolated position's instrument
        "amount_units": (I64, REQ),        # settle-asset units: > 0 into the position, < 0 out of it
    },
    MsgType.OPEN_ACCOUNT_REPLY: {
        "request_id": (ID, REQ),
        "code": (CODE, REQ),               # 0 = opened, 3108 exists already, 3109 partition full
    },
    MsgType.ORDER_CHECK: {
        "request_id": (ID, REQ),
        "account": (ID, REQ),
        "instrument_id": (ID, REQ),
        "qty_units": (I64, REQ),           # + buy, - sell
        "price_units": (I64, REQ),
    },
    MsgType.ORDER_CHECK_REPLY: {
        "request_id": (ID, REQ),
        "code": (CODE, REQ),               # 0 = accept, else 4xxx
        "post_equity_usd": (F64, REQ),
        "post_initial_margin_usd": (F64, REQ),
    },
    MsgType.LIQUIDATION_ORDER: {
        "order_id": (ID, REQ),
        "account": (ID, REQ),
        "instrument_id": (ID, REQ),
        "qty_units": (I64, REQ),           # + buy, - sell (closes the position)
        "limit_price_units": (I64, REQ),
        "reason": (CODE, REQ),             # 6xxx
        "tick_seq": (REF_SEQ, REQ),        # seq of the oracle tick that triggered it
        "tick_recv_ns": (I64, REQ),        # engine clock, UTC ns
        "decided_ns": (I64, REQ),
        "sent_ns": (I64, REQ),
    },
    MsgType.ENGINE_EVENT: {
        "code": (CODE, REQ),               # 7xxx (or any code being reported)
        "instrument": (NAME_OR_NIL, OPT),
        "account": (ID_OR_NIL, OPT),
        "detail": (TEXT, REQ),
    },
    MsgType.BATCH: {
        "of": (MSG_TYPE, REQ),             # type of every body in msgs (v1: FILL)
        "msgs": (Kind(list, 1, MAX_BATCH_MSGS, doc="array of maps, 1..4096"), REQ),
    },
    MsgType.ACK: {
        "ref_seq": (ACK_SEQ, REQ),         # seq acknowledged (a BATCH: its first seq)
        "code": (CODE, REQ),               # 0, or 3001 for a duplicate
    },
    MsgType.REJECT: {
        "ref_seq": (REF_SEQ, REQ),         # 0 when the frame's seq could not be read
        "ref_type": (MSG_TYPE, REQ),       # 0 when the frame's type could not be read
        "code": (CODE, REQ),               # 1xxx wire, or the subsystem's code
        "detail": (TEXT, REQ),
    },
}

#: Types that may travel inside a BATCH.
BATCHABLE = frozenset({MsgType.FILL})


# ---------------------------------------------------------------------------------------
# Decoded results
# ---------------------------------------------------------------------------------------

class Message(NamedTuple):
    """A valid message. ``fields`` holds exactly the type's schema fields (header keys
    removed; an absent optional field is ``None``). For a BATCH, ``fields["msgs"]`` is the
    list of validated field dicts; message ``i`` has sequence number ``seq + i``."""

    type: MsgType
    seq: int
    ts_ns: int
    fields: dict


class Rejected(NamedTuple):
    """A frame that is not a valid message: a 1xxx code and a short reason.

    ``ref_seq``/``ref_type`` are the frame's seq and type when they could be read
    (else 0), for the REJECT reply."""

    code: Code
    detail: str
    ref_seq: int = 0
    ref_type: int = 0


Decoded = Union[Message, Rejected]


class EncodeError(ValueError):
    """``encode`` was given fields that ``decode`` would reject (a sender bug)."""

    def __init__(self, code: Code, detail: str):
        super().__init__(f"{code.name} ({int(code)}): {detail}")
        self.code = code
        self.detail = detail


# ---------------------------------------------------------------------------------------
# Validation (shared by encode and decode)
# ---------------------------------------------------------------------------------------

_MISSING = object()
_TYPE_BY_NUMBER: dict[int, MsgType] = {int(m): m for m in MsgType}


def _compile(schema: dict[str, tuple[Kind, bool]]) -> tuple:
    """Flatten a schema to a tuple of plain tuples for the validation loop."""
    return tuple((name, k.py, k.lo, k.hi, k.choices, k.ascii, k.nullable, req)
                 for name, (k, req) in schema.items())


#: Fields added after version 1: (type, field) -> the version that added it. ``SCHEMAS``
#: is the latest version's; a frame of an older version that carries a later field is
#: rejected as an unknown field (1009), like any key its version does not have.
FIELD_SINCE: dict[tuple[MsgType, str], int] = {
    (MsgType.DEPOSIT, "transfer_id"): 2,
    (MsgType.WITHDRAWAL, "transfer_id"): 2,
}


def schema_of(mtype: MsgType, version: int) -> dict[str, tuple[Kind, bool]]:
    """The fields of ``mtype`` in protocol ``version``."""
    return {n: k for n, k in SCHEMAS[mtype].items() if FIELD_SINCE.get((mtype, n), 1) <= version}


_SPECS_BY_VERSION: dict[int, dict[int, tuple]] = {
    v: {int(t): _compile(schema_of(t, v)) for t in SCHEMAS} for v in SUPPORTED_VERSIONS}
_SPECS = _SPECS_BY_VERSION[LATEST_VERSION]


def _short(val: object) -> str:
    """Describe a rejected value without walking it (no repr of containers)."""
    tv = type(val)
    if tv is int or tv is float or tv is bool or val is None:
        return repr(val)
    if tv is str:
        return repr(val[:40]) + ("..." if len(val) > 40 else "")
    return tv.__name__


def _check_fields(body: dict, spec: tuple, where: str) -> tuple[Code, str] | None:
    """Validate ``body`` (header keys already removed) against ``spec`` in place.

    Steps per field, in schema order: 1. presence (absent optional -> ``None``);
    2. exact type (``bool`` is not ``int``; an int for a float field is converted;
    nil only where nullable); 3. domain (int range, finite float, string length, ASCII,
    choices). Then 4. no keys outside the schema. Returns ``None`` or (code, detail).
    """
    seen = 0
    added = 0
    for name, py, lo, hi, choices, ascii_only, nullable, required in spec:
        val = body.get(name, _MISSING)
        if val is _MISSING:
            if required:
                return Code.WIRE_MISSING_FIELD, f"{where}{name}: missing"
            body[name] = None
            added += 1
            continue
        seen += 1
        tv = type(val)
        if tv is not py:
            if tv is int and py is float:
                val = float(val)
                body[name] = val
            elif val is None and nullable:
                continue
            else:
                return (Code.WIRE_BAD_FIELD_TYPE,
                        f"{where}{name}: expected {py.__name__}, got {tv.__name__}")
        if py is int:
            if val < lo or val > hi:
                return Code.WIRE_BAD_VALUE, f"{where}{name}: {val} outside [{lo}, {hi}]"
        elif py is float:
            if val - val != 0.0:                      # NaN and +-inf only
                return Code.WIRE_BAD_VALUE, f"{where}{name}: {val} is not finite"
        elif py is str:
            n = len(val)
            if n < lo or n > hi or (ascii_only and not val.isascii()) or (
                    choices is not None and val not in choices):
                return Code.WIRE_BAD_VALUE, f"{where}{name}: {_short(val)} out of domain"
        else:                                         # list (BATCH msgs): length only
            if len(val) < lo or len(val) > hi:
                return Code.WIRE_BAD_VALUE, f"{where}{name}: length {len(val)} outside [{lo}, {hi}]"
    if len(body) != seen + added:
        for key in body:
            if type(key) is not str or not any(key == s[0] for s in spec):
                return Code.WIRE_UNKNOWN_FIELD, f"{where}{_short(key)}: not a field of this type"
    return None


def _check_fill(f: dict, where: str) -> tuple[Code, str] | None:
    """FILL cross-field rule: ``taker_side`` agrees with the sign of ``qty_units``
    (zero quantity passes the wire; the fills subsystem rejects it as FILL_BAD_QTY)."""
    q = f["qty_units"]
    if (q > 0 and f["taker_side"] != "buy") or (q < 0 and f["taker_side"] != "sell"):
        return Code.WIRE_BAD_VALUE, f"{where}taker_side {f['taker_side']!r} disagrees with qty_units {q}"
    return None


def _check_batch(f: dict, where: str) -> tuple[Code, str] | None:
    """BATCH: ``of`` is a batchable type; every element of ``msgs`` is a valid body of it."""
    of = f["of"]
    inner = _TYPE_BY_NUMBER.get(of)
    if inner is None:
        return Code.WIRE_UNKNOWN_TYPE, f"of: unknown message type {of}"
    if inner not in BATCHABLE:
        return Code.WIRE_BAD_VALUE, f"of: {inner.name} cannot be batched"
    f["of"] = inner
    spec = _SPECS[of]
    fast = _FAST[of]
    post = _POST_CHECKS.get(of)
    for i, body in enumerate(f["msgs"]):
        if type(body) is dict and fast(body) and (post is None or post(body, "") is None):
            continue                                  # hot path
        if type(body) is not dict:
            return Code.WIRE_BAD_FIELD_TYPE, f"msgs[{i}]: expected map, got {type(body).__name__}"
        bad = _check_fields(body, spec, f"msgs[{i}].")
        if bad is None and post is not None:
            bad = post(body, f"msgs[{i}]: ")
        if bad is not None:
            return bad
    return None


_POST_CHECKS = {int(MsgType.FILL): _check_fill, int(MsgType.BATCH): _check_batch}


def _gen_fast_check(mtype: MsgType, schema: dict[str, tuple[Kind, bool]]):
    """Generate, from ``schema``, a predicate that is True only for a body that
    ``_check_fields`` accepts unchanged: every field present, exact types, in domain,
    no other keys. It is the hot path; on False the caller runs ``_check_fields`` for
    the exact code and detail (and for what it tolerates: absent optionals, nil, ints
    in float fields). The tests check that it never accepts what the reference rejects.
    """
    env: dict = {}
    fetch, conds = [], []
    for i, (name, (k, _req)) in enumerate(schema.items()):
        x = f"x{i}"
        fetch.append(f"        {x} = b[{name!r}]")
        if k.py is int:
            c = f"type({x}) is int and {k.lo} <= {x} <= {k.hi}"
        elif k.py is float:
            c = f"type({x}) is float and {x} - {x} == 0.0"
        elif k.py is str:
            c = f"type({x}) is str and {k.lo} <= len({x}) <= {k.hi}"
            if k.ascii:
                c += f" and {x}.isascii()"
            if k.choices is not None:
                env[f"C{i}"] = k.choices
                c += f" and {x} in C{i}"
        else:
            c = f"type({x}) is list and {k.lo} <= len({x}) <= {k.hi}"
        if k.nullable:
            c = f"{x} is None or ({c})"
        conds.append(f"({c})")
    src = "\n".join([
        f"def fast_{mtype.name.lower()}(b):",
        f"    if len(b) != {len(schema)}:",
        "        return False",
        "    try:",
        *fetch,
        "    except KeyError:",
        "        return False",
        "    return (" + (" and\n            ".join(conds) or "True") + ")",
    ])
    exec(compile(src, f"<feeds.protocol fast check {mtype.name}>", "exec"), env)  # noqa: S102
    fn = env[f"fast_{mtype.name.lower()}"]
    fn.source = src
    return fn


#: Per-type generated fast predicates (see ``_gen_fast_check``), keyed by type number.
_FAST_BY_VERSION: dict[int, dict[int, object]] = {
    v: {int(t): _gen_fast_check(t, schema_of(t, v)) for t in SCHEMAS} for v in SUPPORTED_VERSIONS}
_FAST = _FAST_BY_VERSION[LATEST_VERSION]


def _validate(body: dict, t: int, version: int = LATEST_VERSION) -> tuple[Code, str] | None:
    """Fields of type ``t`` in ``version`` (header removed), then the type's cross-field
    rule (a BATCH's elements: FILLs, the same in every version)."""
    bad = _check_fields(body, _SPECS_BY_VERSION[version][t], "")
    if bad is None:
        post = _POST_CHECKS.get(t)
        if post is not None:
            bad = post(body, "")
    return bad


# ---------------------------------------------------------------------------------------
# Decode
# ---------------------------------------------------------------------------------------

_unpackb = msgpack.unpackb
_UNPACK_LIMITS = dict(
    raw=False, strict_map_key=True, use_list=True,
    max_str_len=_MAX_STR_BYTES, max_bin_len=_MAX_STR_BYTES,
    max_array_len=MAX_BATCH_MSGS, max_map_len=_MAX_MAP_LEN, max_ext_len=_MAX_EXT_BYTES,
)


def decode(frame: bytes, *, max_size: int = MAX_FRAME_BYTES,
           types: frozenset | None = None) -> Decoded:
    """Decode one frame into a ``Message``, or a ``Rejected`` with a 1xxx code.

    Never raises. Steps, in order (the first failure decides the code):

    1. size: ``len(frame) > max_size`` -> WIRE_OVERSIZED, before any unpacking;
    2. unpack: one ``msgpack.unpackb`` with tight length limits (strings, arrays, maps,
       ext; nesting is capped by msgpack's stack) -> WIRE_MALFORMED on any failure,
       trailing bytes included;
    3. a map -> else WIRE_NOT_A_MAP;
    4. ``v`` an int in ``SUPPORTED_VERSIONS`` -> else WIRE_BAD_VERSION;
    5. ``t`` an int (else MISSING_FIELD / BAD_FIELD_TYPE) naming a ``MsgType``
       (else WIRE_UNKNOWN_TYPE), and in ``types`` when given (else WIRE_UNEXPECTED_TYPE);
    6. ``seq`` uint64 >= 1, ``ts_ns`` int64 >= 0;
    7. the type's fields (see ``_check_fields``) and its cross-field rule.

    Parameters
    ----------
    frame : bytes-like
        One ZeroMQ frame (bytes, memoryview, zmq.Frame).
    max_size : int
        The stream's frame limit in bytes.
    types : frozenset of MsgType, optional
        The types this stream accepts.
    """
    try:
        if len(frame) > max_size:
            return Rejected(Code.WIRE_OVERSIZED, f"frame of {len(frame)} bytes > limit {max_size}")
        body = _unpackb(frame, **_UNPACK_LIMITS)
    except Exception as exc:  # noqa: BLE001 - any unpacking failure is a malformed frame
        return Rejected(Code.WIRE_MALFORMED, f"{type(exc).__name__}: {str(exc)[:_DETAIL_LIMIT]}")
    if type(body) is not dict:
        return Rejected(Code.WIRE_NOT_A_MAP, f"body is {type(body).__name__}, not a map")

    v = body.pop("v", _MISSING)
    if type(v) is not int or v not in SUPPORTED_VERSIONS:
        return Rejected(Code.WIRE_BAD_VERSION, f"v: {_short(v) if v is not _MISSING else 'missing'}")
    t = body.pop("t", _MISSING)
    if type(t) is not int:
        if t is _MISSING:
            return Rejected(Code.WIRE_MISSING_FIELD, "t: missing")
        return Rejected(Code.WIRE_BAD_FIELD_TYPE, f"t: expected int, got {type(t).__name__}")
    mtype = _TYPE_BY_NUMBER.get(t)
    if mtype is None:
        return Rejected(Code.WIRE_UNKNOWN_TYPE, f"t: unknown message type {t}",
                        _peek_seq(body), t if 0 <= t <= 255 else 0)
    if types is not None and mtype not in types:
        return Rejected(Code.WIRE_UNEXPECTED_TYPE, f"t: {mtype.name} not accepted on this stream",
                        _peek_seq(body), t)
    seq = body.pop("seq", _MISSING)
    if type(seq) is not int or seq < 1 or seq > UINT64_MAX:
        return Rejected(*_header_problem("seq", seq, 1, UINT64_MAX), 0, t)
    ts_ns = body.pop("ts_ns", _MISSING)
    if type(ts_ns) is not int or ts_ns < 0 or ts_ns > INT64_MAX:
        return Rejected(*_header_problem("ts_ns", ts_ns, 0, INT64_MAX), seq, t)

    if _FAST_BY_VERSION[v][t](body):         # hot path: exact, complete, in domain
        post = _POST_CHECKS.get(t)
        bad = None if post is None else post(body, "")
    else:                                    # reference path: exact code and detail
        bad = _validate(body, t, v)
    if bad is None and mtype is MsgType.BATCH and seq + len(body["msgs"]) - 1 > UINT64_MAX:
        bad = (Code.WIRE_BAD_VALUE, f"seq: a batch of {len(body['msgs'])} from {seq} passes 2**64-1")
    if bad is not None:
        return Rejected(bad[0], bad[1], seq, t)
    return Message(mtype, seq, ts_ns, body)


def _peek_seq(body: dict) -> int:
    """The body's ``seq`` when it is a valid one, else 0 (for a REJECT's ``ref_seq``)."""
    seq = body.get("seq")
    return seq if type(seq) is int and 1 <= seq <= UINT64_MAX else 0


def _header_problem(name: str, val: object, lo: int, hi: int) -> tuple[Code, str]:
    if val is _MISSING:
        return Code.WIRE_MISSING_FIELD, f"{name}: missing"
    if type(val) is not int:
        return Code.WIRE_BAD_FIELD_TYPE, f"{name}: expected int, got {type(val).__name__}"
    return Code.WIRE_BAD_VALUE, f"{name}: {val} outside [{lo}, {hi}]"


_FILL_TYPES = frozenset({MsgType.FILL, MsgType.BATCH})


class FillRun(NamedTuple):
    """Fills from one frame: fill ``i`` has sequence number ``first_seq + i``."""

    first_seq: int
    ts_ns: int
    fills: list


def decode_fills(frame: bytes, *, max_size: int = MAX_FRAME_BYTES) -> FillRun | Rejected:
    """Decode a FILL or a BATCH of FILLs into one ``FillRun`` (the fills gateway's loop).

    Any other type is WIRE_UNEXPECTED_TYPE. A batch is all-or-nothing: one bad fill
    rejects the frame, with its index in the detail. Never raises.
    """
    m = decode(frame, max_size=max_size, types=_FILL_TYPES)
    if type(m) is Rejected:
        return m
    if m.type is MsgType.FILL:
        return FillRun(m.seq, m.ts_ns, [m.fields])
    return FillRun(m.seq, m.ts_ns, m.fields["msgs"])


# ---------------------------------------------------------------------------------------
# Encode
# ---------------------------------------------------------------------------------------

_packb = msgpack.Packer(use_bin_type=True, use_single_float=False, autoreset=True).pack


def _coerce(fields: dict, schema: dict[str, tuple[Kind, bool]]) -> dict:
    """Copy ``fields`` in schema order, turning numpy scalars and other Integral/Real
    values into ``int``/``float`` and dropping ``None`` optionals; unknown keys are kept
    so that validation reports them."""
    out = {}
    for name, (kind, _req) in schema.items():
        if name not in fields:
            continue
        val = fields[name]
        if val is None and not _req:
            continue
        if kind.py is int and type(val) is not int and isinstance(val, numbers.Integral) \
                and not isinstance(val, bool):
            val = int(val)
        elif kind.py is float and type(val) is not float and isinstance(val, numbers.Real) \
                and not isinstance(val, bool):
            val = float(val)
        out[name] = val
    for name in fields:
        if name not in schema:
            out[name] = fields[name]
    return out


def encode(msg_type: int, fields: dict, *, seq: int, ts_ns: int, version: int | None = None) -> bytes:
    """Encode one message: header keys first, then the fields in schema order.

    The body is validated with the decoder's own rules before it is packed, so a frame
    this returns always decodes. ``None`` for an optional field omits the key; numpy and
    other ``Integral``/``Real`` scalars are written as msgpack int/float64. ``version``:
    the ``v`` to write; default the lowest supported version that has every field given
    (version 1 unless a later field is set).

    Raises
    ------
    EncodeError
        When ``decode`` would reject the message (the code says why).
    """
    mtype = _TYPE_BY_NUMBER.get(msg_type) if isinstance(msg_type, int) and not isinstance(msg_type, bool) else None
    if mtype is None:
        raise EncodeError(Code.WIRE_UNKNOWN_TYPE, f"unknown message type {msg_type!r}")
    for name, val, lo, hi in (("seq", seq, 1, UINT64_MAX), ("ts_ns", ts_ns, 0, INT64_MAX)):
        if type(val) is not int or not lo <= val <= hi:
            raise EncodeError(*_header_problem(name, val, lo, hi))
    body = _coerce(fields, SCHEMAS[mtype])
    if version is None:
        version = max([1] + [FIELD_SINCE.get((mtype, n), 1) for n in body])
    if version not in SUPPORTED_VERSIONS:
        raise EncodeError(Code.WIRE_BAD_VERSION, f"version {version!r} not in {sorted(SUPPORTED_VERSIONS)}")
    check = dict(body)
    if mtype is MsgType.BATCH and isinstance(body.get("msgs"), (list, tuple)):
        of = body.get("of")
        inner = SCHEMAS.get(_TYPE_BY_NUMBER.get(of), {}) if type(of) is int else {}
        body["msgs"] = [_coerce(m, inner) if isinstance(m, dict) else m for m in body["msgs"]]
        check["msgs"] = [dict(m) if type(m) is dict else m for m in body["msgs"]]
    bad = _validate(check, int(mtype), version)
    if bad is not None:
        raise EncodeError(*bad)
    out = {"v": version, "t": int(mtype), "seq": seq, "ts_ns": ts_ns}
    out.update(body)
    return _packb(out)


def encode_batch(of: int, msgs: list[dict], *, first_seq: int, ts_ns: int) -> bytes:
    """Encode ``msgs`` (field dicts of type ``of``) as one BATCH frame; message ``i``
    takes sequence number ``first_seq + i``."""
    return encode(MsgType.BATCH, {"of": of, "msgs": list(msgs)}, seq=first_seq, ts_ns=ts_ns)


# ---------------------------------------------------------------------------------------
# Sequence numbers
# ---------------------------------------------------------------------------------------

def restamp(frame: bytes, seq: int, ts_ns: int) -> bytes | None:
    """``frame`` with its header's ``seq`` and ``ts_ns`` replaced (every other key and the
    key order kept): what a relay that merges several senders into one stream sends on
    (engine/runtime/liqgw.py, the events PUB). None when ``frame`` is not a msgpack map
    with those header keys (nothing to renumber). For the engine's own frames: the
    body is not validated again."""
    try:
        body = _unpackb(frame, **_UNPACK_LIMITS)
    except Exception:                      # msgpack's errors have no common base class
        return None
    if type(body) is not dict or "seq" not in body or "ts_ns" not in body:
        return None
    body["seq"] = seq
    body["ts_ns"] = ts_ns
    return _packb(body)


class Sequencer:
    """A sender stream's sequence numbers: 1, 2, 3, ...; a BATCH of n takes n numbers.

    ``encode``/``encode_batch`` take the numbers only when encoding succeeds, so a
    sender bug that raises ``EncodeError`` leaves no hole in the stream.
    """

    __slots__ = ("last",)

    def __init__(self, last: int = 0):
        self.last = last                     # last number handed out; 0 = none yet

    def next(self, n: int = 1) -> int:
        """Take ``n`` consecutive numbers; return the first."""
        if n < 1 or self.last + n > UINT64_MAX:
            raise OverflowError("sequence exhausted or n < 1")
        first = self.last + 1
        self.last += n
        return first

    def encode(self, msg_type: int, fields: dict, ts_ns: int | None = None) -> bytes:
        """Encode one message with the next number (``ts_ns`` defaults to now)."""
        frame = encode(msg_type, fields, seq=self.last + 1,
                       ts_ns=time.time_ns() if ts_ns is None else ts_ns)
        self.last += 1
        return frame

    def encode_known(self, msg_type: MsgType, fields: dict, ts_ns: int | None = None) -> bytes:
        """Encode with the next number WITHOUT validation: for the engine's own hot-path
        messages, whose fields are built by the engine as plain ``int``/``float``/``str``
        in schema order (the tests decode what it produces). Anything from outside goes
        through ``encode``."""
        self.last += 1
        out = {"v": VERSION, "t": int(msg_type), "seq": self.last,
               "ts_ns": time.time_ns() if ts_ns is None else ts_ns}
        out.update(fields)
        return _packb(out)

    def encode_batch(self, of: int, msgs: list[dict], ts_ns: int | None = None) -> bytes:
        """Encode a BATCH taking ``len(msgs)`` numbers."""
        frame = encode_batch(of, msgs, first_seq=self.last + 1,
                             ts_ns=time.time_ns() if ts_ns is None else ts_ns)
        self.last += len(msgs)
        return frame


class SeqVerdict(NamedTuple):
    """Classification of an incoming run ``seq .. seq+count-1``.

    ``skip``: leading messages of the run already seen (drop them; apply the rest).
    ``gap_first..gap_last``: the missing range when ``status`` is GAP, else 0, 0.
    """

    status: SeqStatus
    skip: int = 0
    gap_first: int = 0
    gap_last: int = 0


_VERDICT_NEW = SeqVerdict(SeqStatus.NEW)


class SequenceTracker:
    """A receiver's view of one sender stream (keep one per stream identity).

    Invariant: every number ``<= last`` has been applied or reported missing; nothing
    above ``last`` has been seen. Only accepted messages advance it: feed it decoded
    ``Message``s (``receive`` does this), never rejected frames.
    """

    __slots__ = ("last",)

    def __init__(self, last: int = 0):
        self.last = last

    def observe(self, seq: int, count: int = 1) -> SeqVerdict:
        """Classify the run ``seq .. seq+count-1`` and advance past it.

        - entirely ``<= last``: DUPLICATE (acknowledge, drop; state unchanged);
        - starts at ``last + 1`` or overlaps ``last``: NEW (drop ``skip`` leading ones);
        - starts above ``last + 1``: GAP, missing ``last+1 .. seq-1``; accepted.
        """
        last = self.last
        end = seq + count - 1
        if end <= last:
            return SeqVerdict(SeqStatus.DUPLICATE, count)
        self.last = end
        if seq == last + 1:
            return _VERDICT_NEW
        if seq <= last:
            return SeqVerdict(SeqStatus.NEW, last + 1 - seq)
        return SeqVerdict(SeqStatus.GAP, 0, last + 1, seq - 1)

    def receive(self, frame: bytes, *, max_size: int = MAX_FRAME_BYTES,
                types: frozenset | None = None) -> tuple[Decoded, SeqVerdict | None]:
        """Decode ``frame``; when valid, classify its sequence numbers.

        Returns ``(Rejected, None)`` with the tracker untouched, or ``(Message, verdict)``.
        """
        m = decode(frame, max_size=max_size, types=types)
        if type(m) is Rejected:
            return m, None
        n = len(m.fields["msgs"]) if m.type is MsgType.BATCH else 1
        return m, self.observe(m.seq, n)


# ---------------------------------------------------------------------------------------
# Generated documentation parts: `python -m feeds.protocol`
# ---------------------------------------------------------------------------------------

EXAMPLE_TS_NS = 1_767_225_600_000_000_000          # 2026-01-01T00:00:00Z

EXAMPLES: dict[MsgType, dict] = {
    MsgType.ORACLE_TICK: {"venue": "binance", "instrument": "BTC-USD", "price": 97123.5,
                          "venue_ts_ns": EXAMPLE_TS_NS - 2_000_000},
    MsgType.FILL: {"trade_id": 884213, "instrument_id": 1, "maker_account": 1001,
                   "taker_account": 2002, "qty_units": -250, "price_units": 9712350,
                   "maker_fee_units": -4856, "taker_fee_units": 12141, "taker_side": "sell"},
    MsgType.DEPOSIT: {"request_id": 77, "account": 2002, "asset": "USDT",
                      "amount_units": 5_000_000_000, "transfer_id": 7_700_031},
    MsgType.WITHDRAWAL: {"request_id": 78, "account": 2002, "asset": "USDT",
                         "amount_units": 1_000_000_000, "transfer_id": 7_700_032},
    MsgType.COLLATERAL_REPLY: {"request_id": 78, "code": 0, "balance_units": 4_000_000_000},
    MsgType.OPEN_ACCOUNT: {"request_id": 76, "account": 2002, "mode": "isolated"},
    MsgType.OPEN_ACCOUNT_REPLY: {"request_id": 76, "code": 0},
    MsgType.ISOLATED_MARGIN: {"request_id": 79, "account": 2002, "instrument_id": 0, "amount_units": 250_000_000},
    MsgType.ORDER_CHECK: {"request_id": 5150, "account": 2002, "instrument_id": 1,
                          "qty_units": 1000, "price_units": 9712000},
    MsgType.ORDER_CHECK_REPLY: {"request_id": 5150, "code": 4001,
                                "post_equity_usd": 3875.25, "post_initial_margin_usd": 9712.0},
    MsgType.LIQUIDATION_ORDER: {"order_id": 6270825227370455, "account": 2002, "instrument_id": 1,
                                "qty_units": 250, "limit_price_units": 9800000,
                                "reason": 6001, "tick_seq": 31337,
                                "tick_recv_ns": EXAMPLE_TS_NS - 41_000,
                                "decided_ns": EXAMPLE_TS_NS - 29_000,
                                "sent_ns": EXAMPLE_TS_NS - 25_000},
    MsgType.ENGINE_EVENT: {"code": 7001, "instrument": "ETH-USD", "account": None,
                           "detail": "n_used=2 quorum=3 last_good_mark=3412.5"},
    MsgType.BATCH: {"of": MsgType.FILL, "msgs": [
        {"trade_id": 884214, "instrument_id": 1, "maker_account": 1001, "taker_account": 2002,
         "qty_units": 100, "price_units": 9712400, "maker_fee_units": -1942,
         "taker_fee_units": 4856, "taker_side": "buy"},
        {"trade_id": 884215, "instrument_id": 2, "maker_account": 1003, "taker_account": 2002,
         "qty_units": -3, "price_units": 365000, "maker_fee_units": 0,
         "taker_fee_units": 27, "taker_side": "sell"}]},
    MsgType.ACK: {"ref_seq": 42, "code": 0},
    MsgType.REJECT: {"ref_seq": 43, "ref_type": 10, "code": 1008,
                     "detail": "qty_units: 9223372036854775808 outside [-9223372036854775808, 9223372036854775807]"},
}


def _hexdump(data: bytes) -> str:
    lines = []
    for off in range(0, len(data), 16):
        chunk = data[off:off + 16]
        hexs = " ".join(f"{b:02x}" for b in chunk)
        text = "".join(chr(b) if 32 <= b < 127 else "." for b in chunk)
        lines.append(f"{off:04x}  {hexs:<47}  {text}")
    return "\n".join(lines)


def _doc_parts() -> str:
    """The generated sections of docs/protocol.md: the code table and the examples."""
    from engine.codes import REPORTED, subsystem

    out = ["## 8. Reason codes\n",
           "All codes of all ranges, from `engine/codes.py` (generated): what each means and how "
           "it reaches anyone. REJECT: in a REJECT on the acknowledged fills stream or the checks "
           "socket; event: an ENGINE_EVENT on the events PUB; counted: in the process's counters "
           "only (`margin-engine status`, its log); raised: an exception of the Python API.\n",
           "| code | name | subsystem | meaning; how it is reported |", "|---:|---|---|---|"]
    out += [f"| {int(c)} | `{c.name}` | {subsystem(c)} | {REPORTED[int(c)]} |" for c in Code]
    out.append("\n## 9. Example messages\n")
    out.append("Generated from `feeds.protocol.EXAMPLES` with seq 42 and ts_ns "
               f"{EXAMPLE_TS_NS} (2026-01-01T00:00:00Z); keys in encoded order. "
               "Offset, bytes, ASCII.\n")
    for mtype, fields in EXAMPLES.items():
        frame = encode(mtype, fields, seq=42, ts_ns=EXAMPLE_TS_NS)
        shown = ", ".join(f"{k}={v!r}" for k, v in fields.items() if v is not None)
        out.append(f"### {mtype.name} (t = {int(mtype)}), {len(frame)} bytes\n")
        if mtype is not MsgType.BATCH:
            out.append(f"Fields: {shown}\n")
        else:
            out.append("A batch of the two fills below (seq 42 and 43).\n")
        out.append("```\n" + _hexdump(frame) + "\n```\n")
    return "\n".join(out)


if __name__ == "__main__":
    print(_doc_parts())
