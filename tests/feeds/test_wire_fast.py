"""The C wire fast path (``engine._wire``) held to the reference decoder (feeds/protocol.py).

The fast path may answer FALLBACK for anything; what it must never do is accept a frame
the reference rejects, or accept it with other values. Checked on valid frames written
by the reference encoder (where it must accept: the hot path really is hot), on
field-mutated bodies (wrong types, out-of-range values, unknown, missing and extra keys),
byte-mutated and truncated frames, and random bytes. The reply encoder must write the
reference encoder's bytes exactly.
"""

from __future__ import annotations

import msgpack
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine import _wire
from engine.runtime.gateway import FILL_DTYPE
from feeds.protocol import (INT64_MAX, INT64_MIN, UINT64_MAX, Message, MsgType, Rejected, Sequencer,
                            decode, decode_fills, encode, encode_batch)

FUZZ = settings(max_examples=300, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
MAX = 1 << 20
FIELDS = ("trade_id", "instrument_id", "maker_account", "taker_account", "qty_units", "price_units",
          "maker_fee_units", "taker_fee_units")

ids = st.one_of(st.integers(0, INT64_MAX), st.sampled_from([0, 1, 127, 128, 255, 256, 65535, 65536,
                                                             2**32 - 1, 2**32, INT64_MAX]))
i64 = st.one_of(st.integers(INT64_MIN, INT64_MAX),
                st.sampled_from([0, -1, -32, -33, -128, -129, -32768, -32769, -2**31, -2**31 - 1,
                                 INT64_MIN, INT64_MAX, 127, 128]))


@st.composite
def fills(draw):
    f = {k: draw(ids) for k in ("trade_id", "instrument_id", "maker_account", "taker_account")}
    f["qty_units"] = q = draw(i64)
    f["price_units"] = draw(i64)
    f["maker_fee_units"] = draw(i64)
    f["taker_fee_units"] = draw(i64)
    f["taker_side"] = "buy" if q > 0 else "sell" if q < 0 else draw(st.sampled_from(["buy", "sell"]))
    return f


seqs = st.one_of(st.integers(1, UINT64_MAX), st.sampled_from([1, INT64_MAX, INT64_MAX + 1, UINT64_MAX]))
stamps = st.integers(0, INT64_MAX)


def test_compiled_constants_are_the_engines():
    from engine.codes import Code
    from engine.runtime.ctl import RecordKind
    from feeds.protocol import MAX_BATCH_MSGS
    want = {"FILL_LEG": RecordKind.FILL_LEG, "FILL_UNKNOWN_ACCOUNT": Code.FILL_UNKNOWN_ACCOUNT,
            "FILL_SAME_ACCOUNT": Code.FILL_SAME_ACCOUNT,
            "FILL_UNKNOWN_INSTRUMENT": Code.FILL_UNKNOWN_INSTRUMENT, "FILL_BAD_QTY": Code.FILL_BAD_QTY,
            "FILL_BAD_PRICE": Code.FILL_BAD_PRICE, "FILL": MsgType.FILL, "BATCH": MsgType.BATCH,
            "ORDER_CHECK": MsgType.ORDER_CHECK, "ORDER_CHECK_REPLY": MsgType.ORDER_CHECK_REPLY,
            "MAX_BATCH_MSGS": MAX_BATCH_MSGS}
    assert _wire.COMPILED_CONSTANTS == {k: int(v) for k, v in want.items()}


def parser(max_size: int = MAX) -> tuple[_wire.FillIntake, np.ndarray]:
    """A FillIntake with no accounts and no rings: for parsing only."""
    buf = np.zeros(4096, FILL_DTYPE)
    return _wire.FillIntake(buf, np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, 2), np.uint64),
                            np.zeros(0, np.int64), np.zeros((1, 2), np.int64), 0, 1, max_size), buf


