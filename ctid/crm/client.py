"""The CRM lookup client: one shared HTTP session, URL-encoded templates, hard timeouts.

Used for the screen pop (run when the call starts, never on the offer path) and by the
IVR's ``lookup`` node. :meth:`CRMClient.lookup` never raises for anything the network
or the CRM does; it returns a :class:`CRMResult` whose ``error`` is one of:

``timeout``
    the whole request (connect, send, headers, body) took longer than ``timeout_ms``;
``http_<status>``
    the CRM answered with a status outside 2xx (redirects are not followed, so a 3xx
    is ``http_3xx``: a redirect to another host must not receive the API key headers);
``bad_json``
    a 2xx body that is not JSON (or not UTF-8, or has ``NaN``/``Infinity``);
``not_an_object``
    valid JSON that is not an object (an array, a string, ``null`` ...);
``unreachable``
    connection refused or reset, DNS or TLS failure, truncated body, or the client was
    closed while the request was in flight;
``too_large``
    the (decompressed) body is over :data:`MAX_BODY_BYTES`;
``bad_config``
    the request could not be built: unknown placeholder, a header ``env:NAME`` whose
    variable is not set, a non-ASCII template, a value that is exactly ``.`` or ``..``.

Only a 2xx response with a JSON object is ``ok``. It raises only for programming errors
(``lookup`` before :meth:`CRMClient.start` or after :meth:`CRMClient.close`), and it
never swallows cancellation.

**Values.** ``values`` fills the template's ``{name}`` placeholders through
:func:`ctid.asterisk.safety.render_url_template` (every value URL-encoded, so a value
can never add a query parameter, a path segment or change the host). The lead passes
``caller`` (caller ID as received), ``caller_e164`` (its E.164 form, empty when there
is none), ``dnis``, ``service_line``, ``tenant`` and ``call_id``; ``None`` renders as
empty. A POST renders its URL the same way and also sends all the values as a JSON
object body (``Content-Type: application/json`` unless the config sets one).

**Headers.** From the config; a value ``env:NAME`` is replaced by the environment
variable ``NAME`` (read at each lookup from the ``env`` mapping given to the client).

**Cache.** Successes only, for ``cache_ttl`` seconds of the injected ``clock`` (0: no
cache), bounded LRU of ``max_cache_entries``. The key is the method, the rendered URL,
the body and the resolved headers (two tenants sharing a URL with different API keys
never see each other's answers). Each caller gets its own copy of ``data``.

**Single flight.** Concurrent lookups with the same key share one HTTP request. Each
caller waits with its own deadline; cancelling one caller does not cancel the request
for the others. When the last caller leaves, the request is cancelled.

**Logs.** One ``crm.lookup`` line per lookup with the method, the URL host and the
*template's* path (placeholders, not values: values carry caller numbers), the outcome,
status and elapsed time. Query strings, header values and exception messages (which may
quote the URL) are never logged.
"""

from __future__ import annotations

import asyncio
import copy
import functools
import json
import os
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Final, Literal
from urllib.parse import urlsplit

import aiohttp
import structlog
from yarl import URL

from ctid import __version__
from ctid.asterisk.safety import UnsafeValueError, render_url_template
from ctid.config import CRMConfig

__all__ = [
    "CONNECTION_LIMIT",
    "MAX_BODY_BYTES",
    "CRMClient",
    "CRMError",
    "CRMResult",
]

log = structlog.get_logger(__name__)

MAX_BODY_BYTES: Final = 256 * 1024
"""Largest response body accepted (after decompression)."""
CONNECTION_LIMIT: Final = 64
"""Open connections of the shared session, all CRMs together."""
_READ_CHUNK: Final = 16 * 1024
_ENV_PREFIX: Final = "env:"
_USER_AGENT: Final = f"ctid/{__version__}"

CRMError = Literal[
    "timeout", "bad_json", "not_an_object", "unreachable", "too_large", "bad_config"
]
"""The fixed error labels; ``http_<status>`` (e.g. ``http_500``) completes the set."""

_CacheKey = tuple[str, str, bytes, tuple[tuple[str, str], ...]]


@dataclass(frozen=True, slots=True)
class CRMResult:
    """Outcome of one lookup.

    ``data`` is the JSON object when ``ok``; ``error`` is None when ``ok``, else one of
    the labels in the module docstring. ``elapsed_ms`` is this caller's wall time
    (``time.perf_counter``). ``cached`` is True for a cache hit. ``status`` is the HTTP
    status when a response arrived.
    """

    ok: bool
    data: dict[str, Any] | None
    error: str | None
    elapsed_ms: float
    cached: bool = False
    status: int | None = None


@dataclass(frozen=True, slots=True)
class _Outcome:
    """What the shared request produced, before it is handed to each caller."""

    data: dict[str, Any] | None = None
    error: str | None = None
    status: int | None = None


@dataclass(frozen=True, slots=True)
class _Request:
    method: str
    url: URL
    body: bytes | None
    headers: dict[str, str]
    key: _CacheKey


