"""``margin-engine evaluate`` as a real subprocess: the bundled example, and bad inputs
that must exit 2 with one line naming the field, never a traceback."""

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "engine" / "examples" / "scenario.json"
BASE = json.loads(EXAMPLE.read_text())

ACCOUNT_KEYS = {"id", "collateral_value", "unrealized_pnl", "equity", "initial_margin",
                "maintenance_margin", "margin_ratio", "liquidatable", "positions"}
POSITION_KEYS = {"instrument", "notional", "unrealized_pnl", "initial_margin", "maintenance_margin",
                 "liquidation_price", "bankruptcy_price"}

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def evaluate(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "engine.cli", "evaluate", *args], cwd=REPO,
                          input=stdin, capture_output=True, text=True, timeout=60)


# --------------------------------------------------------------------------- the example
@pytest.fixture(scope="module")
def example_result():
    r = evaluate(str(EXAMPLE))
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""
    return json.loads(r.stdout)


def test_example_has_the_documented_keys(example_result):
    assert set(example_result) == {"accounts"}
    assert [a["id"] for a in example_result["accounts"]] == ["a1", "a2", "a3"]
    for acct in example_result["accounts"]:
        assert set(acct) == ACCOUNT_KEYS
        assert isinstance(acct["liquidatable"], bool)
        assert acct["positions"], acct["id"]
        for pos in acct["positions"]:
            assert set(pos) == POSITION_KEYS
            assert all(isinstance(pos[k], float) for k in POSITION_KEYS - {"instrument"}
                       if pos[k] is not None)


def test_example_figures(example_result):
    a1, a2, a3 = example_result["accounts"]
    # a1: cross, 1 535 443.01 USDT at price 1, haircut 0
    assert a1["collateral_value"] == pytest.approx(1_535_443.01)
    assert a1["equity"] == pytest.approx(a1["collateral_value"] + a1["unrealized_pnl"])
    # upnl = 109.488 * (31 967.27 - 32 481.98) + 3 683.979 * (1 335.18 - 1 456.84)
    #      = -56 354.56848 - 448 192.88514 = -504 547.45362
    assert a1["unrealized_pnl"] == pytest.approx(-504_547.45362)
    assert [p["instrument"] for p in a1["positions"]] == ["BTCUSDT", "ETHUSDT"]
    assert a1["margin_ratio"] == pytest.approx(a1["maintenance_margin"] / a1["equity"])
    assert a1["initial_margin"] == pytest.approx(sum(p["initial_margin"] for p in a1["positions"]))
    # a2: isolated short 3 ETH from 3 000 with 1 000 USDT margin, mark 1 335.18
    #   upnl = -3 * (1 335.18 - 3 000) = 4 994.46; equity = 0 + 1 000 + 4 994.46
    assert a2["unrealized_pnl"] == pytest.approx(4_994.46)
    assert a2["equity"] == pytest.approx(5_994.46)
    # a3: 0.5 BTC * 31 967.27 * (1 - 0.05) - 2 000 USDT = 15 184.453 - 2 000 = 13 184.453
    assert a3["collateral_value"] == pytest.approx(13_184.45325)
    assert a3["positions"][0]["instrument"] == "BTCUSD"


def test_default_and_stdin_give_the_same_result(example_result):
    bundled = evaluate()
    assert bundled.returncode == 0, bundled.stderr
    assert json.loads(bundled.stdout) == example_result
    piped = evaluate("-", stdin=EXAMPLE.read_text())
    assert piped.returncode == 0, piped.stderr
    assert json.loads(piped.stdout) == example_result


def test_null_margin_ratio_and_empty_accounts(tmp_path):
    doc = copy.deepcopy(BASE)
    # a3 with no collateral at all and a losing position: equity <= 0 -> margin_ratio null
    doc["accounts"] = [{"id": 7, "collateral": {},
                        "positions": [{"instrument": "BTCUSDT", "qty": 1, "entry_price": 40000}]}]
    p = tmp_path / "s.json"
    p.write_text(json.dumps(doc))
    r = evaluate(str(p))
    assert r.returncode == 0, r.stderr
    (acct,) = json.loads(r.stdout)["accounts"]
    assert acct["id"] == 7
    assert acct["equity"] < 0 and acct["margin_ratio"] is None
    assert acct["liquidatable"] is True
    doc["accounts"] = []
    p.write_text(json.dumps(doc))
    r = evaluate(str(p))
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {"accounts": []}


