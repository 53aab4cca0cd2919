"""Engine configuration: the bundled default, and every kind of bad file refused with
an error that names the bad field."""

import datetime as dt
import math

import pytest

from engine import config
from engine.config import ConfigError
from engine.instruments import Kind, derive_tiers


# --------------------------------------------------------------------------- default
@pytest.fixture(scope="module")
def default():
    return config.load_default()


def test_default_engine_settings(default):
    e = default.engine
    assert (e.name, e.accounts_capacity, e.partitions, e.slots_per_account) == ("margin-engine", 20000, 2, 8)
    assert (e.cpus, e.wait, e.keep_shm_on_exit) == ((), "blocking", False)
    assert (e.gateway_cpu, e.markprice_cpu, e.liqgw_cpu) == (-1, -1, -1)      # not pinned
    assert e.price_stage == "worker"              # worker 0 hears the ticks unless configured
    assert e.holders_slice == 8192                # holders' pass slices: ~20 us each at ~2 ns a holder


def test_default_assets(default):
    assert [a.name for a in default.assets] == ["USDT", "USDC", "BTC", "ETH", "STETH"]
    assert [a.index for a in default.assets] == [0, 1, 2, 3, 4]
    btc = default.asset("BTC")
    assert (btc.scale, btc.price_usd, btc.haircut) == (10**8, 95000.0, 0.05)
    assert default.asset("USDT").scale == 10**6


def test_default_instruments_cover_every_kind(default):
    kinds = {i.name: i.kind for i in default.instruments}
    assert kinds == {
        "BTCUSDT": Kind.PERP, "ETHUSDT": Kind.PERP, "SOLUSDT": Kind.PERP,
        "BTCUSDT-20261225": Kind.FUTURE,
        "BTCUSD": Kind.INVERSE_PERP,
        "BTC-20261225-90000-P": Kind.OPTION, "BTC-20261225-100000-C": Kind.OPTION,
        "BTC-20261225-110000-C": Kind.OPTION,
    }
    assert [i.index for i in default.instruments] == list(range(8))


def test_default_future_option_and_inverse_details(default):
    fut = default.instrument("BTCUSDT-20261225")
    expiry = dt.datetime(2026, 12, 25, 8, tzinfo=dt.timezone.utc)
    assert fut.expiry_ns == int(expiry.timestamp()) * 10**9
    put = default.instrument("BTC-20261225-90000-P")
    assert (put.underlying, put.strike, put.is_call, put.expiry_ns) == ("BTCUSDT", 90000.0, False, fut.expiry_ns)
    assert default.instrument("BTC-20261225-110000-C").is_call is True
    inv = default.instrument("BTCUSD")
    assert (inv.settle, inv.contract_size, inv.kind.is_inverse) == ("BTC", 100.0, True)
    perp = default.instrument("BTCUSDT")
    assert (perp.qty_scale, perp.price_scale) == (1000, 10)
    assert perp.lot_size == pytest.approx(0.001) and perp.tick_size == pytest.approx(0.1)
    assert (perp.underlying, perp.expiry_ns, perp.strike) == (None, 0, 0.0)


def test_default_btcusdt_maintenance_amounts(default):
    tiers = default.instrument("BTCUSDT").tiers
    # maint_k = maint_(k-1) + floor_k * (mmr_k - mmr_(k-1)):
    #   tier 0: 0
    #   tier 1: 0    +    50 000 * (0.005 - 0.004) = 50
    #   tier 2: 50   +   250 000 * (0.01  - 0.005) = 50 + 1 250 = 1 300
    #   tier 3: 1300 + 3 000 000 * (0.025 - 0.01)  = 1 300 + 45 000 = 46 300
    assert [t.maint_amount for t in tiers[:4]] == pytest.approx([0, 50, 1300, 46300])
    # init likewise with imr:
    #   tier 1: 50 000 * (0.01 - 0.008) = 100; tier 2: 100 + 250 000 * 0.01 = 2 600
    assert [t.init_amount for t in tiers[:3]] == pytest.approx([0, 100, 2600])


