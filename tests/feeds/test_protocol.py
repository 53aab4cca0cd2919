"""Wire protocol: round trips, the malformed-frame table, sequence numbers, the document.

Frames for malformed cases are packed with raw ``msgpack.packb`` (the encoder refuses
to produce them); ``raw_body`` starts from the type's documented example.
"""

from __future__ import annotations

import math
import pathlib
import re

import msgpack
import numpy as np
import pytest

from engine.codes import Code
from feeds import protocol as P
from feeds.protocol import (
    EXAMPLE_TS_NS, EXAMPLES, MAX_BATCH_MSGS, SCHEMAS, UINT64_MAX, EncodeError, FillRun,
    Message, MsgType, Rejected, Sequencer, SequenceTracker, SeqStatus, SeqVerdict, decode,
    decode_fills, encode, encode_batch, restamp,
)

DOC = pathlib.Path(__file__).resolve().parents[2] / "docs" / "protocol.md"
DROP = object()   # in raw_body overrides: remove the key
SEQ_42 = 42

ALICE_SELLS_250_BTC_UNITS = EXAMPLES[MsgType.FILL]          # qty -250, taker_side "sell"


def raw_body(mtype: int, **overrides) -> dict:
    """Header + the example fields of ``mtype``, with ``overrides`` (``DROP`` removes)."""
    base = {"v": P.LATEST_VERSION, "t": int(mtype), "seq": SEQ_42, "ts_ns": EXAMPLE_TS_NS}
    example = EXAMPLES.get(mtype, {})
    base.update({k: (int(v) if isinstance(v, MsgType) else v)
                 for k, v in example.items() if v is not None})
    for k, v in overrides.items():
        if v is DROP:
            base.pop(k, None)
        else:
            base[k] = v
    return base


def pack(obj) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def expected_fields(mtype: MsgType) -> dict:
    """What ``decode`` returns for the example: every schema field, optionals as None."""
    out = {name: EXAMPLES[mtype].get(name) for name in SCHEMAS[mtype]}
    return out


# ---------------------------------------------------------------------------------------
# Round trips
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("mtype", list(MsgType), ids=lambda m: m.name)
def test_round_trip_every_type(mtype):
    frame = encode(mtype, EXAMPLES[mtype], seq=SEQ_42, ts_ns=EXAMPLE_TS_NS)
    got = decode(frame)
    assert got == Message(mtype, SEQ_42, EXAMPLE_TS_NS, expected_fields(mtype))
    assert type(got.type) is MsgType


@pytest.mark.parametrize("mtype", list(MsgType), ids=lambda m: m.name)
def test_keys_encoded_header_first_then_schema_order(mtype):
    frame = encode(mtype, EXAMPLES[mtype], seq=SEQ_42, ts_ns=EXAMPLE_TS_NS)
    keys = list(msgpack.unpackb(frame))
    present = [k for k in SCHEMAS[mtype] if EXAMPLES[mtype].get(k) is not None]
    assert keys == ["v", "t", "seq", "ts_ns", *present]


def test_every_type_has_a_schema_and_an_example():
    assert set(SCHEMAS) == set(MsgType) == set(EXAMPLES)
    assert len({int(m) for m in MsgType}) == len(MsgType)
    assert all(0 < int(m) <= 255 for m in MsgType)     # fits REJECT.ref_type


def test_float_fields_are_float64_on_the_wire():
    frame = encode(MsgType.ORACLE_TICK, EXAMPLES[MsgType.ORACLE_TICK], seq=1, ts_ns=1)
    assert b"\xcb" + np.float64(97123.5).byteswap().tobytes() in frame   # 0xcb = float 64


def test_int_accepted_for_float_field_and_converted():
    frame = pack(raw_body(MsgType.ORACLE_TICK, price=97123))
    got = decode(frame)
    assert type(got) is Message
    assert got.fields["price"] == 97123.0 and type(got.fields["price"]) is float


def test_float32_accepted_for_float_field():
    frame = msgpack.packb(raw_body(MsgType.ORACLE_TICK, price=0.5), use_single_float=True)
    assert b"\xca" in frame                                           # 0xca = float 32
    assert decode(frame).fields["price"] == 0.5


def test_seq_accepts_full_uint64_range():
    got = decode(pack(raw_body(MsgType.ACK, seq=UINT64_MAX)))
    assert type(got) is Message and got.seq == UINT64_MAX


def test_engine_event_optional_fields_absent_or_nil_decode_to_none():
    absent = decode(pack(raw_body(MsgType.ENGINE_EVENT, instrument=DROP, account=DROP)))
    nil = decode(pack(raw_body(MsgType.ENGINE_EVENT, instrument=None, account=None)))
    assert absent.fields == nil.fields == {"code": 7001, "instrument": None,
                                           "account": None, "detail": EXAMPLES[MsgType.ENGINE_EVENT]["detail"]}
    present = decode(pack(raw_body(MsgType.ENGINE_EVENT, account=2002)))
    assert present.fields["account"] == 2002