def fast_fills(frame: bytes, max_size: int = MAX):
    intake, buf = parser(max_size)
    status, seq, n = intake.parse(frame)
    rows = buf[:n].tolist()
    assert all(r[-1] == seq + i for i, r in enumerate(rows))      # each fill's own seq
    return status, seq, [dict(zip(FIELDS, map(int, r))) for r in rows]


def assert_fast_agrees(frame: bytes) -> int:
    """Fast OK implies reference accepts with the same values. Returns the fast status."""
    status, seq, got = fast_fills(frame)
    if status == _wire.OK:
        ref = decode_fills(frame, max_size=MAX)
        assert type(ref) is not Rejected, ref
        assert seq == ref.first_seq
        assert got == [{k: f[k] for k in FIELDS} for f in ref.fills]
    else:
        assert status == _wire.FALLBACK
    return status


@FUZZ
@given(fills(), seqs, stamps, st.sampled_from([1, 2]))
def test_valid_fill_is_taken_by_the_fast_path_with_the_reference_values(f, seq, ts, version):
    # versions 1 and 2: a FILL is the same body in both
    frame = encode(MsgType.FILL, f, seq=seq, ts_ns=ts, version=version)
    assert assert_fast_agrees(frame) == _wire.OK


@FUZZ
@given(st.lists(fills(), min_size=1, max_size=40), seqs.filter(lambda s: s <= UINT64_MAX - 40), stamps)
def test_valid_batch_is_taken_by_the_fast_path_with_the_reference_values(fs, seq, ts):
    frame = encode_batch(int(MsgType.FILL), fs, first_seq=seq, ts_ns=ts)
    assert assert_fast_agrees(frame) == _wire.OK


def test_a_full_batch_of_4096_is_taken_and_4097_falls_back():
    f = {"trade_id": 1, "instrument_id": 0, "maker_account": 1, "taker_account": 2, "qty_units": 5,
         "price_units": 10, "maker_fee_units": 0, "taker_fee_units": 0, "taker_side": "buy"}
    assert assert_fast_agrees(encode_batch(int(MsgType.FILL), [f] * 4096, first_seq=1, ts_ns=0)) == _wire.OK
    body = {"v": 1, "t": 90, "seq": 1, "ts_ns": 0, "of": 10, "msgs": [f] * 4097}
    assert assert_fast_agrees(msgpack.packb(body)) == _wire.FALLBACK


junk = st.one_of(st.none(), st.booleans(), st.floats(allow_nan=True), st.text(max_size=5),
                 st.binary(max_size=5), st.integers(INT64_MIN, UINT64_MAX), st.lists(st.integers(-9, 9), max_size=2),
                 st.sampled_from(["buy", "sell", "BUY", "", 1.0, 42.0, -1, INT64_MAX + 1, UINT64_MAX]))
keys = st.sampled_from(["v", "t", "seq", "ts_ns", "of", "msgs", "x", "trade_id", "instrument_id",
                        "maker_account", "taker_account", "qty_units", "price_units", "maker_fee_units",
                        "taker_fee_units", "taker_side", "request_id", "account"])


@st.composite
def mutated_bodies(draw):
    """A valid FILL or BATCH body with some keys set to junk, dropped or added."""
    fs = draw(st.lists(fills(), min_size=1, max_size=3))
    if draw(st.booleans()):
        body = {"v": 1, "t": 10, "seq": draw(seqs), "ts_ns": draw(stamps), **fs[0]}
        target = body
    else:
        body = {"v": 1, "t": 90, "seq": draw(st.integers(1, 1000)), "ts_ns": draw(stamps), "of": 10,
                "msgs": [dict(f) for f in fs]}
        target = draw(st.sampled_from([body] + body["msgs"]))
    for _ in range(draw(st.integers(1, 3))):
        k = draw(keys)
        action = draw(st.sampled_from(["set", "drop", "set"]))
        if action == "drop":
            target.pop(k, None)
        else:
            target[k] = draw(junk)
    return body


@FUZZ
@given(mutated_bodies())
def test_mutated_bodies_are_never_accepted_where_the_reference_rejects(body):
    assert_fast_agrees(msgpack.packb(body, use_bin_type=True))