@dataclass(slots=True)
class _Flight:
    task: asyncio.Task[_Outcome]
    waiters: int = 0


@dataclass(slots=True)
class _Entry:
    expires: float
    outcome: _Outcome = field(repr=False)


class _BadConfig(Exception):
    """The request cannot be built; the message is safe to log (no values)."""


class CRMClient:
    """One HTTP client for every CRM lookup; see the module docstring."""

    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_cache_entries: int = 10000,
        env: Mapping[str, str] = os.environ,
    ) -> None:
        if max_cache_entries < 0:
            raise ValueError("max_cache_entries must be >= 0")
        self._clock = clock
        self._max_entries = max_cache_entries
        self._env = env
        self._session: aiohttp.ClientSession | None = None
        self._closed = False
        self._cache: OrderedDict[_CacheKey, _Entry] = OrderedDict()
        self._inflight: dict[_CacheKey, _Flight] = {}

    # ----------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        """Create the shared session. Must run inside the event loop that uses it."""
        if self._closed:
            raise RuntimeError("CRMClient is closed")
        if self._session is not None:
            return
        connector = aiohttp.TCPConnector(limit=CONNECTION_LIMIT, ttl_dns_cache=60)
        self._session = aiohttp.ClientSession(
            connector=connector,
            cookie_jar=aiohttp.DummyCookieJar(),
            # The whole-request deadline is asyncio.timeout(timeout_ms) in _fetch.
            timeout=aiohttp.ClientTimeout(total=None),
            headers={"User-Agent": _USER_AGENT, "Accept": "application/json"},
            trust_env=False,
        )

    async def close(self) -> None:
        """Cancel in-flight requests (their callers get ``unreachable``), close the session."""
        self._closed = True
        flights = list(self._inflight.values())
        self._inflight.clear()
        for flight in flights:
            flight.task.cancel()
        if flights:
            await asyncio.gather(*(f.task for f in flights), return_exceptions=True)
        self._cache.clear()
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    async def __aenter__(self) -> CRMClient:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # ----------------------------------------------------------------- lookup

    async def lookup(self, config: CRMConfig, values: Mapping[str, object]) -> CRMResult:
        """Run one lookup; never raises for network or CRM errors (see module docstring)."""
        session = self._session
        if session is None:
            raise RuntimeError("CRMClient.lookup() before start() or after close()")
        started = time.perf_counter()
        fields = _log_fields(config)
        try:
            request = self._prepare(config, values)
        except _BadConfig as exc:
            result = CRMResult(ok=False, data=None, error="bad_config", elapsed_ms=_ms(started))
            log.warning("crm.lookup", **fields, outcome="bad_config", reason=str(exc),
                        elapsed_ms=round(result.elapsed_ms, 1))
            return result

        if config.cache_ttl > 0:
            hit = self._cache_get(request.key)
            if hit is not None:
                result = _to_result(hit, started, cached=True)
                log.info("crm.lookup", **fields, outcome="ok", status=hit.status, cached=True,
                         elapsed_ms=round(result.elapsed_ms, 1))
                return result

        flight = self._inflight.get(request.key)
        shared = flight is not None
        if flight is None:
            task = asyncio.create_task(self._fetch(session, request, config))
            flight = _Flight(task)
            self._inflight[request.key] = flight
            task.add_done_callback(functools.partial(self._landed, request.key, flight))
        flight.waiters += 1
        try:
            async with asyncio.timeout(config.timeout_ms / 1000):
                outcome = await asyncio.shield(flight.task)
        except TimeoutError:
            # This caller's own deadline (it may have joined a request started earlier).
            outcome = _Outcome(error="timeout")
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if flight.task.cancelled() and current is not None and not current.cancelling():
                # The request was cancelled under us by close(), not this caller.
                outcome = _Outcome(error="unreachable")
            else:
                log.info("crm.lookup", **fields, outcome="cancelled", shared=shared,
                         elapsed_ms=round(_ms(started), 1))
                raise
        finally:
            flight.waiters -= 1
            if flight.waiters == 0 and not flight.task.done():
                # Nobody wants the answer any more: free the connection.
                if self._inflight.get(request.key) is flight:
                    del self._inflight[request.key]
                flight.task.cancel()
        result = _to_result(outcome, started, cached=False)
        level = log.info if result.ok else log.warning
        level("crm.lookup", **fields, outcome="ok" if result.ok else result.error,
              status=result.status, shared=shared, elapsed_ms=round(result.elapsed_ms, 1))
        return result

    # ----------------------------------------------------------------- internals

    def _prepare(self, config: CRMConfig, values: Mapping[str, object]) -> _Request:
        try:
            rendered = render_url_template(config.url, values)
        except UnsafeValueError as exc:
            raise _BadConfig(str(exc)) from None
        if not rendered.isascii():
            raise _BadConfig("URL template must be ASCII (percent-encode paths, punycode hosts)")
        try:
            # encoded=True: send exactly what render_url_template produced (yarl would
            # otherwise decode %26, %3D, %2F ... inside path segments).
            url = URL(rendered, encoded=True)
        except ValueError:
            raise _BadConfig("URL template does not render to a valid URL") from None
        if url.scheme not in ("http", "https") or not url.host:
            raise _BadConfig("URL must be http:// or https:// with a host")

        headers: dict[str, str] = {}
        for name, raw in config.headers.items():
            value = raw
            if raw.startswith(_ENV_PREFIX):
                var = raw[len(_ENV_PREFIX):]
                resolved = self._env.get(var)
                if resolved is None:
                    raise _BadConfig(f"header {name}: environment variable {var} is not set")
                if any(c in resolved for c in "\r\n\0"):
                    raise _BadConfig(f"header {name}: environment variable {var} has CR/LF/NUL")
                value = resolved
            headers[name] = value

        body: bytes | None = None
        if config.method == "POST":
            try:
                body = json.dumps(dict(values), sort_keys=True, separators=(",", ":"),
                                  ensure_ascii=False, default=str).encode()
            except (TypeError, ValueError):
                raise _BadConfig("values cannot be sent as a JSON object") from None
            if not any(k.lower() == "content-type" for k in headers):
                headers["Content-Type"] = "application/json"
        key: _CacheKey = (config.method, rendered, body or b"", tuple(sorted(headers.items())))
        return _Request(config.method, url, body, headers, key)

    async def _fetch(
        self, session: aiohttp.ClientSession, request: _Request, config: CRMConfig
    ) -> _Outcome:
        status: int | None = None
        try:
            async with asyncio.timeout(config.timeout_ms / 1000):
                async with session.request(
                    request.method,
                    request.url,
                    data=request.body,
                    headers=request.headers,
                    allow_redirects=False,
                ) as response:
                    status = response.status
                    if not 200 <= status < 300:
                        return _Outcome(error=f"http_{status}", status=status)
                    length = response.content_length
                    if length is not None and length > MAX_BODY_BYTES:
                        return _Outcome(error="too_large", status=status)
                    body = await _read_capped(response.content)
                    if body is None:
                        return _Outcome(error="too_large", status=status)
        except TimeoutError:  # also aiohttp's ServerTimeoutError
            return _Outcome(error="timeout", status=status)
        except aiohttp.InvalidURL:
            return _Outcome(error="bad_config")
        except (aiohttp.ClientError, OSError):
            return _Outcome(error="unreachable", status=status)

        try:
            data = json.loads(body, parse_constant=_reject_constant)
        except (ValueError, RecursionError):  # JSONDecodeError and UnicodeDecodeError
            return _Outcome(error="bad_json", status=status)
        if not isinstance(data, dict):
            return _Outcome(error="not_an_object", status=status)
        outcome = _Outcome(data=data, status=status)
        if config.cache_ttl > 0:
            self._cache_put(request.key, outcome, config.cache_ttl)
        return outcome

    def _landed(self, key: _CacheKey, flight: _Flight, _task: object) -> None:
        if self._inflight.get(key) is flight:
            del self._inflight[key]
        if not flight.task.cancelled() and flight.task.exception() is not None:
            # A bug in _fetch; the waiters re-raise it, and this marks it retrieved
            # when every waiter left first.
            log.error("crm.fetch_failed", exc_info=flight.task.exception())

    def _cache_get(self, key: _CacheKey) -> _Outcome | None:
        entry = self._cache.get(key)
        if entry is None:
            return None
        if self._clock() >= entry.expires:
            del self._cache[key]
            return None
        self._cache.move_to_end(key)
        return entry.outcome

    def _cache_put(self, key: _CacheKey, outcome: _Outcome, ttl: float) -> None:
        if self._max_entries == 0 or self._closed:
            return
        self._cache[key] = _Entry(self._clock() + ttl, _Outcome(copy.deepcopy(outcome.data),
                                                               None, outcome.status))
        self._cache.move_to_end(key)
        while len(self._cache) > self._max_entries:
            self._cache.popitem(last=False)


async def _read_capped(stream: aiohttp.StreamReader) -> bytes | None:
    """The body, or None once it grows past MAX_BODY_BYTES."""
    chunks: list[bytes] = []
    size = 0
    while True:
        chunk = await stream.read(_READ_CHUNK)
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            return None
        chunks.append(chunk)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"JSON constant {name} is not allowed")


def _to_result(outcome: _Outcome, started: float, *, cached: bool) -> CRMResult:
    data = copy.deepcopy(outcome.data) if outcome.data is not None else None
    return CRMResult(
        ok=outcome.error is None and data is not None,
        data=data,
        error=outcome.error,
        elapsed_ms=_ms(started),
        cached=cached,
        status=outcome.status,
    )


def _log_fields(config: CRMConfig) -> dict[str, Any]:
    # The template's host and path: placeholders, never rendered values.
    parts = urlsplit(config.url)
    return {"method": config.method, "host": parts.hostname, "path": parts.path}


def _ms(started: float) -> float:
    return (time.perf_counter() - started) * 1000.0
