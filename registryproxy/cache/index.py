"""What is cached about manifests and tags, in SQLite (WAL).

Manifest bytes live in the blob store by digest; this index remembers which
upstream repository they were fetched for, their media type, and which
digest a tag pointed to when (per media type, since a client that accepts
only single-platform manifests gets a different answer than one that takes
an index).
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterable

import attrs

_SCHEMA = """
CREATE TABLE IF NOT EXISTS manifests (
    upstream TEXT NOT NULL, repo TEXT NOT NULL, digest TEXT NOT NULL,
    media_type TEXT NOT NULL, size INTEGER NOT NULL, fetched_at REAL NOT NULL,
    PRIMARY KEY (upstream, repo, digest)
);
CREATE TABLE IF NOT EXISTS tags (
    upstream TEXT NOT NULL, repo TEXT NOT NULL, tag TEXT NOT NULL,
    media_type TEXT NOT NULL, digest TEXT NOT NULL, checked_at REAL NOT NULL,
    PRIMARY KEY (upstream, repo, tag, media_type)
);
-- which repositories may read which blobs: those whose manifests list
-- them, or whose upstream confirmed them
CREATE TABLE IF NOT EXISTS repo_blobs (
    upstream TEXT NOT NULL, repo TEXT NOT NULL, digest TEXT NOT NULL,
    PRIMARY KEY (upstream, repo, digest)
) WITHOUT ROWID;
"""


@attrs.frozen
class ManifestEntry:
    digest: str
    media_type: str
    size: int


@attrs.frozen
class TagEntry:
    digest: str
    media_type: str
    checked_at: float


class Index:
    def __init__(self, path: str) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        self._db.close()

    def manifest(self, upstream: str, repo: str, digest: str) -> ManifestEntry | None:
        row = self._db.execute(
            "SELECT digest, media_type, size FROM manifests"
            " WHERE upstream=? AND repo=? AND digest=?",
            (upstream, repo, digest),
        ).fetchone()
        return ManifestEntry(*row) if row else None

    def put_manifest(
        self, upstream: str, repo: str, entry: ManifestEntry, fetched_at: float
    ) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO manifests VALUES (?, ?, ?, ?, ?, ?)",
            (upstream, repo, entry.digest, entry.media_type, entry.size, fetched_at),
        )

    def link_blobs(self, upstream: str, repo: str, digests: Iterable[str]) -> None:
        self._db.executemany(
            "INSERT OR IGNORE INTO repo_blobs VALUES (?, ?, ?)",
            [(upstream, repo, digest) for digest in digests],
        )

    def has_blob(self, upstream: str, repo: str, digest: str) -> bool:
        row = self._db.execute(
            "SELECT 1 FROM repo_blobs WHERE upstream=? AND repo=? AND digest=?",
            (upstream, repo, digest),
        ).fetchone()
        return row is not None

    def tags(self, upstream: str, repo: str, tag: str) -> list[TagEntry]:
        rows = self._db.execute(
            "SELECT digest, media_type, checked_at FROM tags"
            " WHERE upstream=? AND repo=? AND tag=? ORDER BY checked_at DESC",
            (upstream, repo, tag),
        ).fetchall()
        return [TagEntry(*row) for row in rows]

    def put_tag(self, upstream: str, repo: str, tag: str, entry: TagEntry) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO tags VALUES (?, ?, ?, ?, ?, ?)",
            (upstream, repo, tag, entry.media_type, entry.digest, entry.checked_at),
        )
