"""A demo killed as a process group (systemd stop, a closed terminal, `timeout`) ends cleanly,
and so does a Ctrl-C while it is starting."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest

from ops_support import assert_group_gone, demo_segments, shm_exists, start_demo, wait_for_child

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


def test_sigterm_to_the_demos_process_group_ends_it_cleanly():
    proc = subprocess.Popen([sys.executable, "-m", "engine.cli", "demo", "--duration", "60",
                             "--accounts", "300"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        time.sleep(6)                       # engine up, venues and matching engine running
        os.killpg(proc.pid, signal.SIGTERM)  # every process of the group, as systemd would
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, err[-2000:]
    assert "Traceback" not in err
    assert out.strip().splitlines()[-1].startswith("demo done:")
    # the live line (not a terminal: one line a refresh) carries the counters, the orders
    # by the stage that found them, and the accounts at risk
    live = [ln for ln in out.splitlines() if ln.startswith("t=")]
    assert live and all("trigger index (1a)" in ln and "at risk now:" in ln for ln in live), live[-1:]
    name = re.search(r"shared memory /(me-[0-9a-f]+)", err).group(1)
    # Its segments are gone, and so is every process of the group.
    assert not os.path.exists(f"/dev/shm/{name}") and not os.path.exists(f"/dev/shm/{name}-ctl")
    deadline = time.monotonic() + 10       # the resource tracker leaves just after its parent
    while time.monotonic() < deadline:
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        left = subprocess.run(["ps", "-o", "pid,args", "-g", str(proc.pid)], capture_output=True, text=True).stdout
        pytest.fail(f"processes of the demo's group still running:\n{left}")


# --------------------------------------------------------------------------- Ctrl-C while it starts
def _finish(proc, err_path, segments, timeout_s: float):
    """Wait for the demo's end: (stdout, stderr, seconds it took)."""
    t0 = time.monotonic()
    try:
        out, _ = proc.communicate(timeout=timeout_s)
    finally:
        err = err_path.read_text()
        segments += demo_segments(err)
    return out, err, time.monotonic() - t0


def _assert_nothing_left(proc, ops_dir, segments):
    assert segments, "the demo did not name its segment"
    for seg in segments:
        assert not shm_exists(seg), f"/dev/shm/{seg} left behind"
    assert not [d for d in os.listdir(ops_dir) if d.startswith("me-demo-")], "the demo's temp dir left behind"
    assert_group_gone(proc.pid, within_s=10)   # the resource tracker leaves just after its parent


def test_ctrl_c_while_the_engine_starts_exits_130_and_leaves_nothing(spawn, ops_dir):
    """Ctrl-C (SIGINT to the process group, as a terminal sends it) the moment the first
    margin worker process exists: the engine's processes still importing die of it, so
    the start fails. Expected: exit 130 (interrupted before the run began) with one line
    saying so, no traceback, and the engine stopped, its segments and the demo's temp
    directory gone. The old code: an EngineFailure traceback ("liqgw exited with 1
    during start-up"), exit 1, the /tmp/me-demo-* directory left."""
    proc, err_path, segments = start_demo(spawn, ops_dir)
    wait_for_child(proc, "engine.runtime.worker")
    os.killpg(proc.pid, signal.SIGINT)
    out, err, _ = _finish(proc, err_path, segments, timeout_s=20)
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err, err
    assert err.strip().splitlines()[-1] == ("margin-engine demo: interrupted while starting; stopped, "
                                            "nothing left behind"), err
    _assert_nothing_left(proc, ops_dir, segments)


def test_ctrl_c_while_the_exchange_starts_ends_the_run_at_once(spawn, ops_dir):
    """Ctrl-C the moment the simulated exchange's process exists (it is still importing
    numpy): it must not die of it -- it starts with the signal blocked and then ignores
    it -- and the demo ends the run early as for any Ctrl-C: exit 0, its summary, no
    traceback, nothing left. The old code: a KeyboardInterrupt traceback from the
    exchange process, then 8 s waiting for the report of a process already dead."""
    proc, err_path, segments = start_demo(spawn, ops_dir)
    wait_for_child(proc, "multiprocessing.spawn")
    os.killpg(proc.pid, signal.SIGINT)
    out, err, took = _finish(proc, err_path, segments, timeout_s=25)
    assert proc.returncode == 0, err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert out.strip().splitlines()[-1].startswith("demo done:"), out[-2000:]
    assert took < 8.0, f"{took:.1f} s from Ctrl-C to exit"      # the old code's wait alone was 8 s
    _assert_nothing_left(proc, ops_dir, segments)
