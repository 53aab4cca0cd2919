"""CURVE authentication of the engine's TCP endpoints: an allowlist of client keys.

With ``[security]`` set in the configuration, every external endpoint the engine binds
on ``tcp://`` (oracle, fills, checks, orders, events) is a CURVE server (ZeroMQ's
CurveZMQ: the client proves it holds the secret half of a public key, and the
connection is encrypted). A ZAP handler in each binding process (pyzmq's
``ThreadAuthenticator``, one thread, consulted only while a connection is set up)
admits a client only if its public key is one of the ``*.key`` files in
``curve_allowed_keys``: a key file at its top level may use every endpoint, one in its
subdirectory ``oracle/``, ``fills/``, ``checks/``, ``orders/`` or ``events/`` only that
endpoint (each socket names its endpoint as its ZAP domain), so an operator's event
subscriber need not be able to send fills. A refused client's connection is dropped during the handshake: nothing it
sends reaches the engine; the process's log names the first refused keys and then
counts the rest (a peer trying fresh keys cannot fill the log). ``ipc://`` endpoints
are left as they are, and so are the engine's internal sockets (in the owner-only
runtime directory; an external ipc endpoint's path is the operator's to protect).

The keys are read once, when ``margin-engine run`` starts: the supervisor checks them
and stages a copy in the owner-only runtime directory (``stage``), and every process it
starts -- a worker it restarts too -- reads that copy (``--curve-keys``). Editing the
files while the engine runs changes nothing until the next start, and cannot make a
restarted process fail.

With ``endpoints.orders_via_gateway = false`` the workers connect to the matching
engine's PULL instead of binding: over ``tcp://`` they are then the CURVE client, with
the engine's key pair and the matching engine's public key, ``curve_orders_server_key``.

Key files are ZeroMQ certificates (``zmq.auth.create_certificates``, or
``margin-engine keys``): ``NAME.key`` holds the public key, ``NAME.key_secret`` both.
"""

from __future__ import annotations

import collections
import os
import stat
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils import z85

ENDPOINTS = ("oracle", "fills", "checks", "orders", "events")    # the allowlist's subdirectories
REFUSED_NAMED = 16              # refused keys named one by one in the log; the rest counted
REFUSED_REMEMBERED = 1024       # the most recent refused keys remembered (so each is named once)
REFUSED_SUMMARY_S = 60.0        # a line with the count of refusals at most this often


class SecurityError(ValueError):
    """A ``[security]`` setting that cannot be used (the message names the setting)."""


@dataclass(frozen=True)
class Security:
    """``[security]``: absolute paths (the configuration's relative ones resolved at load);
    empty: CURVE off."""

    curve_secret_key: str = ""          # the engine's certificate, NAME.key_secret (owner-only)
    curve_allowed_keys: str = ""        # directory of the clients' public keys, *.key
    curve_orders_server_key: str = ""   # the matching engine's public key (direct orders over tcp)

    @property
    def on(self) -> bool:
        return bool(self.curve_secret_key)


def check(sec: Security, orders_direct_tcp: bool) -> None:
    """Refuse settings that cannot work, naming the setting (``load`` checks the keys)."""
    if not (sec.curve_secret_key or sec.curve_allowed_keys or sec.curve_orders_server_key):
        return
    if not zmq.has("curve"):
        raise SecurityError("security: this libzmq has no CURVE support")
    if not sec.curve_secret_key or not sec.curve_allowed_keys:
        raise SecurityError("security: curve_secret_key and curve_allowed_keys go together")
    if not sec.curve_orders_server_key and orders_direct_tcp:
        raise SecurityError("security.curve_orders_server_key: required when the workers send orders "
                            "straight to a tcp:// endpoint (endpoints.orders_via_gateway = false)")
    load(sec)


@dataclass(frozen=True)
class Keys:
    """The key material of ``[security]``, z85 (40 characters each), checked."""

    public: bytes
    secret: bytes
    allowed: frozenset              # (endpoint name or "*", key) pairs
    orders_server: bytes = b""


