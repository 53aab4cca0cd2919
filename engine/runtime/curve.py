"""CURVE authentication of the engine's TCP endpoints: an allowlist of client keys.

With ``[security]`` set in the configuration, every external endpoint the engine binds
on ``tcp://`` (oracle, fills, checks, orders, events) is a CURVE server (ZeroMQ's
CurveZMQ: the client proves it holds the secret half of a public key, and the
connection is encrypted). A ZAP handler in each binding process (pyzmq's
``ThreadAuthenticator``, one thread, consulted only while a connection is set up)
admits a client only if its public key is one of the ``*.key`` files in
``curve_allowed_keys``, read at start. A refused client's connection is dropped during
the handshake: nothing it sends reaches the engine; each refused key is written once to
the process's log. ``ipc://`` endpoints are left as they are (their runtime directory is
owner-only; design.md), and so are the engine's internal sockets.

With ``endpoints.orders_via_gateway = false`` the workers connect to the matching
engine's PULL instead of binding: over ``tcp://`` they are then the CURVE client, with
the engine's key pair and the matching engine's public key, ``curve_orders_server_key``.

Key files are ZeroMQ certificates (``zmq.auth.create_certificates``, or
``margin-engine keys``): ``NAME.key`` holds the public key, ``NAME.key_secret`` both.
"""

from __future__ import annotations

import os
import stat
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator


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
    """Refuse settings that cannot work, naming the setting: CURVE without the secret key
    or the allowlist, a secret key others may read, a key file that is not a certificate,
    an allowlist with no key, direct orders over tcp without the matching engine's key."""
    if not (sec.curve_secret_key or sec.curve_allowed_keys or sec.curve_orders_server_key):
        return
    if not zmq.has("curve"):
        raise SecurityError("security: this libzmq has no CURVE support")
    if not sec.curve_secret_key or not sec.curve_allowed_keys:
        raise SecurityError("security: curve_secret_key and curve_allowed_keys go together")
    public, secret = _certificate(sec.curve_secret_key, "security.curve_secret_key")
    if secret is None:
        raise SecurityError(f"security.curve_secret_key: {sec.curve_secret_key} holds no secret key "
                            "(a NAME.key_secret file)")
    mode = os.stat(sec.curve_secret_key).st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise SecurityError(f"security.curve_secret_key: {sec.curve_secret_key} is open to others "
                            f"(mode {stat.S_IMODE(mode):o}); chmod 600 it")
    if not os.path.isdir(sec.curve_allowed_keys):
        raise SecurityError(f"security.curve_allowed_keys: {sec.curve_allowed_keys} is not a directory")
    if not allowed_keys(sec):
        raise SecurityError(f"security.curve_allowed_keys: no *.key file in {sec.curve_allowed_keys}")
    if sec.curve_orders_server_key:
        _certificate(sec.curve_orders_server_key, "security.curve_orders_server_key")
    elif orders_direct_tcp:
        raise SecurityError("security.curve_orders_server_key: required when the workers send orders "
                            "straight to a tcp:// endpoint (endpoints.orders_via_gateway = false)")


def _certificate(path: str, where: str) -> tuple[bytes, bytes | None]:
    try:
        return zmq.auth.load_certificate(path)
    except (OSError, ValueError) as e:
        raise SecurityError(f"{where}: {path}: not a ZeroMQ certificate ({e})") from None


def allowed_keys(sec: Security) -> set[bytes]:
    """The z85 public keys of the ``*.key`` files in the allowlist directory."""
    keys = set()
    for p in sorted(Path(sec.curve_allowed_keys).glob("*.key")):
        public, _ = _certificate(str(p), "security.curve_allowed_keys")
        keys.add(public)
    return keys


# ------------------------------------------------------------------ process side
_SEC = Security()
_AUTH: dict[int, "_Allowlist"] = {}       # id(context) -> its ZAP handler
_LOCK = threading.Lock()


def args(sec: Security) -> list[str]:
    """The command-line arguments that hand ``sec`` to an engine process (``add_args``)."""
    return ["--curve-secret-key", sec.curve_secret_key, "--curve-allowed-keys", sec.curve_allowed_keys,
            "--curve-orders-server-key", sec.curve_orders_server_key] if sec.on else []


def add_args(ap) -> None:
    ap.add_argument("--curve-secret-key", default="", help="CURVE: the engine's certificate (NAME.key_secret)")
    ap.add_argument("--curve-allowed-keys", default="", help="CURVE: directory of allowed clients' *.key")
    ap.add_argument("--curve-orders-server-key", default="",
                    help="CURVE: the matching engine's public key, for orders sent straight to it")


def install(a) -> None:
    """This process's security from its parsed arguments (``add_args``)."""
    global _SEC
    _SEC = Security(a.curve_secret_key, a.curve_allowed_keys, a.curve_orders_server_key)


class _Allowlist:
    """The ZAP handler of one context: the allowlist, each refused key logged once."""

    def __init__(self, ctx: zmq.Context, sec: Security):
        self.keys = allowed_keys(sec)
        self.refused: set[bytes] = set()
        self.auth = ThreadAuthenticator(ctx)
        self.auth.start()
        self.auth.configure_curve_callback("*", self)

    def callback(self, domain: str, key: bytes) -> bool:
        if key in self.keys:
            return True
        if key not in self.refused:
            self.refused.add(key)
            print(f"curve: refused a client whose public key {key.decode()} is not in the allowlist",
                  file=sys.stderr, flush=True)
        return False


def bind(sock: zmq.Socket, endpoint: str) -> None:
    """Bind an external endpoint: a CURVE server behind the allowlist when CURVE is on
    and the endpoint is ``tcp://``, a plain bind otherwise."""
    if _SEC.on and endpoint.startswith("tcp://"):
        with _LOCK:
            if id(sock.context) not in _AUTH:
                _AUTH[id(sock.context)] = _Allowlist(sock.context, _SEC)
        public, secret = zmq.auth.load_certificate(_SEC.curve_secret_key)
        sock.curve_secretkey = secret
        sock.curve_publickey = public
        sock.curve_server = True
    sock.bind(endpoint)


def connect(sock: zmq.Socket, endpoint: str) -> None:
    """Connect to an external endpoint the other side binds (the matching engine's orders
    PULL): a CURVE client with the engine's key pair over ``tcp://`` when CURVE is on."""
    if _SEC.on and endpoint.startswith("tcp://"):
        public, secret = zmq.auth.load_certificate(_SEC.curve_secret_key)
        server, _ = zmq.auth.load_certificate(_SEC.curve_orders_server_key)
        sock.curve_secretkey = secret
        sock.curve_publickey = public
        sock.curve_serverkey = server
    sock.connect(endpoint)


def stop() -> None:
    """Stop this process's ZAP handlers (before its context is terminated)."""
    with _LOCK:
        for a in _AUTH.values():
            a.auth.stop()
        _AUTH.clear()
