"""What-if evaluation: one point in time, from a JSON scenario, through the live kernel.

``evaluate(doc)`` validates the scenario (errors name the field), loads it into a
private store with the same layout as the live one, runs the same kernel the workers
run, and returns the figures per account and per position. The format is documented in
docs/evaluate.md.

Fixed point: balances and isolated margins are held in units of 1e-8 of their asset,
quantities in 1e-8 contracts (overridable per asset ``scale`` / per instrument
``qty_scale``); a value with more decimals than its scale is an error, not a silent
rounding. The cost basis ``qty * cs * entry`` (linear) or ``qty * cs / entry``
(inverse) is rounded half-to-even to one settle unit.
"""

from __future__ import annotations

import math
from decimal import Decimal, ROUND_HALF_EVEN, InvalidOperation

from engine.instruments import Asset, Instrument, Kind, derive_tiers, finite_number, known_keys, power_of_ten
from engine.risk import margin
from engine.store.layout import Mode
from engine.store.shm import Store

DEFAULT_SCALE = 10**8
MAX_SCALE = 10**18          # scales are stored as int64


class ScenarioError(ValueError):
    """The scenario is invalid; the message names the field."""


def _finite(value, where: str) -> float:
    """``value`` as a finite float, or ScenarioError naming ``where`` (ints too big for a
    double included)."""
    try:
        return finite_number(value, where)
    except ValueError as e:
        raise ScenarioError(str(e)) from None
    except OverflowError:
        raise ScenarioError(f"{where}: out of range (too large for a double)") from None


def _scale(value, where: str) -> int:
    try:
        scale = power_of_ten(value, where)
    except ValueError as e:
        raise ScenarioError(str(e)) from None
    if scale > MAX_SCALE:
        raise ScenarioError(f"{where}: at most {MAX_SCALE}, got {value}")
    return scale


def _num(d: dict, key: str, where: str, *, positive: bool = False, default=None) -> float:
    if key not in d:
        if default is not None:
            return default
        raise ScenarioError(f"{where}.{key}: missing")
    v = _finite(d[key], f"{where}.{key}")
    if positive and v <= 0:
        raise ScenarioError(f"{where}.{key}: must be > 0, got {d[key]!r}")
    return v


def _units(value, scale: int, where: str) -> int:
    """``value * scale`` as an exact integer; more decimals than the scale is an error."""
    try:
        d = Decimal(str(value)) * scale
    except InvalidOperation:
        raise ScenarioError(f"{where}: not a number: {value!r}") from None
    if d != d.to_integral_value():
        raise ScenarioError(f"{where}: {value!r} has more decimals than the scale 1/{scale} allows")
    n = int(d)
    if abs(n) >= 2**63:
        raise ScenarioError(f"{where}: {value!r} is out of range at scale {scale}")
    return n


def _table(doc: dict, key: str, where: str) -> dict:
    v = doc.get(key)
    if not isinstance(v, dict):
        raise ScenarioError(f"{where}{key}: missing or not an object")
    return v


