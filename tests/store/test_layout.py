"""The numpy row dtypes (engine/store/layout.py) against the C structs (ext/_types.pxd).

The kernels read shared memory through the C structs and the Python side through the
numpy dtypes, so every size and every field offset must agree byte for byte; the header
carries the magic and layout version that ``Store.attach`` checks.
"""

import hashlib
import mmap

import numpy as np
import pytest

from engine import _shm
from engine.instruments import Asset, Instrument, Kind, RiskTier
from engine.store import layout as L
from engine.store.shm import LayoutMismatch, Store

C_SIZES = _shm.struct_sizes()
C_OFFSETS = _shm.struct_offsets()
TABLE_NAMES = sorted(L.TABLES)


def _public_fields(dtype: np.dtype) -> list[str]:
    return [f for f in dtype.names if not f.startswith("_")]


# --------------------------------------------------------------------------- sizes
def test_every_c_struct_has_a_dtype_and_back():
    assert set(C_SIZES) == set(L.TABLES)
    assert set(C_OFFSETS) == set(L.TABLES)


@pytest.mark.parametrize("table", TABLE_NAMES)
def test_itemsize_equals_sizeof(table):
    assert L.TABLES[table].itemsize == C_SIZES[table]


@pytest.mark.parametrize("table, size", [
    ("asset", 64), ("price", 64), ("position", 32), ("account", 128), ("instrument", 768),
])
def test_sizes_match_the_documented_ones(table, size):
    # The comments in both files promise these sizes; a silent growth would change the
    # cache-line packing of the hot rows (account = 2 lines, price/asset = 1 line).
    assert C_SIZES[table] == size
    assert L.TABLES[table].itemsize == size


def test_partition_rows_are_whole_cache_lines():
    # No C struct (only Python reads it); whole 64-byte lines keep workers' heartbeats
    # from sharing a line.
    assert L.PARTITION.itemsize % 64 == 0


def test_header_fits_before_the_first_section():
    assert L.HEADER.itemsize % 8 == 0
    assert L.HEADER.itemsize <= L.PAGE
    assert L.HEADER.fields["price_seq"][1] % 8 == 0   # atomically bumped: 8-byte aligned


def test_header_is_the_documented_256_bytes():
    assert L.HEADER.itemsize == 256


# --------------------------------------------------------------------------- offsets
@pytest.mark.parametrize("table", TABLE_NAMES)
def test_same_field_names(table):
    assert sorted(_public_fields(L.TABLES[table])) == sorted(C_OFFSETS[table])


@pytest.mark.parametrize("table, field", [
    (t, f) for t in TABLE_NAMES for f in sorted(C_OFFSETS[t])
])
def test_field_offset_equals_c_offset(table, field):
    assert L.TABLES[table].fields[field][1] == C_OFFSETS[table][field]


@pytest.mark.parametrize("table", TABLE_NAMES)
def test_field_order_and_extent_match(table):
    """Fields in the same order and each field's extent ends before the next C field starts."""
    dt = L.TABLES[table]
    c = C_OFFSETS[table]
    by_c_offset = sorted(c, key=c.get)
    by_np_offset = sorted(_public_fields(dt), key=lambda f: dt.fields[f][1])
    assert by_c_offset == by_np_offset
    for here, nxt in zip(by_c_offset, by_c_offset[1:]):
        assert dt.fields[here][1] + dt.fields[here][0].itemsize <= c[nxt]
    last = by_c_offset[-1]
    assert dt.fields[last][1] + dt.fields[last][0].itemsize <= C_SIZES[table]


@pytest.mark.parametrize("table, field, shape", [
    ("instrument", "tier_floor", (L.MAX_TIERS,)),
    ("instrument", "tier_imr", (L.MAX_TIERS,)),
    ("instrument", "tier_mmr", (L.MAX_TIERS,)),
    ("instrument", "tier_init_amount", (L.MAX_TIERS,)),
    ("instrument", "tier_maint_amount", (L.MAX_TIERS,)),
    ("account", "balance", (L.MAX_ASSETS,)),
])
def test_array_fields_have_the_c_length(table, field, shape):
    assert L.TABLES[table].fields[field][0].shape == shape


@pytest.mark.parametrize("table", ["asset", "price", "account", "partition"])
def test_seqlocked_rows_start_with_a_u64_counter(table):
    dt = L.PARTITION if table == "partition" else L.TABLES[table]
    seq_dtype, seq_off = dt.fields["seq"][:2]
    assert seq_off == 0
    assert seq_dtype == np.dtype("<u8")


def test_every_seqlocked_row_is_8_byte_aligned_in_its_table():
    # Atomic u64 loads need 8-byte alignment: every row size is a multiple of 8 and
    # every section starts on a page.
    for dt in (L.ASSET, L.PRICE, L.PARTITION, L.ACCOUNT, L.POSITION, L.INSTRUMENT, L.HEADER):
        assert dt.itemsize % 8 == 0


