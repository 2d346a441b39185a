"""Durable study state in SQLite (WAL): rater tokens, issued pairs and votes.

Every vote is committed before the HTTP reply (``synchronous=FULL``), so a crash or restart loses nothing.
A vote row is keyed by the pair it answers (``UNIQUE``), so a replayed or duplicated request can never be
recorded twice; pairs are keyed per rater by their comparison (prompt, seed, unordered system pair), so a
rater is never issued the same comparison twice.
"""

from __future__ import annotations

import secrets
import sqlite3
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

DB_NAME = "votes.sqlite"
ANSWERS = ("left", "right", "tie", "both_bad")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS raters (
    token TEXT PRIMARY KEY, name TEXT NOT NULL UNIQUE, created_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS pairs (
    id TEXT PRIMARY KEY, rater TEXT NOT NULL REFERENCES raters(name), prompt INTEGER NOT NULL,
    seed INTEGER NOT NULL, sys_a TEXT NOT NULL, sys_b TEXT NOT NULL, left_sys TEXT NOT NULL,
    right_sys TEXT NOT NULL, issued_at REAL NOT NULL,
    UNIQUE (rater, prompt, seed, sys_a, sys_b), CHECK (sys_a < sys_b));
CREATE TABLE IF NOT EXISTS votes (
    id INTEGER PRIMARY KEY AUTOINCREMENT, pair_id TEXT NOT NULL UNIQUE REFERENCES pairs(id),
    rater TEXT NOT NULL, prompt INTEGER NOT NULL, seed INTEGER NOT NULL, left_sys TEXT NOT NULL,
    right_sys TEXT NOT NULL, answer TEXT NOT NULL CHECK (answer IN ('left', 'right', 'tie', 'both_bad')),
    created_at REAL NOT NULL, latency_s REAL);
CREATE INDEX IF NOT EXISTS pairs_by_rater ON pairs (rater);
CREATE INDEX IF NOT EXISTS pairs_by_systems ON pairs (sys_a, sys_b, prompt, seed);
"""


class VoteRejected(Exception):
    """A vote the store refuses; ``status`` is the HTTP status code the web app answers with."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


class Store:
    """Thread-safe access to ``DIR/votes.sqlite`` (one connection per thread, writes serialised by a lock)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._local = threading.local()
        self.write_lock = threading.RLock()
        with self.write_lock:
            self._conn().executescript(_SCHEMA)  # executescript manages its own transaction

    # ------------------------------------------------------------------ connections
    def _conn(self) -> sqlite3.Connection:
        c = getattr(self._local, "conn", None)
        if c is None:
            c = sqlite3.connect(self.path, timeout=30.0, isolation_level=None, check_same_thread=False)
            c.row_factory = sqlite3.Row
            c.execute("PRAGMA journal_mode=WAL")
            c.execute("PRAGMA synchronous=FULL")
            c.execute("PRAGMA foreign_keys=ON")
            self._local.conn = c
        return c

    @contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        """A write transaction (BEGIN IMMEDIATE ... COMMIT), serialised across this process's threads."""
        with self.write_lock:
            c = self._conn()
            c.execute("BEGIN IMMEDIATE")
            try:
                yield c
            except BaseException:
                c.execute("ROLLBACK")
                raise
            c.execute("COMMIT")

    def query(self, sql: str, args: tuple = ()) -> list[sqlite3.Row]:
        """Rows of a read-only query."""
        return self._conn().execute(sql, args).fetchall()

    def close(self) -> None:
        """Close this thread's connection (others close with their threads)."""
        c = getattr(self._local, "conn", None)
        if c is not None:
            c.close()
            self._local.conn = None

    # ------------------------------------------------------------------ meta and raters
    def admin_token(self, wanted: str | None = None) -> str:
        """The study's admin token (created on first use; ``wanted`` replaces it)."""
        with self.tx() as c:
            row = c.execute("SELECT value FROM meta WHERE key='admin_token'").fetchone()
            if wanted:
                c.execute("INSERT OR REPLACE INTO meta VALUES ('admin_token', ?)", (wanted,))
                return wanted
            if row:
                return row["value"]
            tok = secrets.token_urlsafe(18)
            c.execute("INSERT INTO meta VALUES ('admin_token', ?)", (tok,))
            return tok

    def add_rater(self, name: str | None = None) -> tuple[str, str]:
        """Register a rater; returns (name, token). Raises VoteRejected(409) for a taken name."""
        tok = secrets.token_urlsafe(18)
        with self.tx() as c:
            if name is None:
                n = c.execute("SELECT COUNT(*) FROM raters").fetchone()[0]
                name = f"rater-{n + 1:03d}"
                while c.execute("SELECT 1 FROM raters WHERE name=?", (name,)).fetchone():
                    n += 1
                    name = f"rater-{n + 1:03d}"
            elif c.execute("SELECT 1 FROM raters WHERE name=?", (name,)).fetchone():
                raise VoteRejected(409, f"rater name {name!r} is taken")
            c.execute("INSERT INTO raters VALUES (?, ?, ?)", (tok, name, time.time()))
        return name, tok

    def rater_of(self, token: str | None) -> str | None:
        """The rater name of a token, or None."""
        if not token:
            return None
        row = self.query("SELECT name FROM raters WHERE token=?", (token,))
        return row[0]["name"] if row else None

    def raters(self) -> list[dict[str, Any]]:
        """All raters with their tokens."""
        return [dict(r) for r in self.query("SELECT name, token, created_at FROM raters ORDER BY created_at")]

    # ------------------------------------------------------------------ pairs and votes
    def pending_pair(self, rater: str) -> sqlite3.Row | None:
        """The rater's issued but unanswered pair, if any."""
        rows = self.query("SELECT p.* FROM pairs p LEFT JOIN votes v ON v.pair_id = p.id "
                          "WHERE p.rater=? AND v.id IS NULL ORDER BY p.issued_at LIMIT 1", (rater,))
        return rows[0] if rows else None

    def issue_pair(self, c: sqlite3.Connection, rater: str, prompt: int, seed: int, left: str, right: str) -> str:
        """Insert an issued pair inside the caller's transaction; returns its unguessable id."""
        pid = secrets.token_urlsafe(12)
        a, b = sorted((left, right))
        c.execute("INSERT INTO pairs VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                  (pid, rater, prompt, seed, a, b, left, right, time.time()))
        return pid

    def get_pair(self, pair_id: str) -> sqlite3.Row | None:
        """An issued pair by id."""
        rows = self.query("SELECT * FROM pairs WHERE id=?", (pair_id,))
        return rows[0] if rows else None

    def record_vote(self, rater: str, pair_id: str, answer: str) -> int:
        """Store a vote for an issued pair of this rater; returns the vote id.

        Raises VoteRejected: 422 unknown answer, 404 unknown pair, 403 another rater's pair, 409 already answered.
        """
        if answer not in ANSWERS:
            raise VoteRejected(422, f"answer must be one of {', '.join(ANSWERS)}, got {answer!r}")
        with self.tx() as c:
            p = c.execute("SELECT * FROM pairs WHERE id=?", (pair_id,)).fetchone()
            if p is None:
                raise VoteRejected(404, f"pair {pair_id!r} was never issued by this server")
            if p["rater"] != rater:
                raise VoteRejected(403, f"pair {pair_id!r} was issued to another rater")
            if c.execute("SELECT 1 FROM votes WHERE pair_id=?", (pair_id,)).fetchone():
                raise VoteRejected(409, f"pair {pair_id!r} has already been answered")
            now = time.time()
            cur = c.execute(
                "INSERT INTO votes (pair_id, rater, prompt, seed, left_sys, right_sys, answer, created_at, latency_s) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (pair_id, rater, p["prompt"], p["seed"], p["left_sys"], p["right_sys"], answer, now,
                 now - p["issued_at"]))
            return int(cur.lastrowid)

    def votes(self) -> list[dict[str, Any]]:
        """Every vote, oldest first."""
        return [dict(r) for r in self.query("SELECT * FROM votes ORDER BY id")]

    def n_votes(self, rater: str | None = None) -> int:
        """Number of stored votes (of one rater, or all)."""
        if rater is None:
            return int(self.query("SELECT COUNT(*) FROM votes")[0][0])
        return int(self.query("SELECT COUNT(*) FROM votes WHERE rater=?", (rater,))[0][0])