def test_encode_omits_none_optional_and_accepts_numpy_scalars():
    frame = encode(MsgType.ENGINE_EVENT, {"code": 7005, "instrument": None, "account": np.int64(3),
                                          "detail": ""}, seq=1, ts_ns=1)
    assert "instrument" not in msgpack.unpackb(frame)
    fill = dict(ALICE_SELLS_250_BTC_UNITS, qty_units=np.int64(-250), trade_id=np.uint32(7))
    m = decode(encode(MsgType.FILL, fill, seq=1, ts_ns=1))
    assert m.fields["qty_units"] == -250 and type(m.fields["qty_units"]) is int
    tick = dict(EXAMPLES[MsgType.ORACLE_TICK], price=np.float32(2.5))
    assert type(decode(encode(MsgType.ORACLE_TICK, tick, seq=1, ts_ns=1)).fields["price"]) is float


def test_batch_round_trip_and_decode_fills():
    fills = [dict(ALICE_SELLS_250_BTC_UNITS, trade_id=i) for i in range(1, 101)]
    frame = encode_batch(MsgType.FILL, fills, first_seq=7, ts_ns=5)
    m = decode(frame)
    assert m.type is MsgType.BATCH and m.seq == 7
    assert m.fields["of"] is MsgType.FILL and m.fields["msgs"] == fills
    run = decode_fills(frame)
    assert run == FillRun(7, 5, fills)          # fill i has seq 7 + i
    single = decode_fills(encode(MsgType.FILL, fills[0], seq=3, ts_ns=5))
    assert single == FillRun(3, 5, [fills[0]])


def test_decode_fills_rejects_other_types_as_unexpected():
    got = decode_fills(encode(MsgType.DEPOSIT, EXAMPLES[MsgType.DEPOSIT], seq=9, ts_ns=1))
    assert got == Rejected(Code.WIRE_UNEXPECTED_TYPE, got.detail, 9, int(MsgType.DEPOSIT))


def test_decode_accepts_memoryview_and_bytearray():
    frame = encode(MsgType.ACK, {"ref_seq": 1, "code": 0}, seq=1, ts_ns=1)
    assert decode(memoryview(frame)) == decode(bytearray(frame)) == decode(frame)


# ---------------------------------------------------------------------------------------
# Malformed frames: one table, each case named, with its code
# ---------------------------------------------------------------------------------------

def _nested(depth: int) -> bytes:
    return b"\x91" * depth + b"\xc0"            # [[[...[nil]...]]]


def _fill_with_raw_qty(raw_value: bytes) -> bytes:
    """A FILL whose qty_units value is the given raw msgpack bytes."""
    frame = pack(raw_body(MsgType.FILL, qty_units=0x7777))
    marker = b"\xcd\x77\x77"                     # uint16 0x7777
    assert frame.count(marker) == 1
    return frame.replace(marker, raw_value)


VALID_FILL = pack(raw_body(MsgType.FILL))
TOO_MANY_FILLS = [dict(ALICE_SELLS_250_BTC_UNITS)] * (MAX_BATCH_MSGS + 1)