def test_derived_amounts_make_requirements_continuous(default):
    """At every floor the requirement is the same whether computed in the tier below or
    the tier above: floor_k * mmr_(k-1) - maint_(k-1) == floor_k * mmr_k - maint_k."""
    for ins in default.instruments:
        for lo, hi in zip(ins.tiers, ins.tiers[1:]):
            assert hi.floor * lo.mmr - lo.maint_amount == pytest.approx(hi.floor * hi.mmr - hi.maint_amount)
            assert hi.floor * lo.imr - lo.init_amount == pytest.approx(hi.floor * hi.imr - hi.init_amount)


def test_lookup_of_unknown_names_is_keyerror(default):
    with pytest.raises(KeyError):
        default.asset("DOGE")
    with pytest.raises(KeyError):
        default.instrument("DOGEUSDT")


def test_load_reads_a_file_and_names_it_in_errors(tmp_path):
    good = tmp_path / "good.toml"
    good.write_text(ASSET_USDT + PERP)
    cfg = config.load(good)
    assert [i.name for i in cfg.instruments] == ["BTCUSDT"]
    assert cfg.engine.partitions == 2          # defaults fill the missing [engine] table
    bad = tmp_path / "bad.toml"
    bad.write_text(ASSET_USDT.replace("price_usd = 1.0", "price_usd = -1.0") + PERP)
    with pytest.raises(ConfigError, match=r"bad\.toml: assets\[0\]\.price_usd"):
        config.load(bad)


def test_load_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        config.load(tmp_path / "nope.toml")


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


# --------------------------------------------------------------------------- bad configs
ASSET_USDT = """
[[assets]]
name = "USDT"
scale = 1_000_000
price_usd = 1.0
haircut = 0.0
"""

ASSET_BTC = """
[[assets]]
name = "BTC"
scale = 100_000_000
price_usd = 50000.0
haircut = 0.05
"""

PERP = """
[[instruments]]
name = "BTCUSDT"
kind = "perp"
settle = "USDT"
mark_price = 50000.0
tiers = [{ floor = 0, imr = 0.01, mmr = 0.005 }, { floor = 100_000, imr = 0.02, mmr = 0.01 }]
"""

FUTURE = """
[[instruments]]
name = "BTCUSDT-20261225"
kind = "future"
settle = "USDT"
mark_price = 51000.0
expiry = "2026-12-25T08:00:00Z"
tiers = [{ floor = 0, imr = 0.02, mmr = 0.01 }]
"""

OPTION = """
[[instruments]]
name = "BTC-C"
kind = "option"
settle = "USDT"
underlying = "BTCUSDT"
strike = 60000.0
call = true
expiry = "2026-12-25T08:00:00Z"
contract_size = 0.01
mark_price = 800.0
tiers = [{ floor = 0, imr = 0.15, mmr = 0.075 }]
"""

VALID = ASSET_USDT + ASSET_BTC + PERP + FUTURE + OPTION


def test_the_base_of_the_bad_cases_is_valid():
    cfg = config.parse(VALID)
    assert [i.kind for i in cfg.instruments] == [Kind.PERP, Kind.FUTURE, Kind.OPTION]


def _swap(old: str, new: str, text: str = VALID) -> str:
    assert old in text, old
    return text.replace(old, new, 1)