def parse(doc) -> tuple[list[Asset], list[Instrument], list[dict]]:
    """Validate a scenario document; return assets, instruments and normalized accounts."""
    if not isinstance(doc, dict):
        raise ScenarioError("scenario: top level must be an object")
    known_keys(doc, ("assets", "instruments", "accounts"), "", ScenarioError)
    raw_assets = _table(doc, "assets", "")
    if not raw_assets or len(raw_assets) > 8:
        raise ScenarioError(f"assets: 1 to 8 assets, got {len(raw_assets)}")
    assets: list[Asset] = []
    for i, (name, a) in enumerate(raw_assets.items()):
        w = f"assets.{name}"
        if not isinstance(a, dict):
            raise ScenarioError(f"{w}: must be an object")
        known_keys(a, ("price", "haircut", "scale"), w, ScenarioError)
        price = _num(a, "price", w, positive=True)
        haircut = _num(a, "haircut", w, default=0.0)
        if not 0 <= haircut < 1:
            raise ScenarioError(f"{w}.haircut: must be in [0, 1), got {haircut}")
        scale = _scale(a.get("scale", DEFAULT_SCALE), f"{w}.scale")
        assets.append(Asset(name, i, scale, price, haircut))
    asset_by = {a.name: a for a in assets}

    raw_ins = _table(doc, "instruments", "")
    if not raw_ins:
        raise ScenarioError("instruments: at least one")
    instruments: list[Instrument] = []
    for i, (name, d) in enumerate(raw_ins.items()):
        w = f"instruments.{name}"
        if not isinstance(d, dict):
            raise ScenarioError(f"{w}: must be an object")
        known_keys(d, ("kind", "settle", "mark_price", "tiers", "contract_size", "qty_scale",
                       "underlying", "strike", "call"), w, ScenarioError)
        try:
            kind = Kind.parse(d.get("kind"))
        except ValueError as e:
            raise ScenarioError(f"{w}.kind: {e}") from None
        settle = d.get("settle")
        if not isinstance(settle, str) or settle not in asset_by:
            raise ScenarioError(f"{w}.settle: unknown asset {settle!r} (assets: {sorted(asset_by)})")
        try:
            tiers = derive_tiers(d.get("tiers"), f"{w}.tiers")
        except ValueError as e:
            raise ScenarioError(str(e)) from None
        except OverflowError:
            raise ScenarioError(f"{w}.tiers: a number is out of range") from None
        qs = _scale(d.get("qty_scale", DEFAULT_SCALE), f"{w}.qty_scale")
        underlying = d.get("underlying")
        if kind == Kind.OPTION and (not isinstance(underlying, str) or underlying not in raw_ins
                                    or underlying == name):
            raise ScenarioError(f"{w}.underlying: an option needs another instrument's name")
        if kind == Kind.OPTION and not isinstance(d.get("call", True), bool):
            raise ScenarioError(f"{w}.call: true (call) or false (put), got {d['call']!r}")
        instruments.append(Instrument(
            name=name, index=i, kind=kind, settle=settle,
            contract_size=_num(d, "contract_size", w, positive=True, default=1.0),
            qty_scale=qs, price_scale=100, tick_size=0.01, lot_size=1.0 / qs, tiers=tiers,
            mark_price=_num(d, "mark_price", w, positive=True),
            underlying=underlying if kind == Kind.OPTION else None,
            strike=_num(d, "strike", w, positive=True) if kind == Kind.OPTION else 0.0,
            expiry_ns=1 if kind == Kind.OPTION else 0, is_call=bool(d.get("call", True)),
        ))
    ins_by = {x.name: x for x in instruments}

    raw_accounts = doc.get("accounts")
    if not isinstance(raw_accounts, list):
        raise ScenarioError("accounts: missing or not a list")
    accounts = []
    for k, acc in enumerate(raw_accounts):
        w = f"accounts[{k}]"
        if not isinstance(acc, dict):
            raise ScenarioError(f"{w}: must be an object")
        known_keys(acc, ("id", "mode", "collateral", "positions"), w, ScenarioError)
        if "id" not in acc:
            raise ScenarioError(f"{w}.id: missing")
        if isinstance(acc["id"], bool) or not isinstance(acc["id"], (str, int)):
            raise ScenarioError(f"{w}.id: must be a string or an integer, got {acc['id']!r}")
        mode = acc.get("mode", "cross")
        if mode not in ("cross", "isolated"):
            raise ScenarioError(f"{w}.mode: 'cross' or 'isolated', got {mode!r}")
        coll = acc.get("collateral", {})
        if not isinstance(coll, dict):
            raise ScenarioError(f"{w}.collateral: must be an object of asset -> amount")
        balances = {}
        for aname, amount in coll.items():
            if aname not in asset_by:
                raise ScenarioError(f"{w}.collateral.{aname}: unknown asset")
            _finite(amount, f"{w}.collateral.{aname}")
            balances[asset_by[aname].index] = _units(amount, asset_by[aname].scale, f"{w}.collateral.{aname}")
        positions = acc.get("positions", [])
        if not isinstance(positions, list):
            raise ScenarioError(f"{w}.positions: must be a list")
        seen = set()
        norm = []
        for j, p in enumerate(positions):
            pw = f"{w}.positions[{j}]"
            if not isinstance(p, dict):
                raise ScenarioError(f"{pw}: must be an object")
            known_keys(p, ("instrument", "qty", "entry_price", "isolated_margin"), pw, ScenarioError)
            iname = p.get("instrument")
            if not isinstance(iname, str) or iname not in ins_by:
                raise ScenarioError(f"{pw}.instrument: unknown instrument {iname!r}")
            if iname in seen:
                raise ScenarioError(f"{pw}.instrument: {iname} appears twice in one account")
            seen.add(iname)
            ins = ins_by[iname]
            qty = _num(p, "qty", pw)
            entry = _num(p, "entry_price", pw, positive=True)
            settle_scale = asset_by[ins.settle].scale
            qty_units = _units(p["qty"], ins.qty_scale, f"{pw}.qty")
            q = Decimal(str(p["qty"])) * Decimal(repr(ins.contract_size))
            if ins.kind.is_inverse:
                cost = q / Decimal(str(p["entry_price"]))
            else:
                cost = q * Decimal(str(p["entry_price"]))
            cost_scaled = cost * settle_scale
            if abs(cost_scaled) >= 2**63:   # checked before rounding: quantize needs < 28 digits
                raise ScenarioError(f"{pw}.entry_price: cost basis {cost:.6g} (qty * contract_size "
                                    f"{'/' if ins.kind.is_inverse else '*'} entry_price) is out of "
                                    f"range at the settle scale {settle_scale}")
            cost_units = int(cost_scaled.quantize(Decimal(1), rounding=ROUND_HALF_EVEN))
            iso = 0
            pmode = Mode.ISOLATED if mode == "isolated" else Mode.CROSS
            if pmode == Mode.ISOLATED:
                im_raw = p.get("isolated_margin")
                if im_raw is None:
                    raise ScenarioError(f"{pw}.isolated_margin: required in an isolated account")
                if _num(p, "isolated_margin", pw) < 0:
                    raise ScenarioError(f"{pw}.isolated_margin: must be >= 0")
                iso = _units(im_raw, settle_scale, f"{pw}.isolated_margin")
            elif "isolated_margin" in p:
                raise ScenarioError(f"{pw}.isolated_margin: only for isolated accounts")
            if qty_units == 0:
                raise ScenarioError(f"{pw}.qty: must not be zero")
            del qty, entry
            norm.append((ins.index, int(pmode), qty_units, cost_units, iso))
        accounts.append({"id": acc["id"], "balances": balances, "positions": norm,
                         "isolated": mode == "isolated"})
    return assets, instruments, accounts


