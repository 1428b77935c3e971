"""CRMClient against a real aiohttp server on 127.0.0.1: fast, slow, down and garbage."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, unquote

import pytest
from aiohttp import web
from structlog.testing import capture_logs

from ctid.config import CRMConfig
from ctid.crm import MAX_BODY_BYTES, CRMClient, CRMResult

BOUND = 5.0  # seconds; generous bound for what must "happen promptly"


@dataclass
class CRMServer:
    port: int
    hits: list[str] = field(default_factory=list)
    gate: asyncio.Event = field(default_factory=asyncio.Event)
    at_gate: asyncio.Event = field(default_factory=asyncio.Event)
    release: asyncio.Event = field(default_factory=asyncio.Event)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def count(self, prefix: str) -> int:
        return sum(1 for hit in self.hits if hit.startswith(prefix))


def _app(server: CRMServer) -> web.Application:
    async def handle(request: web.Request) -> web.StreamResponse:
        path = request.rel_url.raw_path
        server.hits.append(path)
        body = await request.read()
        if path.startswith("/ok"):
            return web.json_response({
                "name": "Alice",
                "vip": True,
                "method": request.method,
                "raw_path": path,
                "raw_query": request.rel_url.raw_query_string,
                "body": body.decode(),
                "headers": {k: v for k, v in request.headers.items() if k.lower().startswith("x-")},
                "content_type": request.headers.get("Content-Type"),
            })
        if path.startswith("/gate"):
            server.at_gate.set()
            await asyncio.wait_for(server.gate.wait(), BOUND * 2)
            return web.json_response({"gated": True})
        if path.startswith("/slow"):
            with_timeout = asyncio.wait_for(server.release.wait(), BOUND * 2)
            try:
                await with_timeout
            except TimeoutError:
                pass
            return web.json_response({"late": True})
        if path == "/garbage":
            return web.Response(text="<html>not json</html>", content_type="text/html")
        if path == "/latin1":
            return web.Response(body=b'{"name": "\xe9"}', content_type="application/json")
        if path == "/nan":
            return web.Response(text='{"score": NaN}', content_type="application/json")
        if path == "/array":
            return web.json_response([1, 2, 3])
        if path == "/null":
            return web.json_response(None)
        if path == "/error":
            return web.json_response({"error": "boom"}, status=500)
        if path == "/missing":
            return web.json_response({"error": "no such caller"}, status=404)
        if path == "/redirect":
            raise web.HTTPFound(server.url("/ok/redirected"))
        if path == "/huge":
            return web.json_response({"blob": "x" * (MAX_BODY_BYTES + 10)})
        if path == "/huge-chunked":
            response = web.StreamResponse(headers={"Content-Type": "application/json"})
            response.enable_chunked_encoding()
            await response.prepare(request)
            await response.write(b'{"blob": "')
            for _ in range(MAX_BODY_BYTES // 16384 + 2):
                await response.write(b"x" * 16384)
            await response.write(b'"}')
            await response.write_eof()
            return response
        return web.json_response({"error": "unknown test path"}, status=418)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


@pytest.fixture
async def crm_server() -> AsyncIterator[CRMServer]:
    server = CRMServer(port=0)
    runner = web.AppRunner(_app(server), shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    sockets = runner.addresses
    server.port = sockets[0][1]
    try:
        yield server
    finally:
        server.gate.set()
        server.release.set()
        await runner.cleanup()


@pytest.fixture
def down_port() -> Iterator[int]:
    """A port that is bound (so nobody else takes it) but not listening: refused at once."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    try:
        yield sock.getsockname()[1]
    finally:
        sock.close()


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def client() -> AsyncIterator[CRMClient]:
    async with CRMClient(env={"CRM_KEY": "s3cret-key"}) as crm:
        yield crm


def cfg(url: str, **kwargs: Any) -> CRMConfig:
    kwargs.setdefault("cache_ttl", 0)
    return CRMConfig(url=url, **kwargs)


VALUES: dict[str, object] = {
    "caller": "+442079460000",
    "caller_e164": "+442079460000",
    "dnis": "8000",
    "service_line": "sales",
    "tenant": "acme",
    "call_id": "c-1",
}


def _assert_failed(result: CRMResult, error: str) -> None:
    assert result.ok is False
    assert result.error == error
    assert result.data is None
    assert result.cached is False


# --------------------------------------------------------------------------- fast path


