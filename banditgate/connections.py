"""Client settings shared by gateway and feedback: Kafka security kwargs, Redis clients, TLS
contexts, and start-up checks that turn a refused login or an untrusted certificate into one line.

Secrets are read from the typed config here and handed to the clients; they are never logged
or put in error messages (errors name the file, the mechanism and the user, not the value).
"""

from __future__ import annotations

import asyncio
import ssl
from typing import TYPE_CHECKING, Any

from banditgate.config import KafkaConfig, RedisConfig, ServerConfig
from banditgate.redaction import redact_url

if TYPE_CHECKING:
    import redis.asyncio as aredis


class ConnectionSettingsError(Exception):
    """A certificate or key file named in the config cannot be used."""

    user_facing = True


class ConnectionCheckError(Exception):
    """A server refused us at start-up for a reason the configuration must fix (credentials,
    certificates, permissions), or cannot be reached; one line: what, where, what to do."""

    user_facing = True


def kafka_ssl_context(kafka: KafkaConfig) -> ssl.SSLContext | None:
    security = kafka.security
    if security.protocol not in ("SSL", "SASL_SSL"):
        return None
    try:
        context = ssl.create_default_context(cafile=str(security.ca_file) if security.ca_file else None)
    except (OSError, ssl.SSLError) as exc:
        raise ConnectionSettingsError(f"kafka.security.ca_file {security.ca_file}: cannot load CA: {exc}") from None
    context.check_hostname = security.check_hostname
    if security.cert_file and security.key_file:
        password = security.key_password.get_secret_value() if security.key_password else None
        try:
            context.load_cert_chain(str(security.cert_file), str(security.key_file), password=password)
        except (OSError, ssl.SSLError) as exc:
            raise ConnectionSettingsError(
                f"kafka.security.cert_file {security.cert_file} / key_file {security.key_file}: "
                f"cannot load the client certificate ({_ssl_reason(exc)}): check that the files exist, that the "
                "key belongs to the certificate and, for an encrypted key, kafka.security.key_password") from None
    return context


def server_ssl_context(server: ServerConfig) -> ssl.SSLContext | None:
    """The HTTPS/gRPC server's TLS context (None without tls_cert_file), loaded once at start-up so
    that an unreadable certificate, key or client CA is one line naming the file, not a trace."""
    if server.tls_cert_file is None or server.tls_key_file is None:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(str(server.tls_cert_file), str(server.tls_key_file))
    except (OSError, ssl.SSLError) as exc:
        raise ConnectionSettingsError(
            f"server.tls_cert_file {server.tls_cert_file} / tls_key_file {server.tls_key_file}: cannot load the "
            f"server certificate: {_ssl_reason(exc)}") from None
    if server.client_ca_file is not None:
        try:
            context.load_verify_locations(cafile=str(server.client_ca_file))
        except (OSError, ssl.SSLError) as exc:
            raise ConnectionSettingsError(
                f"server.client_ca_file {server.client_ca_file}: cannot load the client CA: {_ssl_reason(exc)}") from None
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def _refused_client_certificate(exc: ssl.SSLError) -> bool:
    """A TLS alert from the server about our certificate (or its absence)."""
    reason = _ssl_reason(exc).upper()
    return "ALERT" in reason and ("CERTIFICATE" in reason or "UNKNOWN_CA" in reason)


def _ssl_reason(exc: BaseException) -> str:
    reason = getattr(exc, "reason", None) or getattr(exc, "strerror", None)
    if not reason and isinstance(exc, ssl.SSLError) and len(exc.args) > 1:
        reason = str(exc.args[1]).split(" (_ssl.c")[0]  # e.g. "[SSL] PEM lib"
    return str(reason or type(exc).__name__)


def kafka_client_kwargs(kafka: KafkaConfig) -> dict[str, object]:
    """aiokafka keyword arguments for address, client id and security."""
    security = kafka.security
    kwargs: dict[str, object] = {"bootstrap_servers": kafka.bootstrap_servers, "client_id": kafka.client_id,
                              "security_protocol": security.protocol}
    context = kafka_ssl_context(kafka)
    if context is not None:
        kwargs["ssl_context"] = context
    if security.protocol.startswith("SASL"):
        kwargs["sasl_mechanism"] = security.sasl_mechanism
        kwargs["sasl_plain_username"] = security.sasl_username
        kwargs["sasl_plain_password"] = security.sasl_password.get_secret_value() if security.sasl_password else None
    return kwargs


