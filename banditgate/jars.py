"""Kafka's jars from Maven Central without Maven: a committed lock file, sha256-checked downloads.

The lock (`stack_files/kafka-jars-<version>.json`, written by `scripts/lock_kafka_jars.py` from
what Maven resolved) names every jar by its repository path with its size and sha256. The stack
downloads each missing jar over HTTPS with urllib (so `https_proxy` / `no_proxy` from the
environment apply), from `BANDITGATE_MAVEN_MIRROR` or Maven Central, into a part file beside the
cache; checks size and sha256; and only then renames it into the jar folder. A jar that does not
match is deleted and is one error naming the jar and both hashes. A part file left by an
interrupted download is resumed with an HTTP range request. Jars already in the cache are
re-hashed against the lock every time (~0.3 s for Kafka's 54 MB) and kept when they match.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import http.client
import json
import os
import re
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from banditgate.jsontypes import JSONValue

if TYPE_CHECKING:
    from rich.progress import Progress as RichBar
    from rich.progress import TaskID

LOCK_FORMAT = 1
DEFAULT_MIRROR = "https://repo.maven.apache.org/maven2"
MIRROR_ENV = "BANDITGATE_MAVEN_MIRROR"
CHUNK_BYTES = 256 * 1024
ATTEMPTS = 3
"""Tries per jar for errors that may pass (connection reset, timeout, HTTP 5xx, a short body)."""
TIMEOUT_S = 60.0
"""Socket timeout of one connection attempt and of each read."""

_SHA256 = re.compile(r"[0-9a-f]{64}")
_PERMANENT_HTTP = frozenset(range(400, 500)) - {408, 429}
"""HTTP answers that no retry changes: the mirror does not have the file or refuses us."""


class JarError(Exception):
    """The jars could not be fetched or verified; str(self) is one line saying what and what to do."""

    user_facing = True


@dataclass(frozen=True)
class LockedJar:
    """One jar of the lock: where it lives in a Maven repository, its size and sha256."""

    coordinates: str
    path: str
    """Repository path, e.g. org/apache/kafka/kafka-clients/4.1.0/kafka-clients-4.1.0.jar."""
    file: str
    size: int
    sha256: str

    def url(self, base_url: str) -> str:
        return f"{base_url.rstrip('/')}/{self.path}"


@dataclass(frozen=True)
class JarLock:
    """The exact jar set of one Kafka version."""

    kafka_version: str
    jars: tuple[LockedJar, ...]
    source: str

    @property
    def total_size(self) -> int:
        return sum(jar.size for jar in self.jars)


def lock_path(kafka_version: str) -> Path:
    """Where the package keeps the lock of `kafka_version` (it may not exist)."""
    return Path(__file__).parent / "stack_files" / f"kafka-jars-{kafka_version}.json"


def parse_lock(document: JSONValue, source: str) -> JarLock:
    """Check a lock document at the edge; raise JarError naming the first bad field."""
    def bad(what: str) -> JarError:
        return JarError(f"jar lock {source}: {what} (regenerate it with scripts/lock_kafka_jars.py)")

    if not isinstance(document, dict) or document.get("format") != LOCK_FORMAT:
        raise bad(f"not a lock of format {LOCK_FORMAT}")
    version = document.get("kafka_version")
    entries = document.get("jars")
    if not isinstance(version, str) or not version:
        raise bad("kafka_version missing")
    if not isinstance(entries, list) or not entries:
        raise bad("no jars")
    jars: list[LockedJar] = []
    seen: set[str] = set()
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise bad(f"jars[{index}] is not an object")
        path, name, size, sha = entry.get("path"), entry.get("file"), entry.get("size"), entry.get("sha256")
        if not isinstance(path, str) or not path.endswith(".jar") or path.startswith("/") or ".." in path.split("/"):
            raise bad(f"jars[{index}].path {path!r} is not a relative repository path of a .jar")
        if name != path.rsplit("/", 1)[-1]:
            raise bad(f"jars[{index}].file {name!r} is not the last part of its path")
        if type(size) is not int or size <= 0:
            raise bad(f"jars[{index}].size {size!r} is not a positive integer")
        if not isinstance(sha, str) or not _SHA256.fullmatch(sha):
            raise bad(f"jars[{index}].sha256 is not 64 lower-case hex digits")
        if name in seen:
            raise bad(f"jar file name {name} appears twice")
        seen.add(name)
        jars.append(LockedJar(coordinates=str(entry.get("coordinates", name)), path=path, file=name, size=size,
                              sha256=sha))
    return JarLock(kafka_version=version, jars=tuple(jars), source=source)


def load_lock(kafka_version: str, path: Path | None = None) -> JarLock | None:
    """The lock of `kafka_version` shipped with the package, or None if there is none."""
    path = path or lock_path(kafka_version)
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    try:
        document = json.loads(text)
    except ValueError as exc:
        raise JarError(f"jar lock {path} is not JSON: {exc}") from None
    lock = parse_lock(document, source=path.name)
    if lock.kafka_version != kafka_version:
        raise JarError(f"jar lock {path} is for Kafka {lock.kafka_version}, not {kafka_version}")
    return lock


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def mirror_url(environ: dict[str, str] | None = None) -> str:
    """The repository root to download from: BANDITGATE_MAVEN_MIRROR or Maven Central."""
    env = os.environ if environ is None else environ
    value = (env.get(MIRROR_ENV) or "").strip() or DEFAULT_MIRROR
    if not value.startswith(("https://", "http://", "file://")):
        raise JarError(f"{MIRROR_ENV}={value!r} is not an http(s):// or file:// URL of a Maven repository root")
    return value.rstrip("/")


# ---------------------------------------------------------------------------------------------
# the cache


@dataclass
class CacheCheck:
    """The jar folder held against the lock."""

    verified: list[LockedJar] = field(default_factory=list)
    missing: list[LockedJar] = field(default_factory=list)
    mismatched: list[tuple[LockedJar, str]] = field(default_factory=list)
    """Jars present with another sha256 (the actual one beside)."""
    unknown: list[Path] = field(default_factory=list)
    """Jars in the folder that the lock does not name (they would join the class path)."""

    @property
    def complete(self) -> bool:
        return not self.missing and not self.mismatched and not self.unknown


def check_cache(libs: Path, lock: JarLock) -> CacheCheck:
    """Hash every jar in `libs` against `lock`; changes nothing."""
    check = CacheCheck()
    for jar in lock.jars:
        path = libs / jar.file
        if not path.is_file():
            check.missing.append(jar)
            continue
        actual = file_sha256(path)
        if actual == jar.sha256:
            check.verified.append(jar)
        else:
            check.mismatched.append((jar, actual))
    named = {jar.file for jar in lock.jars}
    if libs.is_dir():
        check.unknown = sorted(p for p in libs.iterdir() if p.suffix.lower() == ".jar" and p.name not in named)
    return check


# ---------------------------------------------------------------------------------------------
# downloading


class Progress(Protocol):
    """What the downloader reports: bytes as they arrive, and each finished jar."""

    def start(self, total_bytes: int, total_jars: int) -> None: ...
    def advance(self, nbytes: int) -> None: ...
    def jar_done(self, jar: LockedJar) -> None: ...
    def close(self) -> None: ...


class _Transient(Exception):
    """A failure another try may not have (the message says what happened)."""


def _fix_hint() -> str:
    return (f"check the network; behind a proxy set https_proxy (and no_proxy); or set {MIRROR_ENV} to a Maven "
            "Central mirror; or BANDITGATE_KAFKA_FETCH=maven to let Maven fetch with its own settings")


def _open(url: str, offset: int, timeout_s: float) -> Any:  # Any: typeshed types OpenerDirector.open's response as Any
    request = urllib.request.Request(url, headers={"User-Agent": "banditgate-stack"})  # noqa: S310 - http(s)/file only
    if offset:
        request.add_header("Range", f"bytes={offset}-")
    # build_opener's ProxyHandler reads http(s)_proxy / no_proxy from the environment
    return urllib.request.build_opener().open(request, timeout=timeout_s)


def _content_range_start(value: str | None) -> int | None:
    match = re.fullmatch(r"bytes (\d+)-\d+/(\d+|\*)", (value or "").strip())
    return int(match.group(1)) if match else None


def _download_once(jar: LockedJar, url: str, part: Path, timeout_s: float, on_bytes: Callable[[int], None]) -> None:
    """One request: append to `part` from its current size (range request) or rewrite it whole.
    Raises _Transient for what a retry may fix and JarError for what it cannot."""
    offset = part.stat().st_size if part.exists() else 0
    if offset >= jar.size:  # a part as long as the jar that did not verify: start over
        part.unlink()
        offset = 0
    try:
        response = _open(url, offset, timeout_s)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and offset:  # the range is past the end: our part is not the file
            part.unlink()
            raise _Transient(f"HTTP 416 for a resume at byte {offset}") from None
        if exc.code in _PERMANENT_HTTP:
            raise JarError(f"{url} answered HTTP {exc.code} {exc.reason}: the repository does not serve "
                           f"{jar.coordinates}; {_fix_hint()}") from None
        raise _Transient(f"HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
        reason = getattr(exc, "reason", exc)
        raise _Transient(str(reason) or type(exc).__name__) from None
    with response:
        status = getattr(response, "status", None) or 200
        if offset and (status != 206 or _content_range_start(response.headers.get("Content-Range")) != offset):
            offset = 0  # the server sent the whole file: rewrite the part
        remaining = jar.size - offset
        with part.open("ab" if offset else "wb") as out:
            try:
                # read at most one byte more than the lock's size: enough to know it is too long
                while remaining >= 0:
                    chunk = response.read(min(CHUNK_BYTES, remaining + 1))
                    if not chunk:
                        break
                    out.write(chunk)
                    remaining -= len(chunk)
                    on_bytes(len(chunk))
            except (OSError, http.client.HTTPException) as exc:
                raise _Transient(f"connection lost after {jar.size - remaining} of {jar.size} bytes ({exc})") from None
    if remaining > 0:
        # http.client returns a short body without an error when the peer closes early
        raise _Transient(f"connection closed after {jar.size - remaining} of {jar.size} bytes")


def download_jar(jar: LockedJar, base_url: str, libs: Path, parts: Path, *, attempts: int = ATTEMPTS,
                 timeout_s: float = TIMEOUT_S, on_bytes: Callable[[int], None] = lambda _n: None,
                 sleep: Callable[[float], None] = time.sleep) -> Path:
    """Download `jar` into `libs` (via a part file in `parts`, renamed once its size and sha256
    match the lock) and return its path. Raises JarError: a hash or size mismatch (the file is
    deleted), an HTTP answer no retry changes, or `attempts` transient failures (the part file is
    kept, so the next call resumes it)."""
    url = jar.url(base_url)
    parts.mkdir(parents=True, exist_ok=True)
    part = parts / f"{jar.file}.part"
    resumed = part.exists()
    last = ""
    tries = 0
    while tries < attempts:
        tries += 1
        try:
            _download_once(jar, url, part, timeout_s, on_bytes)
        except _Transient as exc:
            last = str(exc)
            if tries < attempts:
                sleep(min(4.0, 0.5 * 2 ** (tries - 1)))
            continue
        size = part.stat().st_size
        actual = file_sha256(part)
        if size == jar.size and actual == jar.sha256:
            part.replace(libs / jar.file)  # same file system: atomic
            return libs / jar.file
        part.unlink()
        if resumed:  # the part we resumed may have been someone else's bytes: one fresh try, not counted
            resumed = False
            tries -= 1
            continue
        raise JarError(f"{jar.file} from {url} does not match the lock: sha256 {actual} ({size} bytes), expected "
                       f"{jar.sha256} ({jar.size} bytes); the file was not kept. A mirror that serves other bytes "
                       f"({MIRROR_ENV}) or a proxy that rewrites them is the usual cause")
    raise JarError(f"could not download {url}: {last} ({attempts} tries; a rerun resumes); {_fix_hint()}")


@contextlib.contextmanager
def _exclusive(path: Path) -> Iterator[None]:
    """One fetch per cache folder at a time (two `stack up` at once must not interleave files)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@dataclass(frozen=True)
