"""How to reach the cluster's engines: the settings the config parses.

Plain values, apart from the engines' client libraries (boto3, psycopg),
which cost a start-up about 0.4 s: a single node, which never uses them,
does not import them (psycopg is imported here only to read a DSN).
"""

from __future__ import annotations

from urllib.parse import urlsplit

import attrs


def redacted_dsn(dsn: str) -> str:
    """*dsn* as shown in logs and reprs: its password starred."""
    from psycopg import ProgrammingError
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    try:
        params = conninfo_to_dict(dsn)
    except ProgrammingError:
        return "<unparsable DSN>"
    if "password" in params:
        params["password"] = "***"
    return repr(make_conninfo("", **params))


@attrs.frozen
class PgSettings:
    #: libpq connection string or URI; its password is never shown
    dsn: str = attrs.field(repr=redacted_dsn)
    #: connections the pool keeps open, and the most it opens
    min_size: int = 1
    max_size: int = 8
    #: seconds to wait for a new connection to PostgreSQL (libpq counts whole seconds, >= 2)
    connect_timeout: float = 5.0
    #: seconds a query waits for a free pooled connection before failing
    acquire_timeout: float = 10.0
    #: seconds a request's work on the index may take (waiting for a
    #: connection included) before the request is answered 503: a server that
    #: keeps its connections and never answers (stopped, stuck on its storage)
    #: holds no client longer
    query_timeout: float = 30.0
    #: leases held at once by this node; each holds a connection of its own
    max_leases: int = 16
    #: seconds of silence after which the server probes a lease holder's
    #: connection (TCP keepalive), so that a node that vanished without
    #: closing its connections (power cut, partition) loses its leases in
    #: about keepalive_idle + 3 * keepalive_interval seconds
    keepalive_idle: int = 10
    keepalive_interval: int = 5

    def __attrs_post_init__(self) -> None:
        from psycopg import ProgrammingError
        from psycopg.conninfo import conninfo_to_dict

        try:
            conninfo_to_dict(self.dsn)
        except ProgrammingError:
            # psycopg's message quotes the DSN, password and all
            raise ValueError(
                "dsn: expected a libpq connection string (host=... dbname=...) or a "
                "postgresql:// URI; the value is not shown, as it may hold a password"
            ) from None
        if not 0 <= self.min_size <= self.max_size or self.max_size < 1:
            raise ValueError("min_size, max_size: need 0 <= min_size <= max_size, max_size >= 1")
        if self.max_leases < 1:
            raise ValueError("max_leases: must be at least 1")
        if not self.query_timeout > 0:
            raise ValueError("query_timeout: must be more than 0 seconds")

    @property
    def libpq_connect_timeout(self) -> int:
        return max(2, round(self.connect_timeout))


@attrs.frozen
class S3Settings:
    """Where the blobs live, and how to reach them."""

    bucket: str
    #: an S3-compatible service's URL (``http://127.0.0.1:8080``); None: AWS
    endpoint: str | None = None
    #: put before every key (``"regproxy/"``), so that one bucket can hold more
    prefix: str = ""
    region: str = "us-east-1"
    #: ``host/bucket/key`` rather than ``bucket.host/key``; None: True when an
    #: endpoint is given (S3-compatible services rarely have per-bucket DNS)
    path_style: bool | None = None
    #: None: boto3's own lookup (environment, ~/.aws, instance role)
    access_key: str | None = None
    secret_key: str | None = attrs.field(default=None, repr=False)
    #: PEM bundle of the CAs to trust for an https endpoint, instead of the system's
    ca_file: str | None = None
    #: seconds to wait for a TCP (and TLS) connection
    connect_timeout: float = 5.0
    #: seconds to wait for a response, and the longest silence mid-body
    read_timeout: float = 30.0
    #: attempts per call, the first included (botocore's "standard" retry mode:
    #: connection errors, 5xx, throttling)
    max_attempts: int = 3

    def __attrs_post_init__(self) -> None:
        if not self.bucket:
            raise ValueError("bucket: is empty")
        if self.endpoint is not None:
            parts = urlsplit(self.endpoint)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError(f"endpoint: expected http(s)://host[:port], got {self.endpoint!r}")
        if self.prefix.startswith("/"):
            raise ValueError(f"prefix: must not start with '/', got {self.prefix!r}")
        if (self.access_key is None) != (self.secret_key is None):
            raise ValueError("access_key and secret_key: give both or neither")
        if self.max_attempts < 1:
            raise ValueError("max_attempts: must be at least 1")

    @property
    def addressing_style(self) -> str:
        path_style = self.path_style if self.path_style is not None else bool(self.endpoint)
        return "path" if path_style else "virtual"