MALFORMED = [
    # id, frame, expected code
    ("empty_frame", b"", Code.WIRE_MALFORMED),
    ("reserved_byte_c1", b"\xc1", Code.WIRE_MALFORMED),
    ("truncated_fill", VALID_FILL[:-3], Code.WIRE_MALFORMED),
    ("trailing_bytes", VALID_FILL + b"\xc0", Code.WIRE_MALFORMED),
    ("two_bodies_in_one_frame", VALID_FILL + VALID_FILL, Code.WIRE_MALFORMED),
    ("invalid_utf8_string", pack(raw_body(MsgType.ORACLE_TICK)).replace(b"\xa7binance", b"\xa7bi\xffance"),
     Code.WIRE_MALFORMED),
    ("int_map_key", pack({1: 2}), Code.WIRE_MALFORMED),
    ("nesting_bomb_5000_deep", _nested(5000), Code.WIRE_MALFORMED),
    ("array_header_claims_4g_elements", b"\xdd\xff\xff\xff\xff", Code.WIRE_MALFORMED),
    ("map_of_33_keys", pack({f"k{i}": i for i in range(33)}), Code.WIRE_MALFORMED),
    ("string_over_4096_bytes", pack(raw_body(MsgType.ENGINE_EVENT, detail="x" * 5000)), Code.WIRE_MALFORMED),
    ("batch_of_4097_fills", pack(raw_body(MsgType.BATCH, msgs=TOO_MANY_FILLS)), Code.WIRE_MALFORMED),
    ("oversized_garbage_checked_before_unpack", b"\xc1" * (P.MAX_FRAME_BYTES + 1), Code.WIRE_OVERSIZED),
    ("not_a_map_array", pack([1, 2, 3]), Code.WIRE_NOT_A_MAP),
    ("not_a_map_int", pack(7), Code.WIRE_NOT_A_MAP),
    ("not_a_map_nil", pack(None), Code.WIRE_NOT_A_MAP),
    ("not_a_map_bin", pack(b"\x81\xa1v\x01"), Code.WIRE_NOT_A_MAP),
    ("version_missing", pack(raw_body(MsgType.FILL, v=DROP)), Code.WIRE_BAD_VERSION),
    ("version_3", pack(raw_body(MsgType.FILL, v=3)), Code.WIRE_BAD_VERSION),
    ("version_0", pack(raw_body(MsgType.FILL, v=0)), Code.WIRE_BAD_VERSION),
    ("version_bool_true", pack(raw_body(MsgType.FILL, v=True)), Code.WIRE_BAD_VERSION),
    ("version_float_1", pack(raw_body(MsgType.FILL, v=1.0)), Code.WIRE_BAD_VERSION),
    ("version_str", pack(raw_body(MsgType.FILL, v="1")), Code.WIRE_BAD_VERSION),
    ("type_missing", pack(raw_body(MsgType.FILL, t=DROP)), Code.WIRE_MISSING_FIELD),
    ("type_str", pack(raw_body(MsgType.FILL, t="FILL")), Code.WIRE_BAD_FIELD_TYPE),
    ("type_bool", pack(raw_body(MsgType.FILL, t=True)), Code.WIRE_BAD_FIELD_TYPE),
    ("type_float", pack(raw_body(MsgType.FILL, t=10.0)), Code.WIRE_BAD_FIELD_TYPE),
    ("type_0_unknown", pack(raw_body(MsgType.FILL, t=0)), Code.WIRE_UNKNOWN_TYPE),
    ("type_999_unknown", pack(raw_body(MsgType.FILL, t=999)), Code.WIRE_UNKNOWN_TYPE),
    ("type_negative_unknown", pack(raw_body(MsgType.FILL, t=-10)), Code.WIRE_UNKNOWN_TYPE),
    ("seq_missing", pack(raw_body(MsgType.FILL, seq=DROP)), Code.WIRE_MISSING_FIELD),
    ("seq_zero", pack(raw_body(MsgType.FILL, seq=0)), Code.WIRE_BAD_VALUE),
    ("seq_negative", pack(raw_body(MsgType.FILL, seq=-1)), Code.WIRE_BAD_VALUE),
    ("seq_float", pack(raw_body(MsgType.FILL, seq=42.0)), Code.WIRE_BAD_FIELD_TYPE),
    ("seq_bool", pack(raw_body(MsgType.FILL, seq=True)), Code.WIRE_BAD_FIELD_TYPE),
    ("seq_str", pack(raw_body(MsgType.FILL, seq="42")), Code.WIRE_BAD_FIELD_TYPE),
    ("ts_missing", pack(raw_body(MsgType.FILL, ts_ns=DROP)), Code.WIRE_MISSING_FIELD),
    ("ts_negative", pack(raw_body(MsgType.FILL, ts_ns=-1)), Code.WIRE_BAD_VALUE),
    ("ts_above_int64", pack(raw_body(MsgType.FILL, ts_ns=1 << 63)), Code.WIRE_BAD_VALUE),
    ("ts_float", pack(raw_body(MsgType.FILL, ts_ns=1.7e18)), Code.WIRE_BAD_FIELD_TYPE),
    ("ts_msgpack_timestamp_ext", pack(raw_body(MsgType.FILL, ts_ns=msgpack.Timestamp(1, 0))),
     Code.WIRE_BAD_FIELD_TYPE),
    ("fill_missing_trade_id", pack(raw_body(MsgType.FILL, trade_id=DROP)), Code.WIRE_MISSING_FIELD),
    ("fill_missing_taker_side", pack(raw_body(MsgType.FILL, taker_side=DROP)), Code.WIRE_MISSING_FIELD),
    ("fill_key_as_bin_not_str", pack({**raw_body(MsgType.FILL, price_units=DROP), b"price_units": 1}),
     Code.WIRE_MISSING_FIELD),
    ("fill_extra_field", pack(raw_body(MsgType.FILL, liquidity="maker")), Code.WIRE_UNKNOWN_FIELD),
    ("fill_extra_bin_key", pack({**raw_body(MsgType.FILL), b"x": 1}), Code.WIRE_UNKNOWN_FIELD),
    ("fill_qty_bool", pack(raw_body(MsgType.FILL, qty_units=True)), Code.WIRE_BAD_FIELD_TYPE),
    ("fill_qty_float", pack(raw_body(MsgType.FILL, qty_units=-250.0)), Code.WIRE_BAD_FIELD_TYPE),
    ("fill_qty_str", pack(raw_body(MsgType.FILL, qty_units="-250")), Code.WIRE_BAD_FIELD_TYPE),
    ("fill_qty_nil", pack(raw_body(MsgType.FILL, qty_units=None)), Code.WIRE_BAD_FIELD_TYPE),
    ("fill_qty_map", pack(raw_body(MsgType.FILL, qty_units={"a": 1})), Code.WIRE_BAD_FIELD_TYPE),
    ("fill_qty_nested_1000_deep", _fill_with_raw_qty(_nested(1000)), Code.WIRE_BAD_FIELD_TYPE),
    ("fill_qty_above_int64", pack(raw_body(MsgType.FILL, qty_units=1 << 63)), Code.WIRE_BAD_VALUE),
    ("fill_qty_uint64_max", pack(raw_body(MsgType.FILL, qty_units=UINT64_MAX)), Code.WIRE_BAD_VALUE),
    ("fill_fee_above_int64", pack(raw_body(MsgType.FILL, taker_fee_units=1 << 63)), Code.WIRE_BAD_VALUE),
    ("fill_trade_id_negative", pack(raw_body(MsgType.FILL, trade_id=-1)), Code.WIRE_BAD_VALUE),
    ("fill_account_negative", pack(raw_body(MsgType.FILL, maker_account=-5)), Code.WIRE_BAD_VALUE),
    ("fill_side_unknown_word", pack(raw_body(MsgType.FILL, taker_side="long")), Code.WIRE_BAD_VALUE),
    ("fill_side_upper_case", pack(raw_body(MsgType.FILL, taker_side="SELL")), Code.WIRE_BAD_VALUE),
    ("fill_side_bin", pack(raw_body(MsgType.FILL, taker_side=b"sell")), Code.WIRE_BAD_FIELD_TYPE),
    ("fill_side_disagrees_with_qty_sign", pack(raw_body(MsgType.FILL, taker_side="buy")), Code.WIRE_BAD_VALUE),
    ("tick_price_nan", pack(raw_body(MsgType.ORACLE_TICK, price=math.nan)), Code.WIRE_BAD_VALUE),
    ("tick_price_inf", pack(raw_body(MsgType.ORACLE_TICK, price=math.inf)), Code.WIRE_BAD_VALUE),
    ("tick_price_minus_inf", pack(raw_body(MsgType.ORACLE_TICK, price=-math.inf)), Code.WIRE_BAD_VALUE),
    ("tick_price_str", pack(raw_body(MsgType.ORACLE_TICK, price="97123.5")), Code.WIRE_BAD_FIELD_TYPE),
    ("tick_price_bool", pack(raw_body(MsgType.ORACLE_TICK, price=False)), Code.WIRE_BAD_FIELD_TYPE),
    ("tick_venue_empty", pack(raw_body(MsgType.ORACLE_TICK, venue="")), Code.WIRE_BAD_VALUE),
    ("tick_venue_non_ascii", pack(raw_body(MsgType.ORACLE_TICK, venue="bînance")), Code.WIRE_BAD_VALUE),
    ("tick_venue_65_chars", pack(raw_body(MsgType.ORACLE_TICK, venue="v" * 65)), Code.WIRE_BAD_VALUE),
    ("tick_venue_int", pack(raw_body(MsgType.ORACLE_TICK, venue=3)), Code.WIRE_BAD_FIELD_TYPE),
    ("tick_venue_ts_float", pack(raw_body(MsgType.ORACLE_TICK, venue_ts_ns=1.0)), Code.WIRE_BAD_FIELD_TYPE),
    ("deposit_amount_zero", pack(raw_body(MsgType.DEPOSIT, amount_units=0)), Code.WIRE_BAD_VALUE),
    ("withdrawal_amount_negative", pack(raw_body(MsgType.WITHDRAWAL, amount_units=-1)), Code.WIRE_BAD_VALUE),
    ("collateral_reply_code_10000", pack(raw_body(MsgType.COLLATERAL_REPLY, code=10000)), Code.WIRE_BAD_VALUE),
    ("order_check_missing_price", pack(raw_body(MsgType.ORDER_CHECK, price_units=DROP)), Code.WIRE_MISSING_FIELD),
    ("order_check_reply_equity_nan", pack(raw_body(MsgType.ORDER_CHECK_REPLY, post_equity_usd=math.nan)),
     Code.WIRE_BAD_VALUE),
    ("liquidation_reason_negative", pack(raw_body(MsgType.LIQUIDATION_ORDER, reason=-6001)), Code.WIRE_BAD_VALUE),
    ("engine_event_detail_1025_chars", pack(raw_body(MsgType.ENGINE_EVENT, detail="é" * 1025)), Code.WIRE_BAD_VALUE),
    ("engine_event_detail_missing", pack(raw_body(MsgType.ENGINE_EVENT, detail=DROP)), Code.WIRE_MISSING_FIELD),
    ("engine_event_account_bool", pack(raw_body(MsgType.ENGINE_EVENT, account=False)), Code.WIRE_BAD_FIELD_TYPE),
    ("reject_ref_type_256", pack(raw_body(MsgType.REJECT, ref_type=256)), Code.WIRE_BAD_VALUE),
    ("ack_ref_seq_zero", pack(raw_body(MsgType.ACK, ref_seq=0)), Code.WIRE_BAD_VALUE),
    ("batch_empty", pack(raw_body(MsgType.BATCH, msgs=[])), Code.WIRE_BAD_VALUE),
    ("batch_msgs_not_array", pack(raw_body(MsgType.BATCH, msgs={"a": 1})), Code.WIRE_BAD_FIELD_TYPE),
    ("batch_of_unknown_type", pack(raw_body(MsgType.BATCH, of=77)), Code.WIRE_UNKNOWN_TYPE),
    ("batch_of_ticks_not_batchable",
     pack(raw_body(MsgType.BATCH, of=int(MsgType.ORACLE_TICK), msgs=[EXAMPLES[MsgType.ORACLE_TICK]])),
     Code.WIRE_BAD_VALUE),
    ("batch_of_batches", pack(raw_body(MsgType.BATCH, of=int(MsgType.BATCH))), Code.WIRE_BAD_VALUE),
    ("batch_element_not_map", pack(raw_body(MsgType.BATCH, msgs=[ALICE_SELLS_250_BTC_UNITS, 5])),
     Code.WIRE_BAD_FIELD_TYPE),
    ("batch_element_with_header_keys",
     pack(raw_body(MsgType.BATCH, msgs=[dict(ALICE_SELLS_250_BTC_UNITS, seq=43)])), Code.WIRE_UNKNOWN_FIELD),
    ("batch_second_fill_nan_free_but_qty_float",
     pack(raw_body(MsgType.BATCH, msgs=[ALICE_SELLS_250_BTC_UNITS, dict(ALICE_SELLS_250_BTC_UNITS, qty_units=1.5)])),
     Code.WIRE_BAD_FIELD_TYPE),
    ("batch_second_fill_side_mismatch",
     pack(raw_body(MsgType.BATCH, msgs=[ALICE_SELLS_250_BTC_UNITS, dict(ALICE_SELLS_250_BTC_UNITS, taker_side="buy")])),
     Code.WIRE_BAD_VALUE),
]


