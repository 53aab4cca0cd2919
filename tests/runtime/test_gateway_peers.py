"""The gateway's per-peer state is bounded, and a forgotten peer's numbering goes forward.

ZeroMQ gives each connection of a DEALER without a routing id of its own a new random
one, so per-peer state kept for good would grow for as long as the engine runs with a
client that reconnects often. Two bounds (docs/protocol.md sections 3 and 6):

- the answers' numbering and REQ envelope of each ROUTER peer (``Peers``): the 4,096
  heard from most recently; a forgotten peer heard again gets numbers above its old ones
  (a stream starts at the microsecond clock), never 1 again;
- the acknowledged fills streams (``trackers``, whose last seq must be kept for good so
  that resent frames stay duplicates): at most 1,024; a frame from a new routing id past
  that is REJECTed 3009 and nothing of it is applied or remembered.

A real store and control segment, a real Gateway with its ROUTERs bound on ipc
endpoints, real DEALER clients; the gateway's own methods run here one step at a time.
"""

from __future__ import annotations

import time

import pytest
import zmq

from engine.codes import Code
from engine.runtime import gateway as G
from engine.runtime.journal import replay
from feeds.protocol import Message, MsgType, Sequencer, decode, encode
from runtime_support import close_gateway, fill, gateway_state

pytestmark = pytest.mark.timeout(60)

TAKER, MAKER = 1, 2


def test_peers_forget_the_least_recently_heard_and_number_forward():
    peers = G.Peers(capacity=2)
    t0_us = time.time_ns() // 1000
    peers.heard(b"A", False)
    a = peers.seq(b"A")
    assert a.last >= t0_us                       # A's first answer is numbered a.last + 1 > t0_us
    a.next(3)                                    # three answers sent to A
    a_last = a.last
    peers.heard(b"B", True)
    peers.heard(b"A", False)                     # A heard again: B is now the least recent
    peers.heard(b"C", False)                     # a third peer: B is forgotten, not A
    assert len(peers) == 2 and peers.forgotten == 1
    assert peers.seq(b"A") is a and not peers.is_req(b"B")
    peers.heard(b"B", False)                     # B again: A is now the least recent, forgotten
    assert peers.forgotten == 2 and peers.seq(b"C").last >= t0_us
    peers.heard(b"A", False)                     # A back: a new stream, numbered above the old one
    assert peers.forgotten == 3
    # 3 answers cannot outrun the clock: the new stream starts at now_us > t0_us + 3 >= a_last.
    assert peers.seq(b"A").last > a_last
    with pytest.raises(ValueError):
        G.Peers(capacity=0)


@pytest.fixture
def gateway(tmp_path):
    root = str(tmp_path)
    cfg, store, ctl, ep = gateway_state(root, 1, [TAKER, MAKER], capacity=8)
    e = cfg.engine
    g = G.Gateway(e.name, ep["fills"], ep["checks"], ep["replies"], ep["events"], root, 1, [0],
                  fills_acks=True, journal_sync="interval", journal_fsync_interval_s=0)
    g.set_asset_names([a.name for a in cfg.assets])
    ctx = zmq.Context()
    yield g, ep, ctx
    ctx.destroy(linger=0)
    close_gateway(g, ctl, store)


def dealer(ctx: zmq.Context, endpoint: str, routing_id: bytes) -> zmq.Socket:
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.ROUTING_ID, routing_id)
    s.connect(endpoint)
    return s


def answer(sock: zmq.Socket) -> Message:
    assert sock.poll(5000), "no answer within 5 s"
    m = decode(sock.recv())
    assert type(m) is Message
    return m


def test_a_fills_stream_past_the_limit_is_refused_3009_and_the_others_go_on(gateway, monkeypatch):
    g, ep, ctx = gateway
    monkeypatch.setattr(G, "MAX_FILLS_STREAMS", 2)
    mes = [dealer(ctx, ep["fills"], f"ME-{k}".encode()) for k in (1, 2, 3)]
    seqs = [Sequencer() for _ in mes]

    def feed(k: int, frame: bytes) -> Message:
        """ME-k sends ``frame``; the gateway takes it as its loop does; ME-k's answer."""
        mes[k].send(frame)
        assert g.fills.poll(5000)
        parts = g.fills.recv_multipart()
        g.take_fills(parts[-1], 1, g._peer(g.fills, parts))
        g.flush_fills(1)
        g.pump_answers()
        return answer(mes[k])

    def fill_frame(k: int, trade_id: int) -> bytes:
        # 1 BTC at 50,000.0: qty_units 1000, price_units 500,000
        return seqs[k].encode(MsgType.FILL, fill(trade_id, TAKER, MAKER, 1000, 500_000))

    for k in (0, 1):                                # two streams: accepted
        ack = feed(k, fill_frame(k, 10 + k))
        assert (ack.type, ack.fields["ref_seq"], ack.fields["code"]) == (MsgType.ACK, 1, 0)
    # The third routing id: refused, named 3009, with its frame's seq and type.
    rej = feed(2, fill_frame(2, 30))
    assert (rej.type, rej.fields["ref_seq"], rej.fields["ref_type"], rej.fields["code"]) == \
        (MsgType.REJECT, 1, int(MsgType.FILL), int(Code.FILL_TOO_MANY_STREAMS))
    assert g.counters["reject_3009"] == 1
    # A malformed frame from it keeps its own code (1001: 0xc1 is never valid msgpack).
    assert feed(2, b"\xc1").fields["code"] == int(Code.WIRE_MALFORMED)
    # The tracked streams go on: ME-1's second frame is accepted.
    ack = feed(0, fill_frame(0, 11))
    assert (ack.type, ack.fields["ref_seq"], ack.fields["code"]) == (MsgType.ACK, 2, 0)
    # Nothing of ME-3 was journaled or remembered: 3 records (ME-1: seq 1, 2; ME-2: seq 1).
    assert sorted(g.trackers) == [b"ME-1", b"ME-2"]
    assert sorted((r.stream, r.first_seq) for r in replay(g.journal.path)) == \
        [(b"ME-1", 1), (b"ME-1", 2), (b"ME-2", 1)]


def test_a_forgotten_checks_peer_is_answered_with_higher_numbers(gateway):
    """Three clients on a ROUTER that remembers two: the first is forgotten once the
    other two have been heard after it, and its next answer is numbered above its last
    one (a forward jump: a gap to the client, never a duplicate)."""
    g, ep, ctx = gateway
    g.peers[g.checks] = G.Peers(capacity=2)
    clients = [dealer(ctx, ep["checks"], name) for name in (b"A", b"B", b"C")]

    def ask(k: int, rid: int) -> int:
        clients[k].send(encode(MsgType.ORDER_CHECK, {"request_id": rid, "account": TAKER, "instrument_id": 0,
                                                     "qty_units": 1000, "price_units": 500_000}, seq=rid, ts_ns=1))
        assert g.checks.poll(5000)
        parts = g.checks.recv_multipart()
        g.on_request(g._peer(g.checks, parts), parts[-1], 1)
        m = answer(clients[k])
        assert m.type is MsgType.ORDER_CHECK_REPLY and m.fields["request_id"] == rid
        return m.seq

    a1 = ask(0, 1)
    assert ask(0, 2) == a1 + 1                  # consecutive while remembered
    ask(1, 1)
    ask(2, 1)                                    # A is forgotten here
    assert g.peers[g.checks].forgotten == 1
    assert ask(0, 3) > a1 + 1                    # a new stream, above the old one