# (id, TOML text, text the error must contain: the field it names)
BAD = [
    ("bad-toml", "[[assets]\nname = 'USDT'", "not valid TOML"),
    ("missing-assets", PERP, "assets: at least one"),
    ("assets-not-tables", "assets = [1, 2]\n" + PERP, "assets[0]: must be a table"),
    ("missing-instruments", ASSET_USDT, "instruments: at least one"),
    ("unknown-section", "[margin]\nx = 1\n" + VALID, "unknown section"),
    ("unknown-kind", _swap('kind = "perp"', 'kind = "swap"'), "instruments[0].kind"),
    ("missing-kind", _swap('kind = "perp"\n', ""), "instruments[0].kind"),
    ("settle-unknown-asset", _swap('settle = "USDT"\nmark_price = 50000.0', 'settle = "USDC"\nmark_price = 50000.0'),
     "instruments[0].settle"),
    ("tier-floors-not-increasing",
     _swap("{ floor = 100_000, imr = 0.02, mmr = 0.01 }", "{ floor = 0, imr = 0.02, mmr = 0.01 }"),
     "instruments[0].tiers[1].floor"),
    ("tier-floors-decreasing",
     _swap("{ floor = 100_000, imr = 0.02, mmr = 0.01 }]",
           "{ floor = 100_000, imr = 0.02, mmr = 0.01 }, { floor = 50_000, imr = 0.05, mmr = 0.02 }]"),
     "instruments[0].tiers[2].floor"),
    ("mmr-above-imr", _swap("{ floor = 0, imr = 0.01, mmr = 0.005 }", "{ floor = 0, imr = 0.01, mmr = 0.02 }"),
     "instruments[0].tiers[0]: need 0 < mmr <= imr"),
    ("mmr-zero", _swap("{ floor = 0, imr = 0.01, mmr = 0.005 }", "{ floor = 0, imr = 0.01, mmr = 0 }"),
     "instruments[0].tiers[0]: need 0 < mmr"),
    ("rates-decrease", _swap("{ floor = 100_000, imr = 0.02, mmr = 0.01 }", "{ floor = 100_000, imr = 0.02, mmr = 0.004 }"),
     "instruments[0].tiers[1]: rates must not decrease"),
    ("first-floor-not-zero", _swap("{ floor = 0, imr = 0.01, mmr = 0.005 }", "{ floor = 10, imr = 0.01, mmr = 0.005 }"),
     "instruments[0].tiers[0].floor"),
    ("tier-missing-mmr", _swap("{ floor = 0, imr = 0.01, mmr = 0.005 }", "{ floor = 0, imr = 0.01 }"),
     "instruments[0].tiers[0].mmr: missing"),
    ("tiers-missing", _swap("tiers = [{ floor = 0, imr = 0.01, mmr = 0.005 }, { floor = 100_000, imr = 0.02, mmr = 0.01 }]\n", ""),
     "instruments[0].tiers"),
    ("seventeen-tiers", _swap("tiers = [{ floor = 0, imr = 0.01, mmr = 0.005 }, { floor = 100_000, imr = 0.02, mmr = 0.01 }]",
                              "tiers = [" + ", ".join(f"{{ floor = {k * 1000}, imr = 0.5, mmr = 0.25 }}" for k in range(17)) + "]"),
     "instruments[0].tiers: at most 16"),
    ("haircut-one", _swap("haircut = 0.05", "haircut = 1.0"), "assets[1].haircut"),
    ("haircut-negative", _swap("haircut = 0.05", "haircut = -0.1"), "assets[1].haircut"),
    ("nan-asset-price", _swap("price_usd = 50000.0", "price_usd = nan"), "assets[1].price_usd: must be finite"),
    ("inf-mark-price", _swap("mark_price = 50000.0", "mark_price = inf"), "instruments[0].mark_price: must be finite"),
    ("nan-tier-rate", _swap("{ floor = 0, imr = 0.01, mmr = 0.005 }", "{ floor = 0, imr = nan, mmr = 0.005 }"),
     "instruments[0].tiers[0].imr: must be finite"),
    ("zero-price", _swap("price_usd = 50000.0", "price_usd = 0.0"), "assets[1].price_usd: must be > 0"),
    ("string-price", _swap("price_usd = 50000.0", 'price_usd = "50000"'), "assets[1].price_usd: must be a number"),
    ("missing-mark", _swap("mark_price = 50000.0\n", ""), "instruments[0].mark_price: missing"),
    ("option-without-underlying", _swap('underlying = "BTCUSDT"\n', ""), "instruments[2].underlying"),
    ("option-underlying-unknown", _swap('underlying = "BTCUSDT"', 'underlying = "ETHUSDT"'), "instruments[2].underlying"),
    ("option-underlying-itself", _swap('underlying = "BTCUSDT"', 'underlying = "BTC-C"'), "instruments[2].underlying"),
    ("option-without-strike", _swap("strike = 60000.0\n", ""), "instruments[2].strike"),
    ("option-without-call", _swap("call = true\n", ""), "instruments[2].call"),
    ("underlying-on-a-perp", _swap('kind = "perp"', 'kind = "perp"\nunderlying = "BTC-C"'), "instruments[0].underlying"),
    ("future-without-expiry", _swap('expiry = "2026-12-25T08:00:00Z"\ntiers = [{ floor = 0, imr = 0.02', "tiers = [{ floor = 0, imr = 0.02"),
     "instruments[1].expiry: required"),
    ("expiry-without-zone", _swap('expiry = "2026-12-25T08:00:00Z"', 'expiry = "2026-12-25T08:00:00"'), "instruments[1].expiry: needs a time zone"),
    ("expiry-not-a-time", _swap('expiry = "2026-12-25T08:00:00Z"', 'expiry = "at christmas"'), "instruments[1].expiry"),
    ("asset-scale-not-power-of-ten", _swap("scale = 100_000_000", "scale = 250_000_000"), "assets[1].scale"),
    ("asset-scale-zero", _swap("scale = 100_000_000", "scale = 0"), "assets[1].scale"),
    ("qty-scale-not-power-of-ten", _swap('kind = "perp"', 'kind = "perp"\nqty_scale = 250'), "instruments[0].qty_scale"),
    ("price-scale-float", _swap('kind = "perp"', 'kind = "perp"\nprice_scale = 10.0'), "instruments[0].price_scale"),
    ("contract-size-negative", _swap("contract_size = 0.01", "contract_size = -0.01"), "instruments[2].contract_size"),
    ("wait-unknown", "[engine]\nwait = \"sleepy\"\n" + VALID, "engine.wait"),
    ("partitions-zero", "[engine]\npartitions = 0\n" + VALID, "engine.partitions: must be >= 1"),
    ("capacity-bool", "[engine]\naccounts_capacity = true\n" + VALID, "engine.accounts_capacity: must be an integer"),
    ("cpus-negative", "[engine]\ncpus = [0, -1]\n" + VALID, "engine.cpus"),
    ("keep-shm-string", "[engine]\nkeep_shm_on_exit = \"yes\"\n" + VALID, "engine.keep_shm_on_exit"),
    ("state-dir-number", "[engine]\nstate_dir = 5\n" + VALID, "engine.state_dir"),
    ("snapshot-interval-negative", "[engine]\nsnapshot_interval_s = -1\n" + VALID, "engine.snapshot_interval_s"),
    ("fills-max-wait-negative", "[engine]\nfills_max_wait_us = -5\n" + VALID, "engine.fills_max_wait_us"),
    ("journal-sync-unknown", "[engine]\njournal_sync = \"never\"\n" + VALID, "engine.journal_sync"),
    ("transfer-window-zero", "[engine]\ntransfer_window = 0\n" + VALID, "engine.transfer_window"),
    ("journal-fsync-negative", "[engine]\njournal_fsync_interval_s = -1\n" + VALID, "engine.journal_fsync_interval_s"),
    ("gateway-cpu-below-minus-one", "[engine]\ngateway_cpu = -2\n" + VALID, "engine.gateway_cpu"),
    ("markprice-cpu-float", "[engine]\nmarkprice_cpu = 1.5\n" + VALID, "engine.markprice_cpu"),
    ("liqgw-cpu-bool", "[engine]\nliqgw_cpu = true\n" + VALID, "engine.liqgw_cpu"),
    ("price-stage-unknown", "[engine]\nprice_stage = \"gateway\"\n" + VALID, "engine.price_stage"),
    ("holders-slice-zero", "[engine]\nholders_slice = 0\n" + VALID, "engine.holders_slice: must be >= 1"),
    ("duplicate-asset", VALID + ASSET_BTC, "assets[2].name: duplicate asset 'BTC'"),
    ("duplicate-instrument", VALID + PERP, "instruments[0].name: duplicate instrument 'BTCUSDT'"),
    ("nine-assets", "".join(ASSET_USDT.replace('"USDT"', f'"A{k}"') for k in range(9)) + PERP.replace('"USDT"', '"A0"'),
     "assets: at most 8"),
    ("name-too-long", _swap('name = "BTC-C"', 'name = "' + "X" * 24 + '"'), "instruments[2].name: at most 23 bytes"),
    # a key the engine does not read (a typo) is refused, not ignored with the default in force
    ("engine-key-typo", "[engine]\nsnapshot_interval = 5\n" + VALID, "engine.snapshot_interval: unknown key"),
    ("asset-key-typo", _swap("haircut = 0.05", "hair_cut = 0.05"), "assets[1].hair_cut: unknown key"),
    ("instrument-key-typo", _swap("mark_price = 50000.0", "mark_price = 50000.0\nmaint_rate = 0.1"),
     "instruments[0].maint_rate: unknown key"),
    ("tier-key-typo", _swap("{ floor = 0, imr = 0.01, mmr = 0.005 }", "{ floor = 0, imr = 0.01, mmr = 0.005, mmr2 = 0.1 }"),
     "instruments[0].tiers[0].mmr2: unknown key"),
]