@pytest.mark.parametrize("frame, code", [c[1:] for c in MALFORMED], ids=[c[0] for c in MALFORMED])
def test_malformed_frame_is_rejected_with_code(frame, code):
    got = decode(frame)
    assert type(got) is Rejected, got
    assert got.code == code, got.detail
    assert type(got.code) is Code and 1000 <= got.code < 2000
    assert type(got.detail) is str and 0 < len(got.detail) <= 300


def test_malformed_table_ids_are_unique():
    ids = [c[0] for c in MALFORMED]
    assert len(ids) == len(set(ids))


@pytest.mark.parametrize("bad", [None, "text", 3, object()], ids=["none", "str", "int", "object"])
def test_non_bytes_input_is_malformed_not_an_exception(bad):
    assert decode(bad).code == Code.WIRE_MALFORMED


def test_oversized_uses_the_stream_limit():
    frame = encode(MsgType.FILL, ALICE_SELLS_250_BTC_UNITS, seq=1, ts_ns=1)
    assert type(decode(frame, max_size=len(frame))) is Message
    assert decode(frame, max_size=len(frame) - 1).code == Code.WIRE_OVERSIZED


def test_unexpected_type_on_a_stream():
    frame = encode(MsgType.ORACLE_TICK, EXAMPLES[MsgType.ORACLE_TICK], seq=1, ts_ns=1)
    got = decode(frame, types=frozenset({MsgType.FILL, MsgType.BATCH}))
    assert got.code == Code.WIRE_UNEXPECTED_TYPE


