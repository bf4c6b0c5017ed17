"""The export's join on disk: a window's outcomes, requests and predictions in SQLite, rows read back
in row groups, so the memory an export needs does not grow with its window.

:class:`SpillJoin` takes the events of one route a batch at a time, in the order the export reads
the topics: outcomes first (those with ``ts`` in [since, until), the last one per request id
wins, as in feedback.export.join_rows), then requests and predictions, of which only those whose
request id has such an outcome are kept. :meth:`SpillJoin.finish` joins them in one statement,
in feedback.export's row order; :meth:`SpillJoin.groups` reads the rows back as lists of at most
``max_rows`` rows and about ``max_bytes`` bytes of stored JSON.

Memory: SQLite's page cache (``cache_mib``, 16 MiB by default; its sorter spills to temporary
files beyond that) plus the batch or row group in hand. Disk: the window's outcomes and the
requests and predictions that join them (about their JSON size, twice during the final sort), in
a temporary folder (``folder``, default the system's, i.e. ``$TMPDIR``) deleted by :meth:`close`.
No row is ever dropped for lack of memory.
"""

from __future__ import annotations

import sqlite3
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import TypeAlias

import orjson

from banditgate.jsontypes import JSONObject, JSONValue
from feedback.export import PREDICTION_FIELDS, ExportError, make_row, outcome_time

_SCHEMA = """
CREATE TABLE outcomes (request_id TEXT PRIMARY KEY, ts REAL NOT NULL, body BLOB NOT NULL) WITHOUT ROWID;
CREATE TABLE requests (request_id TEXT PRIMARY KEY, body BLOB NOT NULL) WITHOUT ROWID;
CREATE TABLE predictions (seq INTEGER PRIMARY KEY, request_id TEXT NOT NULL, shadow INTEGER NOT NULL,
                          arm_key TEXT NOT NULL, body BLOB NOT NULL);
"""
# seq keeps repeats of one prediction in read order, as join_rows' stable sort does
_JOIN = """
CREATE TABLE joined AS
SELECT p.request_id AS request_id, p.body AS prediction, r.body AS request, o.body AS outcome, o.ts AS ts
FROM predictions p JOIN outcomes o ON o.request_id = p.request_id
LEFT JOIN requests r ON r.request_id = p.request_id
ORDER BY o.ts, p.request_id, p.shadow, p.arm_key, p.seq
"""

_Row: TypeAlias = tuple[str | int | float | bytes, ...]
"""One row of parameters for the spill database (sqlite3)."""


