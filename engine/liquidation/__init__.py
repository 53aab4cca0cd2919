"""Liquidation: what to close when an account breaches, and how much."""