def test_rejected_carries_seq_and_type_when_readable():
    got = decode(pack(raw_body(MsgType.FILL, qty_units=True, seq=77)))
    assert (got.ref_seq, got.ref_type) == (77, int(MsgType.FILL))
    assert "qty_units" in got.detail
    got = decode(pack(raw_body(MsgType.FILL, seq=-1)))
    assert (got.ref_seq, got.ref_type) == (0, int(MsgType.FILL))
    assert decode(b"\xc1")[2:] == (0, 0)


def test_batch_reject_names_the_bad_element():
    frame = pack(raw_body(MsgType.BATCH, msgs=[ALICE_SELLS_250_BTC_UNITS] * 3
                          + [dict(ALICE_SELLS_250_BTC_UNITS, trade_id=-1)]))
    got = decode(frame)
    assert got.code == Code.WIRE_BAD_VALUE and got.detail.startswith("msgs[3].trade_id")


def test_reject_detail_does_not_walk_deep_values():
    got = decode(pack(raw_body(MsgType.FILL, liquidity=[[[[[1]]]]])))
    assert got.code == Code.WIRE_UNKNOWN_FIELD
    got = decode(_fill_with_raw_qty(_nested(1000)))
    assert "list" in got.detail and len(got.detail) < 100


def test_reject_detail_fits_a_reject_message():
    frame = b"\x81" + b"\xa1k" + b"\xdb" + b"\xff" * 4     # str32 header claiming 4 GiB
    got = decode(frame)
    reply = encode(MsgType.REJECT, {"ref_seq": got.ref_seq, "ref_type": got.ref_type,
                                    "code": got.code, "detail": got.detail}, seq=1, ts_ns=1)
    assert decode(reply).fields["code"] == got.code


