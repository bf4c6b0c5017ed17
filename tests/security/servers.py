"""Extra real servers for the security tests, on free loopback ports in temporary folders.

The shared local stack (127.0.0.1:19092, redis 16379) is left alone: these are a second Kafka
broker with SASL_SSL and mTLS listeners, and a second redis-server with a TLS port and an ACL
user. Each is stopped by the fixture that started it.
"""

from __future__ import annotations

import base64
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from banditgate.stack import (
    _LOG4J2,
    HOST,
    KafkaServer,
    RedisServer,
    ensure_kafka_jars,
    find_java,
    find_redis_server,
    kafka_answers,
    pid_alive,
    stop_pid,
)
from tests.processes import free_port
from tests.security.pki import Pki

SCRAM_MECHANISMS = ("SCRAM-SHA-256", "SCRAM-SHA-512")


@dataclass
class SecureKafka:
    """A broker whose clients must authenticate: SASL_SSL (PLAIN and SCRAM) and SSL with client certificates."""

    server: KafkaServer
    pid: int
    plaintext: str  # inter-broker listener; tests use it only to create topics and SCRAM users
    sasl_ssl: str
    mtls: str  # SSL listener with ssl.client.auth=required
    users: dict[str, str] = field(default_factory=dict)

    def stop(self) -> None:
        stop_pid(self.pid, grace_s=10)


def _jaas(module: str, options: str = "") -> str:
    return f"org.apache.kafka.common.security.{module} required{options};"


class _SecureKafkaServer(KafkaServer):
    """KafkaServer whose storage format needs one JVM, not two (the cluster id is made here), and
    can seed SCRAM credentials at format time (`StorageTool format --add-scram`)."""

    format_scram: tuple[str, ...] = ()

    def prepare(self, java: str, libs: Path) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        (self.root / "server.properties").write_text(self.properties())
        (self.root / "log4j2.properties").write_text(_LOG4J2.format(logs=self.logs_dir))
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode().replace("-", "A")
        scram = [arg for entry in self.format_scram for arg in ("--add-scram", entry)]
        result = subprocess.run(  # noqa: S603 - fixed argv
            [java, "-Xmx128m", "-XX:TieredStopAtLevel=1", "-XX:+UseSerialGC",
             f"-Dlog4j2.configurationFile={self.root / 'log4j2.properties'}", "-cp", f"{libs}/*",
             "kafka.tools.StorageTool", "format", "--standalone", "-t", cluster_id,
             "-c", str(self.root / "server.properties"), *scram],
            capture_output=True, text=True, timeout=120,
        )
        if result.returncode != 0:
            raise RuntimeError(f"Kafka storage format failed: {(result.stderr or result.stdout)[-500:]}")


def start_secure_kafka(root: Path, pki: Pki, plain_users: dict[str, str], timeout_s: float = 90,
                       format_scram: tuple[str, ...] = ()) -> SecureKafka:
    """Start the broker and wait until its PLAINTEXT listener answers. `format_scram` entries
    (``SCRAM-SHA-256=[name=u,password=p]``) are written at format time."""
    java, _source = find_java()
    libs = ensure_kafka_jars()
    port, sasl_port, mtls_port, controller_port = free_port(), free_port(), free_port(), free_port()
    plain_options = "".join(f' user_{name}="{password}"' for name, password in plain_users.items())
    properties = {
        "sasl.enabled.mechanisms": "PLAIN,SCRAM-SHA-256,SCRAM-SHA-512",
        "listener.name.sasl_ssl.plain.sasl.jaas.config": _jaas("plain.PlainLoginModule", plain_options),
        "listener.name.sasl_ssl.scram-sha-256.sasl.jaas.config": _jaas("scram.ScramLoginModule"),
        "listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config": _jaas("scram.ScramLoginModule"),
        "ssl.keystore.type": "PEM",
        "ssl.keystore.location": str(pki.server_keystore),
        "ssl.truststore.type": "PEM",
        "ssl.truststore.location": str(pki.ca),
        # SASL_SSL: a client certificate is checked when one is offered (optional mTLS);
        # SSL: a client certificate is the only credential, so it is required
        "listener.name.sasl_ssl.ssl.client.auth": "requested",
        "listener.name.mtls.ssl.client.auth": "required",
        "num.partitions": "2",
        "offsets.topic.num.partitions": "2",
        "transaction.state.log.num.partitions": "2",
        "log.segment.bytes": str(8 * 1024 * 1024),
    }
    server = _SecureKafkaServer(
        root=root, port=port, controller_port=controller_port, extra_properties=properties,
        listeners=f"PLAINTEXT://{HOST}:{port},SASL_SSL://{HOST}:{sasl_port},MTLS://{HOST}:{mtls_port}",
        advertised_listeners=f"PLAINTEXT://{HOST}:{port},SASL_SSL://{HOST}:{sasl_port},MTLS://{HOST}:{mtls_port}",
        protocol_map="PLAINTEXT:PLAINTEXT,SASL_SSL:SASL_SSL,MTLS:SSL",
        jvm_options=("-Xmx384m", "-XX:TieredStopAtLevel=1"),
    )
    server.format_scram = format_scram
    server.prepare(java, libs)
    pid = server.start(java, libs)
    deadline = time.monotonic() + timeout_s
    while not kafka_answers(HOST, port, timeout_s=1.0):
        if not pid_alive(pid):
            raise RuntimeError(f"the SASL_SSL test broker exited: {server.log_tail(3)}")
        if time.monotonic() > deadline:
            stop_pid(pid, grace_s=5)
            raise RuntimeError(f"the SASL_SSL test broker did not answer within {timeout_s}s: {server.log_tail(3)}")
        time.sleep(0.25)
    return SecureKafka(server=server, pid=pid, plaintext=f"{HOST}:{port}", sasl_ssl=f"{HOST}:{sasl_port}",
                       mtls=f"{HOST}:{mtls_port}", users=dict(plain_users))


