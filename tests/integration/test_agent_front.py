"""The agent's OpenAI-compatible front against a fake edge API (aiohttp on loopback)."""

from __future__ import annotations

import asyncio
import json
import socket
import threading

import openai
import pytest
from aiohttp import web

from vllm_tslt.agent.front import FrontServer

pytestmark = pytest.mark.integration
CHUNKS = ["Hel", "lo", " world"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class FakeEdgeAPI:
    """Records each request body; answers like vLLM's OpenAI server (JSON or an SSE stream)."""

    def __init__(self) -> None:
        self.bodies: list[dict] = []
        self.headers: list[dict] = []
        self.port = free_port()
        self._loop = asyncio.new_event_loop()
        self._runner: web.AppRunner | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    async def _completion(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.bodies.append(body)
        self.headers.append(dict(request.headers))
        chat = request.path.endswith("chat/completions")
        if not body.get("stream"):
            if chat:
                choice = {"index": 0, "message": {"role": "assistant", "content": "".join(CHUNKS)},
                          "finish_reason": "stop"}
            else:
                choice = {"index": 0, "text": "".join(CHUNKS), "finish_reason": "stop"}
            return web.json_response({
                "id": "x", "object": "chat.completion" if chat else "text_completion",
                "created": 0, "model": body["model"], "choices": [choice],
                "usage": {"prompt_tokens": 1, "completion_tokens": 3, "total_tokens": 4}})
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for piece in CHUNKS:
            delta = {"index": 0, "delta": {"content": piece}} if chat else {"index": 0, "text": piece}
            event = {"id": "x", "object": "chat.completion.chunk" if chat else "text_completion",
                     "created": 0, "model": body["model"], "choices": [delta]}
            await resp.write(f"data: {json.dumps(event)}\n\n".encode())
            await asyncio.sleep(0.01)
        await resp.write(b"data: [DONE]\n\n")
        return resp

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [
            {"id": "tiny-target", "object": "model", "created": 0, "owned_by": "vllm"}]})

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_post("/v1/completions", self._completion)
        app.router.add_post("/v1/chat/completions", self._completion)
        app.router.add_get("/v1/models", self._models)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    def start(self) -> FakeEdgeAPI:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


@pytest.fixture()
def edge_api():
    api = FakeEdgeAPI().start()
    yield api
    api.stop()


@pytest.fixture()
def session():
    return {"id": "sess-1"}


@pytest.fixture()
def front(edge_api, session):
    f = FrontServer(f"http://127.0.0.1:{edge_api.port}", "127.0.0.1:0", lambda: session["id"],
                    connect_timeout_s=1.0, timeout_s=10.0)
    f.start()
    yield f
    f.stop()


def _client(front: FrontServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=front.url + "/v1", api_key="none", max_retries=0, timeout=10)


def test_openai_client_through_the_front_binds_the_session(front, edge_api):
    client = _client(front)
    assert [m.id for m in client.models.list().data] == ["tiny-target"]
    chat = client.chat.completions.create(
        model="tiny-target", messages=[{"role": "user", "content": "hi"}], max_tokens=8,
        extra_body={"vllm_xargs": {"other": 1}})
    assert chat.choices[0].message.content == "Hello world"
    text = client.completions.create(model="tiny-target", prompt="hi", max_tokens=8)
    assert text.choices[0].text == "Hello world"
    assert edge_api.bodies[0]["vllm_xargs"] == {"other": 1, "tslt_session": "sess-1"}
    assert edge_api.bodies[1]["vllm_xargs"] == {"tslt_session": "sess-1"}
    assert edge_api.bodies[1]["prompt"] == "hi" and edge_api.bodies[1]["max_tokens"] == 8


def test_streams_are_relayed_chunk_by_chunk(front, edge_api):
    client = _client(front)
    stream = client.chat.completions.create(
        model="tiny-target", messages=[{"role": "user", "content": "hi"}], stream=True)
    pieces = [c.choices[0].delta.content for c in stream if c.choices and c.choices[0].delta.content]
    assert pieces == CHUNKS
    stream = client.completions.create(model="tiny-target", prompt="hi", stream=True)
    assert [c.choices[0].text for c in stream] == CHUNKS
    assert all(b["vllm_xargs"]["tslt_session"] == "sess-1" for b in edge_api.bodies)


def test_without_a_session_the_request_goes_unbound(front, edge_api, session):
    session["id"] = ""
    text = _client(front).completions.create(model="tiny-target", prompt="hi")
    assert text.choices[0].text == "Hello world"
    assert "vllm_xargs" not in edge_api.bodies[0]
    assert front.counters["unbound"] == 1


def test_edge_api_down_is_a_clear_502():
    port = free_port()  # nothing listens there
    f = FrontServer(f"http://127.0.0.1:{port}", "127.0.0.1:0", lambda: "s",
                    connect_timeout_s=1.0, timeout_s=5.0)
    f.start()
    try:
        client = _client(f)
        with pytest.raises(openai.APIStatusError) as info:
            client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
        assert info.value.status_code == 502
        assert f"http://127.0.0.1:{port}" in info.value.message and "--api" in info.value.message
        with pytest.raises(openai.APIStatusError) as info:
            client.models.list()
        assert info.value.status_code == 502
    finally:
        f.stop()


def test_bad_json_is_a_400(front):
    import urllib.error
    import urllib.request

    req = urllib.request.Request(front.url + "/v1/completions", data=b"{nope",
                                 headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(req, timeout=5)
    assert info.value.code == 400
    assert "not JSON" in json.loads(info.value.read())["error"]["message"]


def test_data_parallel_route_header_goes_with_the_session(edge_api, session):
    """With vLLM DP the handshake names the engine rank; bound requests carry it as the
    X-data-parallel-rank header, unbound ones (no session: any engine) do not."""
    route = {"rank": 1}
    f = FrontServer(f"http://127.0.0.1:{edge_api.port}", "127.0.0.1:0", lambda: session["id"],
                    route=lambda: route["rank"], connect_timeout_s=1.0, timeout_s=10.0)
    f.start()
    try:
        client = _client(f)
        client.completions.create(model="tiny-target", prompt="hi", max_tokens=8)
        session["id"] = ""
        client.completions.create(model="tiny-target", prompt="hi", max_tokens=8)
        session["id"], route["rank"] = "sess-2", None
        client.completions.create(model="tiny-target", prompt="hi", max_tokens=8)
    finally:
        f.stop()
    ranks = [{k.lower(): v for k, v in h.items()}.get("x-data-parallel-rank")
             for h in edge_api.headers]
    assert ranks == ["1", None, None]
    assert edge_api.bodies[0]["vllm_xargs"] == {"tslt_session": "sess-1"}
