"""One serving replica: the engine behind a request/response interface, with rejection records going to the
stream logger. A plain class: tests call it directly; cluster/serve.py wraps it in a Ray Serve deployment.

A request is a dict (cluster/api/ validated it): ``prompt`` or ``messages``, ``max_tokens`` (0: score the prompt
only), ``temperature``, ``top_p``, ``top_k``, ``seed``, the sampling controls of SamplingParams
(``frequency_penalty`` ... ``min_p``), ``stop`` (strings), ``logprobs`` (None or how many alternatives),
``prompt_logprobs`` (the same, for the prompt's tokens), ``tools`` (for the chat template), ``label``,
``request_id``. ``stream`` yields events (dicts with a ``type``):
  start  {prompt_tokens, prompt_ids, prompt_logprobs?}   the prompt was accepted; tokens follow
  delta  {text, token_ids, logprobs?}          new text of one verification round
  end    {finish_reason, usage, replica}       usage: token counts and acceptance figures
  error  {status, error: {message, type, param, code}}   before any token: the request was refused
One decoding thread owns the engine and runs its steps while any request is in it: requests join the batch
between rounds and leave when done, or when their caller goes away (a client disconnect). A request beyond
``server.max_batch`` decoding and as many again waiting is refused with 429.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
import uuid
from typing import AsyncIterator, Callable, Iterator

from onspec.actors.requests import GenerationStats, RequestError, SamplingParams
from onspec.actors.config import OnspecConfig

log = logging.getLogger(__name__)


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


class _Job:
    """A request inside the replica: its engine sequence, what it has streamed, and where its events go."""

    def __init__(self, req: dict, emit: Callable[[dict], None]):
        self.req, self.emit = req, emit
        self.seq = None
        self.stats = GenerationStats()
        self.out: list[int] = []
        self.sent = ""                       # text streamed so far
        self.stop = [s for s in (req.get("stop") or []) if s]
        self.hold = max((len(s) for s in self.stop), default=1) - 1  # chars that may yet become a stop string
        self.logprobs: list = []             # (token id, logprob, top) not yet streamed
        self.done = False

    def send(self, ev: dict) -> None:
        """Hand an event to the caller. A caller that is gone (its event loop closed) misses it: its cancel is on
        the way, and the decoding thread must go on for every other request."""
        try:
            self.emit(ev)
        except Exception:  # noqa: BLE001 -- whatever the caller's side raises, it is the caller's loss alone
            log.debug("a request's caller is gone; dropped a %s event", ev.get("type"))


class Replica:
    def __init__(self, cfg: OnspecConfig, engine=None, logger=None, replica_id: str | None = None):
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._closed = False
        self._thread = threading.Thread(target=self._run, args=(cfg if engine is None else None,),
                                        name="onspec-engine", daemon=True)
        self._started: queue.SimpleQueue = queue.SimpleQueue()
        self._thread.start()
        if engine is None:
            # Built on the decoding thread, so that the thread doing every forward is the first to run torch's
            # parallel (OpenMP) work: a later thread's team ran matrix products 1.5x slower (BENCHMARKS.md).
            engine = self._started.get()
            if isinstance(engine, BaseException):
                raise engine
        self.cfg, self.engine, self.logger = cfg, engine, logger
        self.replica_id = replica_id or uuid.uuid4().hex[:8]
        engine.record_context = cfg.stream.context_window
        engine.record_topk = cfg.stream.topk
        engine.record_coverage = cfg.stream.coverage_every
        self.set_stream_enabled(cfg.stream.enabled)
        self.cancelled = 0  # requests whose caller went away mid-generation
        self.in_flight = 0  # requests decoding or waiting here (what the trainer yields to)
        self.refused = 0    # requests turned away with 429 (batch and queue full)
        self.max_waiting = getattr(engine, "max_rows", 1)  # beyond max_batch decoding: this many wait, then 429
        self.watcher = None  # actors/hot_swap.DrafterWatcher, when a registry is configured
        self.sharer = None   # actors/suffix_share.SuffixSharer, when Redis is configured
        self.generate_s = 0.0  # time spent generating, and the part of it spent handing records to the logger
        self.observer_s = 0.0
        self.max_batch_seen = 0
        self.speculate = True  # off: target-only decoding (a baseline switch for benchmarks)
        self.stream_interval = cfg.server.stream_interval_ms / 1000
        self._inbox.put(("wake", None))  # set up: the decoding thread may start

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
        label, request_id = rec.request or ("", "")
        self.logger.log((rec, label, time.time(), request_id))
        self.observer_s += time.perf_counter() - t

    # ---- requests --------------------------------------------------------------------------------------------
    def _encode(self, req: dict) -> list[int]:
        if req.get("tools"):  # only tool_choice "auto" sends them: the template describes them to the model
            return self.engine.encode(req.get("prompt"), req.get("messages"), tools=req["tools"])
        return self.engine.encode(req.get("prompt"), req.get("messages"))

    def _prepare(self, req: dict) -> tuple[list[int], SamplingParams] | dict:
        param = "messages" if req.get("messages") is not None else "prompt"
        # max_tokens 0 scores the prompt only (echo with logprobs); generation still checks the other fields.
        limit = 16 if req.get("max_tokens") is None else max(1, req["max_tokens"])
        params = SamplingParams(max_tokens=limit, temperature=req.get("temperature", 1.0),
                                top_p=req.get("top_p", 1.0), top_k=req.get("top_k") or 0, seed=req.get("seed"),
                                logprobs=req.get("logprobs"), frequency_penalty=req.get("frequency_penalty", 0.0),
                                presence_penalty=req.get("presence_penalty", 0.0),
                                repetition_penalty=req.get("repetition_penalty", 1.0),
                                logit_bias=req.get("logit_bias") or None, min_tokens=req.get("min_tokens", 0),
                                ignore_eos=bool(req.get("ignore_eos")), min_p=req.get("min_p", 0.0),
                                response_format=req.get("response_format"))
        try:
            params.validate()
        except RequestError as e:
            return error_event(str(e), param=str(e).split()[0])
        try:
            ids = list(req["resume"]["prompt_ids"]) if req.get("resume") else self._encode(req)
        except RequestError as e:  # tools asked of a template that cannot render them
            return error_event(str(e), param="tool_choice", code="unsupported_value")
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

    def submit(self, req: dict, emit: Callable[[dict], None]) -> _Job | None:
        """Hand a request to the decoding thread; its events go to ``emit`` (called on that thread). None, after
        a 429 event, when the batch and its queue are full."""
        limit = getattr(self.engine, "max_rows", 1) + self.max_waiting
        if self.in_flight >= limit:
            self.refused += 1
            emit(error_event(f"this replica is busy ({self.in_flight} requests decoding or waiting); retry "
                             "shortly", code="overloaded", status=429, type="rate_limit_error"))
            return None
        job = _Job(req, emit)
        self.in_flight += 1
        self._load_changed()
        self._inbox.put(("submit", job))
        return job

    def cancel(self, job: _Job) -> None:
        """The caller went away: the request leaves the batch at the next step."""
        self._inbox.put(("cancel", job))

    def stream(self, req: dict) -> Iterator[dict]:
        events: queue.SimpleQueue = queue.SimpleQueue()
        job = self.submit(req, events.put)
        done = False
        try:
            while True:
                ev = events.get()
                done = ev["type"] in ("end", "error")
                yield ev
                if done:
                    return
        finally:
            if not done and job is not None:
                self.cancel(job)

    def complete(self, req: dict) -> dict:
        return collect(self.stream(req))

    def tokenize(self, req: dict) -> dict:
        """vLLM's /tokenize: the token ids a prompt (or a conversation, chat template and generation prompt
        applied) becomes, as generation would see them."""
        param = "messages" if req.get("messages") is not None else "prompt"
        try:
            ids = self._encode(req)
        except RequestError as e:
            return error_event(str(e), param="tools", code="unsupported_value")
        except Exception as e:  # a chat template that rejects the conversation
            return error_event(f"cannot apply the chat template: {e}", param=param)
        out = {"type": "result", "count": len(ids), "max_model_len": self.engine.max_context, "tokens": ids}
        if req.get("return_token_strs"):
            out["token_strs"] = self.engine.tokenizer.convert_ids_to_tokens(ids)
        return out

    def detokenize(self, req: dict) -> dict:
        ids = req["tokens"]
        vocab = len(self.engine.tokenizer)
        bad = [i for i in ids if not 0 <= i < vocab]
        if bad:
            return error_event(f"token id {bad[0]} is outside the vocabulary (0..{vocab - 1})", param="tokens")
        return {"type": "result", "prompt": self.engine.tokenizer.decode(ids)}

    # ---- the decoding thread -----------------------------------------------------------------------------------
    def _run(self, cfg: OnspecConfig | None) -> None:
        if cfg is not None:
            try:
                from onspec.actors.engine import SpeculativeEngine
                engine = SpeculativeEngine.from_config(cfg)
                # Measured before the replica is ready: the first speculative request would wait ~20 s for it.
                engine.warm_up()
                self._started.put(engine)
            except BaseException as e:  # noqa: BLE001 -- handed to the constructor, which raises it
                self._started.put(e)
                return
        self._inbox.get()  # the constructor has finished setting up
        jobs: dict[int, _Job] = {}  # id(seq) -> job
        while not self._closed:
            block = not jobs  # idle: sleep until a request (or a swap, or close) arrives
            while True:
                try:
                    cmd = self._inbox.get(block=block)
                except queue.Empty:
                    break
                self._guarded(jobs, cmd[1] if isinstance(cmd[1], _Job) else None, self._command, cmd, jobs)
                block = False
            if self._closed:
                return
            self.engine.apply_pending_swap()
            if not jobs:  # only its own requests: never a step for sequences someone else submitted
                continue
            try:
                touched = self.engine.step()
            except Exception as e:  # an engine failure: its requests get a server error, the replica lives on
                for job in list(jobs.values()):
                    self._fail(job, jobs, error_event(f"generation failed: {type(e).__name__}: {e}", status=500,
                                                      type="server_error"))
                continue
            self.max_batch_seen = max(self.max_batch_seen, len(self.engine.active))
            for seq in touched:
                job = jobs.get(id(seq))
                if job is not None:
                    self._guarded(jobs, job, self._emit_tokens, job, seq, jobs)

    def _guarded(self, jobs: dict, job: _Job | None, fn, *args) -> None:
        """One request's failure (a bug in its handling, a tokenizer error) fails that request with a server
        error: an exception here would end the decoding thread, and every request after it would hang."""
        try:
            fn(*args)
        except Exception as e:  # noqa: BLE001
            log.exception("handling a request failed")
            if job is not None:
                self._fail(job, jobs, error_event(f"request failed: {type(e).__name__}: {e}", status=500,
                                                  type="server_error"))

    def _command(self, cmd, jobs: dict) -> None:
        kind, job = cmd
        if kind == "wake":
            return
        if kind == "cancel":
            if job.seq is not None and not job.done:
                self.engine.cancel(job.seq)
                self.cancelled += 1
                self._retire(job, jobs)
            return
        prepared = self._prepare(job.req)
        if isinstance(prepared, dict):
            self._fail(job, jobs, prepared)
            return
        ids, params = prepared
        resume = job.req.get("resume")
        if resume:  # another replica died mid-stream: go on from what it had streamed (see api.events_once)
            job.out, job.sent = list(resume["output_ids"]), resume["sent"]
            ids = list(resume["prompt_ids"]) + job.out
            params.max_tokens -= len(job.out)
            params.min_tokens = max(0, params.min_tokens - len(job.out))
            if params.max_tokens < 1:  # it had streamed everything: only its end was lost
                job.stats.prompt_tokens, job.stats.completion_tokens = len(resume["prompt_ids"]), len(job.out)
                job.send({"type": "end", "finish_reason": "length", "usage": usage_of(job.stats),
                          "replica": self.stats()})
                self._retire(job, jobs)
                return
        start = {"type": "start", "prompt_tokens": len(ids), "prompt_ids": ids}
        if job.req.get("prompt_logprobs") is not None and not resume:
            tok = self.engine.tokenizer
            start["prompt_logprobs"] = [
                (tok.decode([t]), lp, [(tok.decode([i]), v) for i, v in top])
                for t, (lp, top) in zip(ids, self.engine.prompt_logprobs(ids, job.req["prompt_logprobs"]))]
        if job.req.get("max_tokens") == 0:  # scoring only: nothing to generate
            job.stats.prompt_tokens = len(ids)
            job.send(start)
            job.send({"type": "end", "finish_reason": "length", "usage": usage_of(job.stats),
                      "replica": self.stats()})
            self._retire(job, jobs)
            return
        try:
            job.seq = self.engine.submit(ids, params, speculate=self.speculate, stats=job.stats,
                                         tag=(job.req.get("label") or "", job.req.get("request_id") or ""),
                                         resumed=len(job.out))
        except RequestError as e:
            self._fail(job, jobs, error_event(str(e), param=e.param))
            return
        if resume:
            job.stats.prompt_tokens = len(resume["prompt_ids"])
            job.stats.completion_tokens = len(job.out)
        jobs[id(job.seq)] = job
        job.send(start)

    def _emit_tokens(self, job: _Job, seq, jobs: dict) -> None:
        tok = self.engine.tokenizer
        if seq.new:
            job.out.extend(seq.new)
            if seq.params.logprobs is not None:
                job.logprobs += [(t, lp, top) for t, (lp, top) in zip(seq.new, seq.logprobs)]
        text = tok.decode(job.out, skip_special_tokens=True)
        finished = seq.finished
        cut = self._stop_at(job, text)
        if cut is not None:  # a stop string: the text ends before it, the request ends here
            text, finished = text[:cut], True
            job.stats.finish_reason = "stop"
            if not seq.finished:
                self.engine.cancel(seq)
        # Hold back a partly decoded multi-byte character, and the tail that may still grow into a stop string.
        ready = len(text) if finished else len(text) - job.hold
        if finished or (not text.endswith("\ufffd") and text.startswith(job.sent)):
            piece = text[len(job.sent):max(ready, len(job.sent))]
            if piece or job.logprobs:
                ev = {"type": "delta", "text": piece, "token_ids": seq.new if seq.new else []}
                if seq.params.logprobs is not None:
                    ev["logprobs"] = [(tok.decode([t]), lp, [(tok.decode([i]), v) for i, v in top])
                                      for t, lp, top in job.logprobs]
                    job.logprobs = []
                job.send(ev)
                job.sent += piece
        if finished:
            if job.stats.finish_reason == "cancelled":
                job.stats.finish_reason = "stop"
            job.send({"type": "end", "finish_reason": job.stats.finish_reason or "length",
                      "usage": usage_of(job.stats), "replica": self.stats()})
            self.generate_s += job.stats.elapsed_s
            self._retire(job, jobs)

    @staticmethod
    def _stop_at(job: _Job, text: str) -> int | None:
        """Where the first stop string starts in ``text`` (searching only what could contain a new one)."""
        if not job.stop:
            return None
        start = max(0, len(job.sent) - job.hold)
        hits = [i for i in (text.find(s, start) for s in job.stop) if i >= 0]
        return min(hits) if hits else None

    def _fail(self, job: _Job, jobs: dict, event: dict) -> None:
        if job.seq is not None and not job.seq.finished:
            self.engine.cancel(job.seq)
        job.send(event)
        self._retire(job, jobs)

    def _retire(self, job: _Job, jobs: dict) -> None:
        if job.done:
            return
        job.done = True
        if job.seq is not None:
            jobs.pop(id(job.seq), None)
        self.in_flight -= 1
        self._load_changed()

    def load(self) -> dict:
        rows = getattr(self.engine, "max_rows", 1)
        return {"in_flight": self.in_flight, "queued": max(0, self.in_flight - rows)}

    def apply_pending_swap(self) -> None:
        """Wake the decoding thread: it takes the drafter between two rounds, or at once when idle."""
        self._inbox.put(("wake", None))

    def _load_changed(self) -> None:
        if self.watcher is not None:
            self.watcher.poke()

    def stats(self) -> dict:
        return {"replica_id": self.replica_id, "cancelled": self.cancelled, "in_flight": self.in_flight,
                "refused": self.refused, "max_batch_seen": self.max_batch_seen,
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
    async def astream(self, req: dict, interval: float | None = None) -> AsyncIterator[dict]:
        """The request's events. Deltas that come within ``interval`` seconds (default: the server's
        stream_interval_ms) of the last item sent go out merged into one: every item crosses Ray's streams
        (replica, ingress, proxy) at a CPU cost that the decoding thread's cores pay. The first token and the
        end are never held back."""
        loop = asyncio.get_running_loop()
        interval = self.stream_interval if interval is None else interval
        events: asyncio.Queue = asyncio.Queue()
        job = self.submit(req, lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev))
        done, sent_at, after = False, float("-inf"), None
        try:
            while True:
                ev = after if after is not None else await events.get()
                after = None
                while ev["type"] == "delta":
                    if events.empty():
                        wait = sent_at + interval - loop.time()
                        if wait <= 0:
                            break
                        try:
                            nxt = await asyncio.wait_for(events.get(), wait)
                        except asyncio.TimeoutError:
                            break
                    else:
                        nxt = events.get_nowait()
                    if nxt["type"] != "delta":
                        after = nxt
                        break
                    ev = merged_deltas(ev, nxt)
                done = ev["type"] in ("end", "error")
                yield ev
                if ev["type"] == "delta":
                    sent_at = loop.time()
                if done:
                    return
        finally:
            if not done and job is not None:
                self.cancel(job)

    async def acomplete(self, req: dict) -> dict:
        return collect([item async for item in self.astream(req, interval=0.0)])

    async def aready(self) -> dict:
        return await asyncio.to_thread(self.ready)

    def close(self) -> None:
        self._closed = True
        self._inbox.put(("wake", None))
        if self.watcher is not None:
            self.watcher.stop()
        if self.sharer is not None:
            self.sharer.close()
        if self.logger is not None:
            self.logger.close()


def merged_deltas(a: dict, b: dict) -> dict:
    """Two consecutive delta events of one request as one (what a longer round would have sent)."""
    out = {**a, "text": a["text"] + b["text"], "token_ids": list(a["token_ids"]) + list(b["token_ids"])}
    if "logprobs" in a or "logprobs" in b:
        out["logprobs"] = list(a.get("logprobs") or []) + list(b.get("logprobs") or [])
    return out


def collect(events) -> dict:
    """Stream events folded into one response: {text, token_ids, finish_reason, usage, replica} or an error."""
    text, ids, logprobs, prompt_logprobs = [], [], None, None
    for ev in events:
        if ev["type"] == "error":
            return ev
        if ev["type"] == "start":
            prompt_logprobs = ev.get("prompt_logprobs")
        if ev["type"] == "delta":
            text.append(ev["text"])
            ids.extend(ev["token_ids"])
            if "logprobs" in ev:
                logprobs = (logprobs or []) + ev["logprobs"]
        elif ev["type"] == "end":
            return {"type": "result", "text": "".join(text), "token_ids": ids, "logprobs": logprobs,
                    "finish_reason": ev["finish_reason"], "usage": ev["usage"], "replica": ev["replica"],
                    **({"prompt_logprobs": prompt_logprobs} if prompt_logprobs is not None else {})}
    return error_event("generation ended without a result", status=500, type="server_error")
