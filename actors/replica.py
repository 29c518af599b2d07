"""One serving replica: the engine behind a request/response interface, with rejection records going to the
stream logger. A plain class: tests call it directly; cluster/serve.py wraps it in a Ray Serve deployment.

A request is a dict (cluster/api.py validated it): ``prompt`` or ``messages``, ``max_tokens``, ``temperature``,
``top_p``, ``top_k``, ``seed``, ``label``, ``request_id``. ``stream`` yields events (dicts with a ``type``):
  start  {prompt_tokens}                       the prompt was accepted; tokens follow
  delta  {text, token_ids}                     new text of one verification round
  end    {finish_reason, usage, replica}       usage: token counts and acceptance figures
  error  {status, error: {message, type, param, code}}   before any token: the request was refused
The engine is not thread-safe: the async methods run every engine step on one worker thread, one request at a
time, and stop generating at the next round when the caller goes away (a client disconnect).
"""
from __future__ import annotations

import asyncio
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import AsyncIterator, Iterator

from onspec.actors.engine import GenerationStats, RequestError, SamplingParams
from onspec.cluster.config import OnspecConfig

_END = object()


def error_event(message: str, param: str | None = None, code: str | None = None, status: int = 400,
                type: str = "invalid_request_error") -> dict:
    return {"type": "error", "status": status,
            "error": {"message": message, "type": type, "param": param, "code": code}}


def usage_of(stats: GenerationStats) -> dict:
    return {"prompt_tokens": stats.prompt_tokens, "completion_tokens": stats.completion_tokens,
            "total_tokens": stats.prompt_tokens + stats.completion_tokens,
            "acceptance_rate": round(stats.acceptance_rate, 4), "drafted_tokens": stats.drafted,
            "accepted_tokens": stats.accepted, "tokens_per_step": round(stats.tokens_per_step, 4),
            "drafter_version": stats.drafter_version,
            # onspec extension: who drafted what (the drafter model, text seen before, or nothing)
            "draft_sources": stats.source_dict()}