@pytest.mark.parametrize("text, field", [pytest.param(t, f, id=i) for i, t, f in BAD])
def test_bad_config_is_refused_naming_the_field(text, field):
    with pytest.raises(ConfigError) as ei:
        config.parse(text, source="case.toml")
    msg = str(ei.value)
    assert field in msg, msg
    assert msg.startswith("case.toml: ")


def test_bad_case_ids_are_unique():
    ids = [i for i, _, _ in BAD]
    assert len(ids) == len(set(ids))


# --------------------------------------------------------------------------- derive_tiers
def test_derive_tiers_single_tier_has_no_amounts():
    (t,) = derive_tiers([{"floor": 0, "imr": 0.1, "mmr": 0.05}])
    assert (t.floor, t.imr, t.mmr, t.init_amount, t.maint_amount) == (0.0, 0.1, 0.05, 0.0, 0.0)


def test_derive_tiers_accepts_integers_and_equal_rates():
    tiers = derive_tiers([{"floor": 0, "imr": 1, "mmr": 1}, {"floor": 5, "imr": 1, "mmr": 1}])
    # equal rates: maint_1 = 0 + 5 * (1 - 1) = 0
    assert [t.maint_amount for t in tiers] == [0.0, 0.0]
    assert all(isinstance(t.floor, float) for t in tiers)