def add_scram_user(kafka: SecureKafka, user: str, password: str,
                   mechanisms: tuple[str, ...] = SCRAM_MECHANISMS) -> None:
    """Create (or update) SCRAM credentials with Kafka's own admin tool (kafka-configs, over the
    PLAINTEXT listener), one JVM per mechanism: Kafka 4.1 refuses two credentials of one user in
    one request ("A user credential cannot be altered twice in the same request")."""
    java, _source = find_java()
    libs = ensure_kafka_jars()
    for mechanism in mechanisms:
        _kafka_configs(java, libs, kafka, user, f"{mechanism}=[iterations=4096,password={password}]")
    kafka.users[user] = password


def _kafka_configs(java: str, libs: Path, kafka: SecureKafka, user: str, credential: str) -> None:
    result = subprocess.run(  # noqa: S603 - fixed argv
        [java, "-Xmx128m", "-XX:TieredStopAtLevel=1", "-XX:+UseSerialGC",
         f"-Dlog4j2.configurationFile={kafka.server.root / 'log4j2.properties'}", "-cp", f"{libs}/*",
         "kafka.admin.ConfigCommand", "--bootstrap-server", kafka.plaintext, "--alter",
         "--add-config", credential, "--entity-type", "users", "--entity-name", user],
        capture_output=True, text=True, timeout=120,
    )
    if result.returncode != 0:
        raise RuntimeError(f"kafka-configs could not add SCRAM user {user}: {(result.stderr or result.stdout)[-500:]}")


@dataclass
class SecureRedis:
    """A redis-server with only a TLS port (client certificates required) and an ACL user."""

    server: RedisServer
    pid: int
    port: int
    user: str
    password: str

    def url(self, user: str | None = None) -> str:
        return f"rediss://{user or self.user}@{HOST}:{self.port}/0"

    def stop(self) -> None:
        stop_pid(self.pid, grace_s=10)


# What the project runs on Redis (router/stats_store.py, feedback/ledger.py): hashes, SET NX EX
# for dedup marks, EXPIRE, and Lua scripts through EVALSHA (SCRIPT LOAD on a NOSCRIPT reply).
ACL_COMMANDS = ("+ping", "+hello", "+auth", "+client|setname", "+select",
                "+hgetall", "+hget", "+hmget", "+hset", "+hsetnx", "+hdel", "+hincrby", "+hincrbyfloat",
                "+set", "+get", "+del", "+expire", "+exists",
                "+eval", "+evalsha", "+script|load", "+script|exists")


def start_secure_redis(root: Path, pki: Pki, user: str, password: str, key_prefix: str = "bg",
                       timeout_s: float = 20) -> SecureRedis:
    """TLS only (`--port 0 --tls-port N`), the default user off, `user` limited to `key_prefix:*` keys."""
    import redis

    exe, _source = find_redis_server()
    port = free_port()
    server = RedisServer(root=root, port=port, extra_args=(
        "--port", "0", "--tls-port", str(port),
        "--tls-cert-file", str(pki.server_cert), "--tls-key-file", str(pki.server_key),
        "--tls-ca-cert-file", str(pki.ca), "--tls-auth-clients", "yes",
        "--save", "", "--user", "default", "off",
        "--user", user, "on", f">{password}", "resetkeys", f"~{key_prefix}:*", "resetchannels", "-@all",
        *ACL_COMMANDS,
    ))
    pid = server.start(exe)
    deadline = time.monotonic() + timeout_s
    while True:
        if not pid_alive(pid):
            raise RuntimeError(f"the TLS test redis-server exited: {server.log_tail()}")
        try:
            client = redis.Redis(host=HOST, port=port, username=user, password=password, ssl=True,
                                 ssl_ca_certs=str(pki.ca), ssl_certfile=str(pki.client_cert),
                                 ssl_keyfile=str(pki.client_key), socket_timeout=1)
            try:
                if client.ping():
                    break
            finally:
                client.close()
        except redis.RedisError:
            pass
        if time.monotonic() > deadline:
            stop_pid(pid, grace_s=5)
            raise RuntimeError(f"the TLS test redis-server did not answer within {timeout_s}s: {server.log_tail()}")
        time.sleep(0.1)
    return SecureRedis(server=server, pid=pid, port=port, user=user, password=password)
