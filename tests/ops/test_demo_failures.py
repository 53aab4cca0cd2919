"""The demo when its simulated counterparties fail, ``--crash 0``, and what its screen shows.

Before: a venue thread that died (``--crash 0`` raised in it) or an exchange process
that died (``--accounts 0``) left the demo showing 0 ticks/s and 0 fills/s until the
end, then exiting 0 as if all went well.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from engine.codes import Code
from engine.demo import _exchange
from engine.runtime.harness import local_config
from ops_support import REPO, assert_group_gone, cli, demo_segments, shm_exists, start_demo, wait_for_child

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


def test_a_killed_exchange_stops_the_demo_with_exit_1(spawn, ops_dir):
    """The simulated exchange's process killed (SIGKILL) 1 s into a 20 s run: the demo
    notices within its next refresh (0.5 s), stops the engine and exits 1 with one line
    naming what happened -- no summary of a run that did not happen, no traceback,
    nothing left behind. The old code went on showing zeros for the rest of the 20 s."""
    proc, err_path, segments = start_demo(spawn, ops_dir)
    exchange = wait_for_child(proc, "multiprocessing.spawn")
    time.sleep(1.0)
    os.kill(exchange, signal.SIGKILL)
    try:
        out, _ = proc.communicate(timeout=10)
    finally:
        err = err_path.read_text()
        segments += demo_segments(err)
    assert proc.returncode == 1, err[-3000:]
    assert "Traceback" not in err, err
    assert err.strip().splitlines()[-1] == ("margin-engine demo: the simulated exchange failed: "
                                            "killed by SIGKILL; stopped"), err
    assert "demo done:" not in out
    for seg in segments:
        assert not shm_exists(seg), f"/dev/shm/{seg} left behind"
    assert segments and not [d for d in os.listdir(ops_dir) if d.startswith("me-demo-")]
    assert_group_gone(proc.pid, within_s=10)


def test_a_dead_venue_thread_is_reported_at_once(ops_dir):
    """The exchange process on its own (no engine: its sockets connect to nothing), with
    a crash the venue simulator refuses (150 %: ``VenueSim.crash`` raises ValueError on
    the first step, in the venue thread). Expected: within 10 s of a 30 s run, the
    message ``("error", <the thread and its exception>)`` on its result pipe, and the
    process ends by itself. The old exchange printed the thread's traceback, sent
    nothing, and ran the full 30 s."""
    cfg = local_config(ops_dir)
    ctx = mp.get_context("spawn")
    results, results_w = ctx.Pipe(duplex=False)
    done, stop = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_exchange, daemon=True,
                       args=(cfg, 10, 30.0, 0.0, 1.5, 7, results_w, done))
    proc.start()
    try:
        assert results.poll(10), "no message from the exchange within 10 s"
        assert results.recv() == ("error", "venue simulator died: ValueError: pct must be < 1 and "
                                           "non-zero, got 1.5")
        proc.join(5)
        assert proc.exitcode == 0
    finally:
        if proc.is_alive():
            proc.kill()
            proc.join()


def test_crash_0_runs_without_a_crash(spawn, ops_dir):
    """``--crash 0`` means no crash: the run goes to its end (exit 0, every engine process
    exiting 0) and says "no crash". The old code scheduled a 0 % crash, which the venue
    simulator refused with a traceback in its thread, and the run went on without ticks."""
    segments: list[str] = []
    err_path = Path(ops_dir) / "demo.err"
    with open(err_path, "w") as err_file:
        proc = spawn(cli("demo", "--duration", "4", "--accounts", "200", "--crash", "0"), segments=segments,
                     stdout=subprocess.PIPE, stderr=err_file, text=True, cwd=REPO,
                     env={**os.environ, "TMPDIR": ops_dir})
    try:
        out, _ = proc.communicate(timeout=25)
    finally:
        err = err_path.read_text()
        segments += demo_segments(err)
    assert proc.returncode == 0, err
    assert "Traceback" not in err, err
    assert "engine up: 1 worker, " in err and "; no crash" in err, err
    final = out.strip().splitlines()[-1]
    assert final.startswith("demo done:") and final.endswith("engine processes exited [0]"), final
    for seg in segments:
        assert not shm_exists(seg), f"/dev/shm/{seg} left behind"


def test_other_events_show_the_codes_name():
    """The screen's "other engine events" showed bare numbers (``[7004]``)."""
    from engine.demo import code_name             # here: the old demo module has none

    assert code_name(7004) == "EVENT_VENUE_READMITTED" == Code(7004).name
    assert code_name(int(Code.EVENT_PRICE_FROZEN)) == "EVENT_PRICE_FROZEN"
    assert code_name(65000) == "65000"            # a code this build does not know: its number