async def test_get_ok(client: CRMClient, crm_server: CRMServer) -> None:
    result = await client.lookup(cfg(crm_server.url("/ok/lookup?ani={caller}")), VALUES)
    assert result.ok is True
    assert result.error is None
    assert result.status == 200
    assert result.cached is False
    assert result.data is not None
    assert result.data["name"] == "Alice"
    assert result.data["method"] == "GET"
    assert result.data["raw_query"] == "ani=%2B442079460000"
    assert result.data["body"] == ""
    assert result.elapsed_ms > 0


async def test_hostile_values_arrive_exactly_and_add_no_parameters(
    client: CRMClient, crm_server: CRMServer
) -> None:
    hostile = {
        "caller": "+44 20&x=1",
        "name": "../é☃?#%41",
        "seg": "../../admin",
        "empty": None,
    }
    template = crm_server.url("/ok/c/{seg}/{caller}?ani={caller}&n={name}&e={empty}")
    result = await client.lookup(cfg(template), hostile)
    assert result.ok, result
    assert result.data is not None
    query = parse_qsl(result.data["raw_query"], keep_blank_values=True, strict_parsing=True)
    assert query == [("ani", "+44 20&x=1"), ("n", "../é☃?#%41"), ("e", "")]
    segments = [unquote(s) for s in result.data["raw_path"].split("/")]
    assert segments == ["", "ok", "c", "../../admin", "+44 20&x=1"]
    # Sent byte for byte as rendered: no re-quoting (which turns %26 into & in a path).
    assert result.data["raw_path"] == "/ok/c/..%2F..%2Fadmin/%2B44%2020%26x%3D1"


async def test_dot_segment_value_is_refused_before_any_request(
    client: CRMClient, crm_server: CRMServer
) -> None:
    result = await client.lookup(cfg(crm_server.url("/ok/{caller}")), {"caller": ".."})
    _assert_failed(result, "bad_config")
    assert crm_server.hits == []


async def test_unknown_placeholder_is_bad_config(client: CRMClient, crm_server: CRMServer) -> None:
    result = await client.lookup(cfg(crm_server.url("/ok?x={nope}")), VALUES)
    _assert_failed(result, "bad_config")
    assert crm_server.hits == []


async def test_post_sends_values_as_json_body(client: CRMClient, crm_server: CRMServer) -> None:
    values = {**VALUES, "caller": "+44 20&x=1"}
    config = cfg(crm_server.url("/ok/post/{tenant}"), method="POST")
    result = await client.lookup(config, values)
    assert result.ok, result
    assert result.data is not None
    assert result.data["method"] == "POST"
    assert result.data["raw_path"] == "/ok/post/acme"
    assert result.data["raw_query"] == ""
    assert result.data["content_type"] == "application/json"
    assert json.loads(result.data["body"]) == values


async def test_headers_static_and_from_env(client: CRMClient, crm_server: CRMServer) -> None:
    config = cfg(crm_server.url("/ok/h"), headers={"X-Api-Key": "env:CRM_KEY", "X-Static": "plain"})
    with capture_logs() as logs:
        result = await client.lookup(config, VALUES)
    assert result.ok, result
    assert result.data is not None
    assert result.data["headers"]["X-Api-Key"] == "s3cret-key"
    assert result.data["headers"]["X-Static"] == "plain"
    assert "s3cret-key" not in repr(logs)


async def test_missing_env_header_is_bad_config(crm_server: CRMServer) -> None:
    config = cfg(crm_server.url("/ok/h"), headers={"X-Api-Key": "env:CRM_KEY"})
    async with CRMClient(env={}) as crm:
        with capture_logs() as logs:
            result = await crm.lookup(config, VALUES)
    _assert_failed(result, "bad_config")
    assert crm_server.hits == []
    [line] = [e for e in logs if e["event"] == "crm.lookup"]
    assert line["outcome"] == "bad_config"
    assert "CRM_KEY" in line["reason"]


# --------------------------------------------------------------------------- slow, down


async def test_slow_server_times_out(client: CRMClient, crm_server: CRMServer) -> None:
    timeout_ms = 200
    started = time.perf_counter()
    result = await client.lookup(cfg(crm_server.url("/slow"), timeout_ms=timeout_ms), VALUES)
    wall = time.perf_counter() - started
    _assert_failed(result, "timeout")
    assert crm_server.count("/slow") == 1
    assert wall >= timeout_ms / 1000 * 0.9
    assert wall < timeout_ms / 1000 * 3
    assert result.elapsed_ms < timeout_ms * 3


