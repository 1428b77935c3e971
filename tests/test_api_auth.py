"""Authentication and scope: API tokens and their roles, tenant scoping, desktop sign-in
with a PIN (expiry on the injected clock), the failed-sign-in rate limit, and no token
or secret in any log line."""

from __future__ import annotations

import base64
import io
import logging
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
import structlog

from ctid import logs
from ctid.api.auth import (
    Authenticator,
    AuthError,
    Principal,
    Role,
    check_secret_hash,
    hash_secret,
    token_env_name,
    verify_secret,
)
from ctid.config import APIConfig, TokenConfig
from ctid.events.schema import Event
from tests.test_api_server import PIN, TOKENS, Clock, recv, request, running, sha256

# --------------------------------------------------------------------------- secrets


def test_hash_secret_is_scrypt_with_a_random_salt() -> None:
    encoded = hash_secret("1234")
    scheme, n, r, p, salt, key = encoded.split("$")
    assert (scheme, n, r, p) == ("scrypt", str(2**14), "8", "1")
    assert (len(base64.b64decode(salt)), len(base64.b64decode(key))) == (16, 32)
    assert hash_secret("1234") != encoded, "a fresh salt every time"
    assert verify_secret("1234", encoded)
    assert not verify_secret("1235", encoded)
    assert not verify_secret("1234", "plain-text")
    check_secret_hash(encoded)


@pytest.mark.parametrize("bad", ["", "scrypt$16384$8$1$AAAA", "bcrypt$x$y$z$a$b", "scrypt$1000$8$1$c2FsdHNhbHQ=$"
                                 + "A" * 44, "scrypt$4194304$8$1$c2FsdHNhbHQ=$" + "A" * 44, "scrypt$16384$8$1$!!$!!"])
def test_malformed_hashes_never_match(bad: str) -> None:
    with pytest.raises(ValueError):
        check_secret_hash(bad)
    assert not verify_secret("anything", bad)


def test_token_env_names() -> None:
    assert token_env_name("crm.main-1") == "CTID_TOKEN_CRM_MAIN_1"


def test_a_token_from_the_environment_wins_over_the_file() -> None:
    tokens = [TokenConfig(name="crm.main", role="integration", tenant="acme", token_sha256=sha256("from-file")),
              TokenConfig(name="noop", role="admin")]
    auth = Authenticator(tokens, [], APIConfig(), env={"CTID_TOKEN_CRM_MAIN": "from-env"}, clock=Clock())
    assert auth.authenticate("from-env").name == "crm.main"
    with pytest.raises(AuthError):
        auth.authenticate("from-file")
    with pytest.raises(AuthError):
        auth.bearer("Basic Zm9vOmJhcg==")
    assert auth.bearer("bearer  from-env ").role is Role.INTEGRATION


def test_principal_scope() -> None:
    ts = datetime(2026, 1, 1, tzinfo=UTC)
    mine = Event("call.offered", "acme", ts, agent_id="1001")
    other_agent = Event("call.offered", "acme", ts, agent_id="1002")
    tenant_wide = Event("queue.stats", "acme", ts, queue="support")
    other_tenant = Event("call.offered", "globex", ts, agent_id="1001")
    agent = Principal("a", Role.AGENT, "acme", "1001")
    sup = Principal("s", Role.SUPERVISOR, "acme")
    admin = Principal("x", Role.ADMIN, None)
    assert [agent.sees(e) for e in (mine, other_agent, tenant_wide, other_tenant)] == [True, False, False, False]
    assert [sup.sees(e) for e in (mine, other_agent, tenant_wide, other_tenant)] == [True, True, True, False]
    assert all(admin.sees(e) for e in (mine, other_agent, tenant_wide, other_tenant))
    assert agent.may_command("1001", "acme") and not agent.may_command("1002", "acme")
    assert sup.may_command("1002", "acme") and not sup.may_command("2001", "globex")
    assert not Principal("i", Role.INTEGRATION, "acme").may_command("1001", "acme")


# --------------------------------------------------------------------------- roles over HTTP


@pytest.mark.parametrize(("token", "visible"), [
    ("admin", ["1001", "1002", "2001"]),
    ("sup", ["1001", "1002"]),
    ("int", ["1001", "1002"]),
    ("sup-globex", ["2001"]),
    ("agent-1001", ["1001"]),
])
async def test_roles_see_their_scope_of_agents(token: str, visible: list[str]) -> None:
    async with running() as h, h.session.get(h.url + "/api/v1/agents", headers=h.auth(token)) as resp:
        assert resp.status == 200
        assert [a["agent_id"] for a in (await resp.json())["agents"]] == visible


async def test_missing_or_bad_tokens_are_401_with_a_json_error() -> None:
    async with running() as h:
        for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": TOKENS["admin"]},
                        {"Authorization": "Basic " + TOKENS["admin"]}):
            async with h.session.get(h.url + "/api/v1/agents", headers=headers) as resp:
                assert resp.status == 401
                assert resp.headers["WWW-Authenticate"] == "Bearer"
                assert (await resp.json())["error"]["code"] == "unauthorized"
        async with h.session.get(h.url + f"/api/v1/agents?token={TOKENS['admin']}") as resp:
            assert resp.status == 401, "tokens are never taken from the query string"