class SpillJoin:
    """One route's window joined on disk (see the module docstring). Not thread-safe: one thread
    calls every method. Raises ExportError when the temporary folder cannot be written."""

    def __init__(self, route: str, since: float, until: float | None, folder: str | None = None,
                 cache_mib: int = 16) -> None:
        self.route, self.since, self.until = route, since, until
        self.outcomes = self.requests = self.predictions = self.rows = 0
        """What was kept (outcomes: distinct request ids), and the rows `finish` joined."""
        try:
            self._folder = tempfile.TemporaryDirectory(prefix="banditgate-export-", dir=folder)
            self._db = sqlite3.connect(str(Path(self._folder.name) / "join.sqlite"), isolation_level=None)
            # a scratch database: no journal, no fsync; the cache bounds SQLite's memory
            for pragma in ("journal_mode = OFF", "synchronous = OFF", "temp_store = FILE",
                           f"cache_size = {-1024 * int(cache_mib)}"):
                self._db.execute(f"PRAGMA {pragma}")
            self._db.executescript(_SCHEMA)
        except (OSError, sqlite3.Error) as exc:
            raise ExportError(f"cannot spill the export's join to {folder or tempfile.gettempdir()}: {exc}") from None

    def add_outcomes(self, events: Iterable[Mapping[str, JSONValue]]) -> None:
        """Outcomes with ``ts`` in the window (the last one of a request id wins)."""
        def rows() -> Iterator[_Row]:
            for event in events:
                ts = outcome_time(event, self.since, self.until)
                if ts is not None:
                    yield (str(event.get("request_id")), ts,
                           orjson.dumps({"reward": event.get("reward"), "label": event.get("label")}))
        self._run("INSERT OR REPLACE INTO outcomes VALUES (?, ?, ?)", rows())

    def add_requests(self, events: Iterable[Mapping[str, JSONValue]]) -> None:
        """Requests of the route whose request id has an outcome in the window (the last one wins)."""
        def rows() -> Iterator[_Row]:
            for event in events:
                if event.get("route") == self.route:
                    request_id = str(event.get("request_id"))
                    yield request_id, orjson.dumps({"inputs": event.get("inputs"), "unit_id": event.get("unit_id")}), \
                        request_id
        self._run("INSERT OR REPLACE INTO requests SELECT ?, ? WHERE EXISTS "
                  "(SELECT 1 FROM outcomes WHERE request_id = ?)", rows())

    def add_predictions(self, events: Iterable[Mapping[str, JSONValue]]) -> None:
        """Predictions (serving or shadow) of the route whose request id has an outcome in the window."""
        def rows() -> Iterator[_Row]:
            for event in events:
                if event.get("route") == self.route:
                    request_id = str(event.get("request_id"))
                    fields = {name: event.get(name) for name in PREDICTION_FIELDS}
                    yield request_id, int(bool(fields["shadow"])), str(fields["arm"]), orjson.dumps(fields), request_id
        self._run("INSERT INTO predictions (request_id, shadow, arm_key, body) SELECT ?, ?, ?, ? WHERE EXISTS "
                  "(SELECT 1 FROM outcomes WHERE request_id = ?)", rows())

    def finish(self) -> int:
        """Join what was added, in row order; returns the number of rows."""
        try:
            self._db.execute(_JOIN)
            self.rows = int(self._db.execute("SELECT count(*) FROM joined").fetchone()[0])
            self.outcomes = int(self._db.execute("SELECT count(*) FROM outcomes").fetchone()[0])
            self.requests = int(self._db.execute("SELECT count(*) FROM requests").fetchone()[0])
            self.predictions = int(self._db.execute("SELECT count(*) FROM predictions").fetchone()[0])
            self._db.execute("DROP TABLE predictions")  # its pages are reused by nothing else; free the space
        except sqlite3.Error as exc:
            raise ExportError(f"the export's join failed: {exc}") from None
        return self.rows

    def groups(self, max_rows: int, max_bytes: int) -> Iterator[list[JSONObject]]:
        """The joined rows (after `finish`) in order, as lists of at most `max_rows` rows and, past
        the first row, at most about `max_bytes` bytes of stored JSON (a single larger row is one
        group of its own)."""
        if max_rows < 1 or max_bytes < 1:
            raise ValueError(f"max_rows and max_bytes must be >= 1, got {max_rows}, {max_bytes}")
        cursor = self._db.execute("SELECT request_id, prediction, request, outcome, ts FROM joined ORDER BY rowid")
        group: list[JSONObject] = []
        size = 0
        while True:
            fetched = cursor.fetchmany(256)
            if not fetched:
                break
            for request_id, prediction, request, outcome, ts in fetched:
                weight = len(prediction) + len(request or b"") + len(outcome)
                if group and (len(group) >= max_rows or size + weight > max_bytes):
                    yield group
                    group, size = [], 0
                event = orjson.loads(prediction)
                event["request_id"] = request_id
                group.append(make_row(self.route, event, orjson.loads(request) if request else None,
                                      orjson.loads(outcome), ts))
                size += weight
        if group:
            yield group

    def close(self) -> None:
        """Delete the temporary database."""
        self._db.close()
        self._folder.cleanup()

    def _run(self, statement: str, rows: Iterator[_Row]) -> None:
        # rows come from a generator: orjson's output buffers are large (a 3 kB document can hold
        # 8 kB or more), so a batch never holds more than one of them at a time
        try:
            self._db.execute("BEGIN")  # one transaction per batch: SQLite commits once, not per row
            self._db.executemany(statement, rows)
            self._db.execute("COMMIT")
        except sqlite3.Error as exc:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            raise ExportError(f"the export's join could not store a batch (disk full?): {exc}") from None
