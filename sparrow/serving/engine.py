"""Continuous batching on one KV cache: requests join a running batch and leave it as soon as they finish.

    engine = Engine(load("runs/sft-tiny/model"), max_batch=8)
    engine.start()
    request = engine.submit(prompt_ids, SamplingParams(max_tokens=64, temperature=0.7, seed=1), on_event)
    ...
    engine.close(drain_timeout=10)

Design choices:

- **Slots.** One :class:`~sparrow.model.KVCache` holds ``max_batch`` rows, each as long as the model's context. A
  new request is prefilled alone into a free row (a batch-1 view of that row, so its prompt is never padded),
  then decoded with every other running row, one token per row per step. A finished or cancelled row is free
  at once; waiting requests are prefilled into free rows before the next step.
- **A request's tokens do not depend on its neighbours.** Every decode step runs on all rows (a fixed shape,
  idle rows decode a pad token into their own row), so the arithmetic of one row is the same whichever other
  rows are busy; each request samples from its own ``torch.Generator`` seeded with its ``seed``, through the
  library's sampling rule (:func:`sparrow.generate.next_tokens`) applied to its row alone. Run alone or among
  fifteen others, a request with the same seed gets the same tokens.
- **Bounds.** At most ``max_queued`` requests wait for a row (:class:`EngineFull` beyond: the server answers 429); a
  waiting request joins only while the running requests' prompt + ``max_tokens`` summed stay within
  ``max_tokens_in_flight`` (first come, first served: the head of the queue is never overtaken).
- **Threads.** The model runs on one engine thread; ``submit`` and ``cancel`` may be called from any thread.
  Events (``("token", id)``, then one ``("finish", reason)``) are delivered through the request's callback on
  the engine thread; the server forwards them to its event loop.
"""

from __future__ import annotations

import collections
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from .adapter import GenerationConfig, KVCache, LoadedModel, next_tokens


class EngineFull(RuntimeError):
    """The queue of waiting requests is full (HTTP 429)."""


class EngineClosed(RuntimeError):
    """The engine is shutting down and takes no new requests (HTTP 503)."""


@dataclass
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int | None = None  # None: a fresh random seed, recorded on the request


Event = tuple[str, object]  # ("token", int) | ("finish", "stop" | "length" | "cancelled" | "error")


@dataclass(eq=False)
class Request:
    prompt: list[int]
    params: SamplingParams
    config: GenerationConfig
    on_event: Callable[[Event], None]
    seed: int
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    error: str | None = None
    submitted_at: float = field(default_factory=time.monotonic)
    _cancelled: bool = False
    _done: threading.Event = field(default_factory=threading.Event)
    _generator: torch.Generator | None = None
    _slot: int | None = None

    @property
    def cost(self) -> int:
        """Cache positions this request may occupy: what the tokens-in-flight bound counts."""
        return len(self.prompt) + self.params.max_tokens

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        return self._done.wait(timeout)


