"""``vllm serve`` with exit layers in the responses: an ASGI middleware for vLLM's OpenAI server.

    vllm serve MODEL ... --middleware adainfer.vllm.server.ExitLayers

adds to every choice of a (non-streaming) ``/v1/completions`` or ``/v1/chat/completions`` response
the exit layer of each token it sampled: ``choice["adainfer"] = {"exit_layers": [k, ...]}`` (``L``
for tokens that ran every layer; the OpenAI client keeps unknown fields: ``choice.model_extra``). The
layers come from the engine's workers through ``collective_rpc`` (``report.WORKER_METHOD``), taken
for the request ids of that response only. ``GET /adainfer/work`` returns the decoder-layer token
rows computed and those the dense model would have computed since start-up. Streaming responses
pass through unchanged (their exit layers stay readable in the worker log).

Metrics (vLLM's ``/metrics``, the server's default Prometheus registry): ``adainfer_exit_layer``, a
histogram of the exit layer of every token answered through the middleware (buckets 1..64), and
``adainfer_answers_total`` / ``adainfer_early_exits_total`` counters.
"""

from __future__ import annotations

import json

from adainfer.vllm.report import WORKER_METHOD, external_id

ANNOTATED_PATHS = ("/v1/completions", "/v1/chat/completions")
WORK_PATH = "/adainfer/work"
_METRICS: dict | None = None


def _metrics() -> dict:
    """The Prometheus metrics, made once per process (prometheus_client refuses a second registration)."""
    global _METRICS
    if _METRICS is None:
        from prometheus_client import Counter, Histogram

        _METRICS = {
            "layer": Histogram(
                "adainfer_exit_layer", "Decoder layers each answered token ran (AdaInfer)", buckets=tuple(range(1, 65))
            ),
            "answers": Counter("adainfer_answers", "Tokens answered through the AdaInfer middleware"),
            "early": Counter("adainfer_early_exits", "Answered tokens that stopped before the last layer"),
        }
    return _METRICS


def _observe(layers: list[int], num_layers: int | None) -> None:
    m = _metrics()
    for k in layers:
        m["layer"].observe(k)
        m["answers"].inc()
        if num_layers is not None and k < num_layers:
            m["early"].inc()


class ExitLayers:
    """ASGI middleware (Starlette's ``add_middleware`` contract: constructed with the app)."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if scope["path"] == WORK_PATH and scope["method"] == "GET":
            return await self._work(scope, send)
        if scope["path"] not in ANNOTATED_PATHS:
            return await self.app(scope, receive, send)
        start: dict | None = None
        passthrough = False
        chunks: list[bytes] = []

        async def capture(message) -> None:
            nonlocal start, passthrough
            if message["type"] == "http.response.start":
                headers = dict(message.get("headers") or [])
                passthrough = b"application/json" not in headers.get(b"content-type", b"")
                if passthrough:  # a stream (server-sent events): unchanged
                    return await send(message)
                start = message
                return
            if passthrough or message["type"] != "http.response.body":
                return await send(message)
            chunks.append(message.get("body", b""))
            if message.get("more_body"):
                return
            body = await self._annotate(scope, b"".join(chunks))
            headers = [(k, v) for k, v in start.get("headers") or [] if k.lower() != b"content-length"]
            headers.append((b"content-length", str(len(body)).encode()))
            await send({**start, "headers": headers})
            await send({"type": "http.response.body", "body": body})

        await self.app(scope, receive, capture)

    async def _annotate(self, scope, body: bytes) -> bytes:
        try:
            data = json.loads(body)
        except ValueError:
            return body
        if not isinstance(data, dict) or not isinstance(data.get("id"), str) or "choices" not in data:
            return body
        response_id = data["id"]
        results = await scope["app"].state.engine_client.collective_rpc(WORKER_METHOD, args=(True, response_id))
        first = (results[0] or {}) if results else {}
        log = first.get("log", {})
        by_choice: dict[int, list[int]] = {}
        for rid, layers in log.items():
            rest = external_id(rid)[len(response_id) :]  # "-<prompt index>" for completions, "" for chat
            index = int(rest[1:]) if rest.startswith("-") and rest[1:].isdigit() else 0
            by_choice[index] = layers
        for choice in data["choices"]:
            layers = by_choice.get(int(choice.get("index", 0)))
            if layers is not None:
                choice["adainfer"] = {"exit_layers": layers}
                _observe(layers, first.get("num_layers"))
        return json.dumps(data).encode()

    async def _work(self, scope, send) -> None:
        results = await scope["app"].state.engine_client.collective_rpc(WORKER_METHOD, args=(False,))
        first = results[0] if results else None
        status, payload = (200, {k: first[k] for k in ("layer_tokens", "dense_tokens")}) if first else (404, {})
        body = json.dumps(payload).encode()
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": body})
