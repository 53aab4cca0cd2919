"""Supervision: a dead worker is restarted; a dead singleton process stops the engine."""

from __future__ import annotations

import os
import signal

import pytest

from engine.runtime.supervisor import EngineFailure
from runtime_support import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


def test_dead_mark_price_process_is_an_engine_failure(start_engine):
    run = start_engine(price_stage="process")
    eng = run.engine
    mark = next(c for c in eng.children if c.role == "markprice")
    os.kill(mark.proc.pid, signal.SIGKILL)
    mark.proc.wait(10)
    # Not restarted alone: its sockets and index state go with it, so the supervisor
    # reports a failure (``margin-engine run`` then stops and exits 1 for systemd).
    with pytest.raises(EngineFailure, match="markprice exited with -9"):
        eng.watch_once()


def _kill_worker0(eng) -> int:
    """SIGKILL worker 0, wait for it to be dead, let the supervisor act; its old pid."""
    old = eng.worker_pid(0)
    os.kill(old, signal.SIGKILL)
    worker = next(c for c in eng.children if c.role == "worker0")
    wait_until(lambda: worker.proc.poll() is not None, 10.0, "the worker to die")
    assert eng.watch_once() == ["worker0"]
    return old


def test_dead_worker_is_restarted_not_a_failure(start_engine):
    eng = start_engine().engine
    old = _kill_worker0(eng)
    assert eng.worker_pid(0) != old


def test_a_worker_restart_is_an_event(start_engine):
    """Operators learn of a restart on the events stream: code 7005, naming the worker,
    the signal that ended it and its new pid."""
    from engine.codes import Code

    run = start_engine()
    eng = run.engine
    old = _kill_worker0(eng)
    ev = run.client.event(Code.EVENT_WORKER_RESTARTED)
    assert ev["detail"].startswith(f"worker0 (pid {old}) killed by SIGKILL; restarted as pid {eng.worker_pid(0)}")
    assert ev["account"] is None and ev["instrument"] is None


def test_an_events_endpoint_already_bound_fails_the_start(tmp_path):
    """The liquidation gateway binds its endpoints before it says it is ready: one that
    is taken fails the engine's start, naming the process (the bind used to happen in a
    thread that died alone, and the engine ran on with no orders or events going out)."""
    import zmq

    from engine.runtime.harness import LocalEngine, local_config

    ctx = zmq.Context()
    squatter = ctx.socket(zmq.PUB)                  # (an ipc bind would take the path over)
    squatter.bind("tcp://127.0.0.1:*")
    port = int(squatter.getsockopt_string(zmq.LAST_ENDPOINT).rsplit(":", 1)[1])
    config = local_config(str(tmp_path), tcp_ports={"events": port})
    le = LocalEngine(config)
    try:
        with pytest.raises(EngineFailure, match="liqgw exited with 1 during start-up"):
            le.__enter__()
        assert not os.path.exists("/dev/shm/" + config.engine.name)     # start() cleaned up
    finally:
        if any(c.proc is not None and c.proc.poll() is None for c in le.engine.children):
            le.__exit__(None, None, None)         # it started after all: stop it, unlink
        ctx.destroy(linger=0)
