"""Supervisor: creates the shared memory, starts and watches the engine's processes.

Processes (``docs/architecture.md`` draws them)::

    markprice  oracle ticks -> marks in shared memory, workers' doorbells rung (or, with
               ``engine.price_stage = "worker"``, the same stage inside worker 0)
    gateway    fills, deposits/withdrawals -> journal -> partition rings; order checks answered
    worker N   pinned to a CPU, sole writer of its partitions; liquidation orders out
    liqgw      worker orders -> matching engine; every process's events -> PUB

Start-up order: shared memory and control segment, liqgw (orders and events sinks),
workers, markprice, gateway; ``start`` returns once every process has bound its
sockets (its pid is in the control header) and every worker has done its first
margin pass (partition heartbeats), which is when systemd is told READY. A worker that
dies is restarted on the same CPU with the same partitions; its replacement rolls back
a half-applied record and takes the unapplied ones from the ring. ``stop``: intake
stops, workers drain their rings, the journal is flushed, the shared memory is unlinked
unless configured to be kept.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import zmq

from engine.codes import Code
from engine.config import Config
from engine.runtime import curve, process
from engine.runtime.ctl import Control, Role
from engine.runtime.journal import FILLS_STREAMS_FILE, journal_file, journal_generations, read_fills_streams
from engine.store.shm import Store
from feeds.protocol import Sequencer


def sd_notify(message: str) -> None:
    """Tell systemd (Type=notify) about our state; a no-op outside systemd."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.connect(addr)
        s.sendall(message.encode())


class EngineFailure(RuntimeError):
    """A process the engine cannot run without has died."""


def _exit_words(returncode: int | None) -> str:
    """How a child ended, in words: ``killed by SIGKILL`` or ``exited with 3``."""
    if returncode is not None and returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exited with {returncode}"


def _warn_if_open(path: str) -> None:
    """The ipc sockets live in the runtime directory, which only its owner should enter
    (made 0700 when the engine creates it; an existing one is used as it is): say so on
    stderr when group or others may enter it."""
    mode = os.stat(path).st_mode & 0o777
    if mode & 0o077:
        print(f"margin-engine: warning: the runtime directory {path} is mode {mode:o}: other users "
              f"can reach the engine's ipc sockets (chmod 700 it)", file=sys.stderr)


@dataclass
class Child:
    role: str
    args: list[str]
    cpu: int = -1
    proc: subprocess.Popen | None = None
    restarts: int = 0
    log: object = None


