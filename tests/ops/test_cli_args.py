"""Bad arguments to ``demo``, ``run`` and ``status``: exit 2 at once with argparse's one
error line naming the argument, nothing started, no traceback.

Before these checks ``demo --crash 0/150/nan`` killed the simulated venues mid-run while
the demo showed 0/s and exited 0; ``demo --accounts 0`` killed the simulated exchange
(zeros for the whole run, exit 0); ``demo --duration nan`` was a traceback and
``--duration -1`` a run "crashing at -0 s"; ``demo --workers -1`` and ``run --workers -1``
hung 60 s (then a TimeoutError traceback); ``run --accounts -5`` started an empty engine;
``status --state-dir`` of a missing directory reported "0 journal bytes to replay".

Each command runs in its own session with a timeout: on the old code the ones that
started something are stopped by the ``spawn`` fixture, their segments unlinked.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from ops_support import REPO, cli, demo_segments, ipc_endpoints, shm_exists, unique_name, write_config

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


def _refused(spawn, ops_dir, args, segments=()):
    """Run ``margin-engine ARGS``; return the last line of its stderr after checking it
    was refused: exit 2 within 15 s, nothing on stdout, no traceback, no demo directory.
    (A demo the old code started names its segment on stderr: teardown unlinks it.)"""
    segments = list(segments)                 # the fixture reads it at teardown
    err_path = Path(ops_dir) / "cli.err"
    with open(err_path, "w") as err_file:
        proc = spawn(cli(*args), segments=segments, stdout=subprocess.PIPE, stderr=err_file,
                     text=True, cwd=REPO, env={**os.environ, "TMPDIR": ops_dir})
    try:
        out, _ = proc.communicate(timeout=15)
    except subprocess.TimeoutExpired:
        out = None
    finally:
        err = err_path.read_text()
        segments += demo_segments(err)
    assert out is not None, f"margin-engine {' '.join(args)} still running after 15 s: not refused"
    assert proc.returncode == 2, (proc.returncode, err[-2000:])
    assert out == ""
    assert "Traceback" not in err, err
    assert not [d for d in os.listdir(ops_dir) if d.startswith("me-demo-")], "a demo directory was made"
    return err.strip().splitlines()[-1]


@pytest.mark.parametrize("args, words", [
    (["--crash", "150"], "argument --crash: must be a percent in [0, 100)"),
    (["--crash", "100"], "argument --crash: must be a percent in [0, 100)"),
    (["--crash", "-5"], "argument --crash: must be a percent in [0, 100)"),
    (["--crash", "nan"], "argument --crash: must be a finite number, got 'nan'"),
    (["--crash", "inf"], "argument --crash: must be a finite number, got 'inf'"),
    (["--accounts", "0"], "argument --accounts: must be >= 1, got 0"),
    (["--accounts", "-5"], "argument --accounts: must be >= 1, got -5"),
    (["--duration", "nan"], "argument --duration: must be a finite number, got 'nan'"),
    (["--duration", "-1"], "argument --duration: must be > 0 seconds, got -1"),
    (["--duration", "0"], "argument --duration: must be > 0 seconds, got 0"),
    (["--workers", "0"], "argument --workers: must be >= 1, got 0"),
    (["--workers", "-1"], "argument --workers: must be >= 1, got -1"),
    (["--seed", "-1"], "argument --seed: must be >= 0, got -1"),
])
def test_demo_refuses_an_out_of_range_argument(spawn, ops_dir, args, words):
    # a short run otherwise: on the old code the accepted ones end within the timeout
    line = _refused(spawn, ops_dir, ["demo", "--duration", "3", "--accounts", "200", *args])
    assert line.startswith("margin-engine demo: error: ") and words in line, line


@pytest.fixture
def private_config(ops_dir):
    """A configuration of our own (unique segment name, ipc endpoints, state directory
    under ops_dir, 2 partitions): even an engine the old code started harms nothing."""
    name = unique_name()
    cfg = write_config(Path(ops_dir) / "engine.toml", name, engine={"state_dir": f'"{ops_dir}/state"'},
                       endpoints=ipc_endpoints(ops_dir))
    return name, cfg


@pytest.mark.parametrize("args, words", [
    (["--workers", "-1"], "argument --workers: must be >= 1, got -1"),
    (["--workers", "0"], "argument --workers: must be >= 1, got 0"),
    (["--accounts", "-5"], "argument --accounts: must be >= 1, got -5"),
    (["--accounts", "0"], "argument --accounts: must be >= 1, got 0"),
    (["--demo-accounts", "-1"], "argument --demo-accounts: must be >= 0, got -1"),
])
def test_run_refuses_an_out_of_range_argument(spawn, ops_dir, private_config, args, words):
    name, cfg = private_config
    line = _refused(spawn, ops_dir, ["run", "--config", str(cfg), *args], segments=[name, name + "-ctl"])
    assert line.startswith("margin-engine run: error: ") and words in line, line
    assert not shm_exists(name), "the engine's segment was created"


def test_run_refuses_more_workers_than_partitions(spawn, ops_dir, private_config):
    """Each worker owns at least one partition: with 2 partitions a third worker had none
    and crash-looped (restarted every 100 ms) for as long as the engine ran."""
    name, cfg = private_config
    line = _refused(spawn, ops_dir, ["run", "--config", str(cfg), "--workers", "3"],
                    segments=[name, name + "-ctl"])
    assert line == ("margin-engine run: --workers 3: at most engine.partitions (2) workers "
                    "(each owns at least one partition)"), line
    assert not shm_exists(name), "the engine's segment was created"


@pytest.mark.parametrize("what", ["missing", "file"])
def test_status_refuses_a_state_dir_that_is_not_a_directory(spawn, ops_dir, what):
    path = Path(ops_dir) / "no-such-dir"
    if what == "file":
        path = Path(ops_dir) / "a-file"
        path.write_text("not a state directory\n")
    line = _refused(spawn, ops_dir, ["status", "--name", unique_name(), "--state-dir", str(path)])
    words = "does not exist" if what == "missing" else "is not a directory"
    assert line == f"margin-engine status: error: argument --state-dir: {path} {words}", line


def test_help_shows_the_demos_defaults_and_no_rst_markup():
    """``demo --help`` says what the demo is and each option's default; the top-level
    help is plain text (it showed the module docstring's ``double backticks``)."""
    demo = subprocess.run(cli("demo", "--help"), capture_output=True, text=True, timeout=30, cwd=REPO)
    assert demo.returncode == 0, demo.stderr
    text = " ".join(demo.stdout.split())
    assert "simulated venues and a simulated matching engine" in text
    for default in ("(default: 30.0)", "(default: 5000)", "(default: 1)", "(default: 12.0)", "(default: 7)"):
        assert default in text, (default, text)
    top = subprocess.run(cli("--help"), capture_output=True, text=True, timeout=30, cwd=REPO)
    assert top.returncode == 0, top.stderr
    assert "``" not in top.stdout, top.stdout
    assert "margin-engine command line" in top.stdout
