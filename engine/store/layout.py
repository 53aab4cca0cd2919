"""Row layouts of the shared-memory tables as numpy structured dtypes.

Each dtype mirrors a C struct in ``ext/_types.pxd`` field for field (the layout test
holds every size and offset equal). Bump ``LAYOUT_VERSION`` on any change: a process
built against another layout refuses to attach.

Segment: one POSIX shared-memory object, sections at page-aligned offsets::

    header | assets[n_assets_cap] | instruments[n_instruments_cap] | prices[n_instruments_cap]
           | partitions[n_partitions] | accounts[accounts_cap] | positions[accounts_cap * slots]

Partition ``p`` owns account rows ``[p * per_partition, (p + 1) * per_partition)`` and
their position slots; its worker is their only writer.
"""

from __future__ import annotations

import enum

import numpy as np

MAGIC = int.from_bytes(b"MRGNENG\x00", "little")
LAYOUT_VERSION = 2
MAX_TIERS = 16
MAX_ASSETS = 8
PAGE = 4096


class Mode(enum.IntEnum):
    CROSS = 0
    ISOLATED = 1


class Status(enum.IntFlag):
    """Account status bits written by every margin pass."""

    HEALTHY = 0
    BELOW_IM = 1                # cross equity < cross initial margin
    LIQUIDATABLE = 2            # cross equity < cross maintenance (strict), maintenance > 0
    ISOLATED_LIQUIDATABLE = 4   # an isolated position below its maintenance
    BANKRUPT = 8                # cross equity < 0


class AccountFlag(enum.IntFlag):
    LIQUIDATION_OUTSTANDING = 1
    ISOLATED_DEFAULT = 2        # new positions open isolated


HEADER = np.dtype([
    ("magic", "<u8"), ("layout_version", "<u4"), ("_pad0", "<u4"),
    ("n_assets_cap", "<i4"), ("n_instruments_cap", "<i4"),
    ("n_partitions", "<i4"), ("slots_per_account", "<i4"),
    ("accounts_cap", "<i8"), ("per_partition", "<i8"),
    ("n_assets", "<i4"), ("n_instruments", "<i4"),
    ("created_ns", "<i8"), ("total_bytes", "<i8"),
    ("off_assets", "<i8"), ("off_instruments", "<i8"), ("off_prices", "<i8"),
    ("off_partitions", "<i8"), ("off_accounts", "<i8"), ("off_positions", "<i8"),
    ("price_seq", "<u8"),          # bumped (atomically) after every published mark
    ("_pad1", "<i8", (16,)),
])  # 256 bytes

ASSET = np.dtype([
    ("seq", "<u8"), ("price_usd", "<f8"), ("haircut", "<f8"), ("scale", "<i8"),
    ("ts_ns", "<i8"), ("_pad", "<i8", (3,)),
])  # 64 bytes

INSTRUMENT = np.dtype([
    ("kind", "<i4"), ("settle_asset", "<i4"), ("underlying", "<i4"), ("n_tiers", "<i4"),
    ("is_call", "<i4"), ("_pad0", "<i4"),
    ("contract_size", "<f8"), ("qty_scale", "<i8"), ("price_scale", "<i8"),
    ("strike", "<f8"), ("expiry_ns", "<i8"),
    ("tier_floor", "<f8", (MAX_TIERS,)), ("tier_imr", "<f8", (MAX_TIERS,)),
    ("tier_mmr", "<f8", (MAX_TIERS,)), ("tier_init_amount", "<f8", (MAX_TIERS,)),
    ("tier_maint_amount", "<f8", (MAX_TIERS,)),
    ("name", "S24"), ("_pad1", "<i8", (5,)),
])  # 768 bytes

PRICE = np.dtype([
    ("seq", "<u8"), ("mark", "<f8"), ("index", "<f8"), ("ts_ns", "<i8"),
    ("price_seq", "<u8"), ("flags", "<u4"), ("_pad0", "<u4"), ("tick_seq", "<u8"),
    ("_pad", "<i8"),
])  # 64 bytes
PRICE_FROZEN = 1

PARTITION = np.dtype([
    ("seq", "<u8"), ("n_accounts", "<i8"), ("fills_applied", "<u8"), ("last_fill_seq", "<u8"),
    ("heartbeat_ns", "<i8"), ("worker_pid", "<i8"), ("_pad", "<i8", (2,)),
    ("fee_pool", "<i8", (MAX_ASSETS,)),   # fees collected by this partition's fills, asset units
])  # 128 bytes

ACCOUNT = np.dtype([
    ("seq", "<u8"), ("status", "<i4"), ("flags", "<u4"),
    ("collateral_usd", "<f8"), ("cross_equity_usd", "<f8"),
    ("cross_im_usd", "<f8"), ("cross_mm_usd", "<f8"),
    ("account_id", "<i8"), ("partition", "<i4"), ("n_positions", "<i4"),
    ("balance", "<i8", (MAX_ASSETS,)),
])  # 128 bytes

POSITION = np.dtype([
    ("instrument", "<i4"), ("mode", "<i4"), ("qty", "<i8"), ("cost", "<i8"),
    ("isolated_margin", "<i8"),
])  # 32 bytes

TABLES = {"asset": ASSET, "instrument": INSTRUMENT, "price": PRICE, "account": ACCOUNT,
          "position": POSITION}


def _align(n: int, to: int = PAGE) -> int:
    return (n + to - 1) // to * to


def plan(n_assets_cap: int, n_instruments_cap: int, n_partitions: int, accounts_cap: int,
         slots_per_account: int) -> dict:
    """Section offsets and total size for the given capacities (bytes)."""
    per_partition = -(-accounts_cap // n_partitions)   # ceil: every partition the same size
    accounts_cap = per_partition * n_partitions
    off = {}
    cursor = _align(HEADER.itemsize)
    for name, dtype, count in (
        ("assets", ASSET, n_assets_cap),
        ("instruments", INSTRUMENT, n_instruments_cap),
        ("prices", PRICE, n_instruments_cap),
        ("partitions", PARTITION, n_partitions),
        ("accounts", ACCOUNT, accounts_cap),
        ("positions", POSITION, accounts_cap * slots_per_account),
    ):
        off[name] = cursor
        cursor = _align(cursor + dtype.itemsize * count)
    return {"offsets": off, "total_bytes": cursor, "per_partition": per_partition,
            "accounts_cap": accounts_cap}
