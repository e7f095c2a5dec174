"""The node's receiver processes (``receive_processes``): started once, handed connections, restarted.

The node's native server (``edge_node.ingest.native_transport.NativeServer``) accepts every connection and
applies the per-address limit; with a pool it then hands the socket to the receiver holding the fewest
connections (``edge_node.ingest.receiver_process``), over that receiver's control channel
(``edge_node.ingest.receiver_channel``, the descriptor travels with ``SCM_RIGHTS``) and closes its own
copy. One supervisor thread per receiver starts its process, answers it (may this association be
admitted? this connection ended; the worker should look), and, when the process ends unasked, forgets the
connections it held (they closed with it: their senders see the connection drop and retry whatever was not
acknowledged; nothing acknowledged is lost: it was fsynced under a durable name in the receiver's own slot
pool first, and the new receiver places and records what its predecessor had not, before it is ready) and
starts a new one, after a pause that grows while the receiver keeps dying young, so a receiver that cannot
run does not spin.

Processes are started with ``subprocess`` (fork and exec, no Python code between them), never by forking
the threaded node; each gets the node's ``sys.path``, so it runs the very code the node runs.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable

from edge_node.errors import SpoolError
from edge_node.ingest.native_transport import HandedConnection, NativeServer
from edge_node.ingest.receiver_channel import Channel, ChannelClosed, channel_pair
from edge_node.ingest.receiver_process import BOOTSTRAP, ReceiverSpec

__all__ = ["START_TIMEOUT_S", "ReceiverPool"]

logger = logging.getLogger(__name__)

#: Seconds every receiver has to become ready when the node starts.
START_TIMEOUT_S = 60.0
#: Seconds a receiver that was told to stop has to exit before it is killed.
STOP_TIMEOUT_S = 10.0
#: Pause before a receiver that died is started again, doubled while it keeps dying young, at most the last.
RESTART_PAUSE_S = (0.5, 30.0)
#: A receiver that ran this long is not dying young: its next restart pauses the least again.
HEALTHY_AFTER_S = 30.0


def _ended(returncode: int | None) -> str:
    if returncode is None:
        return "did not exit"
    if returncode < 0:
        try:
            return f"was killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"was killed by signal {-returncode}"
    return f"exited with status {returncode}"


def _emit(message: dict[str, object], pid: int | None) -> None:
    """A receiver's log record, emitted through the node's logging (its levels, handlers and guard)."""
    name, level = str(message.get("name", __name__)), message.get("level")
    level = level if isinstance(level, int) else logging.WARNING
    logger_ = logging.getLogger(name)
    if not logger_.isEnabledFor(level):
        return
    created = message.get("created")
    record = logging.makeLogRecord(
        {
            "name": name,
            "levelno": level,
            "levelname": logging.getLevelName(level),
            "msg": str(message.get("message", "")),
            "args": None,
            "exc_text": message.get("exc_text") or None,
            "funcName": str(message.get("func", "")),
            "process": pid,
            "processName": "receiver",
            **({"created": created, "msecs": created % 1 * 1000} if isinstance(created, float) else {}),
        }
    )
    logger_.handle(record)


class _Receiver:
    """One receiver slot: its process (started again when it dies), its channel and its connections."""

    def __init__(self, index: int, pool: ReceiverPool) -> None:
        self.index = index
        self._pool = pool
        self._lock = threading.Lock()
        # The channel of the running process (``_control``), and the same once it is ready (``_channel``).
        self._control: Channel | None = None
        self._channel: Channel | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._connections: dict[int, HandedConnection] = {}
        #: Set when the first process is ready, or failed before it was (``failure`` says why).
        self.settled = threading.Event()
        self.failure: str | None = None
        self._ever_ready = False
        self.thread = threading.Thread(target=self._run, name=f"edge-receiver-{index}", daemon=True)

    @property
    def load(self) -> int | None:
        """Connections held now; None while no ready process can take one."""
        with self._lock:
            return len(self._connections) if self._channel is not None else None

    @property
    def pid(self) -> int | None:
        with self._lock:
            return self._process.pid if self._process is not None else None

    def hand(self, sock: socket.socket, connection: HandedConnection) -> bool:
        with self._lock:
            channel = self._channel
            if channel is None:
                return False
            # Known before the receiver can ask about it.
            self._connections[connection.number] = connection
        try:
            channel.send({"op": "take", "number": connection.number, "peer": connection.peer}, sock.fileno())
            return True
        except ChannelClosed:
            with self._lock:
                self._connections.pop(connection.number, None)
            return False

    def ask_to_stop(self) -> None:
        with self._lock:
            channel = self._control
        if channel is not None:
            with contextlib.suppress(ChannelClosed):
                channel.send({"op": "stop"})

    def kill(self) -> None:
        with self._lock:
            process = self._process
        if process is not None and process.poll() is None:
            process.kill()

    # -- the supervisor thread ---------------------------------------------------------------------

    def _run(self) -> None:
        pause = RESTART_PAUSE_S[0]
        while not self._pool.stopping:
            started = time.monotonic()
            try:
                channel = self._spawn()
            except OSError as exc:
                self._settle(f"cannot be started ({exc.strerror})")
                if self._ever_ready:
                    logger.error("receiver process %d cannot be started again: %s", self.index, exc.strerror)
            else:
                self._serve(channel)
                self._reap(channel)
            if time.monotonic() - started >= HEALTHY_AFTER_S:
                pause = RESTART_PAUSE_S[0]
            if not self._ever_ready or self._pool.wait_stopping(pause):
                return  # a receiver that never started fails the node's start instead
            pause = min(pause * 2, RESTART_PAUSE_S[1])

    def _spawn(self) -> Channel:
        mine, theirs = channel_pair()
        pool = self._pool
        try:
            process = subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    BOOTSTRAP,
                    json.dumps(sys.path),
                    str(theirs.fileno()),
                    str(pool.node_pid),
                    str(self.index),
                    pool.spec.to_json(),
                ],
                pass_fds=[theirs.fileno()],
                stdin=subprocess.DEVNULL,
            )
        except OSError:
            mine.close()
            raise
        finally:
            theirs.close()
        channel = Channel(mine)
        with self._lock:
            self._process, self._control = process, channel
        if self._pool.stopping:  # the node began to stop while this one started
            self.ask_to_stop()
        return channel

    def _serve(self, channel: Channel) -> None:
        server = self._pool.server
        while True:
            try:
                message, carried = channel.receive()
            except ChannelClosed:
                return
            if carried is not None:  # a receiver never sends connections
                carried.close()
            op = message.get("op")
            if op == "ready":
                with self._lock:
                    self._channel = channel
                logger.info("receiver process %d ready (pid %s)", self.index, self.pid)
                self._ever_ready = True
                self.settled.set()
            elif op == "admit":
                number = int(message["number"])
                with self._lock:
                    connection = self._connections.get(number)
                # A refusal is logged by the receiver, as the node logs its own threads' refusals.
                ok = connection is not None and server.admit(connection)
                try:
                    channel.send({"op": "admitted", "number": number, "ok": ok})
                except ChannelClosed:
                    return
            elif op == "ended":
                with self._lock:
                    ended = self._connections.pop(int(message["number"]), None)
                if ended is not None:
                    server.forget(ended)
            elif op == "studies":
                self._pool.on_studies()
            elif op == "log":
                _emit(message, self.pid)
            else:
                logger.warning("ignored a control message the node does not know (%s)", op)

    def _reap(self, channel: Channel) -> None:
        """The channel closed, the process ends: wait for it, forget its connections, say how it ended."""
        with self._lock:
            self._channel = self._control = None
            process = self._process
        channel.close()
        returncode = None
        if process is not None:
            try:
                returncode = process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                process.kill()
                returncode = process.wait()
        with self._lock:
            held = list(self._connections.values())
            self._connections.clear()
            self._process = None
        for connection in held:
            self._pool.server.forget(connection)
        how = _ended(returncode)
        if not self._ever_ready:
            self._settle(f"{how} before it was ready (its log lines above say why)")
        elif not self._pool.stopping:
            logger.warning(
                "receiver process %d %s; its %d connections dropped (their senders retry what was not "
                "acknowledged); starting it again",
                self.index,
                how,
                len(held),
            )

    def _settle(self, failure: str) -> None:
        self.failure = failure
        self.settled.set()


class ReceiverPool:
    """``count`` receiver processes for ``NativeServer`` (its ``Receivers``); see the module docstring."""

    def __init__(self, count: int, spec: ReceiverSpec, *, on_studies: Callable[[], None]) -> None:
        if count < 1:
            raise ValueError("a receiver pool needs at least one process")
        self.spec = spec
        self.on_studies = on_studies
        self.node_pid = 0
        self._server: NativeServer | None = None
        self._stop = threading.Event()
        self._receivers = [_Receiver(i, self) for i in range(count)]
        self._next = 0

    @property
    def server(self) -> NativeServer:
        assert self._server is not None, "the pool serves a started NativeServer"
        return self._server

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def wait_stopping(self, seconds: float) -> bool:
        return self._stop.wait(seconds)

    @property
    def loads(self) -> list[int | None]:
        """Connections each receiver holds now (None: it is being started again)."""
        return [r.load for r in self._receivers]

    @property
    def pids(self) -> list[int | None]:
        """The receivers' process ids now (None: being started again)."""
        return [r.pid for r in self._receivers]

    def start(self, server: NativeServer) -> None:
        """Start every receiver; return when all are ready, raise SpoolError if one cannot start."""
        self._server = server
        self.node_pid = os.getpid()
        for receiver in self._receivers:
            receiver.thread.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        for receiver in self._receivers:
            if not receiver.settled.wait(max(0.0, deadline - time.monotonic())):
                receiver.failure = f"was not ready within {START_TIMEOUT_S:.0f} s"
            if receiver.failure is not None:
                self.stop()
                raise SpoolError(
                    f"receiver process {receiver.index} {receiver.failure}; set receive_processes = 0 to "
                    "receive in the node's own process"
                )
        logger.info("%d receiver processes ready", len(self._receivers))

    def hand(self, sock: socket.socket, connection: HandedConnection) -> bool:
        """Pass the connection to the receiver with the fewest connections (False: none can take it)."""
        loads = [(r.load, i) for i, r in enumerate(self._receivers)]
        # Fewest connections first; among equals, the one after the last chosen (spread idle receivers).
        n = len(self._receivers)
        order = sorted(
            ((load, (i - self._next) % n, i) for load, i in loads if load is not None),
        )
        for _, _, i in order:
            if self._receivers[i].hand(sock, connection):
                self._next = (i + 1) % n
                return True
        return False

    def stop(self) -> None:
        """Tell every receiver to abort its associations and exit; kill those that do not in time."""
        self._stop.set()
        for receiver in self._receivers:
            receiver.ask_to_stop()
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for receiver in self._receivers:
            if receiver.thread.is_alive():
                receiver.thread.join(max(0.0, deadline - time.monotonic()))
            if receiver.thread.is_alive():
                receiver.kill()
                receiver.thread.join(STOP_TIMEOUT_S)