# ---------------------------------------------------------------------------------------
# Encoder refuses what the decoder rejects (same schema)
# ---------------------------------------------------------------------------------------

ENCODE_ERRORS = [
    ("bool_for_int", MsgType.FILL, dict(ALICE_SELLS_250_BTC_UNITS, qty_units=True), Code.WIRE_BAD_FIELD_TYPE),
    ("float_for_int", MsgType.FILL, dict(ALICE_SELLS_250_BTC_UNITS, qty_units=2.0), Code.WIRE_BAD_FIELD_TYPE),
    ("nan_price", MsgType.ORACLE_TICK, dict(EXAMPLES[MsgType.ORACLE_TICK], price=math.nan), Code.WIRE_BAD_VALUE),
    ("missing_field", MsgType.DEPOSIT, {"request_id": 1, "account": 1, "asset": "USDT"}, Code.WIRE_MISSING_FIELD),
    ("unknown_field", MsgType.ACK, {"ref_seq": 1, "code": 0, "extra": 1}, Code.WIRE_UNKNOWN_FIELD),
    ("int64_overflow", MsgType.FILL, dict(ALICE_SELLS_250_BTC_UNITS, price_units=1 << 63), Code.WIRE_BAD_VALUE),
    ("side_mismatch", MsgType.FILL, dict(ALICE_SELLS_250_BTC_UNITS, taker_side="buy"), Code.WIRE_BAD_VALUE),
    ("batch_of_acks", MsgType.BATCH, {"of": MsgType.ACK, "msgs": [{"ref_seq": 1, "code": 0}]}, Code.WIRE_BAD_VALUE),
    ("unknown_type", 99, {}, Code.WIRE_UNKNOWN_TYPE),
]


@pytest.mark.parametrize("mtype, fields, code", [c[1:] for c in ENCODE_ERRORS], ids=[c[0] for c in ENCODE_ERRORS])
def test_encode_refuses_invalid_fields(mtype, fields, code):
    with pytest.raises(EncodeError) as err:
        encode(mtype, fields, seq=1, ts_ns=1)
    assert err.value.code == code


@pytest.mark.parametrize("seq, ts_ns, code", [(0, 1, Code.WIRE_BAD_VALUE), (1, -1, Code.WIRE_BAD_VALUE),
                                              (True, 1, Code.WIRE_BAD_FIELD_TYPE), (1, 1.5, Code.WIRE_BAD_FIELD_TYPE),
                                              (UINT64_MAX + 1, 1, Code.WIRE_BAD_VALUE)])
def test_encode_refuses_bad_header(seq, ts_ns, code):
    with pytest.raises(EncodeError) as err:
        encode(MsgType.ACK, {"ref_seq": 1, "code": 0}, seq=seq, ts_ns=ts_ns)
    assert err.value.code == code


def test_encode_does_not_mutate_its_input():
    fields = {"code": 7001, "instrument": None, "detail": "x"}
    snapshot = dict(fields)
    encode(MsgType.ENGINE_EVENT, fields, seq=1, ts_ns=1)
    assert fields == snapshot


# ---------------------------------------------------------------------------------------
# Sequence numbers
# ---------------------------------------------------------------------------------------

def test_sequencer_starts_at_one_and_batches_take_n():
    s = Sequencer()
    assert decode(s.encode(MsgType.ACK, {"ref_seq": 1, "code": 0}, ts_ns=1)).seq == 1
    batch = decode(s.encode_batch(MsgType.FILL, [ALICE_SELLS_250_BTC_UNITS] * 3, ts_ns=1))
    assert batch.seq == 2                                   # takes 2, 3, 4
    assert decode(s.encode(MsgType.ACK, {"ref_seq": 1, "code": 0})).seq == 5
    assert s.next(10) == 6 and s.last == 15


def test_sequencer_failed_encode_takes_no_number():
    s = Sequencer()
    with pytest.raises(EncodeError):
        s.encode(MsgType.ACK, {"ref_seq": 0, "code": 0}, ts_ns=1)
    assert s.last == 0
    assert decode(s.encode(MsgType.ACK, {"ref_seq": 1, "code": 0}, ts_ns=1)).seq == 1


def test_sequencer_refuses_to_wrap():
    s = Sequencer(last=UINT64_MAX - 1)
    assert s.next() == UINT64_MAX
    with pytest.raises(OverflowError):
        s.next()


