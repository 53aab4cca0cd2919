"""Every request on the checks socket gets exactly one answer, and nothing crashes the
gateway (a KeyError on a version-1 DEPOSIT once did, in session 15).

A real store and control segment, a real Gateway object with its sockets bound on ipc
endpoints, a real custody/matching-engine DEALER. Hypothesis sends runs of requests --
ORDER_CHECKs, DEPOSITs and WITHDRAWALs in protocol versions 1 and 2, with and without
``transfer_id`` (ids repeated on purpose), known and unknown accounts and assets, frames
of the wrong type and bytes that are not msgpack -- and plays the owning worker itself:
each collateral request the gateway puts on a ring is answered applied or refused.
Each request must be answered once: ORDER_CHECK_REPLY or COLLATERAL_REPLY with its
``request_id``, or REJECT for a malformed frame; a transfer applied twice is a failure.
OPEN_ACCOUNTs of new ids (200-202, also drawn by the collateral requests) and known ones
are mixed in: the played worker really adds the row, or refuses it full (3109); an id is
opened at most once, and once open the gateway answers its next open 3108 itself.
"""

from __future__ import annotations

import time

import msgpack
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.codes import Code
from engine.runtime import gateway as G
from engine.runtime.ctl import RecordKind
from engine.store.shm import Store
from feeds.protocol import Message, MsgType, Sequencer, decode, encode
from runtime_support import close_gateway, gateway_state

pytestmark = pytest.mark.timeout(120)
# (a "retry" in a run is the last DEPOSIT / WITHDRAWAL sent again, transfer_id and all)

ACCOUNTS = [1, 2, 3]


@pytest.fixture(scope="module")
def desk(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("gwreq"))
    cfg, store, ctl, ep = gateway_state(root, 2, ACCOUNTS)
    e = cfg.engine
    g = G.Gateway(e.name, ep["fills"], ep["checks"], ep["replies"], ep["events"], root, 1, [0, 1],
                  journal_sync="interval", journal_fsync_interval_s=0)
    g.set_asset_names([a.name for a in cfg.assets])
    ctx = zmq.Context()
    client = ctx.socket(zmq.DEALER)
    client.setsockopt(zmq.LINGER, 0)
    client.connect(ep["checks"])
    yield g, ctl, client
    client.close(0)
    ctx.term()
    close_gateway(g, ctl, store)


NEW_IDS = [200, 201, 202]
OPENED: set[int] = set()                 # ids opened over the module's examples (the desk is shared)
accounts = st.sampled_from(ACCOUNTS + [77, 200])
assets = st.sampled_from(["USDT", "BTC", "DOGE"])
collateral = st.fixed_dictionaries({
    "type": st.sampled_from([MsgType.DEPOSIT, MsgType.WITHDRAWAL]), "account": accounts, "asset": assets,
    "amount_units": st.integers(1, 10**12), "transfer_id": st.one_of(st.none(), st.integers(1, 4)),
    "version": st.sampled_from([1, 2]), "applied": st.booleans()})
check = st.fixed_dictionaries({
    "type": st.just(MsgType.ORDER_CHECK), "account": accounts, "instrument_id": st.sampled_from([0, 1, 2, 999]),
    "qty_units": st.sampled_from([0, 1, -1, 1000, -10**9]), "price_units": st.sampled_from([0, -1, 1, 950_000]),
    "version": st.sampled_from([1, 2])})
opens = st.fixed_dictionaries({"type": st.just(MsgType.OPEN_ACCOUNT), "account": st.sampled_from(ACCOUNTS + NEW_IDS),
                               "applied": st.booleans()})
junk = st.fixed_dictionaries({"type": st.just("junk"), "raw": st.sampled_from([
    b"\xc1", b"", msgpack.packb([1, 2]), msgpack.packb({"v": 1, "t": 10, "seq": 1, "ts_ns": 1}),
    msgpack.packb({"v": 2, "t": 11, "seq": 1, "ts_ns": 1, "request_id": 5, "account": 1, "asset": "USDT",
                   "amount_units": 1, "transfer_id": None})])})


