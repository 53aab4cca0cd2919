"""The shared-memory store: versioned tables of assets, instruments, prices, accounts, positions."""

from engine.store.layout import LAYOUT_VERSION, MAGIC, Status, AccountFlag, Mode
from engine.store.shm import Store, StoreError, CapacityError, LayoutMismatch

__all__ = ["Store", "StoreError", "CapacityError", "LayoutMismatch", "LAYOUT_VERSION",
           "MAGIC", "Status", "AccountFlag", "Mode"]