TRACKER_CASES = [
    # id, last seen, (seq, count), verdict, last after
    ("next_in_order", 5, (6, 1), SeqVerdict(SeqStatus.NEW), 6),
    ("first_message", 0, (1, 1), SeqVerdict(SeqStatus.NEW), 1),
    ("repeat_of_last", 5, (5, 1), SeqVerdict(SeqStatus.DUPLICATE, 1), 5),
    ("old_message", 5, (2, 1), SeqVerdict(SeqStatus.DUPLICATE, 1), 5),
    ("skips_7_to_9", 6, (10, 1), SeqVerdict(SeqStatus.GAP, 0, 7, 9), 10),  # missing 7, 8, 9
    ("first_message_is_3", 0, (3, 1), SeqVerdict(SeqStatus.GAP, 0, 1, 2), 3),
    ("batch_in_order", 5, (6, 4), SeqVerdict(SeqStatus.NEW), 9),
    ("batch_all_seen", 9, (6, 4), SeqVerdict(SeqStatus.DUPLICATE, 4), 9),
    ("batch_overlaps_2_seen", 7, (6, 4), SeqVerdict(SeqStatus.NEW, 2), 9),  # 6, 7 seen; apply 8, 9
    ("batch_after_gap", 5, (8, 4), SeqVerdict(SeqStatus.GAP, 0, 6, 7), 11),
]


@pytest.mark.parametrize("last, run, verdict, after", [c[1:] for c in TRACKER_CASES],
                         ids=[c[0] for c in TRACKER_CASES])
def test_sequence_tracker_classifies(last, run, verdict, after):
    t = SequenceTracker(last)
    assert t.observe(*run) == verdict
    assert t.last == after


def test_gap_is_reported_once_then_stream_continues():
    t = SequenceTracker()
    assert t.observe(1).status is SeqStatus.NEW
    assert t.observe(4) == SeqVerdict(SeqStatus.GAP, 0, 2, 3)
    assert t.observe(5).status is SeqStatus.NEW
    assert t.observe(3).status is SeqStatus.DUPLICATE     # late arrival of a missing one: dropped


def test_streams_count_independently():
    a, b = SequenceTracker(), SequenceTracker()
    sa, sb = Sequencer(), Sequencer()
    for _ in range(3):
        a.receive(sa.encode(MsgType.ACK, {"ref_seq": 1, "code": 0}, ts_ns=1))
    _, verdict = b.receive(sb.encode(MsgType.ACK, {"ref_seq": 1, "code": 0}, ts_ns=1))
    assert verdict.status is SeqStatus.NEW and (a.last, b.last) == (3, 1)


def test_receive_counts_a_batch_as_n_messages():
    t, s = SequenceTracker(), Sequencer()
    m, verdict = t.receive(s.encode_batch(MsgType.FILL, [ALICE_SELLS_250_BTC_UNITS] * 5, ts_ns=1))
    assert verdict.status is SeqStatus.NEW and t.last == 5
    m, verdict = t.receive(s.encode(MsgType.FILL, ALICE_SELLS_250_BTC_UNITS, ts_ns=1))
    assert m.seq == 6 and verdict.status is SeqStatus.NEW


@pytest.mark.parametrize("frame, code", [c[1:] for c in MALFORMED], ids=[c[0] for c in MALFORMED])
def test_rejected_frame_does_not_advance_tracker(frame, code):
    t = SequenceTracker(41)
    got, verdict = t.receive(frame)
    assert type(got) is Rejected and verdict is None and t.last == 41


def test_rejected_message_seq_shows_as_gap_at_next_valid():
    t = SequenceTracker()
    t.receive(encode(MsgType.FILL, ALICE_SELLS_250_BTC_UNITS, seq=1, ts_ns=1))
    got, _ = t.receive(pack(raw_body(MsgType.FILL, seq=2, qty_units=True)))
    assert got.code == Code.WIRE_BAD_FIELD_TYPE and t.last == 1
    _, verdict = t.receive(encode(MsgType.FILL, ALICE_SELLS_250_BTC_UNITS, seq=3, ts_ns=1))
    assert verdict == SeqVerdict(SeqStatus.GAP, 0, 2, 2)


# ---------------------------------------------------------------------------------------
# The document stays in step with the code
# ---------------------------------------------------------------------------------------

def test_doc_hex_dumps_match_the_encoder():
    text = DOC.read_text(encoding="utf-8")
    for mtype, fields in EXAMPLES.items():
        frame = encode(mtype, fields, seq=42, ts_ns=EXAMPLE_TS_NS)
        assert P._hexdump(frame) in text, \
            f"docs/protocol.md: stale hex dump for {mtype.name}; paste `python -m feeds.protocol` output"


def test_doc_lists_every_code_every_type_and_every_field():
    text = DOC.read_text(encoding="utf-8")
    from engine.codes import REPORTED, subsystem
    assert set(REPORTED) == {int(c) for c in Code}          # every code says how it is reported
    for c in Code:
        row = f"| {int(c)} | `{c.name}` | {subsystem(c)} | {REPORTED[int(c)]} |"
        assert row in text, f"docs/protocol.md: stale or missing row for {c.name}; paste " \
                            "`python -m feeds.protocol` output (section 8)"
    for mtype, schema in SCHEMAS.items():
        assert re.search(rf"{mtype.name}.*\b{int(mtype)}\b", text), mtype.name
        for name in schema:
            assert f"`{name}`" in text, (mtype.name, name)


