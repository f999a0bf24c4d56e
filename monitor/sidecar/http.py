"""The sidecar's HTTP listeners: uvicorn (h11) + starlette, each on its own thread and event loop.

* the **scrape listener** (``host:port``) serves ``GET /metrics``, ``/healthz``, ``/readyz`` and nothing else;
* the **ingest listener** (``ingest.host:ingest.port``, only when ``ingest.enabled``) serves ``POST /ingest``,
  behind a bearer token compared in constant time.

Two listeners on two event loops: however many bodies are posted to ``/ingest``, the scrape loop is not
the one reading them. Against slow or many clients, on both listeners:

* a request's headers must arrive within ``http.header_timeout_seconds`` (a connection that trickles a
  header a byte at a time, or never sends one, is closed), idle keep-alive connections are closed after
  ``http.keep_alive_seconds``, headers are capped at 16 KiB (h11);
* at most ``http.max_connections`` connections are kept per listener: above it the **oldest idle**
  connection (no request in progress) is closed to make room, so a flood of idle connections cannot lock
  out a new scrape;
* ingest bodies: ``Content-Length`` required (chunked bodies are refused with 411), at most
  ``ingest.max_body_bytes`` (413), at most ``ingest.max_concurrent_bodies`` read and analyzed at once (503
  with ``Retry-After`` above it), and the body must arrive within ``http.body_timeout_seconds`` (408).
  Memory for ingest is therefore bounded by ``max_concurrent_bodies x (body + decoded arrays)``
  (docs/sidecar.md gives the figure).

Handlers that take the analyzer lock (a scrape, an ingest batch) run in the thread pool, not on the loop.
"""

from __future__ import annotations

import asyncio
import gzip
import hmac
import logging
import socket
import threading
import time
from typing import Any, Protocol

import uvicorn
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("latentwatch.sidecar")


class Servable(Protocol):
    """What the listeners need from the sidecar."""

    registry: CollectorRegistry
    settings: Any

    def ready(self) -> bool: ...
    def ingest_body(self, data: bytes, key: str | None = None) -> tuple[int, dict[str, Any]]: ...


def _guarded_protocol(max_connections: int, header_timeout: float) -> type[H11Protocol]:
    """An h11 protocol with a header deadline and eviction of the oldest idle connection above a cap."""

    class Guarded(H11Protocol):
        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._idle_since = self.loop.time()
            self._deadline = self.loop.call_later(header_timeout, self._check_deadline)
            if len(self.connections) > max_connections:
                idle = [c for c in self.connections if c is not self and not _busy(c)]
                for victim in sorted(idle, key=lambda c: getattr(c, "_idle_since", 0.0))[
                        : len(self.connections) - max_connections]:
                    victim.transport.close()

        def _check_deadline(self) -> None:
            if self.transport.is_closing():
                return
            waited = self.loop.time() - self._idle_since
            if not _busy(self) and waited >= header_timeout:
                self.transport.close()  # no complete request within the deadline (or idle too long)
                return
            self._deadline = self.loop.call_later(max(header_timeout - waited, 0.05) if not _busy(self)
                                                  else header_timeout, self._check_deadline)

        def on_response_complete(self) -> None:
            self._idle_since = self.loop.time()
            super().on_response_complete()

        def connection_lost(self, exc: Exception | None) -> None:
            self._deadline.cancel()
            super().connection_lost(exc)

    return Guarded


def _busy(conn: Any) -> bool:
    cycle = getattr(conn, "cycle", None)
    return cycle is not None and not cycle.response_complete


def scrape_app(sidecar: Servable) -> Starlette:
    def metrics(request: Request) -> Response:  # sync: runs in the thread pool (it waits for the analyzer lock)
        # OpenMetrics when the scraper asks for it (Accept), gzip when it accepts it (Accept-Encoding)
        encoder, content_type = choose_encoder(request.headers.get("accept", ""))
        body = encoder(sidecar.registry)
        headers = {"Vary": "Accept-Encoding"}
        if _accepts_gzip(request.headers.get("accept-encoding", "")):
            body, headers["Content-Encoding"] = gzip.compress(body, compresslevel=5), "gzip"
        return Response(body, media_type=content_type, headers=headers)

    def healthz(_: Request) -> Response:
        return PlainTextResponse("ok\n")

    def readyz(_: Request) -> Response:
        ok = sidecar.ready()
        return PlainTextResponse("ready\n" if ok else "source not readable\n", status_code=200 if ok else 503)

    return Starlette(routes=[Route("/metrics", metrics), Route("/healthz", healthz), Route("/readyz", readyz)])


def _refuse(status: int, reason: str, **headers: str) -> Response:
    return JSONResponse({"error": reason}, status_code=status, headers=headers or None)


def _accepts_gzip(accept_encoding: str) -> bool:
    """``gzip`` (or ``*``) listed in Accept-Encoding with a q-value above 0."""
    for part in accept_encoding.split(","):
        coding, _, params = part.strip().partition(";")
        if coding.strip().lower() in ("gzip", "*"):
            q = params.strip().lower()
            try:
                return not q.startswith("q=") or float(q[2:]) > 0
            except ValueError:
                return False
    return False