def frame_of(req: dict, rid: int, seq: int) -> bytes:
    if req["type"] == "junk":
        return req["raw"]
    if req["type"] == MsgType.OPEN_ACCOUNT:
        return encode(MsgType.OPEN_ACCOUNT, {"request_id": rid, "account": req["account"]}, seq=seq, ts_ns=1)
    if req["type"] == MsgType.ORDER_CHECK:
        body = {k: req[k] for k in ("account", "instrument_id", "qty_units", "price_units")}
        return encode(MsgType.ORDER_CHECK, {"request_id": rid, **body}, seq=seq, ts_ns=1, version=req["version"])
    body = {"request_id": rid, "account": req["account"], "asset": req["asset"], "amount_units": req["amount_units"]}
    if req["transfer_id"] is not None:
        body["transfer_id"] = 1000 * (req["account"]) + req["transfer_id"]    # ids repeat across a run
        return encode(req["type"], body, seq=seq, ts_ns=1, version=2)
    return encode(req["type"], body, seq=seq, ts_ns=1, version=req["version"])


def play_worker(g: G.Gateway, ctl, decisions: dict[int, bool]) -> int:
    """Answer every collateral request on the rings as its worker would: applied (code 0)
    or refused (3104), by the test's draw for that request; an open, by adding the row
    (code 0 and the row) or as a full partition (3109); returns how many."""
    n, worker = 0, Sequencer()
    for p in range(ctl.n_partitions):
        r, w = (int(x) for x in ctl.rings[p][0][["read_idx", "write_idx"]])
        for i in range(r, w):
            rec = ctl.records[p][i % ctl.capacity]
            ticket = int(rec["ref"])
            applied = decisions.get(ticket, True)
            if int(rec["kind"]) == int(RecordKind.OPEN_ACCOUNT):
                code, row = int(Code.ACCOUNTS_FULL), -1
                if applied:
                    view = Store.attach(g.store.name, readonly=False)     # the worker's act
                    try:
                        code, row = 0, view.add_account(int(rec["delta"]))
                    finally:
                        view.detach()
                g.on_worker_reply(worker.encode(MsgType.COLLATERAL_REPLY, {
                    "request_id": ticket, "code": code, "balance_units": row}))
                n += 1
                continue
            assert int(rec["kind"]) in (int(RecordKind.DEPOSIT), int(RecordKind.WITHDRAWAL))
            g.on_worker_reply(worker.encode(MsgType.COLLATERAL_REPLY, {
                "request_id": ticket, "code": 0 if applied else int(Code.WITHDRAWAL_INSUFFICIENT_BALANCE),
                "balance_units": 0}))
            n += 1
        ctl.rings[p][0]["read_idx"] = w
    return n


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.one_of(collateral, check, opens, junk, st.just("retry")), min_size=1, max_size=20))
def test_every_request_is_answered_once_and_a_transfer_is_applied_once(desk, reqs):
    g, ctl, client = desk
    g.transfers.clear()                          # each example from an empty window
    ctl.header[0]["transfers_count"] = 0
    applied_ids: set[int] = set()
    last = None
    for k, req in enumerate(reqs):
        if req == "retry":                       # custody sends its last request again
            if last is None:
                continue
            req = last
        elif req["type"] in (MsgType.DEPOSIT, MsgType.WITHDRAWAL):
            last = req
        rid = 10_000 + k
        client.send(frame_of(req, rid, k + 1))
        assert g.checks.poll(5000)
        ident, frame = g.checks.recv_multipart()
        before = g._last_ticket
        g.on_request(ident, frame, 1)                             # must not raise
        if g._last_ticket != before:                              # went to a worker
            assert req["type"] in (MsgType.DEPOSIT, MsgType.WITHDRAWAL, MsgType.OPEN_ACCOUNT)
            assert req["type"] != MsgType.OPEN_ACCOUNT or (req["account"] not in OPENED and req["account"] not in ACCOUNTS)
            assert play_worker(g, ctl, {g._last_ticket: req["applied"]}) == 1
        assert client.poll(5000), f"no answer to {req}"
        m = decode(client.recv())
        assert type(m) is Message, m
        assert not client.poll(0), "two answers to one request"
        if req["type"] == "junk":
            assert m.type == MsgType.REJECT
            continue
        want = {MsgType.ORDER_CHECK: MsgType.ORDER_CHECK_REPLY,
                MsgType.OPEN_ACCOUNT: MsgType.OPEN_ACCOUNT_REPLY}.get(req["type"], MsgType.COLLATERAL_REPLY)
        assert (m.type, m.fields["request_id"]) == (want, rid)
        if want == MsgType.OPEN_ACCOUNT_REPLY:
            known = req["account"] in OPENED or req["account"] in ACCOUNTS
            assert m.fields["code"] == (3108 if known else 0 if req["applied"] else 3109), (req, m)
            if m.fields["code"] == 0:
                OPENED.add(req["account"])
                assert g.store.row_of(req["account"]) is not None
        if want == MsgType.COLLATERAL_REPLY and m.fields["code"] == 0 and req["transfer_id"] is not None:
            tid = 1000 * req["account"] + req["transfer_id"]
            assert tid not in applied_ids, f"transfer {tid} applied twice"
            applied_ids.add(tid)
    assert not g.pending and not g._transfers_in_flight