class FetchReport:
    verified: int
    """Jars already in the cache that matched the lock."""
    downloaded: int
    downloaded_bytes: int
    removed: tuple[str, ...]
    """Jars deleted from the cache: not in the lock, or not matching it."""


def fetch_locked_jars(lock: JarLock, libs: Path, *, base_url: str | None = None,
                      say: Callable[[str], None] = lambda _m: None, progress: Progress | None = None,
                      attempts: int = ATTEMPTS, timeout_s: float = TIMEOUT_S,
                      sleep: Callable[[float], None] = time.sleep) -> FetchReport:
    """Make `libs` hold exactly the lock's jars, each verified by sha256: keep the cached ones
    that match, delete those that do not and those the lock does not name, download the rest.
    Raises JarError (one line) when a jar cannot be had."""
    base = base_url or mirror_url()
    libs.mkdir(parents=True, exist_ok=True)
    with _exclusive(libs.parent / ".fetch.lock"):
        check = check_cache(libs, lock)
        removed = []
        for jar, actual in check.mismatched:
            say(f"kafka jars: cached {jar.file} has sha256 {actual[:12]}…, the lock {jar.sha256[:12]}…: fetching it again")
            (libs / jar.file).unlink()
            removed.append(jar.file)
        for path in check.unknown:
            path.unlink()
            removed.append(path.name)
        if check.unknown:
            say(f"kafka jars: removed {len(check.unknown)} jar(s) the lock does not name from {libs}")
        todo = check.missing + [jar for jar, _ in check.mismatched]
        total = sum(jar.size for jar in todo)
        if todo:
            say(f"kafka jars: downloading {len(todo)} of {len(lock.jars)} ({total / 1e6:.1f} MB) from {base} "
                f"into {libs}, each checked against {lock.source}")
            if progress:
                progress.start(total, len(todo))
            try:
                for jar in todo:
                    download_jar(jar, base, libs, libs.parent / "downloads", attempts=attempts, timeout_s=timeout_s,
                                 on_bytes=progress.advance if progress else (lambda _n: None), sleep=sleep)
                    if progress:
                        progress.jar_done(jar)
            finally:
                if progress:
                    progress.close()
        return FetchReport(verified=len(check.verified), downloaded=len(todo), downloaded_bytes=total,
                           removed=tuple(removed))