async def test_down_server_is_unreachable_fast(client: CRMClient, down_port: int) -> None:
    started = time.perf_counter()
    config = cfg(f"http://127.0.0.1:{down_port}/lookup?ani={{caller}}", timeout_ms=5000)
    result = await client.lookup(config, VALUES)
    _assert_failed(result, "unreachable")
    assert result.status is None
    assert time.perf_counter() - started < 2.5  # refused, not waiting for the timeout


# --------------------------------------------------------------------------- garbage


@pytest.mark.parametrize(
    ("path", "error", "status"),
    [
        ("/garbage", "bad_json", 200),
        ("/latin1", "bad_json", 200),
        ("/nan", "bad_json", 200),
        ("/array", "not_an_object", 200),
        ("/null", "not_an_object", 200),
        ("/error", "http_500", 500),
        ("/missing", "http_404", 404),
        ("/redirect", "http_302", 302),
        ("/huge", "too_large", 200),
        ("/huge-chunked", "too_large", 200),
    ],
)
async def test_garbage(client: CRMClient, crm_server: CRMServer, path: str, error: str, status: int) -> None:
    result = await client.lookup(cfg(crm_server.url(path), timeout_ms=5000), VALUES)
    _assert_failed(result, error)
    assert result.status == status
    assert crm_server.hits == [path]  # the redirect is not followed


async def test_client_still_works_after_errors(client: CRMClient, crm_server: CRMServer) -> None:
    for path in ("/huge-chunked", "/error", "/garbage"):
        assert not (await client.lookup(cfg(crm_server.url(path)), VALUES)).ok
    assert (await client.lookup(cfg(crm_server.url("/ok/again")), VALUES)).ok


# --------------------------------------------------------------------------- cache


async def test_cache_hit_within_ttl_and_miss_after(crm_server: CRMServer) -> None:
    clock = FakeClock()
    config = cfg(crm_server.url("/ok/cache?ani={caller}"), cache_ttl=10)
    async with CRMClient(clock=clock) as crm:
        first = await crm.lookup(config, VALUES)
        clock.now += 9.9
        second = await crm.lookup(config, VALUES)
        assert first.ok and not first.cached
        assert second.ok and second.cached
        assert second.data == first.data
        assert crm_server.count("/ok/cache") == 1

        clock.now += 0.2
        third = await crm.lookup(config, VALUES)
        assert third.ok and not third.cached
        assert crm_server.count("/ok/cache") == 2

        other = await crm.lookup(config, {**VALUES, "caller": "+15550100"})
        assert not other.cached
        assert crm_server.count("/ok/cache") == 3


async def test_cached_data_is_a_private_copy(crm_server: CRMServer) -> None:
    config = cfg(crm_server.url("/ok/copy"), cache_ttl=60)
    async with CRMClient() as crm:
        first = await crm.lookup(config, VALUES)
        assert first.data is not None
        first.data["name"] = "Mallory"
        second = await crm.lookup(config, VALUES)
        assert second.cached and second.data is not None
        assert second.data["name"] == "Alice"


async def test_failures_and_ttl_zero_are_not_cached(client: CRMClient, crm_server: CRMServer) -> None:
    for _ in range(2):
        assert (await client.lookup(cfg(crm_server.url("/error"), cache_ttl=60), VALUES)).error == "http_500"
        assert (await client.lookup(cfg(crm_server.url("/ok/nocache"), cache_ttl=0), VALUES)).ok
    assert crm_server.count("/error") == 2
    assert crm_server.count("/ok/nocache") == 2


async def test_cache_is_bounded_lru(crm_server: CRMServer) -> None:
    async with CRMClient(max_cache_entries=2) as crm:
        configs = [cfg(crm_server.url(f"/ok/lru{i}"), cache_ttl=60) for i in range(3)]
        await crm.lookup(configs[0], VALUES)
        await crm.lookup(configs[1], VALUES)
        assert (await crm.lookup(configs[0], VALUES)).cached  # 0 is now most recent
        await crm.lookup(configs[2], VALUES)  # evicts 1
        assert (await crm.lookup(configs[0], VALUES)).cached
        assert not (await crm.lookup(configs[1], VALUES)).cached
    assert crm_server.count("/ok/lru1") == 2


async def test_headers_are_part_of_the_cache_key(crm_server: CRMServer) -> None:
    async with CRMClient(env={"A": "key-a", "B": "key-b"}) as crm:
        a = cfg(crm_server.url("/ok/tenant"), cache_ttl=60, headers={"X-Api-Key": "env:A"})
        b = cfg(crm_server.url("/ok/tenant"), cache_ttl=60, headers={"X-Api-Key": "env:B"})
        assert not (await crm.lookup(a, VALUES)).cached
        result = await crm.lookup(b, VALUES)
        assert not result.cached and result.data is not None
        assert result.data["headers"]["X-Api-Key"] == "key-b"