def _check_finite(result: dict, where: str) -> None:
    """Refuse an account whose figures overflowed a double (prices or amounts so large
    that a product is infinite): the output must be valid JSON."""
    figures = [(f"{where}.{key}", v) for key, v in result.items() if isinstance(v, float)]
    for j, pos in enumerate(result["positions"]):
        figures += [(f"{where}.positions[{j}].{key}", v) for key, v in pos.items() if isinstance(v, float)]
    for name, v in figures:
        if not math.isfinite(v):
            raise ScenarioError(f"{name}: evaluates to {v}; a price or amount of this account "
                                f"is out of range")


def evaluate(doc) -> dict:
    """Evaluate a scenario document; return ``{"accounts": [...]}`` (see docs/evaluate.md)."""
    assets, instruments, accounts = parse(doc)
    slots = max([len(a["positions"]) for a in accounts] + [1])
    store = Store.create(None, assets=assets, instruments=instruments,
                         accounts_capacity=max(len(accounts), 1), n_partitions=1,
                         slots_per_account=slots)
    try:
        out = []
        for k, acc in enumerate(accounts):
            row = store.add_account(k, isolated_default=acc["isolated"])
            for asset, units in acc["balances"].items():
                store.set_balance(row, asset, units)
            for ins, mode, qty, cost, iso in acc["positions"]:
                store.set_position(row, ins, qty, cost, mode=mode, isolated_margin=iso)
            d = margin.account_detail(store, row)
            eq = d.equity_usd
            mm = d.maintenance_margin_usd
            out.append({
                "id": acc["id"],
                "collateral_value": d.collateral_usd,
                "unrealized_pnl": d.unrealized_pnl_usd,
                "equity": eq,
                "initial_margin": d.initial_margin_usd,
                "maintenance_margin": mm,
                "margin_ratio": (mm / eq) if eq > 0 else None,   # undefined at equity <= 0
                "liquidatable": d.liquidatable,
                "positions": [{
                    "instrument": instruments[p.instrument].name,
                    "notional": p.notional,
                    "unrealized_pnl": p.unrealized_pnl,
                    "initial_margin": p.initial_margin,
                    "maintenance_margin": p.maintenance_margin,
                    "liquidation_price": p.liquidation_price,
                    "bankruptcy_price": p.bankruptcy_price,
                } for p in d.positions],
            })
            _check_finite(out[-1], f"accounts[{k}]")
        return {"accounts": out}
    finally:
        store.detach()


