"""Engine configuration: TOML, validated on load, errors naming the bad field.

``load(path)`` reads a file; ``load_default()`` the one embedded in the package
(``engine/default.toml``). Both return a frozen ``Config``.
"""

from __future__ import annotations

import datetime as _dt
import os
import tomllib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from engine.instruments import (Asset, Instrument, Kind, derive_tiers, finite_number, known_keys,
                                power_of_ten)
from engine.liquidation.takeover import TakeoverPolicy
from engine.runtime.curve import Security, SecurityError, check as check_security

WAIT_STRATEGIES = ("blocking", "yielding", "busy-spin")
PRICE_STAGES = ("process", "worker")
JOURNAL_SYNC = ("ack", "interval")


class ConfigError(ValueError):
    """The configuration is invalid; the message names the field."""


@dataclass(frozen=True)
class EngineSettings:
    name: str = "margin-engine"
    accounts_capacity: int = 20000
    partitions: int = 2
    slots_per_account: int = 8
    cpus: tuple[int, ...] = ()
    wait: str = "blocking"
    keep_shm_on_exit: bool = False
    gateway_cpu: int = -1              # CPU for the fills/order-check gateway; -1: not pinned
    markprice_cpu: int = -1            # CPU for the mark-price process; -1: not pinned
    liqgw_cpu: int = -1                # CPU for the liquidation gateway; -1: not pinned
    # Where the mark-price stage runs: "worker" (inside worker 0, which binds the oracle
    # socket and re-margins its partitions on the same wake-up: one hop less per tick;
    # the default since session 14, docs/architecture.md) or "process" (its own process,
    # waking the workers through their doorbells).
    price_stage: str = "worker"
    # Holders per slice of a worker's holders' pass (stage 1b): a new tick waits at most
    # one slice (~2 ns a holder); smaller slices cost more Python per pass.
    holders_slice: int = 8192
    # Microseconds a fill may wait behind newer ticks (from the gateway's receipt) before
    # a worker applies it first: fresher positions and sooner next liquidation steps
    # against a longer tail for the ticks that wait (docs/architecture.md, stage 1a).
    fills_max_wait_us: int = 500
    # The fills journal and the book's snapshots (what a restart recovers from): a
    # directory that survives a restart and a reboot (systemd: the StateDirectory).
    # Empty: the endpoints' runtime_dir.
    state_dir: str = ""
    # ``margin-engine run``: seconds between snapshots of the book while running (each
    # pauses fills intake for the copy, ~0.1 s at 1M accounts); 0: only at start and at
    # a clean stop. A restart replays the journal written since the last one.
    snapshot_interval_s: float = 300.0
    # When the journal reaches the disk: "ack" (the default) fsyncs before anything it
    # holds is acknowledged (a fills ACK with ``fills_acks``, a COLLATERAL_REPLY that
    # says applied; one fdatasync per burst, a group commit), so an acknowledgement
    # survives a power loss; "interval" acknowledges from the page cache (a gateway
    # crash loses nothing; a power loss up to ``journal_fsync_interval_s``).
    journal_sync: str = "ack"
    # Seconds between fsyncs of what no acknowledgement has forced to disk (the PULL
    # fills stream's frames); 0: leave it to the OS.
    journal_fsync_interval_s: float = 1.0
    # Applied DEPOSIT / WITHDRAWAL ``transfer_id``s remembered (custody's idempotency keys):
    # a retry of one of the last this many is answered "already applied" (3105), across
    # restarts; 32 bytes each in the control segment.
    transfer_window: int = 100_000