# --------------------------------------------------------------------------- bad inputs
def _mut(fn):
    doc = copy.deepcopy(BASE)
    fn(doc)
    return json.dumps(doc)       # like Python's json: NaN / Infinity written as literals


def _pos(doc, k=0, j=0):
    return doc["accounts"][k]["positions"][j]


def _option(**over):
    d = {"kind": "option", "settle": "USDT", "underlying": "BTCUSDT", "strike": 30000, "call": True,
         "mark_price": 100, "tiers": [{"floor": 0, "imr": 0.1, "mmr": 0.05}]}
    d.update(over)
    return d


# (id, file text, text the one-line error must contain)
BAD = [
    ("unknown-instrument", _mut(lambda d: _pos(d).update(instrument="XRPUSDT")),
     "accounts[0].positions[0].instrument: unknown instrument 'XRPUSDT'"),
    ("nan-asset-price", _mut(lambda d: d["assets"]["BTC"].update(price=float("nan"))), "assets.BTC.price: must be finite"),
    ("nan-qty", _mut(lambda d: _pos(d).update(qty=float("nan"))), "accounts[0].positions[0].qty: must be finite"),
    ("nan-collateral", _mut(lambda d: d["accounts"][0]["collateral"].update(USDT=float("nan"))),
     "accounts[0].collateral.USDT: must be finite"),
    ("infinite-entry", _mut(lambda d: _pos(d).update(entry_price=float("inf"))), "accounts[0].positions[0].entry_price: must be finite"),
    ("missing-mark", _mut(lambda d: d["instruments"]["BTCUSDT"].pop("mark_price")), "instruments.BTCUSDT.mark_price: missing"),
    ("missing-id", _mut(lambda d: d["accounts"][1].pop("id")), "accounts[1].id: missing"),
    ("missing-qty", _mut(lambda d: _pos(d).pop("qty")), "accounts[0].positions[0].qty: missing"),
    ("missing-entry", _mut(lambda d: _pos(d, 2).pop("entry_price")), "accounts[2].positions[0].entry_price: missing"),
    ("missing-accounts", _mut(lambda d: d.pop("accounts")), "accounts: missing"),
    ("missing-assets", _mut(lambda d: d.pop("assets")), "assets: missing"),
    ("missing-tiers", _mut(lambda d: d["instruments"]["ETHUSDT"].pop("tiers")), "instruments.ETHUSDT.tiers"),
    ("missing-isolated-margin", _mut(lambda d: _pos(d, 1).pop("isolated_margin")),
     "accounts[1].positions[0].isolated_margin: required"),
    ("negative-mark", _mut(lambda d: d["instruments"]["BTCUSDT"].update(mark_price=-1)),
     "instruments.BTCUSDT.mark_price: must be > 0"),
    ("negative-entry", _mut(lambda d: _pos(d).update(entry_price=-5)), "accounts[0].positions[0].entry_price: must be > 0"),
    ("zero-asset-price", _mut(lambda d: d["assets"]["USDT"].update(price=0)), "assets.USDT.price: must be > 0"),
    ("negative-isolated-margin", _mut(lambda d: _pos(d, 1).update(isolated_margin=-1)),
     "accounts[1].positions[0].isolated_margin: must be >= 0"),
    ("haircut-one", _mut(lambda d: d["assets"]["BTC"].update(haircut=1)), "assets.BTC.haircut"),
    ("string-qty", _mut(lambda d: _pos(d).update(qty="1")), "accounts[0].positions[0].qty: must be a number"),
    ("bool-qty", _mut(lambda d: _pos(d).update(qty=True)), "accounts[0].positions[0].qty: must be a number"),
    ("list-collateral", _mut(lambda d: d["accounts"][0].update(collateral=[1])), "accounts[0].collateral"),
    ("list-settle", _mut(lambda d: d["instruments"]["BTCUSDT"].update(settle=["USDT"])), "instruments.BTCUSDT.settle"),
    ("list-instrument", _mut(lambda d: _pos(d).update(instrument=["BTCUSDT"])), "accounts[0].positions[0].instrument"),
    ("list-underlying", _mut(lambda d: d["instruments"].update(OPT=_option(underlying=["BTCUSDT"]))),
     "instruments.OPT.underlying"),
    ("string-call", _mut(lambda d: d["instruments"].update(OPT=_option(call="false"))), "instruments.OPT.call"),
    ("option-without-strike", _mut(lambda d: d["instruments"].update(OPT=_option(strike=None))), "instruments.OPT.strike"),
    ("list-id", _mut(lambda d: d["accounts"][0].update(id=["a1"])), "accounts[0].id"),
    ("nan-id", _mut(lambda d: d["accounts"][0].update(id=float("nan"))), "accounts[0].id"),
    ("string-tiers", _mut(lambda d: d["instruments"]["BTCUSDT"].update(tiers="x")), "instruments.BTCUSDT.tiers"),
    ("unknown-kind", _mut(lambda d: d["instruments"]["BTCUSDT"].update(kind="swap")), "instruments.BTCUSDT.kind"),
    ("unknown-settle", _mut(lambda d: d["instruments"]["BTCUSDT"].update(settle="USDC")), "instruments.BTCUSDT.settle"),
    ("unknown-collateral-asset", _mut(lambda d: d["accounts"][0]["collateral"].update(DOGE=1)), "accounts[0].collateral.DOGE"),
    ("bad-mode", _mut(lambda d: d["accounts"][0].update(mode="portfolio")), "accounts[0].mode"),
    ("isolated-margin-in-cross", _mut(lambda d: _pos(d).update(isolated_margin=5)), "accounts[0].positions[0].isolated_margin"),
    ("zero-qty", _mut(lambda d: _pos(d).update(qty=0)), "accounts[0].positions[0].qty: must not be zero"),
    ("duplicate-position", _mut(lambda d: d["accounts"][0]["positions"].append(dict(_pos(d)))),
     "accounts[0].positions[2].instrument: BTCUSDT appears twice"),
    ("qty-scale-not-power-of-ten", _mut(lambda d: d["instruments"]["BTCUSDT"].update(qty_scale=3)), "instruments.BTCUSDT.qty_scale"),
    ("first-floor-not-zero", _mut(lambda d: d["instruments"]["BTCUSDT"]["tiers"][0].update(floor=1)),
     "instruments.BTCUSDT.tiers[0].floor"),
    ("top-level-list", "[]", "top level must be an object"),
    ("nine-assets", _mut(lambda d: d.update(assets={f"A{i}": {"price": 1} for i in range(9)})), "assets: 1 to 8"),
    # more decimals than the fixed-point scale allows (default 1e-8)
    ("qty-below-default-scale", _mut(lambda d: _pos(d).update(qty=0.000000001)), "accounts[0].positions[0].qty"),
    ("collateral-below-default-scale", _mut(lambda d: d["accounts"][0]["collateral"].update(USDT=1.123456789)),
     "accounts[0].collateral.USDT"),
    ("collateral-below-asset-scale", _mut(lambda d: (d["assets"]["USDT"].update(scale=10**6),
                                                    d["accounts"][0]["collateral"].update(USDT=1.0000001))),
     "accounts[0].collateral.USDT: 1.0000001 has more decimals than the scale 1/1000000"),
    ("qty-below-instrument-scale", _mut(lambda d: (d["instruments"]["BTCUSDT"].update(qty_scale=1000),
                                                  _pos(d).update(qty=109.4885))),
     "accounts[0].positions[0].qty: 109.4885 has more decimals than the scale 1/1000"),
    ("isolated-margin-below-scale", _mut(lambda d: _pos(d, 1).update(isolated_margin=0.000000001)),
     "accounts[1].positions[0].isolated_margin"),
    # out of range
    ("qty-out-of-int64", _mut(lambda d: _pos(d).update(qty=1e300)), "accounts[0].positions[0].qty"),
    ("qty-beyond-a-double", _mut(lambda d: _pos(d).update(qty=10**400)), "accounts[0].positions[0].qty: out of range"),
    ("collateral-beyond-a-double", _mut(lambda d: d["accounts"][0]["collateral"].update(USDT=10**400)),
     "accounts[0].collateral.USDT: out of range"),
    ("tier-floor-beyond-a-double", _mut(lambda d: d["instruments"]["BTCUSDT"]["tiers"][1].update(floor=10**400)),
     "instruments.BTCUSDT.tiers"),
    ("cost-basis-out-of-range", _mut(lambda d: _pos(d).update(entry_price=1e12)), "accounts[0].positions[0].entry_price"),
    ("cost-basis-beyond-decimal-precision", _mut(lambda d: _pos(d).update(entry_price=1e300)),
     "accounts[0].positions[0].entry_price"),
    ("inverse-cost-at-tiny-entry", _mut(lambda d: _pos(d, 2).update(entry_price=5e-324)),
     "accounts[2].positions[0].entry_price"),
    ("asset-scale-beyond-int64", _mut(lambda d: d["assets"]["USDT"].update(scale=10**19)), "assets.USDT.scale"),
    ("figures-overflow", _mut(lambda d: (d["assets"]["BTC"].update(price=1e308),
                                        d["accounts"][2]["collateral"].update(BTC=10))),
     "accounts[2].collateral_value"),
    # a key the rule does not read (a typo) is refused, not ignored
    ("unknown-top-key", _mut(lambda d: d.update(acounts=[])), "acounts: unknown key"),
    ("unknown-asset-key", _mut(lambda d: d["assets"]["BTC"].update(hair_cut=0.1)), "assets.BTC.hair_cut: unknown key"),
    ("unknown-instrument-key", _mut(lambda d: d["instruments"]["BTCUSDT"].update(mark=1.0)),
     "instruments.BTCUSDT.mark: unknown key"),
    ("unknown-account-key", _mut(lambda d: d["accounts"][0].update(colateral={})), "accounts[0].colateral: unknown key"),
    ("unknown-position-key", _mut(lambda d: _pos(d).update(entry=1.0)), "accounts[0].positions[0].entry: unknown key"),
    ("unknown-tier-key", _mut(lambda d: d["instruments"]["BTCUSDT"]["tiers"][0].update(mmr2=0.1)),
     "instruments.BTCUSDT.tiers[0].mmr2: unknown key"),
    # not JSON at all
    ("invalid-json", '{"assets": {', "not valid JSON"),
    ("empty-file", "", "not valid JSON"),
]