def test_encode_known_decodes_like_encode():
    """The engine's unchecked hot-path encoder yields the same message as the checked one."""
    fields = dict(EXAMPLES[MsgType.LIQUIDATION_ORDER])
    a, b = Sequencer(), Sequencer()
    checked = decode(a.encode(MsgType.LIQUIDATION_ORDER, fields, ts_ns=EXAMPLE_TS_NS))
    known = decode(b.encode_known(MsgType.LIQUIDATION_ORDER, fields, ts_ns=EXAMPLE_TS_NS))
    assert type(known) is Message and known == checked      # same type, seq 1, ts, fields
    assert (a.last, b.last) == (1, 1)


# ---------------------------------------------------------------------------------------
# Versions: 2 = 1 + ``transfer_id`` on DEPOSIT and WITHDRAWAL (docs/protocol.md section 7)

DEPOSIT_V1 = {"request_id": 77, "account": 2002, "asset": "USDT", "amount_units": 5_000_000_000}


def test_transfer_id_is_a_version_2_field():
    # Encoded with it, the frame says v 2; without it, v 1 (the lowest that has the fields).
    with_id = encode(MsgType.DEPOSIT, {**DEPOSIT_V1, "transfer_id": 9}, seq=1, ts_ns=1)
    without = encode(MsgType.DEPOSIT, DEPOSIT_V1, seq=1, ts_ns=1)
    assert msgpack.unpackb(with_id)["v"] == 2 and msgpack.unpackb(without)["v"] == 1
    assert decode(with_id).fields["transfer_id"] == 9
    assert "transfer_id" not in decode(without).fields        # a v1 body has no such field
    v2_without = decode(encode(MsgType.DEPOSIT, DEPOSIT_V1, seq=1, ts_ns=1, version=2))
    assert v2_without.fields["transfer_id"] is None            # optional in v2
    # A v1 frame carrying it: an unknown field of version 1 (1009), nothing silent.
    v1_with = pack({"v": 1, "t": int(MsgType.WITHDRAWAL), "seq": 1, "ts_ns": 1, **DEPOSIT_V1, "transfer_id": 9})
    m = decode(v1_with)
    assert type(m) is Rejected and m.code == Code.WIRE_UNKNOWN_FIELD and "transfer_id" in m.detail
    with pytest.raises(EncodeError) as e:
        encode(MsgType.DEPOSIT, {**DEPOSIT_V1, "transfer_id": 9}, seq=1, ts_ns=1, version=1)
    assert e.value.code == Code.WIRE_UNKNOWN_FIELD
    with pytest.raises(EncodeError) as e:
        encode(MsgType.DEPOSIT, DEPOSIT_V1, seq=1, ts_ns=1, version=3)
    assert e.value.code == Code.WIRE_BAD_VERSION
    # transfer_id 0 is outside its domain (> 0): 1008
    m = decode(pack({"v": 2, "t": int(MsgType.DEPOSIT), "seq": 1, "ts_ns": 1, **DEPOSIT_V1, "transfer_id": 0}))
    assert type(m) is Rejected and m.code == Code.WIRE_BAD_VALUE


def test_every_type_decodes_the_same_in_version_1_and_2_but_the_requests_transfer_id():
    for mtype in MsgType:
        body = {k: (int(v) if isinstance(v, MsgType) else v) for k, v in EXAMPLES[mtype].items()
                if v is not None and P.FIELD_SINCE.get((mtype, k), 1) == 1}
        one, two = (decode(pack({"v": v, "t": int(mtype), "seq": 5, "ts_ns": 1, **body})) for v in (1, 2))
        assert type(one) is Message and type(two) is Message, mtype.name
        extra = {k for k in two.fields if P.FIELD_SINCE.get((mtype, k), 1) == 2}
        assert {k: v for k, v in two.fields.items() if k not in extra} == one.fields, mtype.name
        assert all(two.fields[k] is None for k in extra)


def test_restamp_renumbers_a_frame_and_keeps_everything_else():
    """The events relay's renumbering: seq 7 and ts_ns 5 become 1,000,001 and 9; the
    fields, and the key order (header first), are those of the original frame."""
    fields = {"code": 7001, "instrument": "ETH-USD", "detail": "frozen"}
    frame = encode(MsgType.ENGINE_EVENT, fields, seq=7, ts_ns=5)
    out = restamp(frame, 1_000_001, 9)
    m = decode(out)
    assert type(m) is Message and (m.seq, m.ts_ns, m.type) == (1_000_001, 9, MsgType.ENGINE_EVENT)
    assert m.fields == {**fields, "account": None}
    assert list(msgpack.unpackb(out))[:4] == ["v", "t", "seq", "ts_ns"]
    for junk in (b"", b"\xc1", msgpack.packb([1, 2]), msgpack.packb({"v": 1, "t": 40})):
        assert restamp(junk, 1, 1) is None            # not a message with a header: no number