# --------------------------------------------------------------------------- portfolio margin
PORTFOLIO_KEYS = ("valuation_time", "options", "same_underlying", "params")
PARAM_KEYS = ("price_range", "price_steps", "vol_shocks", "extreme_multiple", "extreme_fraction",
              "short_option_min", "rate", "var_confidence", "var_horizon_days", "var_vol", "var_points")


def _time_ns(value, where: str) -> int:
    """An ISO 8601 UTC time (``2026-06-26T08:00:00Z``) as Unix nanoseconds."""
    from datetime import datetime

    if not isinstance(value, str):
        raise ScenarioError(f"{where}: an ISO 8601 time such as \"2026-06-26T08:00:00Z\", got {value!r}")
    try:
        t = datetime.fromisoformat(value)
    except ValueError:
        raise ScenarioError(f"{where}: not an ISO 8601 time: {value!r}") from None
    if t.tzinfo is None:
        raise ScenarioError(f"{where}: give the time zone (e.g. a trailing Z): {value!r}")
    return int(t.timestamp()) * 10**9 + t.microsecond * 1000


def _portfolio_params(raw, where: str):
    from engine.risk.portfolio import ScenarioParams

    if raw is None:
        return ScenarioParams()
    if not isinstance(raw, dict):
        raise ScenarioError(f"{where}: must be an object")
    known_keys(raw, PARAM_KEYS, where, ScenarioError)
    kw = {}
    for key, v in raw.items():
        if key in ("price_steps", "var_points"):
            if isinstance(v, bool) or not isinstance(v, int):
                raise ScenarioError(f"{where}.{key}: must be an integer, got {v!r}")
            kw[key] = v
        elif key == "vol_shocks":
            if not isinstance(v, list):
                raise ScenarioError(f"{where}.vol_shocks: a list of relative shocks, got {v!r}")
            kw[key] = tuple(_finite(x, f"{where}.vol_shocks[{i}]") for i, x in enumerate(v))
        else:
            kw[key] = _finite(v, f"{where}.{key}")
    try:
        return ScenarioParams(**kw)
    except ValueError as e:
        raise ScenarioError(f"{where}: {e}") from None