def _assert_clean_refusal(r: subprocess.CompletedProcess, field: str) -> None:
    assert "Traceback" not in r.stderr, r.stderr
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("margin-engine evaluate: ")
    assert field in lines[0], lines[0]


@pytest.mark.parametrize("text, field", [pytest.param(t, f, id=i) for i, t, f in BAD])
def test_bad_scenario_exits_2_naming_the_field(tmp_path, text, field):
    p = tmp_path / "scenario.json"
    p.write_text(text)
    _assert_clean_refusal(evaluate(str(p)), field)


def test_bad_case_ids_are_unique():
    ids = [i for i, _, _ in BAD]
    assert len(ids) == len(set(ids))


def test_nan_is_written_as_the_literal_python_emits():
    text = dict((i, t) for i, t, _ in BAD)["nan-asset-price"]
    assert '"price": NaN' in text


def test_missing_file(tmp_path):
    missing = tmp_path / "nope.json"
    _assert_clean_refusal(evaluate(str(missing)), f"cannot read {missing}: No such file or directory")


def test_directory_instead_of_file(tmp_path):
    _assert_clean_refusal(evaluate(str(tmp_path)), f"cannot read {tmp_path}")


def test_bad_stdin():
    _assert_clean_refusal(evaluate("-", stdin='{"accounts": '), "not valid JSON")