def redis_client(redis_config: RedisConfig, **overrides: Any) -> aredis.Redis:  # Any: Redis.from_url's **kwargs are untyped
    """A redis.asyncio client for the configured URL (password, CA and client certificate from the config)."""
    import redis.asyncio as aredis

    kwargs: dict[str, Any] = {  # Any: redis.asyncio.Redis.from_url's **kwargs are untyped
        "socket_timeout": 2.0, "socket_connect_timeout": 2.0, "health_check_interval": 10}
    if redis_config.password is not None:
        kwargs["password"] = redis_config.password.get_secret_value()
    if redis_config.url.startswith("rediss://"):
        if redis_config.ca_file:
            kwargs["ssl_ca_certs"] = str(redis_config.ca_file)
        if redis_config.cert_file and redis_config.key_file:
            kwargs["ssl_certfile"] = str(redis_config.cert_file)
            kwargs["ssl_keyfile"] = str(redis_config.key_file)
    kwargs.update(overrides)
    return aredis.Redis.from_url(redis_config.url, **kwargs)


# ---------------------------------------------------------------------------------------------
# start-up checks


def _kafka_where(kafka: KafkaConfig, address: str) -> str:
    security = kafka.security
    parts: list[str] = [security.protocol]
    if security.protocol.startswith("SASL"):
        parts.append(f"{security.sasl_mechanism} as user {security.sasl_username!r}")
    if security.protocol in ("SSL", "SASL_SSL"):
        parts.append(f"CA {security.ca_file}" if security.ca_file else "system CAs")
        if security.cert_file:
            parts.append(f"client certificate {security.cert_file}")
    return f"kafka {address} ({', '.join(parts)})"


def _causes(exc: BaseException) -> list[BaseException]:
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in chain:
        chain.append(current)
        current = current.__cause__ or current.__context__
    return chain


def _scrub(text: str, secrets: list[str]) -> str:
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return text


def describe_kafka_failure(kafka: KafkaConfig, address: str, exc: BaseException) -> str:
    """One line: which broker, how we connected, what failed, and which setting to check (no secret)."""
    from aiokafka import errors

    security = kafka.security
    where = _kafka_where(kafka, address)
    chain = _causes(exc)
    verify = next((e for e in chain if isinstance(e, ssl.SSLCertVerificationError)), None)
    tls = next((e for e in chain if isinstance(e, ssl.SSLError)), None)
    if verify is not None:
        detail = getattr(verify, "verify_message", None) or _ssl_reason(verify)
        what = (f"the broker's certificate is not trusted ({detail}): check kafka.security.ca_file"
                + (" and kafka.security.check_hostname" if "mismatch" in str(detail) else ""))
    elif tls is not None and _refused_client_certificate(tls):
        what = (f"the broker refused our client certificate ({_ssl_reason(tls)}): the listener requires one "
                "signed by a CA it trusts: check kafka.security.cert_file and key_file")
    elif tls is not None:
        what = (f"the TLS handshake failed ({_ssl_reason(tls)}): check kafka.security.protocol and the "
                "certificate files")
    elif isinstance(exc, errors.SaslAuthenticationFailed) or "Authentication failed" in str(exc):
        what = (f"authentication failed ({exc.args[0] if exc.args else 'refused'}): check "
                "kafka.security.sasl_username and the password (kafka.security.sasl_password, "
                "sasl_password_file or BANDITGATE_KAFKA_PASSWORD)")
    elif isinstance(exc, errors.UnsupportedSaslMechanismError):
        what = f"{exc.args[0] if exc.args else 'SASL mechanism not offered'}: check kafka.security.sasl_mechanism"
    elif isinstance(exc, errors.IllegalSaslStateError | errors.UnsupportedVersionError):
        what = f"the listener refused SASL ({type(exc).__name__}): check kafka.security.protocol"
    elif isinstance(exc, ConnectionRefusedError) or "Connect call failed" in str(exc):
        what = "connection refused: is the broker running there? check kafka.bootstrap_servers"
    elif isinstance(exc, (asyncio.TimeoutError, TimeoutError)) or "timed out" in str(exc).lower():
        what = ("no answer in time: check kafka.bootstrap_servers and that kafka.security.protocol "
                f"({security.protocol}) is what the listener speaks")
    elif isinstance(exc, ConnectionResetError) or (
            isinstance(exc, errors.KafkaConnectionError) and "closed" in str(exc)):
        what = (f"the broker closed the connection during set-up: check that kafka.security.protocol "
                f"({security.protocol}) is what this listener speaks and, where the listener requires client "
                "certificates, that kafka.security.cert_file is signed by a CA the broker trusts")
    elif isinstance(exc, OSError):
        what = f"cannot connect ({exc.strerror or type(exc).__name__}): check kafka.bootstrap_servers"
    else:
        what = f"{type(exc).__name__}: {exc}"
    secrets = [s.get_secret_value() for s in (security.sasl_password, security.key_password) if s is not None]
    return _scrub(f"{where}: {what}", secrets)