@pytest.mark.parametrize("raw, needle", [
    pytest.param(None, "non-empty list", id="none"),
    pytest.param([], "non-empty list", id="empty"),
    pytest.param([1], "tiers[0]: must be a table", id="not-a-table"),
    pytest.param([{"floor": True, "imr": 0.1, "mmr": 0.05}], "tiers[0].floor: must be a number", id="bool-floor"),
    pytest.param([{"floor": 0, "imr": 1.5, "mmr": 0.05}], "mmr <= imr <= 1", id="imr-above-one"),
    pytest.param([{"floor": 0, "imr": 0.1, "mmr": math.nan}], "tiers[0].mmr: must be finite", id="nan"),
])
def test_derive_tiers_refuses(raw, needle):
    with pytest.raises(ValueError) as ei:
        derive_tiers(raw, "tiers")
    assert needle in str(ei.value)


def test_a_coin_settled_option_on_an_inverse_underlying_is_refused():
    """The standard rule prices an option's notional at |q| cs S in its settle asset: a
    BTC-settled option on the inverse BTCUSD perp would have 95,000 USD of notional per
    contract counted as 95,000 BTC. Refused at load, naming the field and both assets (a
    USDT-settled option on BTCUSD, settling apart from its underlying, too)."""
    text = config.default_text()
    option = ('\n[[instruments]]\nname = "BTC-COIN-C"\nkind = "option"\nsettle = "{settle}"\ncontract_size = 1.0\n'
              'mark_price = 0.05\nunderlying = "BTCUSD"\nstrike = 100000.0\ncall = true\n'
              'expiry = "2026-12-25T08:00:00Z"\ntiers = [{{ floor = 0, imr = 0.1, mmr = 0.05 }}]\n')
    n = text.count("[[instruments]]")
    for settle in ("BTC", "USDT"):
        with pytest.raises(ConfigError, match=rf"instruments\[{n}\]\.settle: an option must settle in its "
                                              rf"underlying's settle asset.*in {settle}, BTCUSD \(inverse_perp\) in BTC"):
            config.parse(text + option.format(settle=settle))
