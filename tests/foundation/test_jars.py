"""Kafka's jars without Maven: the lock's checks, and the downloader against a loopback HTTP server
serving fake jars (good, corrupted, missing, interrupted), through a proxy, and from a file:// mirror
built from the real cache."""

from __future__ import annotations

import hashlib
import http.server
import json
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from banditgate import jars
from banditgate import stack as stack_mod
from banditgate.jars import JarError, JarLock, LockedJar, check_cache, download_jar, fetch_locked_jars, parse_lock

NO_SLEEP = {"sleep": lambda _s: None}


def locked(name: str, content: bytes, group: str = "org/example") -> LockedJar:
    return LockedJar(coordinates=f"{group.replace('/', '.')}:{name}:1", path=f"{group}/{name}/1/{name}-1.jar",
                     file=f"{name}-1.jar", size=len(content), sha256=hashlib.sha256(content).hexdigest())


@dataclass
class Served:
    """What the fake repository does for one path: its bytes and how it misbehaves."""

    body: bytes
    mode: str = "good"  # good | corrupt | interrupt-once | interrupt-always | error-500-once
    hits: int = 0


@dataclass
class FakeRepo:
    url: str
    files: dict[str, Served] = field(default_factory=dict)
    requests: list[tuple[str, str | None, bool]] = field(default_factory=list)
    """(path, Range header, came through a proxy) per request."""

    def serve(self, jar: LockedJar, body: bytes, mode: str = "good") -> None:
        self.files["/maven2/" + jar.path] = Served(body, mode)


