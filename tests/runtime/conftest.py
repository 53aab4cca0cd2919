"""Fixtures of the runtime tests: ``start_engine`` runs a whole engine on private ipc
endpoints with a connected client and always stops and unlinks it (helpers: runtime_support)."""

from __future__ import annotations

import shutil
import tempfile

import pytest

from engine.runtime.harness import LocalEngine, local_config
from runtime_support import ACCOUNTS_CAPACITY, Client, Running


@pytest.fixture
def start_engine():
    """``start_engine(setup, n_workers=1, base=None, **engine_overrides) -> Running`` (``base``:
    a configuration other than the embedded one); stopped and
    unlinked at teardown whatever the test did."""
    started: list[Running] = []

    def start(setup=None, n_workers: int = 1, base=None, **overrides) -> Running:
        root = tempfile.mkdtemp(prefix="me-rt-")
        overrides.setdefault("accounts_capacity", ACCOUNTS_CAPACITY)
        config = local_config(root, base, **overrides)
        try:
            le = LocalEngine(config, setup=setup, n_workers=n_workers)
            le.__enter__()
        except BaseException:
            shutil.rmtree(root, ignore_errors=True)
            raise
        client = Client(config.endpoints)
        run = Running(le, client, root, setup)
        started.append(run)
        client.sync_events()
        return run

    yield start
    for run in reversed(started):
        run.client.close()
        if not hasattr(run.le, "exit_codes"):
            run.le.__exit__(None, None, None)
        run.store.unlink()              # also when keep_shm_on_exit kept them
        run.engine.ctl.unlink()
        shutil.rmtree(run.root, ignore_errors=True)