@dataclass(frozen=True)
class Endpoints:
    """ZeroMQ endpoints. External ones are bound by the engine; ``runtime_dir`` holds the
    owner-only ipc sockets between the engine's own processes."""

    oracle: str = "tcp://127.0.0.1:5701"     # PULL: oracle ticks in
    fills: str = "tcp://127.0.0.1:5702"      # PULL (or ROUTER, fills_acks): fills in
    checks: str = "tcp://127.0.0.1:5703"     # ROUTER: order checks and collateral requests
    orders: str = "tcp://127.0.0.1:5704"     # PUSH: liquidation orders out
    events: str = "tcp://127.0.0.1:5705"     # PUB: engine events out
    runtime_dir: str = ""                    # default: /tmp/margin-engine-<name>
    # Liquidation orders: through the liquidation gateway, which binds ``orders`` (one
    # endpoint, one more hop), or straight from each worker's PUSH connected to
    # ``orders``, which the matching engine binds (PULL): the shortest tick path.
    orders_via_gateway: bool = True
    # Fills: PULL (no replies) or, with acks, a ROUTER answering each frame with ACK
    # (code 0, or 3001 for a duplicate) or REJECT; the matching engine then uses a DEALER.
    fills_acks: bool = False


@dataclass(frozen=True)
class Config:
    engine: EngineSettings
    assets: tuple[Asset, ...]
    instruments: tuple[Instrument, ...]
    endpoints: Endpoints = Endpoints()
    security: Security = Security()
    liquidation: TakeoverPolicy = TakeoverPolicy()

    def asset(self, name: str) -> Asset:
        for a in self.assets:
            if a.name == name:
                return a
        raise KeyError(name)

    def instrument(self, name: str) -> Instrument:
        for i in self.instruments:
            if i.name == name:
                return i
        raise KeyError(name)