class RichProgress:
    """A rich progress bar on stderr: bytes, speed and jars done."""

    def __init__(self, label: str = "kafka jars") -> None:
        self._label = label
        self._bar: RichBar | None = None
        self._task: TaskID | None = None
        self._done = 0
        self._jars = 0

    def start(self, total_bytes: int, total_jars: int) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

        self._jars = total_jars
        self._bar = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                             TextColumn("{task.fields[jars]}"), console=Console(stderr=True), transient=False)
        self._task = self._bar.add_task(self._label, total=total_bytes, jars=f"0/{total_jars} jars")
        self._bar.start()

    def advance(self, nbytes: int) -> None:
        if self._bar is not None and self._task is not None:  # set together by start()
            self._bar.advance(self._task, nbytes)

    def jar_done(self, jar: LockedJar) -> None:
        self._done += 1
        if self._bar is not None and self._task is not None:
            self._bar.update(self._task, jars=f"{self._done}/{self._jars} jars")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


class LineProgress:
    """Progress as a few lines through `say` (for callers that own the terminal, like the demo's
    live view): one line per quarter of the bytes."""

    def __init__(self, say: Callable[[str], None], steps: int = 4) -> None:
        self._say = say
        self._steps = steps
        self._total = 0
        self._bytes = 0
        self._jars = 0
        self._done = 0
        self._next = 1

    def start(self, total_bytes: int, total_jars: int) -> None:
        self._total, self._jars = total_bytes, total_jars

    def advance(self, nbytes: int) -> None:
        self._bytes += nbytes

    def jar_done(self, jar: LockedJar) -> None:
        self._done += 1
        if self._total and self._bytes * self._steps >= self._next * self._total:
            self._next = self._bytes * self._steps // self._total + 1
            self._say(f"kafka jars: {self._done}/{self._jars} jars, {self._bytes / 1e6:.1f} of {self._total / 1e6:.1f} MB")

    def close(self) -> None:
        pass