@dataclass
class Engine:
    """One engine instance on this host."""

    config: Config
    n_workers: int | None = None
    runtime_dir: str | None = None
    python: str = sys.executable
    quiet: bool = True
    children: list[Child] = field(default_factory=list)
    #: ``margin-engine run``: a clean stop writes a snapshot of the book for the next
    #: start (engine/runtime/recovery.py, stage 4)
    durable: bool = False

    def __post_init__(self) -> None:
        e = self.config.engine
        self.name = e.name
        self.n_workers = self.n_workers or min(e.partitions, max(1, len(e.cpus) or 1))
        self.runtime_dir = self.runtime_dir or self.config.endpoints.runtime_dir or \
            os.path.join(tempfile.gettempdir(), f"margin-engine-{e.name}")
        os.makedirs(self.runtime_dir, mode=0o700, exist_ok=True)
        _warn_if_open(self.runtime_dir)
        # [security]: the keys read once, here, and staged for every process started (a
        # restarted worker included), whatever happens to the files meanwhile.
        sec = self.config.security
        self.curve_keys = curve.stage(sec, self.runtime_dir) if sec.on else None
        if sec.on and not any(str(getattr(self.config.endpoints, k)).startswith("tcp://")
                              for k in ("oracle", "fills", "checks", "orders", "events")):
            print("margin-engine: [security] is set but no endpoint is tcp://: CURVE protects "
                  "nothing here", file=sys.stderr)
        self.owner = [p % self.n_workers for p in range(e.partitions)]
        self.store: Store | None = None
        self.ctl: Control | None = None
        self.internal = {k: f"ipc://{self.runtime_dir}/{k}.sock" for k in ("orders", "events", "replies")}
        self.state_dir = e.state_dir or self.runtime_dir       # journal and snapshots
        os.makedirs(self.state_dir, mode=0o700, exist_ok=True)
        self.journal_generation = 1                      # the gateway's first file (create_state decides)
        self.fills_last_seq = 0                          # the PULL fills stream's last seq before this start
        self._next_snapshot = time.monotonic() + e.snapshot_interval_s
        self._writer: threading.Thread | None = None     # the snapshot being written (its own copy)
        self._events = None                               # PUSH to the events relay, made on first use

    # ------------------------------------------------------------------ state
    @property
    def asset_names(self) -> list[str]:
        """The configuration's collateral assets, in the store's order (the store keeps no names)."""
        return [a.name for a in self.config.assets]

    @property
    def journal_path(self) -> str:
        """The journal file being written now: the latest generation in the state dir
        (the gateway may have begun one after a cut the supervisor gave up waiting for)."""
        return journal_file(self.state_dir, self.latest_generation())

    def latest_generation(self) -> int:
        return max(journal_generations(self.state_dir), default=self.journal_generation)

    def create_state(self) -> Store:
        e = self.config.engine
        # a new journal generation every start: what the gateway writes first
        self.journal_generation = max(journal_generations(self.state_dir), default=0) + 1
        self.store = Store.create(e.name, assets=list(self.config.assets),
                                  instruments=list(self.config.instruments),
                                  accounts_capacity=e.accounts_capacity, n_partitions=e.partitions,
                                  slots_per_account=e.slots_per_account, replace=True)
        self.ctl = Control.create("/" + e.name + "-ctl", self.n_workers, e.partitions,
                                  e.slots_per_account, transfer_window=e.transfer_window)
        # Each worker's LIQUIDATION_ORDER stream (its order ids' top bits: the same in
        # every run) goes on above anything an earlier run sent: numbering starts at the
        # microsecond clock (a run sends far fewer than one order a microsecond), and a
        # restarted worker continues from the control segment (docs/protocol.md section 6).
        self.ctl.doorbells["orders_seq"] = time.time_ns() // 1000
        return self.store

    # ------------------------------------------------------------------ processes
    def _spawn(self, child: Child) -> None:
        out = subprocess.DEVNULL if self.quiet else None
        child.log = open(os.path.join(self.runtime_dir, f"{child.role}.log"), "ab")
        child.proc = subprocess.Popen([self.python, "-m", *child.args, *curve.args(self.curve_keys)],
                                      stdout=out, stderr=child.log, stdin=subprocess.DEVNULL,
                                      env={**os.environ, "PYTHONUNBUFFERED": "1"})

    def start(self, timeout_s: float = 60.0) -> None:
        """Start every process; return when all are ready (sockets bound, first pass done)."""
        if self.store is None:
            self.create_state()
        e, ep = self.config.engine, self.config.endpoints
        assets = ",".join(self.asset_names)
        cpus = list(e.cpus)
        name = e.name
        liq_args = ["engine.runtime.liqgw", "--name", name,
                    "--events-in", self.internal["events"], "--events-out", ep.events]
        if ep.orders_via_gateway:
            liq_args += ["--orders-in", self.internal["orders"], "--orders-out", ep.orders]
        orders_for_workers = self.internal["orders"] if ep.orders_via_gateway else ep.orders
        self.children = [Child("liqgw", liq_args + ["--cpu", str(e.liqgw_cpu)], cpu=e.liqgw_cpu)]
        price_args = ["--oracle", ep.oracle, "--assets", assets]     # the mark-price stage's
        takeover = self.config.liquidation.as_args() if self.config.liquidation.enabled else []
        for w in range(self.n_workers):
            parts = ",".join(str(p) for p in range(e.partitions) if self.owner[p] == w)
            cpu = cpus[w % len(cpus)] if cpus else -1
            self.children.append(Child(f"worker{w}", [
                "engine.runtime.worker", "--name", name, "--worker", str(w), "--partitions", parts,
                "--cpu", str(cpu), "--wait", e.wait, "--orders", orders_for_workers,
                "--holders-slice", str(e.holders_slice), "--fills-max-wait-us", str(e.fills_max_wait_us),
                "--replies", self.internal["replies"], "--events", self.internal["events"], *takeover]
                + (price_args if w == 0 and e.price_stage == "worker" else []), cpu=cpu))
        if e.price_stage == "process":
            self.children.append(Child("markprice", [
                "engine.runtime.markprice", "--name", name, *price_args, "--events", self.internal["events"],
                "--cpu", str(e.markprice_cpu)], cpu=e.markprice_cpu))
        self.children.append(Child("gateway", [
            "engine.runtime.gateway", "--name", name, "--fills", ep.fills, "--checks", ep.checks,
            "--replies", self.internal["replies"], "--events", self.internal["events"],
            "--journal-dir", self.state_dir, "--journal-generation", str(self.journal_generation),
            "--fills-last-seq", str(self.fills_last_seq), "--owners", ",".join(map(str, self.owner)), "--assets", assets,
            "--journal-sync", e.journal_sync, "--journal-fsync-interval-s", repr(e.journal_fsync_interval_s),
            "--cpu", str(e.gateway_cpu), *takeover]
            + (["--fills-acks"] if ep.fills_acks else [])
            # a recovered book's DEALER streams (``run`` wrote them after the replay)
            + (["--fills-streams-from", os.path.join(self.state_dir, FILLS_STREAMS_FILE)] if self.durable else []),
            cpu=e.gateway_cpu))
        t0 = time.time_ns()
        for c in self.children:
            self._spawn(c)
        deadline = time.monotonic() + timeout_s
        try:
            while not self.ready(t0):
                self._check_alive(starting=True)     # a child that died: RuntimeError
                if time.monotonic() > deadline:
                    raise TimeoutError("engine processes did not become ready; see logs in " + self.runtime_dir)
                time.sleep(0.02)
        except BaseException:
            self.stop()                              # never leave half an engine running
            raise
        sd_notify("READY=1")

    def ready(self, since_ns: int) -> bool:
        pids = self.ctl.header[0]["ready_pid"]
        if not all(int(pids[r]) for r in (Role.MARKPRICE, Role.GATEWAY, Role.LIQGW)):
            return False
        return bool(np.all(self.store.partitions["heartbeat_ns"] >= since_ns))

    def _check_alive(self, starting: bool = False) -> list[str]:
        """Restart dead workers (same CPU, same partitions); return what was restarted.

        A dead gateway, mark-price process or liquidation gateway is an engine failure
        (``EngineFailure``): the caller stops everything and exits non-zero, and systemd
        (``Restart=on-failure``) starts the engine again. Those processes hold sockets and
        in-flight state a lone restart could not recover in order.
        """
        restarted = []
        for c in self.children:
            if c.proc is not None and c.proc.poll() is not None:
                if starting:
                    raise EngineFailure(f"{c.role} exited with {c.proc.returncode} during start-up; "
                                        f"see {self.runtime_dir}/{c.role}.log")
                if not c.role.startswith("worker"):
                    raise EngineFailure(f"{c.role} exited with {c.proc.returncode}; "
                                        f"see {self.runtime_dir}/{c.role}.log")
                c.restarts += 1
                dead_pid, how = c.proc.pid, _exit_words(c.proc.returncode)
                self._spawn(c)
                restarted.append(c.role)
                self._event(Code.EVENT_WORKER_RESTARTED,
                            f"{c.role} (pid {dead_pid}) {how}; restarted as pid {c.proc.pid}"
                            f" (restart {c.restarts}), its partitions' rings resume where they stopped")
        return restarted

    def _event(self, code: int, detail: str) -> None:
        """An ENGINE_EVENT from the supervisor, onto the events stream (liqgw renumbers
        it with every other process's); dropped, never waited for, when it cannot go."""
        if self._events is None:
            self._zctx = zmq.Context()                # its own: a host process's contexts are its business
            self._events = self._zctx.socket(zmq.PUSH)
            self._events.setsockopt(zmq.LINGER, 500)
            self._events.setsockopt(zmq.SNDHWM, 1000)
            self._events.connect(self.internal["events"])
            self._event_seq = Sequencer()
        process.send_event(self._events, self._event_seq, {"code": int(code), "detail": detail[:1000]})

    def watch_once(self) -> list[str]:
        """One supervision step: restart dead workers; keep systemd's watchdog fed; take
        a snapshot of the book when one is due (``durable``)."""
        restarted = self._check_alive()
        sd_notify("WATCHDOG=1")
        interval = self.config.engine.snapshot_interval_s
        if self.durable and interval > 0 and time.monotonic() >= self._next_snapshot \
                and not (self._writer and self._writer.is_alive()):
            self._next_snapshot = time.monotonic() + interval
            self.snapshot_now()
        return restarted

    def snapshot_now(self, timeout_s: float = 2.0) -> dict:
        """A snapshot of the running book at a consistent cut (recovery.py, "snapshots
        while running"): make the copy's buffers (pages touched, before the pause); ask
        the gateway for a cut (``cut_request``), wait until it has paused intake, the
        rings are drained and it went on in a new journal generation (``cut_ready``,
        ``cut_generation``), copy the book, let intake resume (``cut_done``), then write
        the copy in a thread, which drops it when written.
        Returns what happened: ``written`` (the offset) or ``refused`` / ``timed out``,
        with the intake pause in ms (request to resume) and the buffers' preparation
        (``prepare_ms``, outside the pause)."""
        from engine.runtime import recovery

        t_prep = time.monotonic_ns()
        buffers = recovery.book_buffers(self.store)
        prepare_ms = (time.monotonic_ns() - t_prep) / 1e6
        h = self.ctl.header[0]
        req = int(h["cut_request"]) + 1
        t0 = time.monotonic_ns()
        h["cut_request"] = req
        deadline = time.monotonic() + timeout_s
        while int(h["cut_ready"]) != req:
            if time.monotonic() > deadline:
                h["cut_done"] = req                  # the gateway resumes once it gets there
                return self._snapshot_done({"result": "timed out", "pause_ms": (time.monotonic_ns() - t0) / 1e6,
                                            "prepare_ms": prepare_ms})
            time.sleep(0.0002)
        offset, generation = int(h["cut_offset"]), int(h["cut_generation"])
        t_ready = time.monotonic_ns()
        book = recovery.copy_book(self.store, self.asset_names, buffers,
                                  self.ctl.transfers_in_order()) if offset >= 0 else None
        h["cut_done"] = req
        t_done = time.monotonic_ns()
        del buffers                                  # the book's arrays are views: the writer's now
        info = {"cut": req, "pause_ms": (t_done - t0) / 1e6, "drain_ms": (t_ready - t0) / 1e6,
                "copy_ms": (t_done - t_ready) / 1e6, "prepare_ms": prepare_ms,
                "offset": offset, "generation": generation}
        if book is None:
            return self._snapshot_done({**info, "result": "refused"})
        self.journal_generation = generation
        path = os.path.join(self.state_dir, recovery.SNAPSHOT_FILE)
        last = int(h["fills_last_seq"])
        streams = self._fills_streams()                # the gateway's, at the cut

        def write() -> None:
            try:
                recovery.write_book(book, path, generation, offset, last, streams)
            except OSError as e:             # the previous snapshot stays; recovery replays more
                print(f"margin-engine: snapshot {req}: writing {path} failed: {e}", file=sys.stderr)
                info["write_error"] = str(e)

        self._writer = threading.Thread(target=write, name="snapshot-writer", daemon=True)
        self._writer.start()
        info["result"] = "written"                   # the same dict: a failed write adds write_error
        return self._snapshot_done(info)

    def _fills_streams(self) -> dict[bytes, int]:
        """The acknowledged fills streams' last numbers, as the gateway wrote them last."""
        return read_fills_streams(os.path.join(self.state_dir, FILLS_STREAMS_FILE))

    def _snapshot_done(self, info: dict) -> dict:
        if not self.quiet or self.durable:
            print(f"margin-engine: snapshot {info.get('cut', '')}: {info['result']}, fills intake paused "
                  f"{info['pause_ms']:.1f} ms" + (f" (drain {info['drain_ms']:.1f}, copy {info['copy_ms']:.1f})"
                                                  if "copy_ms" in info else ""), file=sys.stderr)
        return info

    def worker_pid(self, w: int) -> int:
        return self.pid_of(f"worker{w}")

    def pid_of(self, role: str) -> int:
        """Process id of a child: ``worker<N>``, ``gateway``, ``markprice`` or ``liqgw``."""
        return next(c.proc.pid for c in self.children if c.role == role)

    def settled(self, codes: dict) -> bool:
        """After ``stop``: every process exited 0, every partition's ring is drained and
        no record is half applied, so the book holds exactly what the journal holds."""
        if not codes or any(c != 0 for c in codes.values()) or self.ctl is None:
            return False
        return self.ctl.drained()

    def stop(self, timeout_s: float = 10.0) -> dict:
        """Stop intake, let workers drain, flush the journal, release the shared memory."""
        sd_notify("STOPPING=1")
        codes = {}
        if self.ctl is not None:
            self.ctl.request_shutdown()
        deadline = time.monotonic() + timeout_s
        for c in self.children:
            if c.proc is None:
                continue
            try:
                c.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                c.proc.kill()
                c.proc.wait()
            codes[c.role] = c.proc.returncode
            if c.log:
                c.log.close()
        if self._writer is not None:
            self._writer.join()                      # the periodic one first: the stop's is newer
        if self.durable and self.store is not None and self.settled(codes):
            from engine.runtime.recovery import rebase
            rebase(self.store, self.state_dir, self.asset_names, self.latest_generation(),
                   int(self.ctl.header[0]["fills_last_seq"]),       # the gateway's, at its exit
                   self.ctl.transfers_in_order(),
                   self._fills_streams())
        if self._events is not None:
            self._events.close()
            self._zctx.term()                        # LINGER 500 ms bounds it
            self._events = None
        if self.store is not None and not self.config.engine.keep_shm_on_exit:
            self.store.unlink()
            self.ctl.unlink()
        return codes