class Replica:
    def __init__(self, cfg: OnspecConfig, engine=None, logger=None, replica_id: str | None = None):
        if engine is None:
            from onspec.actors.engine import SpeculativeEngine
            engine = SpeculativeEngine.from_config(cfg)
        self.cfg, self.engine, self.logger = cfg, engine, logger
        self.replica_id = replica_id or uuid.uuid4().hex[:8]
        engine.record_context = cfg.stream.context_window
        engine.record_topk = cfg.stream.topk
        engine.record_coverage = cfg.stream.coverage_every
        self.set_stream_enabled(cfg.stream.enabled)
        self._label, self._request_id = "", ""
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="onspec-engine")
        self._lock = asyncio.Lock()
        self.cancelled = 0  # requests whose caller went away mid-generation
        self.in_flight = 0  # requests running or waiting here (what the trainer yields to)
        self.watcher = None  # actors/hot_swap.DrafterWatcher, when a registry is configured
        self.sharer = None   # actors/suffix_share.SuffixSharer, when Redis is configured
        self.generate_s = 0.0  # time spent generating, and the part of it spent handing records to the logger
        self.observer_s = 0.0

    # ---- rejection records ----------------------------------------------------------------------------------
    def set_stream_enabled(self, enabled: bool) -> None:
        self.engine.round_observer = self._on_round if (enabled and self.logger is not None) else None

    def share_suffixes(self, sharer) -> None:
        """Publish finished requests to the other replicas' suffix indexes and index theirs."""
        self.sharer = sharer
        self.engine.sequence_observer = sharer.publish

    def _on_round(self, rec) -> None:
        # On the decode path: only a buffer append; encoding and the write happen on the logger's thread.
        t = time.perf_counter()
        self.logger.log((rec, self._label, time.time(), self._request_id))
        self.observer_s += time.perf_counter() - t

    # ---- the sync interface ----------------------------------------------------------------------------------
    def _prepare(self, req: dict) -> tuple[list[int], SamplingParams] | dict:
        param = "messages" if req.get("messages") is not None else "prompt"
        params = SamplingParams(max_tokens=req.get("max_tokens") or 16, temperature=req.get("temperature", 1.0),
                                top_p=req.get("top_p", 1.0), top_k=req.get("top_k") or 0, seed=req.get("seed"))
        try:
            params.validate()
        except RequestError as e:
            return error_event(str(e), param=str(e).split()[0])
        try:
            ids = self.engine.encode(req.get("prompt"), req.get("messages"))
        except Exception as e:  # a chat template that rejects the conversation (e.g. bad role order)
            return error_event(f"cannot apply the chat template: {e}", param=param)
        limit = self.cfg.server.max_prompt_tokens  # a request limit of this server: 413, not the model's 400
        if limit and len(ids) > limit:
            return error_event(f"the prompt has {len(ids)} tokens, over this server's limit of {limit} "
                               "(server.max_prompt_tokens)", param=param, code="prompt_too_long", status=413)
        try:
            self.engine.check_prompt(ids)
        except RequestError as e:
            code = "context_length_exceeded" if ids else "empty_prompt"
            return error_event(str(e), param=param, code=code)
        return ids, params

    def stream(self, req: dict) -> Iterator[dict]:
        prepared = self._prepare(req)
        if isinstance(prepared, dict):
            yield prepared
            return
        ids, params = prepared
        self._label, self._request_id = req.get("label") or "", req.get("request_id") or ""
        yield {"type": "start", "prompt_tokens": len(ids)}
        stats = GenerationStats()
        tok = self.engine.tokenizer
        out: list[int] = []
        sent = ""
        try:
            for new in self.engine.stream(ids, params, speculate=True, stats=stats):
                out.extend(new)
                text = tok.decode(out, skip_special_tokens=True)
                # Hold back a partly decoded multi-byte character until its last byte arrives.
                if text.endswith("\ufffd") or not text.startswith(sent):
                    continue
                yield {"type": "delta", "text": text[len(sent):], "token_ids": new}
                sent = text
            text = tok.decode(out, skip_special_tokens=True)
            if len(text) > len(sent) and text.startswith(sent):
                yield {"type": "delta", "text": text[len(sent):], "token_ids": []}
        except RequestError as e:
            yield error_event(str(e))
            return
        except Exception as e:  # an engine failure: the caller gets a server error, the replica lives on
            yield error_event(f"generation failed: {type(e).__name__}: {e}", status=500, type="server_error")
            return
        finally:
            self._label, self._request_id = "", ""
            self.generate_s += stats.elapsed_s
        yield {"type": "end", "finish_reason": stats.finish_reason or "length", "usage": usage_of(stats),
               "replica": self.stats()}

    def complete(self, req: dict) -> dict:
        return collect(self.stream(req))

    def load(self) -> dict:
        return {"in_flight": self.in_flight, "queued": max(0, self.in_flight - 1)}

    def apply_pending_swap(self) -> None:
        """Queue the drafter swap on the engine's own thread: it runs between two rounds of a request, or at
        once when the replica is idle."""
        self._pool.submit(self.engine.apply_pending_swap)

    def _load_changed(self) -> None:
        if self.watcher is not None:
            self.watcher.poke()

    def stats(self) -> dict:
        return {"replica_id": self.replica_id, "cancelled": self.cancelled, "in_flight": self.in_flight,
                "drafter_version": getattr(self.engine.drafter, "version", None),
                "drafter_swaps": self.engine.swaps,
                "drafter_refused": self.watcher.refused if self.watcher is not None else 0,
                "generate_s": round(self.generate_s, 6), "observer_s": round(self.observer_s, 6),
                "stream_enabled": self.engine.round_observer is not None,
                "logger": self.logger.stats() if self.logger is not None else None,
                "suffix_index": self.engine.suffix_index.stats(),
                "suffix_share": self.sharer.stats() if self.sharer is not None else None}

    def ready(self) -> dict:
        if self.logger is None:
            redis_state = "disabled"
        else:
            redis_state = "ok" if self.logger.ping() else "degraded"
        return {"model_loaded": True, "redis": redis_state, "replica": self.stats(),
                "drafter_version": getattr(self.engine.drafter, "version", None)}

    # ---- the async interface (what the deployment exposes) ----------------------------------------------------
    async def astream(self, req: dict) -> AsyncIterator[dict]:
        loop = asyncio.get_running_loop()
        self.in_flight += 1
        self._load_changed()
        inner = self._astream_locked(req, loop)
        try:
            async for item in inner:
                yield item
        finally:
            await inner.aclose()  # now, not at garbage collection: the slot is freed before the count drops
            self.in_flight -= 1
            self._load_changed()

    async def _astream_locked(self, req: dict, loop) -> AsyncIterator[dict]:
        async with self._lock:
            it = self.stream(req)
            done = False
            try:
                while True:
                    item = await loop.run_in_executor(self._pool, next, it, _END)
                    if item is _END:
                        done = True
                        return
                    done = item["type"] in ("end", "error")
                    yield item
            finally:
                if not done:
                    self.cancelled += 1
                # Queued behind the round still running (if any): the generator stops, the next request waits.
                self._pool.submit(it.close)

    async def acomplete(self, req: dict) -> dict:
        return collect([item async for item in self.astream(req)])

    async def aready(self) -> dict:
        return await asyncio.to_thread(self.ready)

    def close(self) -> None:
        if self.watcher is not None:
            self.watcher.stop()
        if self.sharer is not None:
            self.sharer.close()
        if self.logger is not None:
            self.logger.close()
        self._pool.shutdown(wait=False)


def collect(events) -> dict:
    """Stream events folded into one response: {text, token_ids, finish_reason, usage, replica} or an error."""
    text, ids = [], []
    for ev in events:
        if ev["type"] == "error":
            return ev
        if ev["type"] == "delta":
            text.append(ev["text"])
            ids.extend(ev["token_ids"])
        elif ev["type"] == "end":
            return {"type": "result", "text": "".join(text), "token_ids": ids,
                    "finish_reason": ev["finish_reason"], "usage": ev["usage"], "replica": ev["replica"]}
    return error_event("generation ended without a result", status=500, type="server_error")
