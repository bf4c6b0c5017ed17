"""Redis over TLS (a TLS-only port that requires client certificates) as an ACL user limited to
the `bg:` key prefix and the commands banditgate runs: the arm-statistics store works, anything
else is refused, and a wrong password stops `banditgate serve` with one line."""

from __future__ import annotations

from pathlib import Path

import pytest
from redis.exceptions import NoPermissionError

from banditgate.config import parse_config
from banditgate.connections import ConnectionCheckError, check_redis, redis_client
from router.stats_store import ArmStatsStore, ArmUpdate
from tests.security.conftest import (
    REDIS_PASSWORD,
    REDIS_USER,
    assert_one_line_failure,
    gateway_data,
    redis_section,
    run_serve_until_exit,
    topic_names,
)

pytestmark = pytest.mark.stack


def _redis_config(secure_redis, pki, password: str = REDIS_PASSWORD, **extra):  # type: ignore[no-untyped-def]
    data = gateway_data("127.0.0.1:1", topic_names("unused"), Path("models"), redis_section(secure_redis, pki, **extra))
    return parse_config(data, env={"BANDITGATE_REDIS_PASSWORD": password}).redis


async def test_redis_tls_acl_user_runs_the_arm_statistics_store(secure_redis, pki) -> None:  # type: ignore[no-untyped-def]
    config = _redis_config(secure_redis, pki)
    assert config.url.startswith("rediss://") and f"{REDIS_USER}@" in config.url
    client = redis_client(config)
    try:
        assert await check_redis(client, config, "bg:{acl-route}:arms") is None
        store = ArmStatsStore(client, prefix="bg", dedup_ttl_s=600)
        updates = [ArmUpdate(f"q-{i}", "a" if i % 2 else "b", float(i % 3 == 0)) for i in range(40)]
        first = await store.apply("acl-route", updates)  # Lua: SET NX EX, HGET/HMGET/HSET (EVALSHA, SCRIPT LOAD)
        again = await store.apply("acl-route", updates[:10])  # redelivery: counted once
        assert (first.applied, again.applied, again.duplicates) == (40, 0, 10)
        await store.record_calls("acl-route", {"a": (5, 1)})
        await store.set_arm_state("acl-route", "b", "drained")
        snapshots = await store.snapshots(["acl-route"])  # the gateway's pipelined HGETALL
        arms = snapshots["acl-route"].arms
        assert arms["a"].stats.weight == pytest.approx(20) and arms["a"].calls == 5 and arms["b"].state == "drained"
        await store.reset_arm("acl-route", "a")
        await store.clear_route("acl-route")
        # the ACL is real: other key prefixes and other commands are refused
        with pytest.raises(NoPermissionError):
            await client.set("other:key", "1")
        with pytest.raises(NoPermissionError):
            await client.flushall()
    finally:
        await client.aclose()


async def test_redis_tls_acl_check_names_what_to_fix(secure_redis, pki) -> None:  # type: ignore[no-untyped-def]
    """Each configuration mistake is one line naming the server and the setting; no password in it."""
    cases = [
        (_redis_config(secure_redis, pki, password="wrong-" + REDIS_PASSWORD), None, "authentication failed"),
        (_redis_config(secure_redis, pki), "elsewhere:{r}:arms", "ACL user may not"),
        (_redis_config(secure_redis, pki, ca_file=str(pki.rogue_ca)), None, "certificate is not trusted"),
        (_redis_config(secure_redis, pki, cert_file=str(pki.rogue_client_cert), key_file=str(pki.rogue_client_key)),
         None, "client certificate"),
    ]
    for config, probe_key, expected in cases:
        client = redis_client(config)
        try:
            with pytest.raises(ConnectionCheckError) as info:
                await check_redis(client, config, probe_key)
        finally:
            await client.aclose()
        message = str(info.value)
        assert expected in message and f"rediss://{REDIS_USER}@127.0.0.1:{secure_redis.port}/0" in message, message
        assert "\n" not in message and REDIS_PASSWORD not in message


async def test_redis_tls_unreachable_is_not_fatal(pki) -> None:  # type: ignore[no-untyped-def]
    """A Redis that is away at start-up is an outage, not a configuration error: the gateway starts
    on its priors (docs/security.md) and the check only describes it."""
    from tests.processes import free_port

    data = gateway_data("127.0.0.1:1", topic_names("unused"), Path("models"),
                        {"url": f"rediss://{REDIS_USER}@127.0.0.1:{free_port()}/0", "ca_file": str(pki.ca)})
    config = parse_config(data, env={"BANDITGATE_REDIS_PASSWORD": REDIS_PASSWORD}).redis
    client = redis_client(config)
    try:
        message = await check_redis(client, config)
    finally:
        await client.aclose()
    assert message is not None and "unreachable" in message and REDIS_PASSWORD not in message


def test_redis_tls_acl_wrong_password_fails_startup_with_one_line(secure_redis, stack, pki, security_repository,  # type: ignore[no-untyped-def]
                                                                   tmp_path: Path) -> None:
    password_file = tmp_path / "redis.pass"
    password_file.write_text("wrong-" + REDIS_PASSWORD + "\n")
    redis = redis_section(secure_redis, pki, password_file=str(password_file))
    data = gateway_data(stack.kafka, topic_names("unused"), security_repository, redis)
    run = run_serve_until_exit(data, tmp_path)
    assert_one_line_failure(run, f"redis rediss://{REDIS_USER}@127.0.0.1:{secure_redis.port}/0", "TLS",
                            "authentication failed", "redis.password")
    assert REDIS_PASSWORD not in run.output