def test_integer_literal_beyond_pythons_digit_limit(tmp_path):
    p = tmp_path / "scenario.json"
    p.write_text('{"assets": {"USDT": {"price": ' + "1" * 5000 + "}}}")
    _assert_clean_refusal(evaluate(str(p)), "not valid JSON")


def test_json_nested_past_the_decoders_recursion_limit(tmp_path):
    # 100,000 nested arrays: json raises RecursionError, not a ValueError (was a traceback, exit 1)
    p = tmp_path / "scenario.json"
    p.write_text("[" * 100_000 + "]" * 100_000)
    _assert_clean_refusal(evaluate(str(p)), "not valid JSON")
    _assert_clean_refusal(evaluate("-", stdin="[" * 100_000 + "]" * 100_000), "not valid JSON")


def test_the_documented_example_gives_the_documented_output(tmp_path):
    """docs/evaluate.md: its example scenario, run through the CLI, prints its example output."""
    text = (REPO / "docs" / "evaluate.md").read_text()
    blocks = [b.split("```", 1)[0] for b in text.split("```json\n")[1:]]
    scenario, expected = json.loads(blocks[0]), json.loads(blocks[1])
    p = tmp_path / "doc.json"
    p.write_text(json.dumps(scenario))
    r = evaluate(str(p))
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert len(got["accounts"]) == 1 and got["accounts"][0].keys() == expected["accounts"][0].keys()
    for key, want in expected["accounts"][0].items():
        if key == "positions":
            for gp, wp in zip(got["accounts"][0]["positions"], want, strict=True):
                assert gp == pytest.approx(wp)
        else:
            assert got["accounts"][0][key] == pytest.approx(want), key