class Engine:
    def __init__(self, loaded: LoadedModel, *, max_batch: int = 8, max_queued: int = 64,
                 max_tokens_in_flight: int | None = None):
        if max_batch < 1 or max_queued < 0:
            raise ValueError(f"max_batch, max_queued: must be >= 1 and >= 0, got {max_batch}, {max_queued}")
        self.loaded = loaded
        self.model = loaded.model
        parameter = next(self.model.parameters())
        self.device, dtype = parameter.device, parameter.dtype
        self.context_length = loaded.context_length
        self.max_batch = max_batch
        self.max_queued = max_queued
        self.max_tokens_in_flight = max_tokens_in_flight or max_batch * self.context_length
        if self.max_tokens_in_flight < self.context_length:
            raise ValueError(f"max_tokens_in_flight: must be >= the context ({self.context_length}), or a request "
                             "that fits the context could never run")
        self.cache = KVCache(self.model.config, max_batch, self.context_length, device=self.device, dtype=dtype)
        # Batch-1 views of each row, for prefilling one request alone: writes land in the shared cache.
        self._row_views = [self._row_view(slot) for slot in range(max_batch)]
        self.slots: list[Request | None] = [None] * max_batch
        self.waiting: collections.deque[Request] = collections.deque()
        self.tokens_in_flight = 0
        self._cond = threading.Condition()
        self._accepting = True
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="sparrow-engine", daemon=True)
        self.steps = 0  # decode steps run, for tests and the load test

    # ------------------------------------------------------------------------------------------ public

    def start(self) -> "Engine":
        self._thread.start()
        return self

    def submit(self, prompt: Sequence[int], params: SamplingParams,
               on_event: Callable[[Event], None] = lambda event: None) -> Request:
        """Queue a request. Raises ``ValueError`` (bad prompt or parameters, naming them), :class:`EngineFull`
        or :class:`EngineClosed`."""
        prompt = [int(t) for t in prompt]
        if not prompt:
            raise ValueError("prompt: needs at least one token")
        if params.max_tokens < 1:
            raise ValueError(f"max_tokens: must be >= 1, got {params.max_tokens}")
        if len(prompt) + params.max_tokens > self.context_length:
            raise ValueError(f"max_tokens: the prompt's {len(prompt)} tokens + max_tokens {params.max_tokens} exceed "
                             f"the model's context of {self.context_length} tokens")
        seed = params.seed if params.seed is not None else random.SystemRandom().randrange(2**63)
        config = GenerationConfig(max_new_tokens=params.max_tokens, temperature=params.temperature,
                                  top_k=params.top_k, top_p=params.top_p,
                                  repetition_penalty=params.repetition_penalty,
                                  stop_ids=self.loaded.stop_ids, seed=seed, vocab_limit=self.loaded.vocab_limit)
        request = Request(prompt, params, config, on_event, seed)
        with self._cond:
            if not self._accepting:
                raise EngineClosed("the server is shutting down")
            # Requests about to take a free row are not waiting: only the ones beyond count against the bound.
            beyond = len(self.waiting) - sum(r is None for r in self.slots)
            if beyond >= self.max_queued:
                raise EngineFull(f"{max(beyond, 0)} requests are already waiting (the limit is {self.max_queued})")
            self.waiting.append(request)
            self._cond.notify()
        return request

    def cancel(self, request: Request) -> None:
        """Stop a request (a client went away): its row is freed before the next step."""
        with self._cond:
            request._cancelled = True
            self._cond.notify()

    def generate(self, prompts: Sequence[Sequence[int]], params: Sequence[SamplingParams],
                 timeout: float = 60.0) -> list[Request]:
        """Submit several requests at once and wait for all of them (tests, evaluation)."""
        requests = [self.submit(p, s) for p, s in zip(prompts, params)]
        for request in requests:
            if not request.wait(timeout):
                raise TimeoutError(f"request not finished after {timeout} s")
        return requests

    def close(self, drain_timeout: float = 0.0) -> None:
        """Take no new requests, let running and waiting ones finish for up to ``drain_timeout`` seconds, cancel
        the rest, and stop the engine thread."""
        with self._cond:
            self._accepting = False
        deadline = time.monotonic() + drain_timeout
        while self._thread.is_alive() and time.monotonic() < deadline and self.busy:
            time.sleep(0.01)
        with self._cond:
            for request in [*self.waiting, *(r for r in self.slots if r is not None)]:
                request._cancelled = True
            self._stop = True
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join(timeout=30)
        # Whatever the thread did not get to (it never started, or stopped on an error) is finished here.
        for request in list(self.waiting):
            self._finish(request, "cancelled")
        self.waiting.clear()

    @property
    def busy(self) -> bool:
        return bool(self.waiting) or any(r is not None for r in self.slots)

    @property
    def running(self) -> int:
        return sum(r is not None for r in self.slots)

    # ---------------------------------------------------------------------------------------- the loop

    def _row_view(self, slot: int) -> KVCache:
        view = KVCache.__new__(KVCache)
        view.keys = [k[slot:slot + 1] for k in self.cache.keys]
        view.values = [v[slot:slot + 1] for v in self.cache.values]
        view.max_len = self.cache.max_len
        view.lengths = torch.zeros(1, dtype=torch.int32, device=self.device)
        return view

    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                with self._cond:
                    while not self._stop and not self.waiting and self.running == 0:
                        self._cond.wait()
                    if self._stop:
                        for request in [*self.waiting, *(r for r in self.slots if r is not None)]:
                            self._finish(request, "cancelled")
                        self.waiting.clear()
                        return
                    joining = self._admit()
                try:
                    for request in joining:
                        self._prefill(request)
                    if self.running:
                        self._decode_step()
                except Exception as exc:  # a failing model must not leave clients hanging
                    for request in [r for r in self.slots if r is not None]:
                        request.error = f"{type(exc).__name__}: {exc}"
                        self._finish(request, "error")

    def _admit(self) -> list[Request]:
        """Move waiting requests into free rows (called under the lock)."""
        for slot, request in enumerate(self.slots):
            if request is not None and request._cancelled:
                self._finish(request, "cancelled")
        joining = []
        while self.waiting:
            request = self.waiting[0]
            if request._cancelled:
                self.waiting.popleft()
                self._finish(request, "cancelled")
                continue
            free = [slot for slot, r in enumerate(self.slots) if r is None]
            if not free or self.tokens_in_flight + request.cost > self.max_tokens_in_flight:
                break
            self.waiting.popleft()
            request._slot = free[0]
            self.slots[free[0]] = request
            self.tokens_in_flight += request.cost
            joining.append(request)
        return joining

    def _prefill(self, request: Request) -> None:
        view = self._row_views[request._slot]
        view.lengths.zero_()
        ids = torch.tensor([request.prompt], dtype=torch.long, device=self.device)
        logits = self.model(ids, kv_cache=view).logits[:, -1]
        self.cache.lengths[request._slot] = len(request.prompt)
        request._generator = torch.Generator(device=self.device).manual_seed(request.seed)
        self._sample(request, logits)

    def _decode_step(self) -> None:
        feed = torch.zeros(self.max_batch, 1, dtype=torch.long, device=self.device)
        for slot, request in enumerate(self.slots):
            if request is None:
                self.cache.lengths[slot] = 0  # idle rows decode a pad token at position 0 of their own row
            else:
                feed[slot, 0] = request.tokens[-1]
        logits = self.model(feed, kv_cache=self.cache).logits[:, -1]
        self.steps += 1
        for slot, request in enumerate(self.slots):
            if request is not None:
                self._sample(request, logits[slot:slot + 1])

    def _sample(self, request: Request, logits: torch.Tensor) -> None:
        """One token for one request from its row's last logits (1, vocab); emits it and maybe finishes."""
        if request._cancelled:
            self._finish(request, "cancelled")
            return
        limit = request.config.vocab_limit
        if limit is not None and limit < logits.shape[-1]:
            logits = logits.clone()
            logits[:, limit:] = float("-inf")
        token = int(next_tokens(logits, [request.prompt + request.tokens], request.config, request._generator)[0])
        request.tokens.append(token)
        request.on_event(("token", token))
        if token in request.config.stop_ids:
            self._finish(request, "stop")
        elif len(request.tokens) >= request.params.max_tokens:
            self._finish(request, "length")

    def _finish(self, request: Request, reason: str) -> None:
        if request.done:
            return
        if request._slot is not None and self.slots[request._slot] is request:
            self.slots[request._slot] = None
            self.tokens_in_flight -= request.cost
        request.finish_reason = reason
        request._done.set()
        request.on_event(("finish", reason))


class IncrementalText:
    """The text of a growing list of token ids, released piece by piece so that the pieces concatenate to the
    final text: a character split across byte-level tokens is held back until complete, and so is any tail
    that could be the start of a stop string. After a stop string the text ends before it."""

    def __init__(self, decode: Callable[[list[int]], str], stop: Sequence[str] = ()):
        self.decode = decode
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.text = ""      # released so far
        self.stopped = False  # a stop string was found

    def push(self, token: int) -> str:
        self.ids.append(token)
        return self._release(final=False)

    def flush(self) -> str:
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        if self.stopped:
            return ""
        text = self.decode(self.ids)
        if not final and text.endswith("\ufffd"):
            return ""
        hits = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        if hits:
            end, self.stopped = min(hits), True
        elif final:
            end = len(text)
        else:
            hold = max((k for s in self.stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
            end = len(text) - hold
        piece = text[len(self.text):end] if end > len(self.text) else ""
        self.text += piece
        return piece
