"""A TCP shim between regproxy and the upstream registry, to break things on cue.

Plain threads and sockets (the tests are synchronous). It forwards bytes both
ways and counts what each connection has sent back (upstream -> client). Armed
with :meth:`TCPShim.cut_after`, a connection whose response passes N bytes is
reset on both sides and the shim goes down (connections refused) until
:meth:`TCPShim.up`: "the upstream died mid-blob". :meth:`TCPShim.on_response_bytes`
instead calls a function once (e.g. SIGKILL the registry) and keeps forwarding
whatever the dead upstream's socket still delivers. :attr:`TCPShim.rate`
slows responses down, so that concurrent requests surely overlap.

The upstream socket gets a small receive buffer, so at the moment of a cut or
a kill little more than N bytes have left the registry.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Callable

_RCVBUF = 128 * 1024
_CHUNK = 64 * 1024


def _reset(sock: socket.socket) -> None:
    """Close with RST instead of FIN: the peer sees a broken connection."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        # Wake a thread blocked in recv() on it: until that returns, the kernel
        # keeps the socket alive and close() alone sends nothing.
        sock.shutdown(socket.SHUT_RD)
    except OSError:
        pass
    sock.close()


class TCPShim:
    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self.port = 0
        self._listener: socket.socket | None = None
        self._lock = threading.Lock()
        self._conns: list[tuple[socket.socket, socket.socket]] = []
        self._threshold: int | None = None
        self._action: Callable[[], None] | None = None
        self._cut = False
        #: set once the armed threshold has fired (after its action ran: a client
        #: may see the effect first, so wait on it rather than test it)
        self.fired = threading.Event()
        #: total response bytes forwarded per connection, in accept order
        self.response_bytes: list[int] = []
        #: responses flow at most this fast (bytes/s) per connection; None: no limit
        self.rate: float | None = None
        self._mode: str | None = None
        self._flowing = threading.Event()
        self._flowing.set()

    # -- lifecycle ------------------------------------------------------------
    def up(self) -> None:
        """Start listening (again, on the same port once it has one)."""
        with self._lock:
            if self._listener is not None:
                return
            listener = socket.socket()
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind(("127.0.0.1", self.port))
            listener.listen(64)
            self.port = listener.getsockname()[1]
            self._listener = listener
        threading.Thread(
            target=self._accept_loop, args=(listener,), daemon=True, name="shim-accept"
        ).start()

    def down(self) -> None:
        """Stop listening (new connections are refused) and reset open ones."""
        with self._lock:
            listener, self._listener = self._listener, None
            conns, self._conns = self._conns, []
            self._flowing.set()
        if listener is not None:
            try:
                listener.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            listener.close()
        for client, upstream in conns:
            _reset(client)
            _reset(upstream)

    close = down

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # -- faults -----------------------------------------------------------------
    def cut_after(self, nbytes: int) -> None:
        """The next response to pass *nbytes* is reset, then the shim goes down."""
        with self._lock:
            self._threshold, self._action, self._cut = nbytes, None, True
            self.fired.clear()

    def on_response_bytes(self, nbytes: int, action: Callable[[], None]) -> None:
        """Call *action* once, when a response first passes *nbytes*."""
        with self._lock:
            self._threshold, self._action, self._cut = nbytes, action, False
            self.fired.clear()

    def corrupt_at(self, nbytes: int) -> None:
        """Flip one bit of the next response at byte *nbytes*: the body
        arrives whole but wrong (the headers are well under *nbytes*)."""
        with self._lock:
            self._threshold, self._action, self._cut = nbytes, None, False
            self._mode = "corrupt"
            self.fired.clear()

    def stall_at(self, nbytes: int) -> None:
        """The next response to pass *nbytes* stops flowing, the connection
        held open, until :meth:`disarm` or :meth:`down`."""
        with self._lock:
            self._threshold, self._action, self._cut = nbytes, None, False
            self._mode = "stall"
            self._flowing.clear()
            self.fired.clear()

    def disarm(self) -> None:
        with self._lock:
            self._threshold, self._action, self._cut = None, None, False
            self._mode = None
            self._flowing.set()

    # -- plumbing ---------------------------------------------------------------
    def _accept_loop(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # listener closed
            upstream = socket.socket()
            upstream.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _RCVBUF)
            try:
                upstream.connect(self.target)
            except OSError:
                _reset(client)
                upstream.close()
                continue
            with self._lock:
                self._conns.append((client, upstream))
                index = len(self.response_bytes)
                self.response_bytes.append(0)
            threading.Thread(
                target=self._pump_request, args=(client, upstream), daemon=True
            ).start()
            threading.Thread(
                target=self._pump_response, args=(upstream, client, index), daemon=True
            ).start()

    def _pump_request(self, client: socket.socket, upstream: socket.socket) -> None:
        try:
            while data := client.recv(_CHUNK):
                upstream.sendall(data)
            upstream.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def _pump_response(self, upstream: socket.socket, client: socket.socket, index: int) -> None:
        try:
            while data := upstream.recv(_CHUNK):
                fire = None
                with self._lock:
                    before = self.response_bytes[index]
                    self.response_bytes[index] += len(data)
                    if (
                        self._threshold is not None
                        and self.response_bytes[index] >= self._threshold
                    ):
                        fire = self._mode or ("cut" if self._cut else "action")
                        action = self._action
                        at = self._threshold - before
                        self._threshold = self._action = None
                        self._mode = None
                if fire == "corrupt":
                    flipped = data[at - 1] ^ 0x01 if at > 0 else data[0] ^ 0x01
                    position = max(at - 1, 0)
                    data = data[:position] + bytes([flipped]) + data[position + 1 :]
                    self.fired.set()
                if fire == "stall":
                    client.sendall(data[: max(at - 1, 0)])
                    self.fired.set()
                    self._flowing.wait()
                    data = data[max(at - 1, 0) :]
                client.sendall(data)
                if self.rate:
                    time.sleep(len(data) / self.rate)
                if fire == "cut":
                    self.fired.set()
                    self.down()
                    return
                if fire == "action":
                    assert action is not None
                    action()
                    self.fired.set()
            client.shutdown(socket.SHUT_WR)
        except OSError:
            _reset(client)
            return
        finally:
            with self._lock:
                pair = (client, upstream)
                if pair in self._conns:
                    self._conns.remove(pair)
        upstream.close()
        client.close()
