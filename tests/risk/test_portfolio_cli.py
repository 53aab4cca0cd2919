"""``margin-engine portfolio`` as a real subprocess: the bundled example (standard margin
beside portfolio margin per account) and bad inputs that exit 2 with one line."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "engine" / "examples" / "portfolio.json"
BASE = json.loads(EXAMPLE.read_text())

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def portfolio(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "engine.cli", "portfolio", *args], cwd=REPO,
                          input=stdin, capture_output=True, text=True, timeout=60)


def test_example_standard_beside_portfolio():
    r = portfolio(str(EXAMPLE))
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    by = {a["id"]: a for a in doc["accounts"]}
    assert list(by) == ["delta-hedged-call", "short-strangle-perp", "deribit-style-coin"]
    hedged = by["delta-hedged-call"]
    g = hedged["groups"][0]
    assert g["positions"] == ["BTCUSDT-27MAR26-90000-C", "BTCUSDT-20260327"]
    assert g["convention"] == "usd"
    # delta-hedged: the book needs less than its legs alone, and its worst case is a vol drop
    assert g["requirement"] < g["legs_alone"]
    assert (g["worst_scenario"]["move"], g["worst_scenario"]["vol_shock"]) == (0.0, -0.3)
    assert hedged["portfolio_requirement"] == g["requirement_usd"]
    strangle = by["short-strangle-perp"]["groups"][0]
    assert "BTCUSDT" in strangle["positions"]               # joined through same_underlying
    assert strangle["short_option_minimum"] > 0
    coin = by["deribit-style-coin"]["groups"][0]
    assert (coin["convention"], coin["settle"]) == ("coin", "BTC")
    assert coin["requirement_usd"] == pytest.approx(coin["requirement"] * 90483.84)
    assert portfolio().stdout == r.stdout                   # the default is the bundled example


@pytest.mark.parametrize("edit,message", [
    (lambda d: d.pop("portfolio"), "portfolio: missing or not an object"),
    (lambda d: d["portfolio"]["options"].pop("BTC-27MAR26-90000-C"),
     "portfolio.options.BTC-27MAR26-90000-C: missing (expiry and iv of a held option)"),
    (lambda d: d["portfolio"].update(valuation_time="yesterday"), "portfolio.valuation_time: not an ISO 8601"),
    (lambda d: d["portfolio"]["options"]["BTC-27MAR26-90000-C"].update(iv=-0.1),
     "portfolio.options.BTC-27MAR26-90000-C.iv: must be >= 0"),
    (lambda d: d["portfolio"]["params"].update(price_steps=1), "portfolio.params: price_steps"),
    (lambda d: d["portfolio"]["params"].update(bogus=1), "portfolio.params.bogus: unknown key"),
    (lambda d: d["instruments"]["BTC-27MAR26-90000-C"].update(settle="USDT"),
     "BTC-27MAR26-90000-C settles in USDT, its underlying BTC-27MAR26 in BTC"),
])
def test_bad_input_exits_2_with_one_line(edit, message):
    doc = copy.deepcopy(BASE)
    edit(doc)
    r = portfolio("-", stdin=json.dumps(doc))
    assert r.returncode == 2
    assert r.stdout == ""
    assert r.stderr.count("\n") == 1 and message in r.stderr, r.stderr
