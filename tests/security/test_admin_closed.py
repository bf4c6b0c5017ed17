"""The admin API is closed by default: no admin token configured means every /v2/admin request is
refused unless `server.admin_open` says otherwise; blank or non-ASCII tokens are refused when the
config loads (exit 2); admin requests must carry one of our Host names, no foreign Origin, and a
POST must be JSON (a cross-site form or a DNS-rebound page cannot reach a gateway on loopback)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from banditgate.config import ConfigError, parse_config
from gateway.transport.http import SidecarContext, build_app, host_allowed, host_name, same_origin
from tests.security.conftest import run_serve_until_exit

ROUTES = [{"name": "r", "policy": "fixed", "arms": [{"name": "a", "model": "m", "version": 1},
                                                    {"name": "b", "model": "m", "version": 2}]}]
TOKEN = "admin-tok-7f3a"

# every admin route the REST surface has: (method, path)
ADMIN_CALLS = [
    ("GET", "/v2/admin/config"),
    ("GET", "/v2/admin/routes"),
    ("GET", "/v2/admin/routes/r"),
    ("POST", "/v2/admin/reload"),
    ("POST", "/v2/admin/routes/r/arms/a/drain"),
    ("POST", "/v2/admin/routes/r/arms/a/restore"),
    ("POST", "/v2/admin/routes/r/arms/a/reset"),
    ("GET", "/v2/admin/routes/r/rollout/status"),
    ("POST", "/v2/admin/routes/r/rollout/promote"),
    ("POST", "/v2/admin/routes/r/rollout/rollback"),
]


class RecordingAdmin:
    """Stands in for gateway.admin.Admin: records what reached it (the checks under test come first)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, str]]] = []

    async def handle(self, params: dict[str, str], method: str, body: bytes) -> dict[str, Any]:
        self.calls.append((method, dict(params)))
        return {"ok": True}


def _app(**server: Any) -> tuple[Any, RecordingAdmin]:
    config = parse_config({"server": server, "routes": ROUTES}, env={})
    admin = RecordingAdmin()

    async def produce(_outcomes: list[dict[str, Any]]) -> None:
        return None

    ctx = SidecarContext(config=config, dataplane=None, publish=lambda _t, _e: None,  # type: ignore[arg-type]
                         produce_outcomes=produce, is_ready=lambda: True, admin=admin)
    return build_app(ctx), admin


async def _call(app: Any, method: str, path: str, headers: dict[str, Any] | None = None,
                host: str = "127.0.0.1:8080", json_body: bool = True) -> httpx.Response:
    base = {"Content-Type": "application/json"} if (method == "POST" and json_body) else {}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=f"http://{host}") as client:
        return await client.request(method, path, headers={**base, **(headers or {})},
                                    content=b"{}" if method == "POST" else None)


@pytest.mark.parametrize(("method", "path"), ADMIN_CALLS)
async def test_admin_without_tokens_is_closed_on_every_route(method: str, path: str) -> None:
    app, admin = _app()
    response = await _call(app, method, path)
    assert response.status_code == 403, response.text
    assert "admin API is closed" in response.json()["error"] and "admin_tokens" in response.json()["error"]
    assert admin.calls == []


@pytest.mark.parametrize(("method", "path"), ADMIN_CALLS)
async def test_admin_tokens_guard_every_route(method: str, path: str) -> None:
    app, admin = _app(admin_tokens=[TOKEN])
    assert (await _call(app, method, path)).status_code == 401
    assert (await _call(app, method, path, {"Authorization": "Bearer wrong"})).status_code == 403
    # a non-breaking space is not a blank around the token: it is part of what was offered
    assert (await _call(app, method, path, {"Authorization": f"Bearer \u00a0{TOKEN}".encode("latin-1")})
            ).status_code == 403
    assert admin.calls == []
    assert (await _call(app, method, path, {"Authorization": f"Bearer {TOKEN}"})).status_code == 200
    assert len(admin.calls) == 1


