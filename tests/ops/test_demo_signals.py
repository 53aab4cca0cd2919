"""A demo killed as a process group (systemd stop, a closed terminal, `timeout`) ends cleanly."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest

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
