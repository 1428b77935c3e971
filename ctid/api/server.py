"""The HTTP and websocket server: one aiohttp application and its lifetime.

:class:`ApiServer` owns the aiohttp runner, the websocket hub (the bus sink) and the
API's Prometheus collector. ``start()`` listens on ``config.http`` and adds the hub
to the bus; ``stop()`` removes it, closes every websocket with 1001 (bounded), then
shuts the runner down. Nothing else in the API starts a task that outlives a request.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Collection, Iterable, Mapping
from datetime import UTC, datetime

import structlog
from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ctid.acd.control import CallControl
from ctid.agents import AgentRegistry
from ctid.api.admin import setup_admin_routes
from ctid.api.auth import Authenticator
from ctid.api.commands import AgentCommands, CallCommands
from ctid.api.openapi import document
from ctid.api.rest import (
    API_CONTEXT,
    ApiContext,
    CallsView,
    ConfigView,
    EndedCalls,
    Health,
    Reload,
    error_middleware,
    setup_routes,
)
from ctid.api.websocket import EventHub, ReplayBus, WebsocketEndpoint
from ctid.config import Config
from ctid.store.provisioning import ProvisioningStore

__all__ = ["ApiServer", "build_app"]

log = structlog.get_logger(__name__)

Clock = Callable[[], datetime]


def _utc_now() -> datetime:
    return datetime.now(UTC)


class _ApiCollector(Collector):
    """Reads the API's counters at scrape time (nothing on the hot path)."""

    def __init__(self, hub: EventHub, auth: Authenticator) -> None:
        self._hub = hub
        self._auth = auth

    def collect(self) -> Iterable[Metric]:
        yield GaugeMetricFamily("ctid_ws_clients", "Open websocket connections", value=len(self._hub))
        yield GaugeMetricFamily("ctid_ws_streaming_clients", "Websocket connections receiving events",
                                value=self._hub.streaming)
        yield CounterMetricFamily("ctid_ws_events_queued", "Events queued to websocket clients",
                                  value=self._hub.delivered)
        yield CounterMetricFamily("ctid_ws_slow_client_drops", "Websocket clients closed (1008) on queue overflow",
                                  value=self._hub.slow_drops)
        yield CounterMetricFamily("ctid_api_sign_in_failures", "Failed desktop sign-ins",
                                  value=self._auth.sign_in_failures)
        yield CounterMetricFamily("ctid_api_sign_in_rate_limited", "Desktop sign-ins refused by the rate limit",
                                  value=self._auth.rate_limited)
        yield GaugeMetricFamily("ctid_api_sessions", "Desktop session tokens in memory",
                                value=self._auth.session_count)


def build_app(ctx: ApiContext, ws: WebsocketEndpoint) -> web.Application:
    app = web.Application(middlewares=[error_middleware], client_max_size=ctx.config.api.max_message_bytes)
    app[API_CONTEXT] = ctx
    setup_routes(app, ws.handle)
    setup_admin_routes(app)
    return app


class ApiServer:
    """The API. Construct it with the daemon's parts, then ``await start()`` / ``await stop()``.

    * ``bus``: the event bus (``add_sink``, ``remove_sink``, ``replay``, ``last_seq``);
    * ``agents``: the agent registry the commands act on;
    * ``calls_view``: the active calls (``GET /api/v1/calls``);
    * ``health``: a report in the shape of ``Daemon.health()`` (``ami``: link id ->
      ``{"state"}``; ``agi``: ``{"listening"}``; plus ``db``, ``broker``, ``event_lag``);
    * ``metrics_registry``: served at ``/metrics``; the API adds its own collector;
    * ``ended_calls(limit)``: recent ended calls from the store (``?state=ended``);
    * ``known_endpoints()``: the devices a login may use (None: pattern check only);
    * ``env``: where ``CTID_TOKEN_<NAME>`` is read (default ``os.environ``);
    * ``provisioning``, ``reload``, ``current_config``: for the admin API
      (``ctid.api.admin``); without a store or a hook its routes answer 503;
    * ``control``: call control (``ctid.acd.control``) behind ``/api/v1/calls/{id}/*``,
      ``/api/v1/agents/{id}/dial`` and the websocket ops of the same names (None: 503).
    """

    def __init__(self, config: Config, bus: ReplayBus, agents: AgentRegistry, calls_view: CallsView,
                 health: Health, metrics_registry: CollectorRegistry, *,
                 ended_calls: EndedCalls | None = None,
                 known_endpoints: Callable[[], Collection[str] | None] | None = None,
                 env: Mapping[str, str] | None = None, clock: Clock = _utc_now,
                 auth_timeout: float = 5.0, close_timeout: float = 5.0, shutdown_timeout: float = 5.0,
                 provisioning: ProvisioningStore | None = None, reload: Reload | None = None,
                 current_config: ConfigView | None = None, control: CallControl | None = None) -> None:
        self.config = config
        self.bus = bus
        self.auth = Authenticator(config.tokens, config.agents, config.api, env=env, clock=clock)
        self.hub = EventHub()
        commands = AgentCommands(agents, known_endpoints)
        calls = CallCommands(control) if control is not None else None
        ctx = ApiContext(config=config, auth=self.auth, registry=agents, commands=commands, bus=bus,
                         calls_view=calls_view, ended_calls=ended_calls, health=health, metrics=metrics_registry,
                         clock=clock, openapi=json.dumps(document()).encode(), provisioning=provisioning,
                         reload=reload, current_config=current_config, calls=calls)
        self.websocket = WebsocketEndpoint(auth=self.auth, bus=bus, hub=self.hub, registry=agents,
                                           commands=commands, api=config.api, queues=list(config.queues),
                                           clock=clock, auth_timeout=auth_timeout, close_timeout=close_timeout,
                                           calls=calls)
        self.app = build_app(ctx, self.websocket)
        self._metrics = metrics_registry
        self._collector = _ApiCollector(self.hub, self.auth)
        self._shutdown_timeout = shutdown_timeout
        self._runner: web.AppRunner | None = None
        self.port: int | None = None

    async def start(self) -> None:
        """Listen on ``config.http`` (port 0: any free port, see :attr:`port`) and join the bus."""
        runner = web.AppRunner(self.app, handle_signals=False, shutdown_timeout=self._shutdown_timeout)
        await runner.setup()
        site = web.TCPSite(runner, self.config.http.bind, self.config.http.port)
        try:
            await site.start()
        except OSError:
            await runner.cleanup()
            raise
        self._runner = runner
        self.port = int(runner.addresses[0][1])
        self._metrics.register(self._collector)
        self.bus.add_sink(self.hub)
        log.info("api.started", bind=self.config.http.bind, port=self.port)

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is None:
            return
        self.bus.remove_sink(self.hub)
        await self.hub.close_all(timeout=self.websocket.close_timeout + 1)
        await runner.cleanup()
        self._metrics.unregister(self._collector)
        log.info("api.stopped")