def ingest_app(sidecar: Servable, token: bytes) -> Starlette:
    cfg = sidecar.settings.ingest
    body_timeout = sidecar.settings.http.body_timeout_seconds
    in_flight = 0  # bodies being read or analyzed (this app's event loop only)

    async def ingest(request: Request) -> Response:
        nonlocal in_flight
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token):
            return _refuse(401, "a valid bearer token is required", **{"WWW-Authenticate": "Bearer"})
        if "chunked" in request.headers.get("transfer-encoding", "").lower():
            return _refuse(411, "chunked bodies are not accepted: send Content-Length")
        length_header = request.headers.get("content-length")
        if length_header is None:
            return _refuse(411, "Content-Length is required")
        try:
            length = int(length_header)
        except ValueError:
            return _refuse(400, "Content-Length is not a number")
        if not 0 < length <= cfg.max_body_bytes:
            return _refuse(413, f"body must be 1 to {cfg.max_body_bytes} bytes, got {length}")
        key = request.headers.get("idempotency-key")
        if key is not None and not (0 < len(key) <= 128 and key.isascii() and key.isprintable()):
            return _refuse(400, "Idempotency-Key must be 1 to 128 printable ASCII characters")
        if in_flight >= cfg.max_concurrent_bodies:
            return _refuse(503, f"{in_flight} bodies in flight (max_concurrent_bodies); retry", **{"Retry-After": "1"})
        in_flight += 1
        try:
            buf = bytearray()

            async def read() -> None:
                async for chunk in request.stream():
                    buf.extend(chunk)
                    if len(buf) > length:
                        return

            try:
                await asyncio.wait_for(read(), body_timeout)
            except asyncio.TimeoutError:
                return _refuse(408, f"body not received within {body_timeout:g} s")
            if len(buf) > length:
                return _refuse(400, "body is longer than its Content-Length")
            if len(buf) != length:
                return _refuse(400, f"body ended after {len(buf)} of {length} bytes")
            status, answer = await run_in_threadpool(sidecar.ingest_body, bytes(memoryview(buf)), key)
            return JSONResponse(answer, status_code=status)
        finally:
            in_flight -= 1

    return Starlette(routes=[Route("/ingest", ingest, methods=["POST"])])


class Listener:
    """One uvicorn server on its own thread and event loop, on a socket bound before it starts."""

    def __init__(self, app: Starlette, host: str, port: int, http: Any, name: str) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.sock.bind((host, port))  # OSError here (port taken) reaches the caller
        except OSError:
            self.sock.close()
            raise
        self.sock.listen(1024)
        self.address: tuple[str, int] = self.sock.getsockname()[:2]
        config = uvicorn.Config(app, http=_guarded_protocol(http.max_connections, http.header_timeout_seconds),
                                lifespan="off", log_config=None, access_log=False, server_header=False,
                                timeout_keep_alive=http.keep_alive_seconds, backlog=1024,
                                timeout_graceful_shutdown=http.shutdown_seconds, ws="none")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self._run, name=f"latentwatch-{name}", daemon=True)
        self.name = name

    def _run(self) -> None:
        try:
            self.server.run(sockets=[self.sock])
        except BaseException:  # a crashed listener must be logged, never silent
            log.exception("the %s listener stopped", self.name)

    def start(self, timeout: float = 30.0) -> None:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise OSError(f"the {self.name} listener on {self.address[0]}:{self.address[1]} did not start")
            time.sleep(0.01)

    def stop(self) -> None:
        """Graceful: stop accepting, let in-flight requests finish (up to ``http.shutdown_seconds``)."""
        self.server.should_exit = True
        self.thread.join(timeout=self.server.config.timeout_graceful_shutdown + 5)
        self.sock.close()


class HttpServers:
    """The scrape listener and, when enabled, the ingest listener. ``server_address`` is the scrape one."""

    def __init__(self, sidecar: Servable) -> None:
        s = sidecar.settings
        self.scrape = Listener(scrape_app(sidecar), s.host, s.port, s.http, "scrape")
        self.ingest: Listener | None = None
        try:
            if s.ingest.enabled:
                self.ingest = Listener(ingest_app(sidecar, s.ingest.token()), s.ingest.host, s.ingest.port,
                                       s.http, "ingest")
            self.scrape.start()
            if self.ingest is not None:
                self.ingest.start()
        except BaseException:
            self.stop()
            raise

    @property
    def server_address(self) -> tuple[str, int]:
        return self.scrape.address

    @property
    def ingest_address(self) -> tuple[str, int] | None:
        return self.ingest.address if self.ingest is not None else None

    def stop(self) -> None:
        for listener in (self.ingest, self.scrape):
            if listener is not None:
                if listener.thread.is_alive():
                    listener.stop()
                else:
                    listener.sock.close()

    # the http.server names the demo and older callers use
    def shutdown(self) -> None:
        self.stop()

    def server_close(self) -> None:
        pass


def describe(servers: HttpServers) -> str:
    out = f"http://{servers.server_address[0]}:{servers.server_address[1]} (metrics)"
    if servers.ingest_address:
        out += f", http://{servers.ingest_address[0]}:{servers.ingest_address[1]}/ingest (token required)"
    return out


__all__ = ["HttpServers", "describe", "ingest_app", "scrape_app"]
