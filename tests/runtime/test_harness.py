"""``LocalEngine`` releases its shared memory when it cannot be built.

It creates the store and control segments, then runs ``setup(store)``. A setup that
raised (the demo's ``--seed -1``: numpy's ValueError in ``provision``; a Ctrl-C while
the book loads) left both segments in /dev/shm for good: nothing had started, so no
``stop`` ran to unlink them. No processes start in these tests.
"""

from __future__ import annotations

import os

import posix_ipc
import pytest

from engine.runtime import supervisor
from engine.runtime.harness import LocalEngine, local_config


def _exists(name: str) -> bool:
    return os.path.exists(f"/dev/shm/{name}")


@pytest.fixture
def config(tmp_path):
    cfg = local_config(str(tmp_path), accounts_capacity=64)
    yield cfg
    for seg in (cfg.engine.name, cfg.engine.name + "-ctl"):   # the old code left them
        try:
            posix_ipc.unlink_shared_memory("/" + seg)
        except posix_ipc.ExistentialError:
            pass


@pytest.mark.parametrize("exc", [ValueError("expected a non-negative integer"), KeyboardInterrupt()],
                         ids=["error", "ctrl-c"])
def test_a_setup_that_raises_leaves_no_segment(config, exc):
    name = config.engine.name
    seen = []

    def setup(store):
        seen.append((_exists(name), _exists(name + "-ctl")))    # made before setup runs
        raise exc

    with pytest.raises(type(exc)):                # the caller still gets the exception
        LocalEngine(config, setup=setup)
    assert seen == [(True, True)]
    assert not _exists(name), f"/dev/shm/{name} left behind"
    assert not _exists(name + "-ctl"), f"/dev/shm/{name}-ctl left behind"


def test_a_control_segment_that_cannot_be_made_leaves_no_store(config, monkeypatch):
    """The store is made first: when the control segment then fails, the store goes too."""
    def refuse(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(supervisor.Control, "create", refuse)
    with pytest.raises(OSError):
        LocalEngine(config)
    assert not _exists(config.engine.name), f"/dev/shm/{config.engine.name} left behind"


def test_discard_releases_an_engine_never_started(config):
    le = LocalEngine(config, setup=lambda store: store.add_account(1))
    assert _exists(config.engine.name) and _exists(config.engine.name + "-ctl")
    le.discard()
    le.discard()                                  # idempotent
    assert not _exists(config.engine.name) and not _exists(config.engine.name + "-ctl")