async def test_agent_a_cannot_act_on_or_see_agent_b() -> None:
    async with running() as h:
        h.registry.login("1002", "PJSIP/1002")
        before = len(h.events())
        for command, body in (("ready", None), ("pause", {"reason": "break"}), ("logout", None),
                              ("login", {"device": "PJSIP/7"}), ("wrapup", {"call_id": "c1"})):
            async with h.session.post(h.url + f"/api/v1/agents/1002/{command}", json=body,
                                      headers=h.auth("agent-1001")) as resp:
                assert resp.status == 403, command
                assert (await resp.json())["error"]["code"] == "forbidden"
        async with h.session.post(h.url + "/api/v1/agents/nobody/ready", headers=h.auth("agent-1001")) as resp:
            assert resp.status == 403, "an agent cannot probe which ids exist"
        async with h.session.get(h.url + "/api/v1/events?agent_id=1002", headers=h.auth("agent-1001")) as resp:
            assert resp.status == 403
        async with h.session.get(h.url + "/api/v1/events", headers=h.auth("agent-1001")) as resp:
            assert (await resp.json())["events"] == [], "1002's login is not 1001's business"
        ws = await h.ws("agent-1001")
        assert (await request(ws, "ready", agent_id="1002"))["error"]["code"] == "forbidden"
        assert (await request(ws, "subscribe", 2, agent_ids=["1002"]))["error"]["code"] == "forbidden"
        assert h.registry.get("1002").state.value == "ready"
        assert len(h.events()) == before


async def test_supervisors_act_within_their_tenant_and_integrations_do_not_act() -> None:
    async with running() as h:
        async with h.session.post(h.url + "/api/v1/agents/1002/login", json={"device": "PJSIP/1002"},
                                  headers=h.auth("sup")) as resp:
            assert resp.status == 200
        async with h.session.post(h.url + "/api/v1/agents/2001/login", json={"device": "PJSIP/2001"},
                                  headers=h.auth("sup")) as resp:
            assert resp.status == 403
        async with h.session.post(h.url + "/api/v1/agents/1001/login", json={"device": "PJSIP/1001"},
                                  headers=h.auth("int")) as resp:
            assert resp.status == 403
        async with h.session.post(h.url + "/api/v1/agents/2001/login", json={"device": "PJSIP/2001"},
                                  headers=h.auth("admin")) as resp:
            assert resp.status == 200
        async with h.session.get(h.url + "/api/v1/agents?tenant=globex", headers=h.auth("sup")) as resp:
            assert resp.status == 403
        async with h.session.get(h.url + "/api/v1/agents?tenant=globex", headers=h.auth("admin")) as resp:
            assert [a["agent_id"] for a in (await resp.json())["agents"]] == ["2001"]
        assert [h.registry.get(a).state.value for a in ("1001", "1002", "2001")] == ["logged_out", "ready", "ready"]


# --------------------------------------------------------------------------- desktop sign-in


async def test_sign_in_with_a_pin_gives_a_session_token_that_expires() -> None:
    async with running({"session_ttl": 600}) as h:
        async with h.session.post(h.url + "/api/v1/auth/login", json={"agent_id": "1001", "secret": PIN}) as resp:
            assert resp.status == 200
            assert resp.headers["Cache-Control"] == "no-store"
            body = await resp.json()
        assert body["expires_at"] == "2026-12-01T09:10:00.000Z"
        assert (body["agent_id"], body["tenant"]) == ("1001", "acme")
        session = {"Authorization": f"Bearer {body['token']}"}
        async with h.session.post(h.url + "/api/v1/agents/1001/login", json={"device": "PJSIP/1001"},
                                  headers=session) as resp:
            assert resp.status == 200
        async with h.session.post(h.url + "/api/v1/agents/1002/ready", headers=session) as resp:
            assert resp.status == 403, "a session acts as its agent only"
        ws = await h.ws(body["token"])
        assert (await request(ws, "subscribe"))["type"] == "ack"
        h.clock.advance(599)
        async with h.session.get(h.url + "/api/v1/agents", headers=session) as resp:
            assert resp.status == 200
        h.clock.advance(1)
        async with h.session.get(h.url + "/api/v1/agents", headers=session) as resp:
            assert resp.status == 401
            assert (await resp.json())["error"]["message"] == "session expired"
        reply = await request(ws, "ready", 2)
        assert reply["error"]["code"] == "unauthorized", "an expired session cannot command over the websocket"


async def test_wrong_pin_unknown_agent_and_agent_without_pin_look_the_same() -> None:
    async with running() as h:
        messages = set()
        for agent_id, secret in (("1001", "0000"), ("nobody", PIN), ("1002", PIN)):
            async with h.session.post(h.url + "/api/v1/auth/login",
                                      json={"agent_id": agent_id, "secret": secret}) as resp:
                assert resp.status == 401
                messages.add((await resp.json())["error"]["message"])
        assert len(messages) == 1