# --------------------------------------------------------------------------- single flight


async def _at_gate(server: CRMServer) -> None:
    await asyncio.wait_for(server.at_gate.wait(), BOUND)


async def test_single_flight_shares_one_request(client: CRMClient, crm_server: CRMServer) -> None:
    config = cfg(crm_server.url("/gate?ani={caller}"), timeout_ms=5000)
    tasks = [asyncio.create_task(client.lookup(config, VALUES)) for _ in range(3)]
    await _at_gate(crm_server)
    await asyncio.sleep(0.05)
    crm_server.gate.set()
    results = await asyncio.gather(*tasks)
    assert all(r.ok and r.data == {"gated": True} for r in results)
    assert crm_server.count("/gate") == 1
    data = [r.data for r in results]
    assert data[0] is not data[1]  # each caller gets its own copy


async def test_cancelling_one_caller_keeps_the_shared_request(
    client: CRMClient, crm_server: CRMServer
) -> None:
    config = cfg(crm_server.url("/gate"), timeout_ms=5000)
    first = asyncio.create_task(client.lookup(config, VALUES))
    await _at_gate(crm_server)
    second = asyncio.create_task(client.lookup(config, VALUES))
    await asyncio.sleep(0.02)
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    crm_server.gate.set()
    result = await asyncio.wait_for(second, BOUND)
    assert result.ok and result.data == {"gated": True}
    assert crm_server.count("/gate") == 1


async def test_cancellation_propagates_and_frees_the_request(
    client: CRMClient, crm_server: CRMServer
) -> None:
    config = cfg(crm_server.url("/gate"), timeout_ms=5000)
    task = asyncio.create_task(client.lookup(config, VALUES))
    await _at_gate(crm_server)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # The caller's own deadline is a cancellation too: it surfaces as the caller's TimeoutError.
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.05):
            await client.lookup(config, VALUES)
    # The abandoned requests were dropped, so a new lookup makes a new request.
    crm_server.gate.set()
    result = await asyncio.wait_for(client.lookup(config, VALUES), BOUND)
    assert result.ok
    assert crm_server.count("/gate") == 3


async def test_close_while_in_flight_gives_unreachable(crm_server: CRMServer) -> None:
    crm = CRMClient()
    await crm.start()
    task = asyncio.create_task(crm.lookup(cfg(crm_server.url("/gate"), timeout_ms=5000), VALUES))
    await _at_gate(crm_server)
    await crm.close()
    result = await asyncio.wait_for(task, BOUND)
    _assert_failed(result, "unreachable")
    with pytest.raises(RuntimeError):
        await crm.lookup(cfg(crm_server.url("/ok")), VALUES)


async def test_lookup_before_start_is_a_programming_error() -> None:
    with pytest.raises(RuntimeError):
        await CRMClient().lookup(cfg("http://127.0.0.1:9/x"), VALUES)
    with pytest.raises(ValueError):
        CRMClient(max_cache_entries=-1)


# --------------------------------------------------------------------------- logs


async def test_logs_carry_host_and_template_path_never_values(
    client: CRMClient, crm_server: CRMServer, down_port: int
) -> None:
    number = "+447700900123"
    values = {**VALUES, "caller": number, "caller_e164": number}
    configs = [
        cfg(crm_server.url("/ok/customers/{caller}?ani={caller_e164}")),
        cfg(crm_server.url("/error?ani={caller}")),
        cfg(crm_server.url("/slow?ani={caller}"), timeout_ms=50),
        cfg(f"http://127.0.0.1:{down_port}/x?ani={{caller}}"),
        cfg(crm_server.url("/ok/post?ani={caller}"), method="POST"),
    ]
    with capture_logs() as logs:
        results = [await client.lookup(c, values) for c in configs]
    assert [r.error for r in results] == [None, "http_500", "timeout", "unreachable", None]
    lines = [e for e in logs if e["event"] == "crm.lookup"]
    assert len(lines) == len(configs)
    assert lines[0]["host"] == "127.0.0.1"
    assert lines[0]["path"] == "/ok/customers/{caller}"
    assert [e["outcome"] for e in lines] == ["ok", "http_500", "timeout", "unreachable", "ok"]
    assert all("elapsed_ms" in e for e in lines)
    text = repr(logs)
    for needle in (number, "447700900123", "%2B447700900123", "ani="):
        assert needle not in text
