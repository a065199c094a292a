"""The measurement database: one SQLite file, every result committed the moment it is measured.

Operator rows are keyed by the board's fingerprint (its target, RPC key and what the board reports about
itself), the workload key (:class:`~ohq_tvm.oqa.workloads.Workload`, the same for every model sharing
the operator) and the schedule the operator was built with. A failed measurement is stored too, with its
reason, and is measured again by the next run. Whole-model rows (``model_runs``: a uniform plan of one
model built whole and timed, see :mod:`.in_model`) are keyed by board, model, schedule and plan. A row
measured during a run whose timings contradicted each other is marked unreliable (``unreliable_*``
tables, with the reason): it is read as missing, so the next run times it again, which clears the mark.
Safe to share between threads of one process (one connection, one lock) and between processes (SQLite's
own locking, WAL journal).
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ..board.session import LatencyStats
from ..errors import OHQError
from .workloads import Workload

SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS boards (
    fingerprint TEXT PRIMARY KEY,
    label TEXT NOT NULL,
    description TEXT NOT NULL,
    first_seen REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS workloads (
    key TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    op TEXT NOT NULL,
    precision TEXT NOT NULL,
    label TEXT NOT NULL,
    descriptor TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS measurements (
    fingerprint TEXT NOT NULL REFERENCES boards(fingerprint),
    workload TEXT NOT NULL REFERENCES workloads(key),
    schedule TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('ok', 'failed')),
    median_ms REAL,
    min_ms REAL,
    iqr_ms REAL,
    repeats_ms TEXT,
    error TEXT,
    attempts INTEGER NOT NULL,
    worker TEXT NOT NULL,
    measured_at REAL NOT NULL,
    PRIMARY KEY (fingerprint, workload, schedule)
);
CREATE TABLE IF NOT EXISTS model_runs (
    fingerprint TEXT NOT NULL REFERENCES boards(fingerprint),
    model TEXT NOT NULL,
    schedule TEXT NOT NULL,
    plan TEXT NOT NULL,
    median_ms REAL NOT NULL,
    repeats_ms TEXT NOT NULL,
    measured_at REAL NOT NULL,
    PRIMARY KEY (fingerprint, model, schedule, plan)
);
CREATE TABLE IF NOT EXISTS unreliable_measurements (
    fingerprint TEXT NOT NULL,
    workload TEXT NOT NULL,
    schedule TEXT NOT NULL,
    reason TEXT NOT NULL,
    marked_at REAL NOT NULL,
    PRIMARY KEY (fingerprint, workload, schedule)
);
CREATE TABLE IF NOT EXISTS unreliable_model_runs (
    fingerprint TEXT NOT NULL,
    model TEXT NOT NULL,
    schedule TEXT NOT NULL,
    plan TEXT NOT NULL,
    reason TEXT NOT NULL,
    marked_at REAL NOT NULL,
    PRIMARY KEY (fingerprint, model, schedule, plan)
);
"""
# A marked row is what a run must not reuse: the tables were added without a schema change, so a
# database written before them opens as it is (they are created empty) and older readers ignore them.
_MARKED_MEASUREMENT = (
    "EXISTS (SELECT 1 FROM unreliable_measurements u WHERE u.fingerprint = m.fingerprint "
    "AND u.workload = m.workload AND u.schedule = m.schedule)"
)


def default_database_path() -> Path:
    """``$OHQ_TVM_DB``, else ``$XDG_CACHE_HOME/ohq-tvm/measurements.sqlite`` (``~/.cache`` by default)."""
    explicit = os.environ.get("OHQ_TVM_DB")
    if explicit:
        return Path(explicit)
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "ohq-tvm" / "measurements.sqlite"


@dataclass(frozen=True)
class Measurement:
    """One stored row."""

    fingerprint: str
    workload: Workload
    schedule: str
    status: str
    median_ms: float | None
    min_ms: float | None
    iqr_ms: float | None
    repeats_ms: tuple[float, ...]
    error: str | None
    attempts: int
    worker: str
    measured_at: float

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def to_json(self) -> dict:
        return {
            "board": self.fingerprint,
            "workload": self.workload.key,
            "label": self.workload.label,
            "kind": self.workload.kind,
            "precision": self.workload.precision.value,
            "schedule": self.schedule,
            "status": self.status,
            "median_ms": self.median_ms,
            "min_ms": self.min_ms,
            "iqr_ms": self.iqr_ms,
            "repeats_ms": list(self.repeats_ms),
            "error": self.error,
            "attempts": self.attempts,
            "worker": self.worker,
            "measured_at": self.measured_at,
            "descriptor": self.workload.to_json(),
        }


