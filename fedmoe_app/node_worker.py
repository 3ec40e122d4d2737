"""A node worker: one long-lived process per device that serves the ClientApp's train and
evaluate messages, so that a message does not pay for importing torch and transformers,
reading its data and loading the backbone again.

On a SuperNode Flower 1.41 starts a new ClientApp process for every message. With the
worker on (node_config `warm-worker`, on by default on a device, i.e. when `data-path` is
set), the ClientApp process hands the message's content to the worker over a Unix socket
and returns the worker's reply; the first message starts the worker and waits for it. The
worker keeps its modules, tokenised data and frozen backbone between messages and exits
after `worker-idle-seconds` without a message (default 900) or when the process that
starts the SuperNode's ClientApps (Flower's SuperExec, which ends with its SuperNode) is gone.

Wire format, both ways: an 8-byte header length, an 8-byte body length, a JSON header and
a body of Flower's own protobuf RecordDict bytes (no pickle). The socket lives in a folder
only this user may enter; its name is a digest of the app's code, the Python interpreter,
the cache folder and the process id of the ClientApps' parent (the SuperExec), so a changed
app or a restarted SuperNode gets a new worker, and SuperNodes sharing a machine do not
share one. A worker that meets a broken or stalled connection drops it and goes on. The worker's log is
`<cache>/workers/<digest>.log`.

Standard library and flwr only at import: the ClientApp process imports this module.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import math
import os
import socket
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Mapping

from flwr.app import RecordDict
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict

from fedmoe_app import messages as msg
from fedmoe_app.rows import cache_dir
from fedmoe_app.startup import process_start

APP_DIR = Path(__file__).resolve().parents[1]  # holds fedmoe_app/ and strategies/
DEFAULT_IDLE_SECONDS = 900.0
START_TIMEOUT_SECONDS = 600.0  # a Raspberry Pi imports torch and loads the backbone in minutes
POLL_SECONDS = 2.0
FRAME_TIMEOUT_SECONDS = 300.0  # a connection that sends or reads nothing this long is dropped
_FRAME = struct.Struct("<QQ")


# ---------------------------------------------------------------------------- settings


def wants_worker(node_config: Mapping[str, Any]) -> bool:
    """Whether this node's messages go to a node worker: node_config `warm-worker`
    (true | false), by default true on a device (`data-path` set) and false in simulation."""
    value = node_config.get("warm-worker", bool(node_config.get(msg.DATA_PATH)))
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    if isinstance(value, bool):
        return value
    raise ValueError(f"node_config warm-worker={value!r}; allowed: true, false")


def idle_seconds(node_config: Mapping[str, Any]) -> float:
    """node_config `worker-idle-seconds`: how long a worker waits for a message before it exits."""
    value = node_config.get("worker-idle-seconds", DEFAULT_IDLE_SECONDS)
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        seconds = -1.0
    if isinstance(value, bool) or not (math.isfinite(seconds) and seconds > 0):
        raise ValueError(f"node_config worker-idle-seconds={value!r}; allowed: a number of seconds > 0")
    return seconds


def socket_path(supernode_pid: int | None = None) -> Path:
    """Where the worker of this app and SuperNode listens; `supernode_pid`: the process that
    starts the ClientApps (default: this process's parent, as seen from a ClientApp)."""
    sources = sorted(p for d in ("fedmoe_app", "strategies") for p in (APP_DIR / d).rglob("*.py"))
    digest = hashlib.sha256(json.dumps([
        str(APP_DIR), max(p.stat().st_mtime_ns for p in sources), sys.executable, str(cache_dir().resolve()),
        os.getppid() if supernode_pid is None else supernode_pid,
    ]).encode()).hexdigest()[:20]
    # AF_UNIX paths are limited to ~104 bytes, so the socket is not under the cache folder.
    folder = Path(tempfile.gettempdir()) / f"fedmoe-{os.getuid()}"
    folder.mkdir(mode=0o700, exist_ok=True)
    info = folder.stat()
    if info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise PermissionError(f"{folder} must belong to this user and be closed to others (chmod 700)")
    return folder / f"{digest}.sock"


def log_path(sock: Path) -> Path:
    """The worker's log file."""
    folder = cache_dir() / "workers"
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{sock.stem}.log"


# ---------------------------------------------------------------------------- framing


def _send(conn: socket.socket, header: dict, body: bytes = b"") -> None:
    head = json.dumps(header).encode()
    conn.sendall(_FRAME.pack(len(head), len(body)) + head + body)


def _recv_exact(conn: socket.socket, size: int) -> bytes:
    chunks, left = [], size
    while left:
        chunk = conn.recv(min(left, 1 << 20))
        if not chunk:
            raise ConnectionError("the other end closed the connection mid-message")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _recv(conn: socket.socket) -> tuple[dict, bytes]:
    head_size, body_size = _FRAME.unpack(_recv_exact(conn, _FRAME.size))
    return json.loads(_recv_exact(conn, head_size)), _recv_exact(conn, body_size)


def _to_bytes(content: RecordDict) -> bytes:
    return recorddict_to_proto(content).SerializeToString()


def _from_bytes(body: bytes) -> RecordDict:
    return recorddict_from_proto(ProtoRecordDict.FromString(body))


# ---------------------------------------------------------------------------- ClientApp side


def handle(kind: str, content: RecordDict, node_config: Mapping[str, Any]) -> RecordDict:
    """The reply content of a `kind` (train | evaluate | calibrate) message: from the node worker when
    `wants_worker(node_config)`, else computed in this process."""
    if not wants_worker(node_config):
        from fedmoe_app.handlers import HANDLERS

        return HANDLERS[kind](content, node_config)
    header = {"kind": kind, "node-config": dict(node_config), "origin": process_start(),
              "idle-seconds": idle_seconds(node_config)}
    sock, body = socket_path(), _to_bytes(content)
    for attempt in (1, 2):  # a worker may exit idle just as a message arrives: start another once
        with _connect_or_start(sock, os.getppid(), header["idle-seconds"]) as conn:
            try:
                _send(conn, header, body)
                answer, body = _recv(conn)
                break
            except ConnectionError as err:
                if attempt == 2:
                    raise RuntimeError(f"the node worker stopped while serving a {kind} message; "
                                       f"see {log_path(sock)}") from err
    if not answer.get("ok"):
        raise RuntimeError(f"the node worker failed on a {kind} message:\n{answer.get('error')}")
    return _from_bytes(body)


def _connect(sock: Path) -> socket.socket | None:
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(str(sock))
        return conn
    except (FileNotFoundError, ConnectionRefusedError):
        conn.close()
        return None


def _connect_or_start(sock: Path, supernode_pid: int, idle: float) -> socket.socket:
    """A connection to the worker at `sock`, starting one first if none listens there."""
    conn = _connect(sock)
    if conn is not None:
        return conn
    with open(sock.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one starter at a time; the others then connect
        conn = _connect(sock)
        if conn is not None:
            return conn
        sock.unlink(missing_ok=True)  # left by a worker that was killed
        log = log_path(sock)
        with open(log, "ab") as out:
            worker = subprocess.Popen(
                [sys.executable, "-m", "fedmoe_app.node_worker", "--socket", str(sock),
                 "--idle-seconds", str(idle), "--watch-pid", str(supernode_pid)],
                cwd=APP_DIR, stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True,
            )
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while (conn := _connect(sock)) is None:
            if worker.poll() is not None:
                raise RuntimeError(f"the node worker exited with code {worker.returncode} while starting:\n"
                                   f"{_tail(log)}")
            if time.monotonic() > deadline:
                worker.kill()
                raise RuntimeError(f"the node worker did not start within {START_TIMEOUT_SECONDS:.0f} s; see {log}")
            time.sleep(0.05)
        return conn


def _tail(path: Path, size: int = 3000) -> str:
    return path.read_bytes()[-size:].decode(errors="replace")


def stop(sock: Path | None = None) -> bool:
    """Ask the worker at `sock` (default: `socket_path()`) to exit; whether one was listening."""
    conn = _connect(sock or socket_path())
    if conn is None:
        return False
    with conn:
        _send(conn, {"kind": "stop"})
        with contextlib.suppress(ConnectionError):
            _recv(conn)
    return True


# ---------------------------------------------------------------------------- worker side


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def serve(sock: Path, idle: float, watch_pid: int) -> None:
    """Import the handlers, then serve messages on `sock` one at a time until `idle` seconds
    pass without one, the process `watch_pid` (the SuperExec) is gone, or a stop request."""
    from fedmoe_app.handlers import HANDLERS  # torch, transformers: imported once, here

    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.unlink(missing_ok=True)
    server.bind(str(sock))
    os.chmod(sock, 0o600)
    ours = sock.stat().st_ino
    server.listen()
    server.settimeout(POLL_SECONDS)
    print(f"node worker {os.getpid()} listening on {sock}", flush=True)
    last = time.monotonic()
    try:
        while time.monotonic() - last < idle and _alive(watch_pid):
            try:
                conn, _ = server.accept()
            except socket.timeout:
                continue
            with conn:
                conn.settimeout(FRAME_TIMEOUT_SECONDS)
                try:
                    header, body = _recv(conn)
                    if header.get("kind") == "stop":
                        _send(conn, {"ok": True})
                        print("node worker stopped on request", flush=True)
                        return
                    idle = float(header.get("idle-seconds", idle))
                    _send(conn, *_answer(HANDLERS, header, body))
                except (OSError, ValueError) as err:  # a ClientApp that died, stalled or sent garbage
                    print(f"node worker dropped a connection: {err!r}", flush=True)
            last = time.monotonic()
        print("node worker exits: idle or its SuperNode is gone", flush=True)
    finally:
        server.close()
        with contextlib.suppress(FileNotFoundError):
            if sock.stat().st_ino == ours:  # not a successor's socket
                sock.unlink()


def _answer(handlers: dict, header: dict, body: bytes) -> tuple[dict, bytes]:
    """The reply frame to one message: the handler's reply, or the error it raised."""
    try:
        reply = handlers[header["kind"]](_from_bytes(body), header["node-config"], header["origin"])
        return {"ok": True}, _to_bytes(reply)
    except Exception:  # the ClientApp reports it as the message's failure
        error = traceback.format_exc()
        print(error, flush=True)
        return {"ok": False, "error": error}, b""


def main(argv: list[str] | None = None) -> None:
    """Command line of the worker process (started by `handle`)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--socket", type=Path, required=True)
    parser.add_argument("--idle-seconds", type=float, default=DEFAULT_IDLE_SECONDS)
    parser.add_argument("--watch-pid", type=int, default=os.getppid())
    args = parser.parse_args(argv)
    serve(args.socket, args.idle_seconds, args.watch_pid)


if __name__ == "__main__":
    main()