async def check_kafka(kafka: KafkaConfig, timeout_s: float = 10.0) -> None:
    """Connect to a bootstrap server and log in as the clients will (TLS, SASL); return on the first
    success. Raises ConnectionCheckError describing the failure when no bootstrap server accepts us,
    before any client is built, so a wrong password is one line and not a client's retry loop."""
    from aiokafka.conn import create_conn

    kwargs = kafka_client_kwargs(kafka)
    kwargs.pop("bootstrap_servers")
    servers = [s.strip() for s in kafka.bootstrap_servers.split(",") if s.strip()]
    failures: list[str] = []
    for address in servers:
        host, _, port = address.rpartition(":")
        if not (port.isascii() and port.isdigit()):
            raise ConnectionCheckError(f"kafka.bootstrap_servers: {address!r} is not host:port")
        try:
            connection = await asyncio.wait_for(
                create_conn(host.strip("[]") or "127.0.0.1", int(port), request_timeout_ms=int(timeout_s * 1000),
                            **kwargs), timeout_s + 1)
        except Exception as exc:  # noqa: BLE001 - every failure becomes the one line describing it
            failures.append(describe_kafka_failure(kafka, address, exc))
            continue
        connection.close()
        return
    raise ConnectionCheckError(failures[0] if len(failures) == 1 else
                               f"no bootstrap server accepted the connection: {'; '.join(failures)}")


def describe_redis_failure(redis_config: RedisConfig, exc: BaseException) -> tuple[str, bool]:
    """(one line naming the server, what failed and the setting to check; whether it is a
    configuration problem that must stop start-up rather than an outage to ride out)."""
    from redis import exceptions

    where = f"redis {redact_url(redis_config.url)}"
    if redis_config.url.startswith("rediss://"):
        where += f" (TLS, {'CA ' + str(redis_config.ca_file) if redis_config.ca_file else 'system CAs'}" +                  (f", client certificate {redis_config.cert_file})" if redis_config.cert_file else ")")
    chain = _causes(exc)
    verify = next((e for e in chain if isinstance(e, ssl.SSLCertVerificationError)), None)
    tls = next((e for e in chain if isinstance(e, ssl.SSLError)), None)
    if isinstance(exc, (exceptions.AuthenticationError, exceptions.AuthenticationWrongNumberOfArgsError)):
        what, fatal = (f"authentication failed ({exc}): check the user in redis.url and the password "
                       "(redis.password, password_file or BANDITGATE_REDIS_PASSWORD)"), True
    elif isinstance(exc, exceptions.NoPermissionError):
        what, fatal = (f"the ACL user may not do what banditgate needs ({exc}): grant the commands listed in "
                       f"docs/security.md on keys {redis_config.key_prefix}:*"), True
    elif verify is not None:
        detail = getattr(verify, "verify_message", None) or _ssl_reason(verify)
        what, fatal = f"the server's certificate is not trusted ({detail}): check redis.ca_file", True
    elif tls is not None:
        what, fatal = (f"the TLS handshake failed ({_ssl_reason(tls)}): the server may require a client "
                       "certificate signed by a CA it trusts (redis.cert_file / redis.key_file)"), True
    else:
        what, fatal = f"unreachable ({type(exc).__name__}: {exc})", False
    secret = redis_config.password.get_secret_value() if redis_config.password is not None else ""
    return _scrub(f"{where}: {what}", [secret]), fatal


async def check_redis(client: aredis.Redis, redis_config: RedisConfig, probe_key: str | None = None) -> str | None:
    """PING (and HGETALL `probe_key`, a read the caller needs anyway) with the configured credentials.

    Raises ConnectionCheckError for what the configuration must fix (wrong password, ACL
    permissions, untrusted certificate); returns a description when the server is merely
    unreachable (the caller may keep going and retry), None when all is well."""
    from redis.exceptions import RedisError

    try:
        await client.ping()
        if probe_key is not None:
            await client.hgetall(probe_key)
    except (TimeoutError, RedisError, OSError) as exc:
        message, fatal = describe_redis_failure(redis_config, exc)
        if fatal:
            raise ConnectionCheckError(message) from None
        return message
    return None
