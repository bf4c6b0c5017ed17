"""Client settings shared by gateway and feedback: Kafka security kwargs and Redis clients.

Secrets are read from the typed config here and handed to the clients; they are never logged
or put in error messages (errors name the file or the mechanism, not the value).
"""

from __future__ import annotations

import ssl
from typing import Any

from banditgate.config import KafkaConfig, RedisConfig


class ConnectionSettingsError(Exception):
    """A certificate or key file named in the config cannot be used."""

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
                f"cannot load the client certificate: {getattr(exc, 'reason', None) or type(exc).__name__}") from None
    return context


def kafka_client_kwargs(kafka: KafkaConfig) -> dict[str, Any]:
    """aiokafka keyword arguments for address, client id and security."""
    security = kafka.security
    kwargs: dict[str, Any] = {"bootstrap_servers": kafka.bootstrap_servers, "client_id": kafka.client_id,
                              "security_protocol": security.protocol}
    context = kafka_ssl_context(kafka)
    if context is not None:
        kwargs["ssl_context"] = context
    if security.protocol.startswith("SASL"):
        kwargs["sasl_mechanism"] = security.sasl_mechanism
        kwargs["sasl_plain_username"] = security.sasl_username
        kwargs["sasl_plain_password"] = security.sasl_password.get_secret_value() if security.sasl_password else None
    return kwargs


def redis_client(redis_config: RedisConfig, **overrides: Any):  # type: ignore[no-untyped-def]
    """A redis.asyncio client for the configured URL (password and CA from the config)."""
    import redis.asyncio as aredis

    kwargs: dict[str, Any] = {"socket_timeout": 2.0, "socket_connect_timeout": 2.0, "health_check_interval": 10}
    if redis_config.password is not None:
        kwargs["password"] = redis_config.password.get_secret_value()
    if redis_config.url.startswith("rediss://") and redis_config.ca_file:
        kwargs["ssl_ca_certs"] = str(redis_config.ca_file)
    kwargs.update(overrides)
    return aredis.Redis.from_url(redis_config.url, **kwargs)