def _handler(repo: FakeRepo) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *_args: object) -> None:  # keep pytest's output clean
            pass

        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            path, proxied = self.path, False
            if path.startswith("http://"):  # absolute URI: we are being used as a proxy
                path, proxied = "/" + path.split("/", 3)[3], True
            repo.requests.append((path, self.headers.get("Range"), proxied))
            served = repo.files.get(path)
            if served is None:
                self.send_error(404, "Not Found")
                return
            served.hits += 1
            body = served.body
            if served.mode == "error-500-once" and served.hits == 1:
                self.send_error(500, "Internal Server Error")
                return
            if served.mode == "corrupt":
                body = bytes(b ^ 0xFF for b in body[:8]) + body[8:]
            start = 0
            ranged = self.headers.get("Range")
            if ranged and ranged.startswith("bytes=") and ranged.endswith("-"):
                start = int(ranged[6:-1])
            chunk = body[start:]
            self.send_response(206 if start else 200)
            if start:
                self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
            self.send_header("Content-Length", str(len(chunk)))
            self.end_headers()
            cut = served.mode == "interrupt-always" or (served.mode == "interrupt-once" and served.hits == 1)
            if cut:
                self.wfile.write(chunk[: len(chunk) // 2])
                self.wfile.flush()
                self.connection.shutdown(socket.SHUT_RDWR)
                self.close_connection = True
                return
            self.wfile.write(chunk)

    return Handler


@pytest.fixture(autouse=True)
def no_proxy_from_outside(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY", "no_proxy",
                 "NO_PROXY", jars.MIRROR_ENV, stack_mod.FETCH_ENV):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def repo() -> Iterator[FakeRepo]:
    fake = FakeRepo(url="")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _handler(fake))
    fake.url = f"http://127.0.0.1:{server.server_address[1]}/maven2"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield fake
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


class Recorder:
    def __init__(self) -> None:
        self.total: tuple[int, int] | None = None
        self.bytes = 0
        self.jars: list[str] = []
        self.closed = False

    def start(self, total_bytes: int, total_jars: int) -> None:
        self.total = (total_bytes, total_jars)

    def advance(self, nbytes: int) -> None:
        self.bytes += nbytes

    def jar_done(self, jar: LockedJar) -> None:
        self.jars.append(jar.file)

    def close(self) -> None:
        self.closed = True


def make_lock(*entries: LockedJar) -> JarLock:
    return JarLock(kafka_version="9.9.9", jars=tuple(entries), source="test-lock.json")


# ---------------------------------------------------------------------------------------------
# the lock


def test_parse_lock_accepts_what_the_script_writes_and_refuses_bad_entries() -> None:
    good = locked("a", b"alpha")
    document = {"format": 1, "kafka_version": "9.9.9", "jars": [good.__dict__]}
    assert parse_lock(document, "x").jars == (good,)
    bad_entries = [
        {**good.__dict__, "path": "../../etc/a-1.jar", "file": "a-1.jar"},
        {**good.__dict__, "path": "/abs/a-1.jar", "file": "a-1.jar"},
        {**good.__dict__, "file": "other.jar"},
        {**good.__dict__, "sha256": "ABC"},
        {**good.__dict__, "size": 0},
        {**good.__dict__, "size": True},
    ]
    for entry in bad_entries:
        with pytest.raises(JarError, match="jar lock x: jars\\[0\\]"):
            parse_lock({**document, "jars": [entry]}, "x")
    with pytest.raises(JarError, match="appears twice"):
        parse_lock({**document, "jars": [good.__dict__, good.__dict__]}, "x")
    with pytest.raises(JarError, match="format 1"):
        parse_lock({**document, "format": 2}, "x")


def test_the_shipped_lock_is_the_stacks_jar_set() -> None:
    lock = jars.load_lock(stack_mod.KAFKA_VERSION)
    assert lock is not None, "banditgate/stack_files has no lock for the stack's Kafka version"
    raw = json.loads(jars.lock_path(stack_mod.KAFKA_VERSION).read_text())
    assert raw["log4j_version"] == stack_mod.LOG4J_VERSION
    coordinates = {jar.coordinates for jar in lock.jars}
    assert f"org.apache.kafka:kafka_2.13:{stack_mod.KAFKA_VERSION}" in coordinates
    assert f"org.apache.kafka:kafka-tools:{stack_mod.KAFKA_VERSION}" in coordinates
    # the slf4j 1.x binding is the one that logs with Kafka 4.1's slf4j-api 1.7 (LOCAL-STACK facts)
    assert f"org.apache.logging.log4j:log4j-slf4j-impl:{stack_mod.LOG4J_VERSION}" in coordinates
    assert not any(":log4j-slf4j2-impl:" in c for c in coordinates)
    with pytest.raises(JarError, match="is for Kafka 4.1.0, not 0.0.1"):
        jars.load_lock("0.0.1", path=jars.lock_path(stack_mod.KAFKA_VERSION))


def test_mirror_from_the_environment() -> None:
    assert jars.mirror_url({}) == jars.DEFAULT_MIRROR
    assert jars.mirror_url({jars.MIRROR_ENV: "https://mirror.example/maven2/"}) == "https://mirror.example/maven2"
    with pytest.raises(JarError, match="BANDITGATE_MAVEN_MIRROR='mirror.example'"):
        jars.mirror_url({jars.MIRROR_ENV: "mirror.example"})


# ---------------------------------------------------------------------------------------------
# downloading


def test_downloads_verifies_and_reports_progress(repo: FakeRepo, tmp_path: Path) -> None:
    bodies = {name: (name * 5000).encode() for name in ("a", "b", "c")}
    entries = [locked(name, body) for name, body in bodies.items()]
    for jar, body in zip(entries, bodies.values(), strict=True):
        repo.serve(jar, body)
    libs = tmp_path / "kafka" / "libs"
    progress = Recorder()
    report = fetch_locked_jars(make_lock(*entries), libs, base_url=repo.url, progress=progress, **NO_SLEEP)
    assert (report.verified, report.downloaded) == (0, 3)
    assert {p.name: p.read_bytes() for p in libs.iterdir()} == {j.file: b for j, b in zip(entries, bodies.values(), strict=True)}
    assert progress.total == (sum(map(len, bodies.values())), 3)
    assert progress.bytes == sum(map(len, bodies.values())) and len(progress.jars) == 3 and progress.closed
    assert not list((tmp_path / "kafka" / "downloads").iterdir())  # no part file left behind


def test_cached_jars_are_verified_kept_or_replaced_and_strangers_removed(repo: FakeRepo, tmp_path: Path) -> None:
    a, b = b"A" * 3000, b"B" * 3000
    jar_a, jar_b = locked("a", a), locked("b", b)
    repo.serve(jar_a, a)
    repo.serve(jar_b, b)
    libs = tmp_path / "libs"
    libs.mkdir()
    (libs / jar_a.file).write_bytes(a)  # good: kept
    (libs / jar_b.file).write_bytes(b"X" * 3000)  # same size, other bytes: replaced
    (libs / "stranger-1.0.jar").write_bytes(b"?")  # would join the class path: removed
    lines: list[str] = []
    report = fetch_locked_jars(make_lock(jar_a, jar_b), libs, base_url=repo.url, say=lines.append, **NO_SLEEP)
    assert (report.verified, report.downloaded) == (1, 1)
    assert set(report.removed) == {jar_b.file, "stranger-1.0.jar"}
    assert [r[0] for r in repo.requests] == ["/maven2/" + jar_b.path]
    assert (libs / jar_b.file).read_bytes() == b and not (libs / "stranger-1.0.jar").exists()
    assert any("has sha256" in line and jar_b.file in line for line in lines)
    # everything verified now: nothing is requested again
    repo.requests.clear()
    again = fetch_locked_jars(make_lock(jar_a, jar_b), libs, base_url=repo.url, **NO_SLEEP)
    assert (again.verified, again.downloaded, repo.requests) == (2, 0, [])
    assert check_cache(libs, make_lock(jar_a, jar_b)).complete


def test_corrupted_jar_is_one_error_with_both_hashes_and_is_not_kept(repo: FakeRepo, tmp_path: Path) -> None:
    body = b"kafka" * 2000
    jar = locked("kafka-clients", body)
    repo.serve(jar, body, mode="corrupt")
    libs = tmp_path / "libs"
    with pytest.raises(JarError) as caught:
        fetch_locked_jars(make_lock(jar), libs, base_url=repo.url, **NO_SLEEP)
    message = str(caught.value)
    served = bytes(b ^ 0xFF for b in body[:8]) + body[8:]
    assert "\n" not in message
    assert jar.file in message and jar.sha256 in message and hashlib.sha256(served).hexdigest() in message
    assert "not kept" in message
    assert not (libs / jar.file).exists() and not list((tmp_path / "downloads").iterdir())


def test_missing_jar_names_the_url_and_is_not_retried(repo: FakeRepo, tmp_path: Path) -> None:
    jar = locked("nowhere", b"n" * 100)
    with pytest.raises(JarError) as caught:
        fetch_locked_jars(make_lock(jar), tmp_path / "libs", base_url=repo.url, **NO_SLEEP)
    message = str(caught.value)
    assert f"{repo.url}/{jar.path} answered HTTP 404" in message and jars.MIRROR_ENV in message
    assert len(repo.requests) == 1


def test_interrupted_download_resumes_with_a_range_request(repo: FakeRepo, tmp_path: Path) -> None:
    body = bytes(range(256)) * 400
    jar = locked("zstd-jni", body)
    repo.serve(jar, body, mode="interrupt-once")
    libs = tmp_path / "libs"
    libs.mkdir()
    download_jar(jar, repo.url, libs, tmp_path / "parts", **NO_SLEEP)
    assert (libs / jar.file).read_bytes() == body
    assert [r[1] for r in repo.requests] == [None, f"bytes={len(body) // 2}-"]


def test_download_that_keeps_failing_is_one_line_and_a_rerun_resumes(repo: FakeRepo, tmp_path: Path) -> None:
    body = b"z" * 50_000
    jar = locked("scala-library", body)
    repo.serve(jar, body, mode="interrupt-always")
    libs = tmp_path / "libs"
    libs.mkdir()
    with pytest.raises(JarError) as caught:
        download_jar(jar, repo.url, libs, tmp_path / "parts", attempts=2, **NO_SLEEP)
    message = str(caught.value)
    assert message.startswith(f"could not download {repo.url}/{jar.path}: connection closed after")
    assert "https_proxy" in message and jars.MIRROR_ENV in message and "\n" not in message
    assert not (libs / jar.file).exists()
    part = tmp_path / "parts" / f"{jar.file}.part"
    kept = part.stat().st_size
    assert 0 < kept < len(body)  # kept for the next run
    repo.files["/maven2/" + jar.path].mode = "good"
    download_jar(jar, repo.url, libs, tmp_path / "parts", **NO_SLEEP)
    assert (libs / jar.file).read_bytes() == body and not part.exists()
    assert repo.requests[-1][1] == f"bytes={kept}-"


def test_server_error_is_retried(repo: FakeRepo, tmp_path: Path) -> None:
    body = b"r" * 1000
    jar = locked("retry", body)
    repo.serve(jar, body, mode="error-500-once")
    (tmp_path / "libs").mkdir()
    download_jar(jar, repo.url, tmp_path / "libs", tmp_path / "parts", **NO_SLEEP)
    assert (tmp_path / "libs" / jar.file).read_bytes() == body and len(repo.requests) == 2


def test_unreachable_repository_is_one_line_naming_the_url_and_the_fixes(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    jar = locked("a", b"a")
    url = f"http://127.0.0.1:{closed}/maven2"
    with pytest.raises(JarError) as caught:
        fetch_locked_jars(make_lock(jar), tmp_path / "libs", base_url=url, attempts=2, **NO_SLEEP)
    message = str(caught.value)
    assert message.startswith(f"could not download {url}/{jar.path}: ") and "refused" in message.lower()
    assert "https_proxy" in message and jars.MIRROR_ENV in message and "BANDITGATE_KAFKA_FETCH=maven" in message


def test_proxy_from_the_environment_is_used(repo: FakeRepo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    body = b"p" * 2000
    jar = locked("proxied", body)
    repo.serve(jar, body)
    proxy = repo.url.rsplit("/maven2", 1)[0]
    monkeypatch.setenv("http_proxy", proxy)
    # a host that does not resolve: only a proxy can answer for it
    fetch_locked_jars(make_lock(jar), tmp_path / "libs", base_url="http://jars.invalid/maven2", **NO_SLEEP)
    assert repo.requests == [("/maven2/" + jar.path, None, True)]


# ---------------------------------------------------------------------------------------------
# the stack's own path, with the real lock


def test_stack_fetches_the_real_lock_without_maven_from_a_mirror(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """`ensure_kafka_jars` in lock mode: no `mvn` anywhere, every jar of the real lock copied from a
    file:// mirror laid out from the developer's verified cache, then verified again on reuse."""
    lock = jars.load_lock(stack_mod.KAFKA_VERSION)
    assert lock is not None
    real_libs = stack_mod.kafka_libs_dir()
    if not check_cache(real_libs, lock).complete:
        pytest.skip(f"{real_libs} does not hold the locked jars yet (the stack smoke test fetches them)")
    mirror = tmp_path / "mirror"
    for jar in lock.jars:
        (mirror / jar.path).parent.mkdir(parents=True, exist_ok=True)
        (mirror / jar.path).symlink_to(real_libs / jar.file)
    monkeypatch.setenv("BANDITGATE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv(jars.MIRROR_ENV, mirror.as_uri())
    monkeypatch.setattr(stack_mod.shutil, "which", lambda _name: None)  # no mvn (nor anything else)
    lines: list[str] = []
    libs = stack_mod.ensure_kafka_jars(lines.append)
    assert check_cache(libs, lock).complete
    assert lines[-1].startswith(f"kafka jars: {len(lock.jars)} in {libs} match kafka-jars-{stack_mod.KAFKA_VERSION}.json")
    assert f"0 cached, {len(lock.jars)} downloaded" in lines[-1]
    (libs / lock.jars[0].file).write_bytes(b"tampered")
    lines.clear()
    stack_mod.ensure_kafka_jars(lines.append)
    assert f"{len(lock.jars) - 1} cached, 1 downloaded" in lines[-1]


def test_a_stale_part_file_that_does_not_verify_is_replaced_by_a_fresh_download(repo: FakeRepo,
                                                                                 tmp_path: Path) -> None:
    body = b"fresh" * 1000
    jar = locked("stale", body)
    repo.serve(jar, body)
    (tmp_path / "parts").mkdir()
    (tmp_path / "parts" / f"{jar.file}.part").write_bytes(b"X" * 100)  # someone else's bytes
    (tmp_path / "libs").mkdir()
    download_jar(jar, repo.url, tmp_path / "libs", tmp_path / "parts", attempts=1, **NO_SLEEP)
    assert (tmp_path / "libs" / jar.file).read_bytes() == body
    assert [r[1] for r in repo.requests] == ["bytes=100-", None]