# --------------------------------------------------------------------------- version
# Fingerprint of every dtype, per layout version. A layout change without a version
# bump would let an old process attach to a new segment and misread it, so any change
# to a dtype must bump LAYOUT_VERSION and add its fingerprint here.
LAYOUT_FINGERPRINTS = {
    1: "87340d054df546ed",   # header, asset, instrument, price, partition (64 B), account, position
    2: "b0f3c30f1d5e3a30",   # + price.tick_seq, partition.fee_pool (partition 128 B), header 256 B
}


def _fingerprint() -> str:
    tables = (("header", L.HEADER), ("asset", L.ASSET), ("instrument", L.INSTRUMENT),
              ("price", L.PRICE), ("partition", L.PARTITION), ("account", L.ACCOUNT),
              ("position", L.POSITION))
    text = repr([(name, dt.descr) for name, dt in tables])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def test_layout_change_bumps_layout_version():
    assert L.LAYOUT_VERSION in LAYOUT_FINGERPRINTS, (
        f"LAYOUT_VERSION {L.LAYOUT_VERSION} has no fingerprint: add {_fingerprint()!r}")
    assert _fingerprint() == LAYOUT_FINGERPRINTS[L.LAYOUT_VERSION], (
        f"the dtypes changed but LAYOUT_VERSION is still {L.LAYOUT_VERSION}: bump it and "
        f"record {_fingerprint()!r} for the new version")


# --------------------------------------------------------------------------- plan
def test_plan_sections_are_page_aligned_ordered_and_disjoint():
    p = L.plan(n_assets_cap=5, n_instruments_cap=9, n_partitions=3, accounts_cap=1000,
               slots_per_account=8)
    # accounts_cap rounds up to a multiple of n_partitions: ceil(1000 / 3) = 334, 334 * 3 = 1002
    assert p["per_partition"] == 334
    assert p["accounts_cap"] == 1002
    sizes = {"assets": 5 * 64, "instruments": 9 * 768, "prices": 9 * 64, "partitions": 3 * 64,
             "accounts": 1002 * 128, "positions": 1002 * 8 * 32}
    order = ["assets", "instruments", "prices", "partitions", "accounts", "positions"]
    off = p["offsets"]
    assert off["assets"] >= L.HEADER.itemsize
    for name in order:
        assert off[name] % L.PAGE == 0
    for a, b in zip(order, order[1:]):
        assert off[a] + sizes[a] <= off[b]
    assert off["positions"] + sizes["positions"] <= p["total_bytes"]
    assert p["total_bytes"] % L.PAGE == 0


# --------------------------------------------------------------------------- header
ONE_ASSET = [Asset("USDT", 0, 10**6, 1.0, 0.0)]
ONE_PERP = [Instrument(name="BTCUSDT", index=0, kind=Kind.PERP, settle="USDT", contract_size=1.0,
                       qty_scale=1000, price_scale=10, tick_size=0.1, lot_size=0.001,
                       tiers=(RiskTier(0.0, 0.01, 0.005),), mark_price=50000.0)]


def test_magic_spells_the_engine_name():
    assert L.MAGIC.to_bytes(8, "little") == b"MRGNENG\x00"
    assert L.HEADER.fields["magic"][1] == 0
    assert L.HEADER.fields["layout_version"][1] == 8


def test_created_header_carries_magic_version_and_capacities():
    store = Store.create(None, assets=ONE_ASSET, instruments=ONE_PERP, accounts_capacity=10,
                         n_partitions=2, slots_per_account=3)
    try:
        h = store.header[0]
        assert int(h["magic"]) == L.MAGIC
        assert int(h["layout_version"]) == L.LAYOUT_VERSION
        assert (int(h["n_assets_cap"]), int(h["n_instruments_cap"])) == (1, 1)
        assert (int(h["n_partitions"]), int(h["slots_per_account"])) == (2, 3)
        assert (int(h["accounts_cap"]), int(h["per_partition"])) == (10, 5)
        assert int(h["total_bytes"]) == len(store._mm)
    finally:
        store.detach()


def _header_only_mmap(**fields) -> mmap.mmap:
    hdr = np.zeros(1, L.HEADER)
    for k, v in fields.items():
        hdr[0][k] = v
    mm = mmap.mmap(-1, L.PAGE)
    mm[: L.HEADER.itemsize] = hdr.tobytes()
    return mm


@pytest.mark.parametrize("fields, needle", [
    pytest.param({"magic": 0x1234, "layout_version": L.LAYOUT_VERSION}, "not a margin-engine segment",
                 id="wrong-magic"),
    pytest.param({"magic": L.MAGIC, "layout_version": L.LAYOUT_VERSION + 1},
                 f"layout version {L.LAYOUT_VERSION + 1}", id="newer-version"),
    pytest.param({"magic": L.MAGIC, "layout_version": 0}, "layout version 0", id="older-version"),
    pytest.param({"magic": L.MAGIC, "layout_version": L.LAYOUT_VERSION, "total_bytes": 10 * L.PAGE},
                 "header says", id="header-bigger-than-segment"),
])
def test_header_check_refuses(fields, needle):
    mm = _header_only_mmap(**fields)
    with pytest.raises(LayoutMismatch, match=needle) as ei:
        Store("/me-test-header", None, mm, readonly=True)
    assert ei.value.code == 5001