class LatencyDatabase:
    """Open the database at ``path`` (default :func:`default_database_path`), creating it and its folders
    unless ``create`` is false. Use as a context manager or call :meth:`close`.

    Raises :class:`OHQError` naming the path when it cannot be opened or created (not a database, a newer
    schema, a folder that cannot be made), or with ``create=False`` when there is no database there.
    """

    def __init__(self, path: str | os.PathLike | None = None, *, create: bool = True) -> None:
        self.path = Path(path) if path is not None else default_database_path()
        if not create and not self.path.is_file():
            raise OHQError(
                f"measurement database {self.path} does not exist; measure a model into it first "
                f"(`ohq-tvm measure MODEL --db {self.path}`) or give --db an existing database"
            )
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._conn = sqlite3.connect(self.path, check_same_thread=False, timeout=30.0)
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.executescript(_SCHEMA)
            version = self._conn.execute("SELECT value FROM meta WHERE name='schema'").fetchone()
            if version is None:
                self._conn.execute("INSERT INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
                self._conn.commit()
            elif int(version[0]) != SCHEMA_VERSION:
                raise OHQError(
                    f"measurement database {self.path} has schema {version[0]}, this ohq-tvm reads "
                    f"{SCHEMA_VERSION}; use another --db or clear it with `ohq-tvm db clear`"
                )
        except sqlite3.DatabaseError as err:
            raise OHQError(f"cannot open measurement database {self.path}: {err}") from None
        except OSError as err:  # its folder cannot be made
            raise OHQError(
                f"cannot open measurement database {self.path}: {err.strerror or err}; give --db a path "
                "in a writable folder"
            ) from None
        self._lock = threading.Lock()

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> LatencyDatabase:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            try:
                yield self._conn
                self._conn.commit()
            except BaseException:
                self._conn.rollback()
                raise

    # -- writing --------------------------------------------------------------------------------------
    def add_board(self, fingerprint: str, label: str, description: dict) -> None:
        with self._write() as conn:
            conn.execute(
                "INSERT OR IGNORE INTO boards VALUES (?, ?, ?, ?)",
                (fingerprint, label, json.dumps(description, sort_keys=True), time.time()),
            )

    def _add_workload(self, conn: sqlite3.Connection, workload: Workload) -> None:
        conn.execute(
            "INSERT OR IGNORE INTO workloads VALUES (?, ?, ?, ?, ?, ?)",
            (
                workload.key,
                workload.kind,
                workload.op,
                workload.precision.value,
                workload.label,
                json.dumps(workload.to_json(), sort_keys=True),
            ),
        )

    def record(
        self,
        fingerprint: str,
        workload: Workload,
        schedule: str,
        stats: LatencyStats,
        *,
        attempts: int = 1,
        worker: str = "",
    ) -> None:
        """Store a successful measurement (replacing an earlier failure), committed before returning."""
        with self._write() as conn:
            self._add_workload(conn, workload)
            conn.execute(
                "INSERT OR REPLACE INTO measurements VALUES (?, ?, ?, 'ok', ?, ?, ?, ?, NULL, ?, ?, ?)",
                (
                    fingerprint,
                    workload.key,
                    schedule,
                    stats.median_ms,
                    stats.min_ms,
                    stats.spread_ms,
                    json.dumps(list(stats.repeats_ms)),
                    attempts,
                    worker,
                    time.time(),
                ),
            )
            conn.execute(
                "DELETE FROM unreliable_measurements WHERE fingerprint=? AND workload=? AND schedule=?",
                (fingerprint, workload.key, schedule),
            )

    def record_failure(
        self,
        fingerprint: str,
        workload: Workload,
        schedule: str,
        error: str,
        *,
        attempts: int,
        worker: str = "",
    ) -> None:
        """Store why a workload could not be measured (never over a successful row)."""
        with self._write() as conn:
            self._add_workload(conn, workload)
            conn.execute(
                "INSERT INTO measurements VALUES (?, ?, ?, 'failed', NULL, NULL, NULL, NULL, ?, ?, ?, ?) "
                "ON CONFLICT DO UPDATE SET error=excluded.error, attempts=excluded.attempts, "
                "worker=excluded.worker, measured_at=excluded.measured_at WHERE status='failed'",
                (fingerprint, workload.key, schedule, error, attempts, worker, time.time()),
            )

    def record_model_run(
        self, fingerprint: str, model: str, schedule: str, plan: str, stats: LatencyStats
    ) -> None:
        """Store the end-to-end latency of ``model`` built with ``plan`` (committed before returning;
        clears an unreliable mark)."""
        with self._write() as conn:
            conn.execute(
                "DELETE FROM unreliable_model_runs WHERE fingerprint=? AND model=? AND schedule=? AND plan=?",
                (fingerprint, model, schedule, plan),
            )
            conn.execute(
                "INSERT OR REPLACE INTO model_runs VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    fingerprint,
                    model,
                    schedule,
                    plan,
                    stats.median_ms,
                    json.dumps(list(stats.repeats_ms)),
                    time.time(),
                ),
            )

    def model_run(self, fingerprint: str, model: str, schedule: str, plan: str) -> LatencyStats | None:
        """The stored end-to-end timing of ``model`` with ``plan`` on this board and schedule, if any and
        not marked unreliable."""
        with self._lock:
            row = self._conn.execute(
                "SELECT repeats_ms FROM model_runs r "
                "WHERE fingerprint=? AND model=? AND schedule=? AND plan=? AND NOT EXISTS "
                "(SELECT 1 FROM unreliable_model_runs u WHERE u.fingerprint = r.fingerprint "
                "AND u.model = r.model AND u.schedule = r.schedule AND u.plan = r.plan)",
                (fingerprint, model, schedule, plan),
            ).fetchone()
        return LatencyStats(tuple(json.loads(row[0]))) if row else None

    def mark_unreliable(self, fingerprint: str, schedule: str, since: float, reason: str) -> int:
        """Mark every successful operator row and whole-model row of this board and schedule measured at
        or after ``since`` (``time.time()``) as unreliable: later reads treat them as missing until they
        are measured again. Returns how many rows were marked."""
        now = time.time()
        with self._write() as conn:
            count = conn.execute(
                "INSERT OR REPLACE INTO unreliable_measurements SELECT fingerprint, workload, schedule, ?, ? "
                "FROM measurements WHERE fingerprint=? AND schedule=? AND status='ok' AND measured_at>=?",
                (reason, now, fingerprint, schedule, since),
            ).rowcount
            count += conn.execute(
                "INSERT OR REPLACE INTO unreliable_model_runs "
                "SELECT fingerprint, model, schedule, plan, ?, ? FROM model_runs "
                "WHERE fingerprint=? AND schedule=? AND measured_at>=?",
                (reason, now, fingerprint, schedule, since),
            ).rowcount
        return count

    def clear(self, fingerprint: str | None = None) -> int:
        """Delete the measurements of one board (all boards when ``None``); returns how many went."""
        with self._write() as conn:
            if fingerprint is None:
                count = conn.execute("DELETE FROM measurements").rowcount
                conn.execute("DELETE FROM model_runs")
                conn.execute("DELETE FROM unreliable_measurements")
                conn.execute("DELETE FROM unreliable_model_runs")
                conn.execute("DELETE FROM boards")
                conn.execute("DELETE FROM workloads")
            else:
                count = conn.execute("DELETE FROM measurements WHERE fingerprint=?", (fingerprint,)).rowcount
                conn.execute("DELETE FROM model_runs WHERE fingerprint=?", (fingerprint,))
                conn.execute("DELETE FROM unreliable_measurements WHERE fingerprint=?", (fingerprint,))
                conn.execute("DELETE FROM unreliable_model_runs WHERE fingerprint=?", (fingerprint,))
                conn.execute("DELETE FROM boards WHERE fingerprint=?", (fingerprint,))
        return count

    # -- reading --------------------------------------------------------------------------------------
    def latencies(
        self, fingerprint: str, schedule: str, keys: Iterable[str] | None = None
    ) -> dict[str, float]:
        """Median latency (ms) of every successfully measured workload of a board, by workload key (rows
        marked unreliable left out)."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT workload, median_ms FROM measurements m WHERE fingerprint=? AND schedule=? "
                f"AND status='ok' AND NOT {_MARKED_MEASUREMENT}",
                (fingerprint, schedule),
            ).fetchall()
        found = {key: float(ms) for key, ms in rows}
        if keys is None:
            return found
        wanted = set(keys)
        return {k: v for k, v in found.items() if k in wanted}

    def missing(self, fingerprint: str, schedule: str, workloads: Iterable[Workload]) -> list[Workload]:
        """The workloads without a successful measurement (not marked unreliable) on this board and
        schedule."""
        done = self.latencies(fingerprint, schedule)
        return [w for w in workloads if w.key not in done]

    def measurements(self, fingerprint: str | None = None) -> list[Measurement]:
        query = (
            "SELECT m.fingerprint, w.descriptor, m.schedule, m.status, m.median_ms, m.min_ms, m.iqr_ms, "
            "m.repeats_ms, m.error, m.attempts, m.worker, m.measured_at "
            "FROM measurements m JOIN workloads w ON w.key = m.workload"
        )
        args: tuple = ()
        if fingerprint is not None:
            query += " WHERE m.fingerprint=?"
            args = (fingerprint,)
        with self._lock:
            rows = self._conn.execute(query + " ORDER BY m.measured_at", args).fetchall()
        return [
            Measurement(
                fp,
                Workload.from_json(json.loads(descriptor)),
                schedule,
                status,
                median,
                low,
                iqr,
                tuple(json.loads(repeats)) if repeats else (),
                error,
                attempts,
                worker,
                at,
            )
            for fp, descriptor, schedule, status, median, low, iqr, repeats, error, attempts, worker, at in (
                rows
            )
        ]

    def boards(self) -> list[dict]:
        with self._lock:
            rows = self._conn.execute(
                "SELECT b.fingerprint, b.label, b.description, b.first_seen, COUNT(m.workload) "
                "FROM boards b LEFT JOIN measurements m ON m.fingerprint = b.fingerprint "
                "GROUP BY b.fingerprint"
            ).fetchall()
        return [
            {"fingerprint": fp, "label": label, "description": json.loads(desc), "first_seen": at, "rows": n}
            for fp, label, desc, at, n in rows
        ]


__all__ = ["LatencyDatabase", "Measurement", "default_database_path"]
