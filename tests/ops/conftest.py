"""Fixtures of the operations tests: CLI subprocesses and engines that are always
stopped, with their shared memory and ipc directories removed, whatever the test did.

``ops_dir``     a short ``/tmp/me-ops-*`` directory (a Unix socket path is at most 107
                bytes; pytest's ``tmp_path`` can be longer), removed at teardown.
``spawn``       ``spawn(argv, segments=(), **popen_kw) -> Popen`` in its own session; at
                teardown the whole process group is stopped (SIGINT, then SIGKILL) and
                the named /dev/shm segments are unlinked: ``segments`` is read then, so
                a list the test fills in later (a demo names its segment on stderr) counts.
``local_engine`` ``local_engine(setup=None, n_workers=1, **engine_overrides) -> LocalEngine``
                started on private ipc endpoints; stopped and unlinked at teardown.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile

import posix_ipc
import pytest

from engine.runtime.harness import LocalEngine, local_config
from ops_support import group_alive

ACCOUNTS_CAPACITY = 64        # small books: start-up and the full passes stay fast


def unlink_segment(name: str) -> None:
    try:
        posix_ipc.unlink_shared_memory("/" + name.lstrip("/"))
    except posix_ipc.ExistentialError:
        pass


def stop_group(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    """SIGINT the session leader (``run`` and ``demo`` both stop cleanly on it and unlink
    their segments), then SIGKILL whatever of its group is left."""
    pgid = proc.pid                    # start_new_session: the leader's pid is the group id
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass
    if group_alive(pgid):
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass


@pytest.fixture
def ops_dir():
    d = tempfile.mkdtemp(prefix="me-ops-")
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def spawn(ops_dir):                      # ops_dir outlives the processes that work in it
    started: list[tuple[subprocess.Popen, list[str]]] = []

    def start(argv: list[str], segments=(), **popen_kw) -> subprocess.Popen:
        popen_kw.setdefault("stdin", subprocess.DEVNULL)
        proc = subprocess.Popen(argv, start_new_session=True, **popen_kw)
        started.append((proc, segments))          # not a copy: read at teardown
        return proc

    yield start
    for proc, segments in reversed(started):
        stop_group(proc)
        for s in segments:
            unlink_segment(s)


@pytest.fixture
def local_engine():
    started: list[tuple[LocalEngine, str]] = []

    def start(setup=None, n_workers: int = 1, **overrides) -> LocalEngine:
        root = tempfile.mkdtemp(prefix="me-ops-")
        overrides.setdefault("accounts_capacity", ACCOUNTS_CAPACITY)
        config = local_config(root, **overrides)
        name = config.engine.name
        try:
            le = LocalEngine(config, setup=setup, n_workers=n_workers)
        except BaseException:          # setup failed: nothing started, segments exist
            unlink_segment(name)
            unlink_segment(name + "-ctl")
            shutil.rmtree(root, ignore_errors=True)
            raise
        started.append((le, root))     # a failed start stops itself; teardown is idempotent
        le.__enter__()
        return le

    yield start
    for le, root in reversed(started):
        if not hasattr(le, "exit_codes"):
            le.__exit__(None, None, None)
        name = le.config.engine.name
        unlink_segment(name)
        unlink_segment(name + "-ctl")
        shutil.rmtree(root, ignore_errors=True)
