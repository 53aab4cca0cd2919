"""Accounting: applying fills to positions, balances and fee pools (exact integer money)."""

from engine.accounting.fills import (BatchResult, InstrumentParams, LegResult, RefLeg,
                                     apply_fill_leg, apply_fill_legs, contract_ratio,
                                     instrument_params, reference_apply_leg,
                                     reference_isolated_im)

__all__ = ["BatchResult", "InstrumentParams", "LegResult", "RefLeg", "apply_fill_leg",
           "apply_fill_legs", "contract_ratio", "instrument_params", "reference_apply_leg",
           "reference_isolated_im"]
