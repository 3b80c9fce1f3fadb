"""The HTTP server: OpenAI-compatible routes on FastAPI, a web chat page, and a way to run it in a thread.

    app = create_app(Engine(load("runs/sft-tiny/model")))
    uvicorn.run(app, host="127.0.0.1", port=8000)         # or `sparrow serve runs/sft-tiny/model`

Routes: ``GET /v1/models``, ``POST /v1/chat/completions``, ``POST /v1/completions`` (streamed as server-sent
events with ``"stream": true``), ``GET /health``, and the chat page at ``/`` (static files of this package, no
build step, nothing fetched from elsewhere).

Every error is the OpenAI error body (``{"error": {"message", "type", "param", "code"}}``) with its status:
400 for malformed JSON, wrong types, out-of-range values, unsupported fields and prompts past the context; 404
for an unknown model or route; 429 when the queue of waiting requests is full; 503 while shutting down. A
client that goes away mid-stream (or before a non-streamed answer) has its requests cancelled, which frees
their rows of the batch. Shutdown (the lifespan's end) lets running requests finish for ``drain_timeout``
seconds, then cancels the rest; a cancelled stream ends with an error event.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from contextlib import asynccontextmanager
from importlib import resources
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from .engine import Engine, EngineClosed, EngineFull, IncrementalText, SamplingParams
from .protocol import ChatCompletionRequest, CompletionRequest, UnsupportedField, error_body

STATIC = resources.files("sparrow.serving") / "static"


class APIError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.body = status, error_body(message, type=type, param=param, code=code)


def _validation_error(exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0]
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    if first.get("type") == "json_invalid":
        return JSONResponse(error_body(f"the request body is not valid JSON: {first.get('msg')}",
                                       code="invalid_json"), status_code=400)
    error = (first.get("ctx") or {}).get("error")
    if isinstance(error, UnsupportedField):
        return JSONResponse(error_body(str(error), param=error.field, code="unsupported_parameter"), status_code=400)
    param = ".".join(loc) or None
    message = first.get("msg", "invalid request").removeprefix("Value error, ")
    if param and not message.startswith(param):
        message = f"{param}: {message}"
    return JSONResponse(error_body(message, param=param, code="invalid_value"), status_code=400)


def create_app(engine: Engine, *, rag=None, rag_k: int = 3, default_max_tokens: int = 256,
               drain_timeout: float = 5.0) -> FastAPI:
    """The app around a (not yet started) engine. ``rag``: a :class:`sparrow.rag.RagIndex` whose passages are put
    before each chat's last user message, as the reading task lays them out."""
    loaded = engine.loaded

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        yield
        await asyncio.to_thread(engine.close, drain_timeout)

    app = FastAPI(title="Sparrow", lifespan=lifespan)
    app.state.engine = engine

    @app.exception_handler(RequestValidationError)
    async def _on_validation(request: Request, exc: RequestValidationError):
        return _validation_error(exc)

    @app.exception_handler(APIError)
    async def _on_api_error(request: Request, exc: APIError):
        return JSONResponse(exc.body, status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def _on_http_error(request: Request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return JSONResponse(error_body(str(exc.detail), code=code), status_code=exc.status_code)

    def _model_card() -> dict:
        return {"id": loaded.name, "object": "model", "created": 0, "owned_by": "sparrow",
                "context_length": loaded.context_length}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [_model_card()]}

    @app.get("/v1/models/{model_id}")
    async def model(model_id: str):
        _check_model(model_id)
        return _model_card()

    @app.get("/health")
    async def health():
        return {"status": "ok", "running": engine.running, "waiting": len(engine.waiting),
                "tokens_in_flight": engine.tokens_in_flight}

    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(str(STATIC / "index.html"))

    app.mount("/static", StaticFiles(directory=str(STATIC)), name="static")

    def _check_model(name: str) -> None:
        if name != loaded.name:
            raise APIError(404, f"The model '{name}' does not exist; this server has '{loaded.name}'",
                           param="model", code="model_not_found")

    def _budget(prompt: list[int], max_tokens: int | None, what: str) -> int:
        """max_tokens for this prompt, or a 400 that states the limits."""
        room = loaded.context_length - len(prompt)
        if room < 1:
            raise APIError(400, f"This model's maximum context length is {loaded.context_length} tokens; your "
                                f"{what} is {len(prompt)} tokens long, which leaves no room for an answer",
                           param="messages" if what == "conversation" else "prompt", code="context_length_exceeded")
        if max_tokens is None:
            return min(default_max_tokens, room)
        if max_tokens > room:
            raise APIError(400, f"max_tokens: must be between 1 and {room}: this model's maximum context length "
                                f"is {loaded.context_length} tokens and your {what} is {len(prompt)} tokens long",
                           param="max_tokens", code="context_length_exceeded")
        return max_tokens

    def _submit(prompts: list[list[int]], body, max_tokens: list[int], queue: asyncio.Queue):
        """One engine request per (prompt, choice); seeds ``seed + choice`` so the n choices differ."""
        loop = asyncio.get_running_loop()
        requests = []

        def forward(index: int):
            def on_event(event):
                try:
                    loop.call_soon_threadsafe(queue.put_nowait, (index, event))
                except RuntimeError:  # the event loop is gone (shutdown): nobody is listening
                    pass
            return on_event

        try:
            for p, (prompt, budget) in enumerate(zip(prompts, max_tokens)):
                for j in range(body.n):
                    seed = None if body.seed is None else body.seed + j
                    params = SamplingParams(max_tokens=budget, temperature=body.temperature, top_p=body.top_p,
                                            top_k=body.top_k, seed=seed)
                    requests.append(engine.submit(prompt, params, forward(len(requests))))
        except (EngineFull, EngineClosed, ValueError) as exc:
            for request in requests:
                engine.cancel(request)
            if isinstance(exc, EngineFull):
                raise APIError(429, f"The server is busy: {exc}; retry later", type="rate_limit_error",
                               code="rate_limit_exceeded") from exc
            if isinstance(exc, EngineClosed):
                raise APIError(503, "The server is shutting down", type="server_error", code="shutting_down") from exc
            raise APIError(400, str(exc), param=str(exc).split(":")[0], code="invalid_value") from exc
        return requests

    async def _events(requests, queue: asyncio.Queue, texts: list[IncrementalText],
                      http_request: Request) -> AsyncIterator[tuple[int, str, Any]]:
        """(choice, kind, value): ("text", piece) as text is released, then ("finish", reason) once per choice."""
        pending = set(range(len(requests)))
        stop_ids = set(loaded.stop_ids)
        while pending:
            try:
                index, (kind, value) = await asyncio.wait_for(queue.get(), timeout=0.5)
            except asyncio.TimeoutError:
                if await http_request.is_disconnected():
                    return
                continue
            if index not in pending:
                continue
            text = texts[index]
            if kind == "token":
                if value in stop_ids:
                    continue
                piece = text.push(value)
                if piece:
                    yield index, "text", piece
                if text.stopped:  # a stop string: this choice is done, its row is freed
                    engine.cancel(requests[index])
                    pending.discard(index)
                    yield index, "finish", "stop"
            else:
                piece = text.flush()
                if piece:
                    yield index, "text", piece
                pending.discard(index)
                if value in ("cancelled", "error"):
                    reason = requests[index].error or "the server is shutting down"
                    raise APIError(503, f"generation was cancelled: {reason}", type="server_error",
                                   code="cancelled")
                yield index, "finish", value

    def _usage(prompts, requests) -> dict:
        prompt_tokens = sum(len(p) for p in prompts)
        completion_tokens = sum(len(r.tokens) for r in requests)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}

    async def _respond(http_request: Request, body, prompts: list[list[int]], max_tokens: list[int], chat: bool):
        queue: asyncio.Queue = asyncio.Queue()
        requests = _submit(prompts, body, max_tokens, queue)
        texts = [IncrementalText(loaded.decode, body.stop_strings()) for _ in requests]
        created = int(time.time())
        kind = "chat.completion" if chat else "text_completion"
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        head = {"id": rid, "created": created, "model": loaded.name}

        def cancel_all():
            for request in requests:
                if not request.done:
                    engine.cancel(request)

        if not body.stream:
            pieces: list[list[str]] = [[] for _ in requests]
            reasons: list[str | None] = [None] * len(requests)
            try:
                async for index, what, value in _events(requests, queue, texts, http_request):
                    if what == "text":
                        pieces[index].append(value)
                    else:
                        reasons[index] = value
            finally:
                cancel_all()
            if chat:
                choices = [{"index": i, "message": {"role": "assistant", "content": "".join(p)},
                            "finish_reason": reasons[i], "logprobs": None} for i, p in enumerate(pieces)]
            else:
                choices = [{"index": i, "text": "".join(p), "finish_reason": reasons[i], "logprobs": None}
                           for i, p in enumerate(pieces)]
            return {**head, "object": kind, "choices": choices, "usage": _usage(prompts, requests)}

        def chunk(index: int, *, text: str | None = None, role: bool = False, finish: str | None = None) -> str:
            if chat:
                delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
                choice = {"index": index, "delta": delta, "finish_reason": finish, "logprobs": None}
                data = {**head, "object": "chat.completion.chunk", "choices": [choice]}
            else:
                data = {**head, "object": "text_completion",
                        "choices": [{"index": index, "text": text or "", "finish_reason": finish, "logprobs": None}]}
            return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

        async def stream():
            try:
                if chat:
                    for index in range(len(requests)):
                        yield chunk(index, role=True)
                async for index, what, value in _events(requests, queue, texts, http_request):
                    yield chunk(index, text=value) if what == "text" else chunk(index, finish=value)
                if body.stream_options and body.stream_options.include_usage:
                    data = {**head, "object": "chat.completion.chunk" if chat else "text_completion",
                            "choices": [], "usage": _usage(prompts, requests)}
                    yield f"data: {json.dumps(data)}\n\n"
                yield "data: [DONE]\n\n"
            except APIError as exc:  # the status line is sent already: the error travels as an event
                yield f"data: {json.dumps(exc.body)}\n\n"
            finally:  # also on a client disconnect (the generator is closed or cancelled)
                cancel_all()

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, http_request: Request):
        _check_model(body.model)
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        if rag is not None and messages[-1]["role"] == "user":
            messages[-1]["content"] = await asyncio.to_thread(rag.augment, messages[-1]["content"], rag_k)
        prompt = await asyncio.to_thread(loaded.chat_ids, messages)
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        budget = _budget(prompt, max_tokens, "conversation")
        return await _respond(http_request, body, [prompt], [budget], chat=True)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, http_request: Request):
        _check_model(body.model)
        prompts = [loaded.encode(p) for p in body.prompts()]
        if any(not p for p in prompts):
            raise APIError(400, "prompt: must not be empty", param="prompt", code="invalid_value")
        budgets = [_budget(p, body.max_tokens, "prompt") for p in prompts]
        return await _respond(http_request, body, prompts, budgets, chat=False)

    return app


class BackgroundServer:
    """uvicorn serving ``app`` on 127.0.0.1 from a thread (tests, the load test, the browser test).
    ``port=0`` picks a free port; ``url`` is known once :meth:`start` returns."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0, graceful_timeout: float = 5.0):
        import uvicorn

        config = uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on",
                                timeout_graceful_shutdown=graceful_timeout)
        self.server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self.server.run, name="sparrow-http", daemon=True)
        self.url = ""

    def start(self, timeout: float = 30.0) -> "BackgroundServer":
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        host, port = self.server.servers[0].sockets[0].getsockname()[:2]
        self.url = f"http://{host}:{port}"
        return self

    def stop(self, timeout: float = 30.0) -> None:
        self.server.should_exit = True
        self._thread.join(timeout)

    def __enter__(self) -> "BackgroundServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