def load(path: str | Path) -> Config:
    """Read and validate a TOML configuration file."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise ConfigError(f"{p}: cannot read ({e.strerror})") from None
    return parse(text, source=str(p))


def default_text() -> str:
    """The TOML text of the configuration embedded in the package."""
    return resources.files("engine").joinpath("default.toml").read_text()


def load_default() -> Config:
    """The configuration embedded in the package."""
    return parse(default_text(), source="engine/default.toml")


def parse(text: str, source: str = "<config>") -> Config:
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{source}: not valid TOML: {e}") from None
    try:
        return from_dict(doc)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


def _int(doc: dict, key: str, where: str, default=None, lo: int | None = None) -> int:
    v = doc.get(key, default)
    if v is None:
        raise ConfigError(f"{where}.{key}: missing")
    if isinstance(v, bool) or not isinstance(v, int):
        raise ConfigError(f"{where}.{key}: must be an integer, got {v!r}")
    if lo is not None and v < lo:
        raise ConfigError(f"{where}.{key}: must be >= {lo}, got {v}")
    return v


def _num(doc: dict, key: str, where: str, default=None) -> float:
    v = doc.get(key, default)
    if v is None:
        raise ConfigError(f"{where}.{key}: missing")
    try:
        return finite_number(v, f"{where}.{key}")
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _str(doc: dict, key: str, where: str, default=None) -> str:
    v = doc.get(key, default)
    if v is None:
        raise ConfigError(f"{where}.{key}: missing")
    if not isinstance(v, str) or not v:
        raise ConfigError(f"{where}.{key}: must be a non-empty string, got {v!r}")
    return v


def _expiry_ns(v, where: str) -> int:
    if v is None:
        return 0
    if isinstance(v, _dt.datetime):
        dt = v
    elif isinstance(v, str):
        try:
            dt = _dt.datetime.fromisoformat(v.replace("Z", "+00:00"))
        except ValueError:
            raise ConfigError(f"{where}: not an ISO-8601 time: {v!r}") from None
    else:
        raise ConfigError(f"{where}: must be an ISO-8601 time string")
    if dt.tzinfo is None:
        raise ConfigError(f"{where}: needs a time zone (use Z for UTC)")
    return int(dt.timestamp()) * 1_000_000_000


ASSET_KEYS = ("name", "scale", "price_usd", "haircut")
INSTRUMENT_KEYS = ("name", "kind", "settle", "contract_size", "qty_scale", "price_scale", "tiers",
                   "mark_price", "underlying", "strike", "call", "expiry")


def from_dict(doc: dict) -> Config:
    """Validate a parsed configuration document. Checks every field, names the first bad one."""
    if not isinstance(doc, dict):
        raise ConfigError("top level must be a table")
    unknown = set(doc) - {"engine", "assets", "instruments", "endpoints", "security", "liquidation"}
    if unknown:
        raise ConfigError(f"unknown section(s) {sorted(unknown)}")
    e = doc.get("engine", {})
    if not isinstance(e, dict):
        raise ConfigError("engine: must be a table")
    known_keys(e, sorted(EngineSettings.__dataclass_fields__), "engine", ConfigError)
    wait = _str(e, "wait", "engine", "blocking")
    if wait not in WAIT_STRATEGIES:
        raise ConfigError(f"engine.wait: one of {WAIT_STRATEGIES}, got {wait!r}")
    cpus = e.get("cpus", [])
    if not isinstance(cpus, list) or any(isinstance(c, bool) or not isinstance(c, int) or c < 0 for c in cpus):
        raise ConfigError(f"engine.cpus: a list of CPU numbers, got {cpus!r}")
    keep = e.get("keep_shm_on_exit", False)
    if not isinstance(keep, bool):
        raise ConfigError("engine.keep_shm_on_exit: must be true or false")
    price_stage = _str(e, "price_stage", "engine", EngineSettings.price_stage)
    if price_stage not in PRICE_STAGES:
        raise ConfigError(f"engine.price_stage: one of {PRICE_STAGES}, got {price_stage!r}")
    snapshot_interval_s = _num(e, "snapshot_interval_s", "engine", EngineSettings.snapshot_interval_s)
    if snapshot_interval_s < 0:
        raise ConfigError(f"engine.snapshot_interval_s: 0 (off) or more seconds, got {snapshot_interval_s}")
    journal_sync = _str(e, "journal_sync", "engine", EngineSettings.journal_sync)
    if journal_sync not in JOURNAL_SYNC:
        raise ConfigError(f"engine.journal_sync: one of {JOURNAL_SYNC}, got {journal_sync!r}")
    journal_fsync_interval_s = _num(e, "journal_fsync_interval_s", "engine",
                                    EngineSettings.journal_fsync_interval_s)
    if journal_fsync_interval_s < 0:
        raise ConfigError(f"engine.journal_fsync_interval_s: 0 (the OS decides) or more seconds, "
                          f"got {journal_fsync_interval_s}")
    name = _str(e, "name", "engine", "margin-engine")
    if "/" in name or len(name) > 200:
        raise ConfigError(f"engine.name: one shared-memory name component without '/', got {name!r}")
    settings = EngineSettings(
        name=name,
        accounts_capacity=_int(e, "accounts_capacity", "engine", 20000, lo=1),
        partitions=_int(e, "partitions", "engine", 2, lo=1),
        slots_per_account=_int(e, "slots_per_account", "engine", 8, lo=1),
        cpus=tuple(cpus), wait=wait, keep_shm_on_exit=keep,
        gateway_cpu=_int(e, "gateway_cpu", "engine", -1, lo=-1),
        markprice_cpu=_int(e, "markprice_cpu", "engine", -1, lo=-1),
        liqgw_cpu=_int(e, "liqgw_cpu", "engine", -1, lo=-1),
        price_stage=price_stage,
        holders_slice=_int(e, "holders_slice", "engine", EngineSettings.holders_slice, lo=1),
        fills_max_wait_us=_int(e, "fills_max_wait_us", "engine", EngineSettings.fills_max_wait_us, lo=0),
        state_dir=_str(e, "state_dir", "engine") if "state_dir" in e else "",
        snapshot_interval_s=snapshot_interval_s,
        journal_sync=journal_sync,
        journal_fsync_interval_s=journal_fsync_interval_s,
        transfer_window=_int(e, "transfer_window", "engine", EngineSettings.transfer_window, lo=1),
    )

    raw_assets = doc.get("assets")
    if not isinstance(raw_assets, list) or not raw_assets:
        raise ConfigError("assets: at least one [[assets]] table")
    if len(raw_assets) > 8:
        raise ConfigError(f"assets: at most 8 collateral assets, got {len(raw_assets)}")
    assets: list[Asset] = []
    for i, a in enumerate(raw_assets):
        w = f"assets[{i}]"
        if not isinstance(a, dict):
            raise ConfigError(f"{w}: must be a table")
        known_keys(a, ASSET_KEYS, w, ConfigError)
        name = _str(a, "name", w)
        if any(x.name == name for x in assets):
            raise ConfigError(f"{w}.name: duplicate asset {name!r}")
        try:
            scale = power_of_ten(a.get("scale", 10**8), f"{w}.scale")
        except ValueError as err:
            raise ConfigError(str(err)) from None
        price = _num(a, "price_usd", w)
        if price <= 0:
            raise ConfigError(f"{w}.price_usd: must be > 0, got {price}")
        haircut = _num(a, "haircut", w, 0.0)
        if not 0 <= haircut < 1:
            raise ConfigError(f"{w}.haircut: must be in [0, 1), got {haircut}")
        assets.append(Asset(name, i, scale, price, haircut))

    raw_ins = doc.get("instruments")
    if not isinstance(raw_ins, list) or not raw_ins:
        raise ConfigError("instruments: at least one [[instruments]] table")
    names = [x.get("name") if isinstance(x, dict) else None for x in raw_ins]
    instruments: list[Instrument] = []
    for i, d in enumerate(raw_ins):
        w = f"instruments[{i}]"
        if not isinstance(d, dict):
            raise ConfigError(f"{w}: must be a table")
        known_keys(d, INSTRUMENT_KEYS, w, ConfigError)
        name = _str(d, "name", w)
        if len(name.encode()) > 23:
            raise ConfigError(f"{w}.name: at most 23 bytes, got {name!r}")
        if names.count(name) > 1:
            raise ConfigError(f"{w}.name: duplicate instrument {name!r}")
        try:
            kind = Kind.parse(d.get("kind"))
        except ValueError as err:
            raise ConfigError(f"{w}.kind: {err}") from None
        settle = _str(d, "settle", w)
        if settle not in {a.name for a in assets}:
            raise ConfigError(f"{w}.settle: unknown asset {settle!r}")
        cs = _num(d, "contract_size", w, 1.0)
        if cs <= 0:
            raise ConfigError(f"{w}.contract_size: must be > 0, got {cs}")
        try:
            qs = power_of_ten(d.get("qty_scale", 1000), f"{w}.qty_scale")
            ps = power_of_ten(d.get("price_scale", 100), f"{w}.price_scale")
            tiers = derive_tiers(d.get("tiers"), f"{w}.tiers")
        except ValueError as err:
            raise ConfigError(str(err)) from None
        mark = _num(d, "mark_price", w)
        if mark <= 0:
            raise ConfigError(f"{w}.mark_price: must be > 0, got {mark}")
        underlying = d.get("underlying")
        strike = 0.0
        if kind == Kind.OPTION:
            if underlying not in names or underlying == name:
                raise ConfigError(f"{w}.underlying: an option needs the name of another instrument, got {underlying!r}")
            strike = _num(d, "strike", w)
            if strike <= 0:
                raise ConfigError(f"{w}.strike: must be > 0")
            if not isinstance(d.get("call"), bool):
                raise ConfigError(f"{w}.call: true (call) or false (put) required")
        elif underlying is not None:
            raise ConfigError(f"{w}.underlying: only options have an underlying")
        expiry = _expiry_ns(d.get("expiry"), f"{w}.expiry")
        if kind in (Kind.FUTURE, Kind.INVERSE_FUTURE, Kind.OPTION) and not expiry:
            raise ConfigError(f"{w}.expiry: required for {kind.name.lower()}")
        instruments.append(Instrument(
            name=name, index=i, kind=kind, settle=settle, contract_size=cs, qty_scale=qs,
            price_scale=ps, tick_size=1.0 / ps, lot_size=1.0 / qs, tiers=tiers, mark_price=mark,
            underlying=underlying, strike=strike, expiry_ns=expiry, is_call=bool(d.get("call", True)),
        ))
    # An option's notional is |q| cs S with S its underlying's mark, in the option's settle
    # asset: true when both settle in the same asset and the underlying is linear. A
    # coin-settled (Deribit-style) option on an inverse underlying would have a USD notional
    # taken as coins (its requirement S times too large): refused until the rule has it.
    for k, ins in enumerate(instruments):
        if ins.kind == Kind.OPTION:
            u = next(x for x in instruments if x.name == ins.underlying)
            if u.kind.is_inverse or u.settle != ins.settle:
                raise ConfigError(f"instruments[{k}].settle: an option must settle in its underlying's settle "
                                  f"asset and have a linear underlying (coin-settled options on an inverse "
                                  f"underlying are not margined by the standard rule); {ins.name} settles in "
                                  f"{ins.settle}, {u.name} ({u.kind.name.lower()}) in {u.settle}")
    ep = doc.get("endpoints", {})
    if not isinstance(ep, dict):
        raise ConfigError("endpoints: must be a table")
    known = {f for f in Endpoints.__dataclass_fields__}
    for key, val in ep.items():
        if key not in known:
            raise ConfigError(f"endpoints.{key}: unknown endpoint; known: {sorted(known)}")
        if key in ("orders_via_gateway", "fills_acks"):
            if not isinstance(val, bool):
                raise ConfigError(f"endpoints.{key}: must be true or false, got {val!r}")
            continue
        if not isinstance(val, str) or (key != "runtime_dir" and "://" not in val):
            raise ConfigError(f"endpoints.{key}: a ZeroMQ endpoint like tcp://127.0.0.1:5701, got {val!r}")
    endpoints = Endpoints(**ep)
    return Config(settings, tuple(assets), tuple(instruments), endpoints, _security(doc, endpoints),
                  _liquidation(doc))


def _liquidation(doc: dict) -> TakeoverPolicy:
    """``[liquidation]``: where liquidations the market did not take go
    (engine/liquidation/takeover.py; docs/configuration.md)."""
    d = doc.get("liquidation", {})
    if not isinstance(d, dict):
        raise ConfigError("liquidation: must be a table")
    w = "liquidation"
    known_keys(d, ("insurance_fund_account", "backstop_accounts", "backstop_discount", "adl", "takeover_after_ms"),
               w, ConfigError)
    backstops = d.get("backstop_accounts", [])
    if not isinstance(backstops, list) or any(isinstance(x, bool) or not isinstance(x, int) for x in backstops):
        raise ConfigError(f"{w}.backstop_accounts: a list of account ids, got {backstops!r}")
    adl = d.get("adl", True)
    if not isinstance(adl, bool):
        raise ConfigError(f"{w}.adl: must be true or false")
    fund = _int(d, "insurance_fund_account", w, 0, lo=0)
    discount = _num(d, "backstop_discount", w, TakeoverPolicy.backstop_discount)
    after_ms = _int(d, "takeover_after_ms", w, TakeoverPolicy.after_ms)
    try:
        return TakeoverPolicy(fund, tuple(backstops), discount, adl, after_ms)
    except ValueError as e:
        raise ConfigError(f"{w}: {e}") from None


def _security(doc: dict, ep: Endpoints) -> Security:
    """``[security]``: CURVE on the tcp:// endpoints (engine/runtime/curve.py). Paths are
    resolved against the working directory here, so every process gets the same file."""
    sec = doc.get("security", {})
    if not isinstance(sec, dict):
        raise ConfigError("security: must be a table")
    known = set(Security.__dataclass_fields__)
    for key, val in sec.items():
        if key not in known:
            raise ConfigError(f"security.{key}: unknown setting; known: {sorted(known)}")
        if not isinstance(val, str) or not val:
            raise ConfigError(f"security.{key}: must be a file or directory path, got {val!r}")
    s = Security(**{k: os.path.abspath(v) for k, v in sec.items()})
    try:
        check_security(s, orders_direct_tcp=not ep.orders_via_gateway and ep.orders.startswith("tcp://"))
    except SecurityError as e:
        raise ConfigError(str(e)) from None
    return s