def evaluate_portfolio(doc) -> dict:
    """Standard figures and the portfolio requirement per account (docs/portfolio.md).

    ``doc`` is an evaluate scenario plus a top-level ``portfolio`` object. Steps: (1) the
    standard figures of ``evaluate`` on the scenario without it; (2) per account, one
    group per option underlying: its options, the underlying itself, and the perps and
    futures ``same_underlying`` maps to it; (3) each group as an
    engine.risk.portfolio.Portfolio (USD-settled when the underlying is linear and every
    member settles in its settle asset; coin-settled when it is inverse, likewise) through
    the kernel, plus VaR and the legs alone; (4) the positions in no group keep their
    standard initial margin. Portfolio margin is what-if only: the live workers do not
    run it.
    """
    from engine.risk import portfolio as pm

    if not isinstance(doc, dict):
        raise ScenarioError("scenario: top level must be an object")
    doc = dict(doc)
    raw = doc.pop("portfolio", None)
    if not isinstance(raw, dict):
        raise ScenarioError("portfolio: missing or not an object (docs/portfolio.md)")
    known_keys(raw, PORTFOLIO_KEYS, "portfolio", ScenarioError)
    standard = evaluate(doc)
    assets, instruments, accounts = parse(doc)
    ins_by = {i.name: i for i in instruments}
    asset_by = {a.name: a for a in assets}
    now_ns = _time_ns(raw.get("valuation_time"), "portfolio.valuation_time")
    params = _portfolio_params(raw.get("params"), "portfolio.params")

    opts = raw.get("options", {})
    if not isinstance(opts, dict):
        raise ScenarioError("portfolio.options: an object of option name -> {expiry, iv}")
    vol_expiry = {}
    for name, o in opts.items():
        w = f"portfolio.options.{name}"
        if name not in ins_by or ins_by[name].kind != Kind.OPTION:
            raise ScenarioError(f"{w}: not an option of the scenario's instruments")
        if not isinstance(o, dict):
            raise ScenarioError(f"{w}: must be an object {{expiry, iv}}")
        known_keys(o, ("expiry", "iv"), w, ScenarioError)
        iv = _num(o, "iv", w)
        if iv < 0:
            raise ScenarioError(f"{w}.iv: must be >= 0, got {iv}")
        vol_expiry[name] = (_time_ns(o.get("expiry"), f"{w}.expiry"), iv)
    same = raw.get("same_underlying", {})
    if not isinstance(same, dict):
        raise ScenarioError("portfolio.same_underlying: an object of perp/future name -> underlying name")
    for name, target in same.items():
        w = f"portfolio.same_underlying.{name}"
        if name not in ins_by or ins_by[name].kind == Kind.OPTION:
            raise ScenarioError(f"{w}: not a perp or future of the scenario's instruments")
        if target not in ins_by or ins_by[target].kind == Kind.OPTION:
            raise ScenarioError(f"{w}: {target!r} is not a perp or future of the scenario's instruments")

    def group_of(ins: Instrument) -> str | None:
        if ins.kind == Kind.OPTION:
            return ins.underlying
        return same.get(ins.name, ins.name)

    out = []
    for k, acc in enumerate(accounts):
        w = f"accounts[{k}]"
        std = standard["accounts"][k]
        held = [(instruments[i], qty) for i, _, qty, _, _ in acc["positions"]]
        roots = sorted({ins.underlying for ins, _ in held if ins.kind == Kind.OPTION})
        groups, ungrouped_im = [], 0.0
        for (ins, _), pos in zip(held, std["positions"]):
            if group_of(ins) not in roots:
                ungrouped_im += pos["initial_margin"] * asset_by[ins.settle].price_usd
        for root in roots:
            under = ins_by[root]
            convention = pm.SETTLE_COIN if under.kind.is_inverse else pm.SETTLE_USD
            legs, names = [], []
            for ins, qty in held:
                if group_of(ins) != root:
                    continue
                if ins.settle != under.settle:
                    raise ScenarioError(
                        f"{w}: {ins.name} settles in {ins.settle}, its underlying {root} in {under.settle}: "
                        f"portfolio margin needs one settle asset per underlying (docs/portfolio.md)")
                if ins.kind == Kind.OPTION:
                    if ins.name not in vol_expiry:
                        raise ScenarioError(f"portfolio.options.{ins.name}: missing (expiry and iv of a held option)")
                    exp_ns, iv = vol_expiry[ins.name]
                    legs.append(pm.Leg(pm.LEG_OPTION, qty, ins.qty_scale, ins.contract_size, under.mark_price,
                                       ins.strike, pm.year_fraction(exp_ns, now_ns), iv, ins.is_call))
                else:
                    kind = pm.LEG_INVERSE if ins.kind.is_inverse else pm.LEG_LINEAR
                    legs.append(pm.Leg(kind, qty, ins.qty_scale, ins.contract_size, ins.mark_price))
                names.append(ins.name)
            pf = pm.Portfolio(convention, tuple(legs))
            try:
                res = pm.portfolio_requirement(pf, params)
                var = pm.var_requirement(pf, params)
                alone = pm.standalone_sum(pf, params)
            except ValueError as e:
                raise ScenarioError(f"{w}: group {root}: {e}") from None
            px = asset_by[under.settle].price_usd
            groups.append({
                "underlying": root, "settle": under.settle,
                "convention": "coin" if convention == pm.SETTLE_COIN else "usd",
                "positions": names,
                "requirement": res.requirement, "requirement_usd": res.requirement * px,
                "worst_scenario": {"index": res.worst_scenario, "move": res.move, "vol_shock": res.vol_shock,
                                   "weight": res.weight, "loss": res.worst_loss},
                "short_option_minimum": res.short_option_minimum,
                "var": var, "legs_alone": alone,
            })
        item = {
            "id": acc["id"],
            "standard_initial_margin": std["initial_margin"],
            "standard_maintenance_margin": std["maintenance_margin"],
            "equity": std["equity"],
            "portfolio_requirement": sum(g["requirement_usd"] for g in groups) + ungrouped_im,
            "ungrouped_initial_margin": ungrouped_im,
            "groups": groups,
        }
        out.append(item)
    return {"valuation_time": raw["valuation_time"], "accounts": out}