def _z85_key(key: bytes | None, where: str, path: str) -> bytes:
    try:
        if key is None or len(key) != 40 or len(z85.decode(key)) != 32:
            raise ValueError
    except ValueError:
        raise SecurityError(f"{where}: {path}: not a CURVE key (40 z85 characters)") from None
    return key


def _certificate(path: str, where: str) -> tuple[bytes, bytes | None]:
    if not os.path.isfile(path):
        raise SecurityError(f"{where}: {path}: no such file")
    try:
        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as e:
        raise SecurityError(f"{where}: {path}: not a ZeroMQ certificate ({e})") from None
    return _z85_key(public, where, path), secret


def load(sec: Security) -> Keys:
    """Read and check every key of ``sec``: the secret key file owner-only, holding a
    secret whose public half is the one it states; each allowlist key and the orders
    server key 40 z85 characters; at least one allowed key."""
    where = "security.curve_secret_key"
    public, secret = _certificate(sec.curve_secret_key, where)
    if secret is None:
        raise SecurityError(f"{where}: {sec.curve_secret_key} holds no secret key (a NAME.key_secret file)")
    _z85_key(secret, where, sec.curve_secret_key)
    if zmq.curve_public(secret) != public:
        raise SecurityError(f"{where}: {sec.curve_secret_key}: its public key is not the secret key's")
    mode = os.stat(sec.curve_secret_key).st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise SecurityError(f"{where}: {sec.curve_secret_key} is open to others "
                            f"(mode {stat.S_IMODE(mode):o}); chmod 600 it")
    if not os.path.isdir(sec.curve_allowed_keys):
        raise SecurityError(f"security.curve_allowed_keys: {sec.curve_allowed_keys} is not a directory")
    top = Path(sec.curve_allowed_keys)
    for sub in sorted(p.name for p in top.iterdir() if p.is_dir()):
        if sub not in ENDPOINTS:
            raise SecurityError(f"security.curve_allowed_keys: {top / sub}: a subdirectory must be named for "
                                f"an endpoint, one of {', '.join(ENDPOINTS)}")
    allowed = frozenset((domain, _certificate(str(p), "security.curve_allowed_keys")[0])
                        for domain, d in [("*", top)] + [(e, top / e) for e in ENDPOINTS if (top / e).is_dir()]
                        for p in sorted(d.glob("*.key")))
    if not allowed:
        raise SecurityError(f"security.curve_allowed_keys: no *.key file in {sec.curve_allowed_keys} "
                            "or its endpoint subdirectories")
    server = b""
    if sec.curve_orders_server_key:
        server = _certificate(sec.curve_orders_server_key, "security.curve_orders_server_key")[0]
    return Keys(public, secret, allowed, server)


