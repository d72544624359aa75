"""The local OpenAI-compatible front: apps on the device talk to it instead of the edge.

POST /v1/completions and /v1/chat/completions are forwarded to the edge's OpenAI API with
``"vllm_xargs": {"tslt_session": <this agent's session>}`` added to the JSON body, so the edge binds
the request to this device's drafts; streamed responses (SSE) are relayed chunk by chunk. GET
/v1/models is forwarded as is; GET /health answers locally. Without a session (edge hub not reached
yet) the request is forwarded unbound: the edge decodes alone, the app is never kept waiting on the
draft model. An unreachable edge API becomes an OpenAI-style error with HTTP 502.

Runs its own asyncio loop in a daemon thread (``start()`` / ``stop()``), so the drafting loop and
the front never share a thread.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import Callable
from typing import Any

import aiohttp
from aiohttp import web

from vllm_tslt.agent.config import parse_host_port

logger = logging.getLogger(__name__)

FORWARD_HEADERS = ("authorization", "accept", "openai-organization", "openai-project")


def error_json(status: int, message: str, kind: str) -> web.Response:
    """An OpenAI-style error body."""
    body = {"error": {"message": message, "type": kind, "param": None, "code": status}}
    return web.json_response(body, status=status)


class FrontServer:
    """HTTP front bound to ``listen`` (HOST:PORT; port 0 picks a free one, see ``port``)."""

    def __init__(self, api: str, listen: str, session: Callable[[], str], *,
                 route: Callable[[], int | None] = lambda: None,
                 connect_timeout_s: float = 5.0, timeout_s: float = 600.0,
                 max_request_bytes: int = 8 << 20, max_concurrent: int = 64) -> None:
        self.api = api.rstrip("/")
        self.host, self.port = parse_host_port(listen, "listen (--listen)")
        self._session = session
        # The edge engine that issued the session, with vLLM data parallelism: the handshake's
        # limits["data_parallel_rank"], sent as the X-data-parallel-rank header (None: no header).
        self._route = route
        self._connect_timeout_s = connect_timeout_s
        self._timeout_s = timeout_s
        self._max_request_bytes = max_request_bytes
        self._max_concurrent = max_concurrent
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._http: aiohttp.ClientSession | None = None
        self._slots: asyncio.Semaphore | None = None
        self.counters: dict[str, int] = {"requests": 0, "bound": 0, "unbound": 0, "errors_502": 0}

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    # ------------------------------------------------------------------------------------------
    # Lifecycle
    # ------------------------------------------------------------------------------------------

    def build_app(self) -> web.Application:
        app = web.Application(client_max_size=self._max_request_bytes)
        app.router.add_post("/v1/completions", self._forward_post)
        app.router.add_post("/v1/chat/completions", self._forward_post)
        app.router.add_get("/v1/models", self._forward_get)
        app.router.add_get("/health", self._health)
        return app

    async def start_async(self) -> None:
        timeout = aiohttp.ClientTimeout(connect=self._connect_timeout_s)
        self._http = aiohttp.ClientSession(timeout=timeout)
        self._slots = asyncio.Semaphore(self._max_concurrent)
        self._runner = web.AppRunner(self.build_app(), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        logger.info("OpenAI-compatible front on %s -> %s", self.url, self.api)

    async def stop_async(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._http is not None:
            await self._http.close()

    def start(self, timeout_s: float = 10.0) -> None:
        """Serve from a daemon thread; returns once listening (raises if binding failed)."""
        ready = threading.Event()
        failure: list[BaseException] = []

        def serve() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                loop.run_until_complete(self.start_async())
            except BaseException as e:
                failure.append(e)
                ready.set()
                loop.close()
                return
            ready.set()
            loop.run_forever()
            loop.run_until_complete(self.stop_async())
            loop.close()

        self._thread = threading.Thread(target=serve, name="tslt-front", daemon=True)
        self._thread.start()
        if not ready.wait(timeout_s):
            raise TimeoutError(f"front did not start within {timeout_s} s")
        if failure:
            raise OSError(f"cannot listen on {self.host}:{self.port} (--listen): {failure[0]}")

    def stop(self, timeout_s: float = 5.0) -> None:
        if self._loop is not None and self._thread is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout_s)

    # ------------------------------------------------------------------------------------------
    # Handlers
    # ------------------------------------------------------------------------------------------

    async def _health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "session": self._session() or None})

    def _headers(self, request: web.Request) -> dict[str, str]:
        return {k: v for k, v in request.headers.items() if k.lower() in FORWARD_HEADERS}

    async def _forward_get(self, request: web.Request) -> web.StreamResponse:
        timeout = aiohttp.ClientTimeout(total=self._timeout_s, connect=self._connect_timeout_s)
        try:
            async with self._http.get(self.api + request.path, headers=self._headers(request),  # type: ignore[union-attr]
                                      timeout=timeout) as resp:
                data = await resp.read()
                return web.Response(body=data, status=resp.status, content_type=resp.content_type)
        except (aiohttp.ClientError, asyncio.TimeoutError) as e:
            return self._unreachable(e)

    async def _forward_post(self, request: web.Request) -> web.StreamResponse:
        self.counters["requests"] += 1
        try:
            body = json.loads(await request.read())
        except (ValueError, UnicodeDecodeError) as e:
            return error_json(400, f"request body is not JSON: {e}", "invalid_request_error")
        if not isinstance(body, dict):
            return error_json(400, "request body must be a JSON object", "invalid_request_error")
        xargs = body.get("vllm_xargs") or {}
        if not isinstance(xargs, dict):
            return error_json(400, "vllm_xargs must be an object", "invalid_request_error")
        session = self._session()
        route = self._route() if session else None
        if session:
            body["vllm_xargs"] = {**xargs, "tslt_session": session}
            self.counters["bound"] += 1
        else:
            self.counters["unbound"] += 1
            logger.info("no edge session yet: %s forwarded unbound (the edge decodes alone)",
                        request.path)
        async with self._slots:  # type: ignore[union-attr]
            return await self._relay(request, body, route)

    async def _relay(self, request: web.Request, body: dict[str, Any],
                     route: int | None = None) -> web.StreamResponse:
        stream = bool(body.get("stream"))
        # NOTE: a stream may run for minutes: bound the wait between chunks, not the total.
        timeout = aiohttp.ClientTimeout(total=None if stream else self._timeout_s,
                                        connect=self._connect_timeout_s,
                                        sock_read=self._timeout_s)
        out: web.StreamResponse | None = None
        try:
            headers = self._headers(request)
            if route is not None:  # to the engine whose draft hub holds this device's session
                headers["X-data-parallel-rank"] = str(route)
            async with self._http.post(self.api + request.path, json=body,  # type: ignore[union-attr]
                                       headers=headers, timeout=timeout) as resp:
                if not (stream and resp.status == 200):
                    data = await resp.read()
                    return web.Response(body=data, status=resp.status,
                                        content_type=resp.content_type)
                out = web.StreamResponse(status=200, headers={
                    "Content-Type": resp.headers.get("Content-Type", "text/event-stream"),
                    "Cache-Control": "no-cache"})
                await out.prepare(request)
                async for chunk in resp.content.iter_any():
                    await out.write(chunk)
                await out.write_eof()
                return out
        except (aiohttp.ClientError, asyncio.TimeoutError) as e:
            if out is None:
                return self._unreachable(e)
            # Headers are gone already: end the stream with an error event the app can see.
            logger.warning("edge API stream broke: %r", e)
            err = {"error": {"message": f"edge API stream broke: {e!r}", "type": "edge_error",
                             "code": 502}}
            await out.write(f"data: {json.dumps(err)}\n\n".encode())
            return out

    def _unreachable(self, e: BaseException) -> web.Response:
        self.counters["errors_502"] += 1
        what = "timed out" if isinstance(e, asyncio.TimeoutError) else f"unreachable: {e}"
        logger.warning("edge API %s %s", self.api, what)
        return error_json(502, f"edge API {self.api} (--api) {what}", "edge_unreachable")
