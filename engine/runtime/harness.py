"""A whole engine on private endpoints, for tests, benchmarks and the demo.

``local_config(base, root)`` rewrites a configuration so that its shared-memory names
are unique and every ZeroMQ endpoint is an ipc socket under ``root`` (no port can
clash with another run); ``LocalEngine`` starts it with accounts provisioned and stops
it on exit, unlinking everything.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import time
import uuid

from engine.config import Config, Endpoints, load_default
from engine.runtime.supervisor import Engine


def local_config(root: str, base: Config | None = None, *, tcp_ports: dict | None = None,
                 **engine_overrides) -> Config:
    """``base`` (default: the embedded config) with a unique name and ipc endpoints in ``root``."""
    base = base or load_default()
    os.makedirs(root, exist_ok=True)
    name = f"me-{uuid.uuid4().hex[:10]}"
    ep = Endpoints(**{k: f"ipc://{root}/{k}.sock" for k in ("oracle", "fills", "checks", "orders", "events")},
                   runtime_dir=os.path.join(root, "run"))
    if tcp_ports:
        ep = dataclasses.replace(ep, **{k: f"tcp://127.0.0.1:{p}" for k, p in tcp_ports.items()})
    settings = dataclasses.replace(base.engine, name=name, **engine_overrides)
    return dataclasses.replace(base, engine=settings, endpoints=ep)


class LocalEngine:
    """Context manager: create state, let ``setup(store)`` fill it, start, stop on exit.

    When creating the state or ``setup`` fails (an exception, Ctrl-C included) the
    shared-memory segments it made are unlinked before the exception goes on; a failed
    start stops what it started and unlinks them too (``Engine.start``). One created
    but never entered is released with ``discard()``."""

    def __init__(self, config: Config, setup=None, n_workers: int | None = None, quiet: bool = True):
        self.config = config
        self.engine = Engine(config, n_workers=n_workers, quiet=quiet)
        try:
            self.store = self.engine.create_state()
            if setup is not None:
                setup(self.store)
        except BaseException:
            self.discard()
            raise

    def discard(self) -> None:
        """Unlink the store and control segments of an engine that is not running
        (idempotent; the mappings of this process stay valid until it lets them go)."""
        if self.engine.store is not None:
            self.engine.store.unlink()
        if self.engine.ctl is not None:
            self.engine.ctl.unlink()

    def __enter__(self) -> "LocalEngine":
        self.engine.start()
        return self

    def __exit__(self, *exc) -> None:
        self.exit_codes = self.engine.stop()

    @property
    def endpoints(self) -> Endpoints:
        return self.config.endpoints

    @contextlib.contextmanager
    def frozen(self):
        """Stop every engine process (SIGSTOP) for the block, continue them (SIGCONT)
        after, even on error. For benchmarks: the floor measured in the same minutes as
        the engine, with the engine's processes neither running nor gone. Sockets and
        shared memory stay as they are; on waking, timers see the time that passed."""
        pids = [c.proc.pid for c in self.engine.children if c.proc is not None and c.proc.poll() is None]
        stopped = []
        try:
            for pid in pids:
                os.kill(pid, signal.SIGSTOP)
                stopped.append(pid)
            yield pids
        finally:
            for pid in stopped:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)


def wait_until(pred, timeout_s: float = 5.0, what: str = "condition", interval_s: float = 0.005):
    """Poll ``pred`` until it returns a truthy value (returned); ``TimeoutError`` naming
    ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(interval_s)