async def test_admin_open_is_open_but_still_checks_host_origin_and_content_type() -> None:
    app, admin = _app(admin_open=True)
    assert (await _call(app, "GET", "/v2/admin/config")).status_code == 200
    assert (await _call(app, "POST", "/v2/admin/routes/r/arms/a/drain")).status_code == 200
    assert (await _call(app, "GET", "/v2/admin/config", host="localhost:8080")).status_code == 200
    assert (await _call(app, "GET", "/v2/admin/config", host="[::1]:8080")).status_code == 200
    calls = len(admin.calls)
    # a cross-site form post: no JSON content type
    form = await _call(app, "POST", "/v2/admin/routes/r/arms/a/drain", json_body=False,
                       headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert form.status_code == 415 and "application/json" in form.json()["error"]
    assert (await _call(app, "POST", "/v2/admin/reload", json_body=False,
                        headers={"Content-Type": "text/plain"})).status_code == 415
    assert (await _call(app, "POST", "/v2/admin/reload", json_body=False)).status_code == 415
    # a page on another origin
    foreign = await _call(app, "POST", "/v2/admin/routes/r/arms/a/drain", {"Origin": "http://evil.example"})
    assert foreign.status_code == 403 and "cross-site" in foreign.json()["error"]
    assert (await _call(app, "GET", "/v2/admin/config", {"Origin": "null"})).status_code == 403
    assert (await _call(app, "GET", "/v2/admin/config", {"Origin": "http://127.0.0.1:9999"})).status_code == 403
    # DNS rebinding: evil.example resolved to 127.0.0.1, the browser sends its own name as Host
    rebound = await _call(app, "GET", "/v2/admin/config", host="evil.example:8080",
                          headers={"Origin": "http://evil.example:8080"})
    assert rebound.status_code == 403 and "allowed_hosts" in rebound.json()["error"]
    assert len(admin.calls) == calls  # none of them reached an admin action
    same = await _call(app, "POST", "/v2/admin/reload", {"Origin": "http://127.0.0.1:8080",
                                                         "Content-Type": "application/json; charset=utf-8"})
    assert same.status_code == 200


async def test_allowed_hosts_replace_the_defaults_and_star_allows_any() -> None:
    app, _admin = _app(admin_tokens=[TOKEN], allowed_hosts=["gateway.internal"])
    auth = {"Authorization": f"Bearer {TOKEN}"}
    assert (await _call(app, "GET", "/v2/admin/config", auth, host="gateway.internal:8080")).status_code == 200
    assert (await _call(app, "GET", "/v2/admin/config", auth, host="127.0.0.1:8080")).status_code == 403
    app, _admin = _app(admin_tokens=[TOKEN], allowed_hosts=["*"])
    assert (await _call(app, "GET", "/v2/admin/config", auth, host="anything.example")).status_code == 200


async def test_inference_endpoints_are_not_admin_checked() -> None:
    app, _admin = _app()
    response = await _call(app, "GET", "/v2/health/ready", host="evil.example")
    assert response.status_code == 200


def test_host_and_origin_helpers() -> None:
    assert host_name("[::1]:8080") == "::1" and host_name("Example.COM:80") == "example.com"
    assert host_name("gw.") == "gw" and host_name("::1") == "::1"
    assert host_allowed("127.0.0.1:1", [], "0.0.0.0") and host_allowed("localhost", [], "0.0.0.0")
    assert not host_allowed("0.0.0.0:8080", [], "0.0.0.0")  # a wildcard bind is not a name
    assert host_allowed("10.0.0.5:8080", [], "10.0.0.5") and not host_allowed(None, [], "127.0.0.1")
    assert same_origin("http://localhost", "http", "localhost:80")
    assert same_origin("HTTPS://GW:443", "https", "gw")
    assert not same_origin("https://gw", "http", "gw") and not same_origin("http://gw/x", "http", "gw")


@pytest.mark.parametrize("token", ["", " ", "\t", "two words", "tok\u00a0", "t\u00f6k", "tok\x00", "\u00a0"])
@pytest.mark.parametrize("field", ["admin_tokens", "infer_tokens"])
def test_blank_or_non_ascii_tokens_are_refused_when_the_config_loads(field: str, token: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config({"server": {field: ["good-token", token]}, "routes": ROUTES}, env={})
    lines = str(caught.value).splitlines()
    assert len(lines) == 1 and f"server.{field}[1]" in lines[0]
    assert token.strip() == "" or token not in lines[0]  # the value of a secret is never echoed


def test_token_environment_variables_with_a_blank_item_are_refused() -> None:
    for value in ("a-token,,b-token", "a-token, ", " , "):
        with pytest.raises(ConfigError, match=r"server\.admin_tokens\[\d\]: a token must not be empty"):
            parse_config({"routes": ROUTES}, env={"BANDITGATE_ADMIN_TOKENS": value})
    with pytest.raises(ConfigError, match=r"^config: server\.admin_tokens\[0\]: environment variable ADMIN_TOKEN is "
                                          r"not set$"):
        parse_config({"server": {"admin_tokens": ["${ADMIN_TOKEN}"]}, "routes": ROUTES}, env={})
    with pytest.raises(ConfigError, match=r"server\.admin_tokens\[0\]: a token must not be empty"):
        parse_config({"server": {"admin_tokens": ["${ADMIN_TOKEN}"]}, "routes": ROUTES}, env={"ADMIN_TOKEN": ""})


def test_admin_open_needs_a_loopback_host_and_no_tokens() -> None:
    with pytest.raises(ConfigError, match="admin_open needs a loopback host"):
        parse_config({"server": {"admin_open": True, "host": "0.0.0.0"}, "routes": ROUTES}, env={})  # noqa: S104
    with pytest.raises(ConfigError, match="contradict"):
        parse_config({"server": {"admin_open": True, "admin_tokens": [TOKEN]}, "routes": ROUTES}, env={})
    with pytest.raises(ConfigError, match="allowed_hosts"):
        parse_config({"server": {"allowed_hosts": ["http://gw:8080"]}, "routes": ROUTES}, env={})
    assert parse_config({"server": {"admin_open": True, "host": "localhost"}, "routes": ROUTES}, env={}).server.admin_open
    with pytest.raises(ConfigError, match="DNS rebinding"):  # Host unchecked: a rebinding page is same-origin
        parse_config({"server": {"admin_open": True, "allowed_hosts": ["*"]}, "routes": ROUTES}, env={})


def test_serve_with_a_blank_admin_token_exits_2_with_one_line(tmp_path: Path) -> None:
    """What an unset ${ADMIN_TOKEN} in a deployment looks like: refused before anything starts."""
    run = run_serve_until_exit({"models": {"repository": str(tmp_path)}, "server": {"admin_tokens": [""]},
                                "routes": ROUTES}, tmp_path, timeout_s=30)
    assert run.code == 2, run.output
    lines = run.error_lines()
    assert len(lines) == 1 and "server.admin_tokens[0]" in lines[0] and "Traceback" not in run.output