def test_each_peer_numbers_the_replies_it_gets_consecutively(desk):
    # Two clients interleave requests; each sees its own replies numbered n, n+1, n+2, ...
    # with no gaps (protocol section 3: replies are a stream per peer), whichever path
    # answered (the C check desk, the reference path, a collateral reply). A peer's
    # stream starts at the microsecond clock when it is first answered (n = now_us + 1),
    # so it is above anything an earlier engine run can have sent it.
    g, ctl, _ = desk
    start_us = time.time_ns() // 1000
    ctx = zmq.Context()
    try:
        clients = []
        for name in (b"peer-A", b"peer-B"):
            c = ctx.socket(zmq.DEALER)
            c.setsockopt(zmq.LINGER, 0)
            c.setsockopt(zmq.ROUTING_ID, name)
            c.connect(g.checks.getsockopt_string(zmq.LAST_ENDPOINT))
            clients.append(c)
        seqs: dict[int, list[int]] = {0: [], 1: []}
        reqs = [check_req(1, 0), check_req(2, 999), deposit_req(3), check_req(77, 0), deposit_req(1)]
        for k in range(10):                       # A, B, A, B, ...: five requests each
            who = k % 2
            clients[who].send(frame_of(reqs[k // 2], 500 + k, k // 2 + 1))
            assert g.checks.poll(5000)
            ident, frame = g.checks.recv_multipart()
            before = g._last_ticket
            g.on_request(ident, frame, 1)
            if g._last_ticket != before:
                play_worker(g, ctl, {})
            assert clients[who].poll(5000)
            m = decode(clients[who].recv())
            assert type(m) is Message and m.fields["request_id"] == 500 + k
            seqs[who].append(m.seq)
        for who in (0, 1):
            first = seqs[who][0]
            assert seqs[who] == [first, first + 1, first + 2, first + 3, first + 4]
            assert start_us < first <= time.time_ns() // 1000 + 1
    finally:
        ctx.destroy(linger=0)


def check_req(account: int, instrument: int) -> dict:
    return {"type": MsgType.ORDER_CHECK, "account": account, "instrument_id": instrument, "qty_units": 1,
            "price_units": 950_000, "version": 1}


def deposit_req(account: int) -> dict:
    return {"type": MsgType.DEPOSIT, "account": account, "asset": "USDT", "amount_units": 5, "transfer_id": None,
            "version": 1, "applied": True}


def test_a_req_socket_gets_every_answer(desk):
    """Protocol section 1 allows REQ-style envelopes (an empty delimiter frame): a REQ
    client's request arrives as [id, b"", body] and its answer must carry the delimiter
    too, or REQ drops it. One request of each path -- a check the C desk answers, a
    check on an unknown instrument (the Python path), a deposit (the worker's reply) and
    a frame that is not msgpack (REJECT) -- each answered, in REQ's strict turn."""
    g, ctl, _ = desk
    ctx = zmq.Context()
    try:
        req = ctx.socket(zmq.REQ)
        req.setsockopt(zmq.LINGER, 0)
        req.connect(g.checks.getsockopt_string(zmq.LAST_ENDPOINT))
        want = [(check_req(1, 0), MsgType.ORDER_CHECK_REPLY), (check_req(2, 999), MsgType.ORDER_CHECK_REPLY),
                (deposit_req(3), MsgType.COLLATERAL_REPLY), ({"type": "junk", "raw": b"\xc1"}, MsgType.REJECT)]
        for k, (r, reply_type) in enumerate(want):
            req.send(frame_of(r, 900 + k, k + 1))
            assert g.checks.poll(5000)
            parts = g.checks.recv_multipart()
            assert len(parts) == 3 and parts[1] == b""          # the REQ envelope
            before = g._last_ticket
            g.on_request(g._peer(g.checks, parts), parts[-1], 1)
            if g._last_ticket != before:
                play_worker(g, ctl, {})
            assert req.poll(5000), f"no answer to request {k} reached the REQ socket"
            m = decode(req.recv())
            assert type(m) is Message and m.type == reply_type, m
            if reply_type is not MsgType.REJECT:
                assert m.fields["request_id"] == 900 + k
        assert g.counters["bad_envelopes"] == 0
        assert g._peer(g.checks, [b"id", b"x", b"body"]) is None and g.counters["bad_envelopes"] == 1
        assert g.fills not in g.peers                     # a PULL fills socket answers nobody
        assert g.peers[g.checks].is_req(parts[0]) and not g.peers[g.checks].is_req(b"peer-A")
    finally:
        ctx.destroy(linger=0)


def test_a_collateral_request_applied_during_shutdown_is_journaled_and_answered(tmp_path):
    """Shutdown stops intake, and the workers drain their rings: a deposit already on a
    ring is applied after the gateway's loop has ended. Its reply must still be taken --
    journaled, its transfer id remembered, custody answered -- or the book (and the stop's
    snapshot) holds a deposit that a retry after the restart applies again. A real
    Gateway's run() in a thread; the test plays the worker over the real replies socket."""
    import threading

    from engine.runtime.journal import journal_file, replay

    root = str(tmp_path)
    cfg, store, ctl, ep = gateway_state(root, 1, ACCOUNTS)
    g = G.Gateway(cfg.engine.name, ep["fills"], ep["checks"], ep["replies"], ep["events"], root, 1, [0],
                  journal_sync="ack", journal_fsync_interval_s=0)
    g.set_asset_names([a.name for a in cfg.assets])
    runner = threading.Thread(target=g.run, daemon=True)
    ctx = zmq.Context()
    try:
        custody = ctx.socket(zmq.DEALER)
        custody.setsockopt(zmq.LINGER, 0)
        custody.connect(ep["checks"])
        worker = ctx.socket(zmq.PUSH)
        worker.setsockopt(zmq.LINGER, 0)
        worker.connect(ep["replies"])
        runner.start()
        deposit = {"request_id": 41, "account": 2, "asset": "USDT", "amount_units": 5_000_000, "transfer_id": 77}
        custody.send(encode(MsgType.DEPOSIT, deposit, seq=1, ts_ns=1))
        deadline = time.monotonic() + 5
        while not g.pending and time.monotonic() < deadline:        # on the ring, at the worker
            time.sleep(0.01)
        [(ticket, _)] = g.pending.items()
        ctl.request_shutdown()                                      # the loop ends; then the worker
        time.sleep(0.3)                                             # applies the deposit and replies
        worker.send(Sequencer().encode(MsgType.COLLATERAL_REPLY,
                                       {"request_id": ticket, "code": 0, "balance_units": 5_000_000}))
        assert custody.poll(5000), "custody got no answer"
        m = decode(custody.recv())
        assert m.type == MsgType.COLLATERAL_REPLY and m.fields == {"request_id": 41, "code": 0,
                                                                   "balance_units": 5_000_000}
        runner.join(5)
        assert not runner.is_alive()
        frames = [r.frame for r in replay(journal_file(root, 1))]
        assert len(frames) == 1 and decode(frames[0]).fields["transfer_id"] == 77   # journaled
        assert [int(t["transfer_id"]) for t in ctl.transfers_in_order()] == [77]    # remembered
    finally:
        ctx.destroy(linger=0)
        ctl.unlink()
        store.unlink()
        store.detach()


def test_an_order_check_while_a_price_row_is_torn_is_answered_4008(desk):
    """A price writer killed mid-write (worker 0 running the mark-price stage) leaves the
    row unreadable until its restart finishes the write. An order check meanwhile is
    answered 4008 (no consistent copy) and the gateway goes on; it raised StoreError and
    died before, taking the whole engine with it. Once the row is whole, checks are
    answered by the rule again."""
    from engine import _shm

    g, ctl, client = desk
    store = g.store
    addr = store.addr(store.prices, 0)
    _shm.write_begin(addr)                                       # the writer dies here
    try:
        client.send(frame_of(check_req(1, 0), 950, 1))
        assert g.checks.poll(5000)
        g.on_request(*g.checks.recv_multipart(), time.time_ns())
        assert client.poll(5000)
        m = decode(client.recv())
        assert (m.fields["request_id"], m.fields["code"]) == (950, Code.CHECK_ACCOUNT_BUSY)
    finally:
        _shm.write_end(addr)                                     # the restarted writer finishes it
    client.send(frame_of(check_req(1, 0), 951, 2))
    assert g.checks.poll(5000)
    g.on_request(*g.checks.recv_multipart(), time.time_ns())
    assert client.poll(5000)
    # account 1 holds nothing: a buy of 1 unit (0.001 BTC at 95,000 = 95 USDT) needs initial
    # margin above its zero equity
    assert decode(client.recv()).fields["code"] == Code.CHECK_INSUFFICIENT_MARGIN


def test_a_reply_lost_with_its_worker_is_recovered_from_the_outcomes_table(desk):
    """A worker that dies after committing a deposit but before its I/O thread sent the
    reply: the request would stay pending for good (retries answered 3107, every
    snapshot cut refused). The worker notes each outcome in the control segment before
    its commit; the gateway, finding the record committed and no reply 0.5 s later,
    answers from there: code 0, the balance the worker noted, the transfer remembered.
    A record not yet committed is left alone."""
    g, ctl, client = desk
    deposit = {"request_id": 61, "account": 3, "asset": "USDT", "amount_units": 7, "transfer_id": 3099}
    client.send(encode(MsgType.DEPOSIT, deposit, seq=1, ts_ns=1))
    assert g.checks.poll(5000)
    g.on_request(*g.checks.recv_multipart(), time.time_ns())
    [(ticket, _)] = [(t, v) for t, v in g.pending.items() if v[1] == 61]
    p = next(q for q in range(ctl.n_partitions) if int(ctl.rings[q][0]["write_idx"]) > int(ctl.rings[q][0]["read_idx"]))
    later = time.monotonic_ns() + G.LOST_REPLY_AFTER_NS + 1
    assert g.recover_lost_replies(later) == 0                 # not committed yet: nothing to recover
    ctl.note_outcome(p, ticket, 0, 1_007)                     # the worker: applied, balance 1,007 units
    ctl.rings[p][0]["read_idx"] = int(ctl.rings[p][0]["write_idx"])   # committed; then it died
    assert g.recover_lost_replies(time.monotonic_ns()) == 0    # too soon: its reply may be on the way
    assert g.recover_lost_replies(later) == 1
    assert client.poll(5000)
    assert decode(client.recv()).fields == {"request_id": 61, "code": 0, "balance_units": 1_007}
    assert ticket not in g.pending and 3099 in g.transfers     # remembered: a retry is answered 3105


def test_an_open_account_whose_reply_was_lost_is_answered_and_known_to_every_path(desk):
    """OPEN_ACCOUNT of id 50 (partition 50 mod 2 = 0): its worker adds the row, notes the
    outcome (code 0, the row) and commits, then dies before replying. The gateway answers
    from the outcomes table like a lost deposit reply, journals the open and takes the id
    into its maps: a second open is answered 3108 at once (no ring record) and the C
    check desk answers an ORDER_CHECK for 50 by the margin rule (4001: no collateral)
    instead of 4002 unknown account."""
    from engine.store.shm import Store

    g, ctl, client = desk
    client.send(encode(MsgType.OPEN_ACCOUNT, {"request_id": 62, "account": 50}, seq=1, ts_ns=1))
    assert g.checks.poll(5000)
    g.on_request(*g.checks.recv_multipart(), time.time_ns())
    [ticket] = [t for t, v in g.pending.items() if v[1] == 62]
    p = 50 % ctl.n_partitions
    rec = ctl.records[p][int(ctl.rings[p][0]["read_idx"]) % ctl.capacity]
    assert (int(rec["kind"]), int(rec["delta"]), int(rec["aux"])) == (int(RecordKind.OPEN_ACCOUNT), 50, 0)
    worker_view = Store.attach(g.store.name, readonly=False)       # the worker's act
    try:
        row = worker_view.add_account(50)
    finally:
        worker_view.detach()
    ctl.note_outcome(p, ticket, 0, row)
    ctl.rings[p][0]["read_idx"] = int(ctl.rings[p][0]["write_idx"])     # committed; then it died
    assert g.recover_lost_replies(time.monotonic_ns() + G.LOST_REPLY_AFTER_NS + 1) == 1
    assert client.poll(5000)
    assert decode(client.recv()).fields == {"request_id": 62, "code": 0}
    assert g.store.row_of(50) == row and ticket not in g.pending

    before = g._last_ticket
    client.send(encode(MsgType.OPEN_ACCOUNT, {"request_id": 63, "account": 50}, seq=2, ts_ns=1))
    assert g.checks.poll(5000)
    g.on_request(*g.checks.recv_multipart(), time.time_ns())
    assert g._last_ticket == before                                 # answered here
    assert client.poll(5000) and decode(client.recv()).fields == {"request_id": 63, "code": 3108}

    client.send(encode(MsgType.ORDER_CHECK, {"request_id": 64, "account": 50, "instrument_id": 0,
                                             "qty_units": 10, "price_units": 950_000}, seq=3, ts_ns=1))
    assert g.checks.poll(5000)
    g.on_request(*g.checks.recv_multipart(), time.time_ns())
    assert client.poll(5000)
    m = decode(client.recv())
    assert (m.type, m.fields["request_id"], m.fields["code"]) == (MsgType.ORDER_CHECK_REPLY, 64, 4001)


def test_an_open_the_worker_finds_done_already_is_journaled_and_known(desk):
    """An open of 52 whose first reply and noted outcome were lost (the outcome slot
    reused since): custody resends, and the worker answers 3108 with the row it holds.
    The gateway, not knowing 52, journals the open (the first never was) and takes the id
    in; custody hears 3108."""
    from engine.store.shm import Store

    g, ctl, client = desk
    worker_view = Store.attach(g.store.name, readonly=False)        # the first open, applied
    try:
        row = worker_view.add_account(52)
    finally:
        worker_view.detach()
    written = g.journal.written
    client.send(encode(MsgType.OPEN_ACCOUNT, {"request_id": 65, "account": 52}, seq=4, ts_ns=1))
    assert g.checks.poll(5000)
    g.on_request(*g.checks.recv_multipart(), time.time_ns())
    [ticket] = [t for t, v in g.pending.items() if v[1] == 65]
    p = 52 % ctl.n_partitions
    ctl.rings[p][0]["read_idx"] = int(ctl.rings[p][0]["write_idx"])
    g.on_worker_reply(Sequencer().encode(MsgType.COLLATERAL_REPLY, {"request_id": ticket, "code": 3108,
                                                                    "balance_units": row}))
    assert client.poll(5000) and decode(client.recv()).fields == {"request_id": 65, "code": 3108}
    assert g.store.row_of(52) == row and g.journal.written > written


def test_isolated_margin_requests_are_checked_here_then_go_to_the_accounts_worker(desk):
    """ISOLATED_MARGIN: an unknown account (77: 3003), an unknown instrument (999: 3004)
    and a zero amount (3102) are answered here; account 3's 40 USDT into its BTCUSDT
    position goes to its partition's ring (kind ISOLATED_MARGIN, delta 40 USDT, aux the
    instrument) and the worker's answer (applied, margin now 140 USDT) reaches custody."""
    g, ctl, client = desk
    bad = [(77, 0, 5), (3, 999, 5), (3, 0, 0)]
    for k, (acct, ins, amount) in enumerate(bad):
        before = g._last_ticket
        client.send(encode(MsgType.ISOLATED_MARGIN, {"request_id": 70 + k, "account": acct, "instrument_id": ins,
                                                     "amount_units": amount}, seq=10 + k, ts_ns=1))
        assert g.checks.poll(5000)
        g.on_request(*g.checks.recv_multipart(), time.time_ns())
        assert g._last_ticket == before and client.poll(5000)
        assert decode(client.recv()).fields == {"request_id": 70 + k, "code": (3003, 3004, 3102)[k], "balance_units": 0}
    client.send(encode(MsgType.ISOLATED_MARGIN, {"request_id": 73, "account": 3, "instrument_id": 0,
                                                 "amount_units": 40_000_000}, seq=13, ts_ns=1))
    assert g.checks.poll(5000)
    g.on_request(*g.checks.recv_multipart(), time.time_ns())
    ticket = g._last_ticket
    p = next(q for q in range(ctl.n_partitions) if int(ctl.rings[q][0]["write_idx"]) > int(ctl.rings[q][0]["read_idx"]))
    rec = ctl.records[p][int(ctl.rings[p][0]["read_idx"]) % ctl.capacity]
    assert (int(rec["kind"]), int(rec["delta"]), int(rec["aux"]), int(rec["ref"])) == \
        (int(RecordKind.ISOLATED_MARGIN), 40_000_000, 0, ticket)
    ctl.rings[p][0]["read_idx"] = int(ctl.rings[p][0]["write_idx"])
    g.on_worker_reply(Sequencer().encode(MsgType.COLLATERAL_REPLY, {"request_id": ticket, "code": 0,
                                                                    "balance_units": 140_000_000}))
    assert client.poll(5000)
    assert decode(client.recv()).fields == {"request_id": 73, "code": 0, "balance_units": 140_000_000}
