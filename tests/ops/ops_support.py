"""Helpers shared by the ops tests and their fixtures."""

from __future__ import annotations

import os


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
