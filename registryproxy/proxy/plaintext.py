"""Answer a TLS handshake on the plain-HTTP port at once.

skopeo, podman and containerd try HTTPS first even for an insecure
registry and fall back to HTTP only when the HTTPS attempt fails.  A Twisted
HTTP server would wait for a request line that never comes, costing every
pull a 10 s handshake timeout; Go's servers answer a ClientHello with a 400
straight away, and so do we.
"""

from __future__ import annotations

from typing import Any

from twisted.protocols.policies import ProtocolWrapper, WrappingFactory

_TLS_RECORD = 0x16
_RESPONSE = b"HTTP/1.0 400 Bad Request\r\n\r\nClient sent an HTTP request to an HTTPS server.\n"


class _RejectTLS(ProtocolWrapper):
    _first = True

    def dataReceived(self, data: bytes) -> None:
        if self._first:
            self._first = False
            if data[:1] == bytes([_TLS_RECORD]):
                self.transport.write(_RESPONSE)  # type: ignore[union-attr]
                self.transport.loseConnection()  # type: ignore[union-attr]
                return
        super().dataReceived(data)


class PlainHTTPFactory(WrappingFactory[_RejectTLS]):
    """Wraps an HTTP factory (a Site) so TLS clients learn fast that it is plain HTTP."""

    protocol = _RejectTLS

    def buildProtocol(self, addr: Any) -> Any:
        # the wrapped factory may refuse the connection (too many already)
        wrapped = self.wrappedFactory.buildProtocol(addr)
        return None if wrapped is None else self.protocol(self, wrapped)
