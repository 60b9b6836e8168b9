"""TLS on the proxy port, its certificate reloadable without a restart.

Twisted's own ``ssl:`` endpoint reads its files once.  regproxy takes the
same description, listens on the plain ``tcp:`` endpoint under it and adds
TLS itself, through a connection creator whose certificate can be swapped:
connections made after :meth:`ServerCertificate.reload` get the new one,
open ones keep their session.  Blobs over TLS go through memory (sendfile
would put plaintext on the wire, see :func:`.sendfile.socket_transport`).
"""

from __future__ import annotations

import datetime
import re
from typing import Any

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa
from OpenSSL import SSL, crypto
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator, IProtocolFactory
from twisted.internet.ssl import CertificateOptions
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from zope.interface import implementer

log = Logger()

#: a certificate, key or CA file larger than this is refused, not read
_MAX_FILE = 1024 * 1024
#: keys of Twisted's ssl: description that regproxy reads itself
_FILES = {"privateKey": "private_key", "certKey": "cert", "extraCertChain": "chain"}
#: keys passed on to the tcp: endpoint under it
_TCP = {"port", "interface", "backlog"}
_SEPARATOR = re.compile(r"(?<!\\):")
#: keys that can sign a TLS handshake (and that pyOpenSSL takes)
_SigningKey = (
    rsa.RSAPrivateKey
    | ec.EllipticCurvePrivateKey
    | ed25519.Ed25519PrivateKey
    | ed448.Ed448PrivateKey
    | dsa.DSAPrivateKey
)


class TLSError(ValueError):
    """A certificate, key or CA file that cannot be used; the message names
    the configuration *key* it came from."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key


@attrs.frozen
class TLSListen:
    """An ``ssl:`` description taken apart."""

    #: the plain TCP endpoint to listen on
    tcp: str
    private_key: str
    #: the certificate file (Twisted's default: the private key's file)
    cert: str
    #: more certificates from the server's to the root
    chain: str | None = None


def parse_listen(description: str) -> TLSListen | None:
    """The TLS listener *description* asks for; None if it is not ``ssl:``."""
    kind, *parts = _SEPARATOR.split(description)
    if kind != "ssl":
        return None
    tcp, files = ["tcp"], {}
    for part in parts:
        name, equals, value = part.partition("=")
        if not equals:
            name, value = "port", part
        if name in _FILES:
            files[_FILES[name]] = re.sub(r"\\(.)", r"\1", value)
        elif name in _TCP:
            tcp.append(part)
        else:
            raise TLSError(
                "listen",
                f"{description!r}: {name!r} is not supported here (use port, interface, "
                "backlog, privateKey, certKey, extraCertChain)",
            )
    if "private_key" not in files:
        raise TLSError("listen", f"{description!r}: privateKey=FILE is missing")
    files.setdefault("cert", files["private_key"])
    return TLSListen(":".join(tcp), **files)


def _read(key: str, path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read(_MAX_FILE + 1)
    except OSError as e:
        raise TLSError(key, f"cannot read {what} {path!r}: {e.strerror}") from None
    if len(data) > _MAX_FILE:
        raise TLSError(key, f"{what} {path!r} is over {_MAX_FILE} bytes: not a PEM file?")
    return data


def _certificates(key: str, path: str, what: str) -> list[x509.Certificate]:
    data = _read(key, path, what)
    try:
        found = x509.load_pem_x509_certificates(data)
    except ValueError:
        found = []
    if not found:
        raise TLSError(key, f"no PEM certificate in {what} {path!r}")
    return found


def _private_key(path: str) -> _SigningKey:
    data = _read("listen", path, "privateKey")
    try:
        private = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as e:
        # the message of a passphrase-protected key says so
        raise TLSError("listen", f"no usable PEM key in privateKey {path!r}: {e}") from None
    if not isinstance(private, _SigningKey):
        raise TLSError("listen", f"privateKey {path!r}: this kind of key cannot sign handshakes")
    return private


def load_context(listen: TLSListen, client_ca: str | None = None) -> SSL.Context:
    """The TLS settings from the files; :class:`TLSError` names what is wrong.

    Twisted's :class:`CertificateOptions` makes the context (protocol
    versions, ciphers, sessions); the key and certificates go into it here
    as cryptography's objects, which pyOpenSSL takes without the
    deprecation of its own ``X509`` and ``PKey`` (that Twisted would pass)."""
    private, leaf, chain, authorities = _files(listen, client_ca)
    options = CertificateOptions(
        # with a client CA: no certificate signed by it, no connection
        verify=bool(authorities),
        requireCertificate=bool(authorities),
        caCerts=[crypto.X509.from_cryptography(c) for c in authorities] or None,
    )
    try:
        context = options.getContext()
        context.use_certificate(leaf)
        context.use_privatekey(private)
        context.check_privatekey()
        for certificate in chain:
            context.add_extra_chain_cert(certificate)
    except SSL.Error as e:
        raise TLSError("listen", f"OpenSSL refuses {listen.cert!r}: {e}") from None
    return context


def _files(
    listen: TLSListen, client_ca: str | None
) -> tuple[_SigningKey, x509.Certificate, list[x509.Certificate], list[x509.Certificate]]:
    """The key, the certificate, its chain and the client CAs, checked."""
    private = _private_key(listen.private_key)
    leaf, *chain = _certificates("listen", listen.cert, "certKey")
    if listen.chain is not None:
        chain += _certificates("listen", listen.chain, "extraCertChain")
    public = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    if leaf.public_key().public_bytes(der, public) != private.public_key().public_bytes(
        der, public
    ):
        raise TLSError(
            "listen",
            f"the private key in {listen.private_key!r} does not match the certificate "
            f"in {listen.cert!r}",
        )
    now = datetime.datetime.now(datetime.UTC)
    if leaf.not_valid_after_utc < now:
        raise TLSError(
            "listen", f"the certificate in {listen.cert!r} expired on {leaf.not_valid_after_utc}"
        )
    authorities = [] if client_ca is None else _certificates("client_ca", client_ca, "CA file")
    return private, leaf, chain, authorities


@implementer(IOpenSSLServerConnectionCreator)
class ServerCertificate:
    """The proxy port's TLS settings, read again from their files by :meth:`reload`."""

    def __init__(self, listen: TLSListen, client_ca: str | None = None) -> None:
        self._listen = listen
        self._client_ca = client_ca
        self._context = load_context(listen, client_ca)

    def reload(self) -> bool:
        """Read the files again; if they cannot be used, keep the settings in use."""
        try:
            context = load_context(self._listen, self._client_ca)
        except TLSError as e:
            log.error("TLS certificate not reloaded, the old one stays: {why}", why=e)
            return False
        self._context = context
        log.info("TLS certificate reloaded from {cert}", cert=self._listen.cert)
        return True

    def serverConnectionForTLS(self, tlsProtocol: TLSMemoryBIOProtocol) -> SSL.Connection:
        return SSL.Connection(self._context, None)


class TLSFactory(TLSMemoryBIOFactory):
    """TLS over a factory that may refuse a connection (a full :class:`GuardedSite`)."""

    def __init__(self, certificate: ServerCertificate, factory: IProtocolFactory) -> None:
        super().__init__(certificate, False, factory)

    def buildProtocol(self, addr: Any) -> Any:
        wrapped = self.wrappedFactory.buildProtocol(addr)
        return None if wrapped is None else self.protocol(self, wrapped)