@FUZZ
@given(fills(), st.data())
def test_byte_mutated_and_truncated_frames_agree(f, data):
    frame = bytearray(encode(MsgType.FILL, f, seq=7, ts_ns=1))
    i = data.draw(st.integers(0, len(frame) - 1))
    if data.draw(st.booleans()):
        frame[i] = data.draw(st.integers(0, 255))
    else:
        frame = frame[:i]
    assert_fast_agrees(bytes(frame))


@FUZZ
@given(st.binary(max_size=200))
def test_random_bytes_agree(raw):
    assert_fast_agrees(raw)


def test_trailing_bytes_oversize_and_other_types_fall_back():
    f = {"trade_id": 1, "instrument_id": 0, "maker_account": 1, "taker_account": 2, "qty_units": -5,
         "price_units": 10, "maker_fee_units": 0, "taker_fee_units": 0, "taker_side": "sell"}
    frame = encode(MsgType.FILL, f, seq=1, ts_ns=0)
    assert fast_fills(frame)[0] == _wire.OK
    assert fast_fills(frame + b"\x00")[0] == _wire.FALLBACK       # reference: WIRE_MALFORMED
    assert fast_fills(frame, len(frame) - 1)[0] == _wire.FALLBACK   # oversized
    tick = encode(MsgType.ORACLE_TICK, {"venue": "a", "instrument": "B", "price": 1.0, "venue_ts_ns": 0},
                  seq=1, ts_ns=0)
    assert fast_fills(tick)[0] == _wire.FALLBACK                    # reference: UNEXPECTED_TYPE
    assert fast_fills(b"")[0] == _wire.FALLBACK


# ------------------------------------------------------------------ order checks

@st.composite
def checks(draw):
    return {"request_id": draw(ids), "account": draw(ids), "instrument_id": draw(ids),
            "qty_units": draw(i64), "price_units": draw(i64)}


def assert_check_agrees(frame: bytes) -> bool:
    got = _wire.parse_order_check(frame, MAX)
    if got is not None:
        ref = decode(frame, max_size=MAX)
        assert type(ref) is Message and ref.type == MsgType.ORDER_CHECK, ref
        f = ref.fields
        assert got == (ref.seq, f["request_id"], f["account"], f["instrument_id"], f["qty_units"],
                       f["price_units"])
    return got is not None


@FUZZ
@given(checks(), seqs, stamps, st.sampled_from([1, 2]))
def test_valid_order_check_is_taken_by_the_fast_path(c, seq, ts, version):
    assert assert_check_agrees(encode(MsgType.ORDER_CHECK, c, seq=seq, ts_ns=ts, version=version))


@FUZZ
@given(checks(), st.lists(st.tuples(keys, junk), min_size=1, max_size=3), st.booleans())
def test_mutated_order_checks_agree(c, changes, drop):
    body = {"v": 1, "t": 20, "seq": 3, "ts_ns": 4, **c}
    for k, v in changes:
        if drop:
            body.pop(k, None)
        else:
            body[k] = v
    assert_check_agrees(msgpack.packb(body, use_bin_type=True))


@FUZZ
@given(st.binary(max_size=120))
def test_random_bytes_are_never_an_order_check(raw):
    assert_check_agrees(raw)


@FUZZ
@given(seqs, stamps, ids, st.integers(0, 9999), st.floats(allow_nan=False, allow_infinity=False),
       st.floats(allow_nan=False, allow_infinity=False))
def test_reply_encoder_writes_the_reference_bytes(seq, ts, req, code, eq, im):
    want = Sequencer(seq - 1).encode_known(MsgType.ORDER_CHECK_REPLY, {
        "request_id": req, "code": code, "post_equity_usd": eq, "post_initial_margin_usd": im}, ts_ns=ts)
    assert _wire.encode_check_reply(seq, ts, req, code, eq, im) == want
    m = decode(want)
    assert type(m) is Message and m.fields["code"] == code