def stage(sec: Security, directory: str) -> str:
    """Check ``sec``'s keys and write them to ``directory/curve.keys`` (mode 600; the
    directory is the engine's owner-only runtime directory): what every engine process
    reads, so that the files are read once per start. Returns the path."""
    k = load(sec)
    path = os.path.join(directory, "curve.keys")
    lines = [b"public " + k.public, b"secret " + k.secret, b"orders_server " + (k.orders_server or b"-")]
    lines += [b"allow " + d.encode() + b" " + a for d, a in sorted(k.allowed)]
    fd = os.open(path + ".tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(b"\n".join(lines) + b"\n")
    os.replace(path + ".tmp", path)
    return path


def read_staged(path: str) -> Keys:
    """The keys ``stage`` wrote."""
    got: dict[bytes, list[bytes]] = collections.defaultdict(list)
    with open(path, "rb") as f:
        for line in f.read().splitlines():
            k, _, v = line.partition(b" ")
            got[k].append(v)
    server = got[b"orders_server"][0]
    allowed = frozenset((d.decode(), key) for d, _, key in (v.partition(b" ") for v in got[b"allow"]))
    return Keys(got[b"public"][0], got[b"secret"][0], allowed, b"" if server == b"-" else server)


# ------------------------------------------------------------------ process side
_KEYS: Keys | None = None
_AUTH: dict[int, "_Allowlist"] = {}       # id(context) -> its ZAP handler
_LOCK = threading.Lock()


def args(path: str | None) -> list[str]:
    """The command-line arguments that hand the staged keys to an engine process."""
    return ["--curve-keys", path] if path else []


def add_args(ap) -> None:
    ap.add_argument("--curve-keys", default="", help="CURVE: the keys margin-engine run staged (curve.keys)")


def install(a) -> None:
    """This process's keys from its parsed arguments (``add_args``); none: CURVE off."""
    use(read_staged(a.curve_keys) if a.curve_keys else None)


def use(keys: Keys | None) -> None:
    """This process's keys (None: CURVE off)."""
    global _KEYS
    _KEYS = keys


class _Allowlist:
    """The ZAP handler of one context: the allowlist; refused keys named in the log up to
    ``REFUSED_NAMED``, then counted (a line at most every ``REFUSED_SUMMARY_S``). The
    callback never raises: an exception there would end pyzmq's handler thread, and the
    process would then admit nobody."""

    def __init__(self, ctx: zmq.Context, keys: Keys):
        self.keys = keys.allowed            # (domain, key): "*" for every endpoint
        self.refused: collections.OrderedDict = collections.OrderedDict()
        self.named = self.count = self.count_logged = 0
        self.summary_at = 0.0
        self.auth = ThreadAuthenticator(ctx)
        self.auth.start()
        for domain in ("*",) + ENDPOINTS:          # pyzmq asks the provider of the socket's domain
            self.auth.configure_curve_callback(domain, self)

    def callback(self, domain: str, key: bytes) -> bool:
        try:
            if ("*", key) in self.keys or (domain, key) in self.keys:
                return True
            self.count += 1
            if key in self.refused:
                self.refused.move_to_end(key)
            else:
                self.refused[key] = None
                if len(self.refused) > REFUSED_REMEMBERED:
                    self.refused.popitem(last=False)
                if self.named < REFUSED_NAMED:
                    self.named += 1
                    self._log(f"curve: refused a client whose public key {key.decode()} is not in the allowlist"
                              + (" (further refused keys are counted, not named)" if self.named == REFUSED_NAMED
                                 else ""))
                    self.count_logged = self.count
            now = time.monotonic()
            if self.count > self.count_logged and now - self.summary_at >= REFUSED_SUMMARY_S:
                self.summary_at = now
                self._log(f"curve: {self.count - self.count_logged} more connections refused "
                          f"({self.count} since start)")
                self.count_logged = self.count
        except Exception:                    # noqa: BLE001 -- never end the handler thread
            pass
        return False

    @staticmethod
    def _log(line: str) -> None:
        try:
            print(line, file=sys.stderr, flush=True)
        except (OSError, ValueError):       # a full or closed log: the refusal stands
            pass


def bind(sock: zmq.Socket, endpoint: str, name: str) -> None:
    """Bind the external endpoint ``name`` (one of ``ENDPOINTS``): a CURVE server behind
    the allowlist, its ZAP domain the endpoint's name, when CURVE is on and the endpoint
    is ``tcp://``; a plain bind otherwise."""
    if name not in ENDPOINTS:
        raise ValueError(f"endpoint name {name!r}: one of {ENDPOINTS}")
    if _KEYS is not None and endpoint.startswith("tcp://"):
        sock.zap_domain = name.encode()
        with _LOCK:
            if id(sock.context) not in _AUTH:
                _AUTH[id(sock.context)] = _Allowlist(sock.context, _KEYS)
        sock.curve_secretkey = _KEYS.secret
        sock.curve_publickey = _KEYS.public
        sock.curve_server = True
    sock.bind(endpoint)


def connect(sock: zmq.Socket, endpoint: str) -> None:
    """Connect to an external endpoint the other side binds (the matching engine's orders
    PULL): a CURVE client with the engine's key pair over ``tcp://`` when CURVE is on."""
    if _KEYS is not None and endpoint.startswith("tcp://"):
        sock.curve_secretkey = _KEYS.secret
        sock.curve_publickey = _KEYS.public
        sock.curve_serverkey = _KEYS.orders_server
    sock.connect(endpoint)


def stop() -> None:
    """Stop this process's ZAP handlers (before its context is terminated)."""
    with _LOCK:
        for a in _AUTH.values():
            a.auth.stop()
        _AUTH.clear()