@pytest.mark.parametrize("body", [b"{", b"[]", b'{"agent_id": "1001"}', b'{"agent_id": 1001, "secret": "1"}',
                                  b'{"agent_id": "1001", "secret": ""}', b'{"agent_id": "10 01", "secret": "1"}',
                                  b'{"agent_id": "1001", "secret": "1", "remember": true}'])
async def test_malformed_sign_ins_are_400(body: bytes) -> None:
    async with running() as h, h.session.post(h.url + "/api/v1/auth/login", data=body) as resp:
        assert resp.status == 400
        assert (await resp.json())["error"]["code"] in ("bad_json", "bad_request")


async def test_failed_sign_ins_are_rate_limited_per_agent() -> None:
    async with running({"login_attempts_per_minute": 3}) as h:
        url = h.url + "/api/v1/auth/login"
        for _ in range(3):
            async with h.session.post(url, json={"agent_id": "1001", "secret": "9999"}) as resp:
                assert resp.status == 401
        h.clock.advance(20)
        async with h.session.post(url, json={"agent_id": "1001", "secret": PIN}) as resp:
            assert resp.status == 429, "even the right PIN waits while limited"
            assert resp.headers["Retry-After"] == "40"
            body = await resp.json()
            assert (body["error"]["code"], body["error"]["retry_after"]) == ("rate_limited", 40)
        h.clock.advance(40)
        async with h.session.post(url, json={"agent_id": "1001", "secret": PIN}) as resp:
            assert resp.status == 200
        assert h.server.auth.rate_limited == 1
        async with h.session.get(h.url + "/metrics") as resp:
            text = await resp.text()
        assert "ctid_api_sign_in_rate_limited_total 1.0" in text
        assert "ctid_api_sign_in_failures_total 3.0" in text


async def test_failed_sign_ins_are_rate_limited_per_client_address() -> None:
    async with running({"login_attempts_per_minute": 2}) as h:
        url = h.url + "/api/v1/auth/login"
        for agent_id in ("1001", "2001"):
            async with h.session.post(url, json={"agent_id": agent_id, "secret": "bad"}) as resp:
                assert resp.status == 401
        async with h.session.post(url, json={"agent_id": "1002", "secret": "bad"}) as resp:
            assert resp.status == 429, "a third agent id from the same address is limited too"
            assert int(resp.headers["Retry-After"]) == 60


async def test_a_successful_sign_in_does_not_count_against_the_limit() -> None:
    async with running({"login_attempts_per_minute": 2}) as h:
        for _ in range(5):
            async with h.session.post(h.url + "/api/v1/auth/login", json={"agent_id": "1001", "secret": PIN}) as resp:
                assert resp.status == 200


# --------------------------------------------------------------------------- no secrets in logs


@pytest.fixture
def captured_logs() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    logs.configure("debug", "json", stream=stream)
    try:
        yield stream
    finally:
        structlog.reset_defaults()
        root.handlers[:], _ = saved
        root.setLevel(saved[1])


async def test_tokens_and_secrets_never_reach_the_logs(captured_logs: io.StringIO) -> None:
    async with running({"login_attempts_per_minute": 2}) as h:
        url = h.url + "/api/v1/auth/login"
        async with h.session.post(url, json={"agent_id": "1001", "secret": PIN}) as resp:
            session_token = (await resp.json())["token"]
        for _ in range(3):
            async with h.session.post(url, json={"agent_id": "2001", "secret": "wrong-secret-5309"}):
                pass
        for token in (session_token, TOKENS["sup"], "forged-token-31337"):
            async with h.session.get(h.url + "/api/v1/agents", headers={"Authorization": f"Bearer {token}"}):
                pass
        ws = await h.ws()
        await ws.send_json({"op": "auth", "req_id": 1, "token": "forged-ws-token-4242"})
        assert (await recv(ws))["error"]["code"] == "unauthorized"
        ws = await h.ws()
        assert (await request(ws, "auth", token=TOKENS["agent-1001"]))["type"] == "ack"
        await request(ws, "login", 2, device="PJSIP/1001")
        async with h.session.post(h.url + "/api/v1/agents/1001/pause", json={"reason": "break"},
                                  headers={"Authorization": f"Bearer {session_token}"}):
            pass
    text = captured_logs.getvalue()
    assert "auth.signed_in" in text and "auth.sign_in_failed" in text and "ws.auth_failed" in text
    assert "auth.sign_in_rate_limited" in text and "agent.command" in text
    assert "aiohttp.access" in text or "GET /api/v1/agents" in text, "the access log is captured too"
    secrets_ = [session_token, PIN, "wrong-secret-5309", "forged-token-31337", "forged-ws-token-4242",
                *TOKENS.values(), *(sha256(t) for t in TOKENS.values()), sha256(session_token)]
    for secret in secrets_:
        assert secret not in text, f"a secret leaked into the logs: {secret[:6]}..."
