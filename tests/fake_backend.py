"""A real Replica (actors/replica.py) over a fake engine, as cluster/api/app.py's backend: the API, the replica's
request checks and its error events run for real, in-process and fast; only the model is left out. For the
security tests (tests/test_security.py) and the fuzzer (tests/test_fuzz.py)."""
from __future__ import annotations

import asyncio
from types import SimpleNamespace

from onspec.actors.requests import GenerationStats, RequestError
from onspec.actors.replica import Replica
from onspec.actors.config import OnspecConfig


class WordTokenizer:
    def decode(self, ids, skip_special_tokens=True):
        return "".join(f" w{i}" for i in ids)

    def convert_ids_to_tokens(self, ids):
        return [f"w{i}" for i in ids]

    def __len__(self):
        return 1000


class FakeEngine:
    """One token id per word of the prompt (chat: of every message), then up to 3 generated tokens."""
    max_context = 64

    def __init__(self):
        self.tokenizer = WordTokenizer()
        self.drafter = SimpleNamespace(version="base")
        self.swaps = 0
        self.round_observer = None
        self.suffix_index = SimpleNamespace(stats=dict)  # what Replica.stats() reads of the engine
        self.prompts: list[list[int]] = []  # what reached generation (tests look)
        self.active = []

    def encode(self, prompt=None, messages=None, tools=None):
        if tools:  # the fake "template" joins the messages' words: it has no place for tools
            raise RequestError("the served chat template does not render tools")
        text = prompt if messages is None else " ".join(m["content"] for m in messages)
        return [len(w) for w in (text or "").split()]

    def prompt_logprobs(self, ids, top):
        """Token i's "log-probability" is -i (the first has none); its alternatives: the ids 0..top-1."""
        return [(None, [])] + [(-float(i), [(a, -float(a)) for a in range(top)]) for i in ids[1:]]

    def check_prompt(self, ids):
        if not ids:
            raise RequestError("the prompt is empty")
        if len(ids) + 1 > self.max_context:
            raise RequestError(f"the prompt has {len(ids)} tokens; the context length is {self.max_context}")

    max_rows = 4

    @property
    def busy(self):
        return bool(self.active)

    def submit(self, ids, params, speculate=True, stats=None, tag=None, resumed=0):
        params.validate()
        self.check_prompt(ids)
        self.prompts.append(ids)
        stats = stats if stats is not None else GenerationStats()
        stats.prompt_tokens, stats.drafter_version = len(ids), "base"
        seq = SimpleNamespace(params=params, stats=stats, new=[], logprobs=[], finished=False, made=0,
                              budget=min(params.max_tokens, 3))
        self.active.append(seq)
        return seq

    def step(self):
        for seq in self.active:
            seq.made += 1
            seq.new, seq.logprobs = [seq.made], [(-0.5, [])]
            seq.stats.completion_tokens += 1
            seq.stats.target_forwards += 1
            if seq.made >= seq.budget:
                seq.finished, seq.stats.finish_reason = True, "length"
        touched, self.active = self.active, [s for s in self.active if not s.finished]
        return touched

    def cancel(self, seq):
        seq.finished = True
        if seq in self.active:
            self.active.remove(seq)

    def apply_pending_swap(self):
        pass


class ReplicaBackend:
    """cluster/api/app.py's backend over a plain Replica (what cluster/serve.py's HandleBackend does over Ray)."""

    def __init__(self, cfg: OnspecConfig, trainer_state: dict | None = None):
        self.replica = Replica(cfg, engine=FakeEngine(), logger=None, replica_id="fake")
        self.trainer_state = trainer_state

    async def complete(self, req):
        return await self.replica.acomplete(req)

    def stream(self, req):
        return self.replica.astream(req)

    async def ready(self):
        return await self.replica.aready()

    async def tokenize(self, req):
        return self.replica.tokenize(req)

    async def detokenize(self, req):
        return self.replica.detokenize(req)

    async def stats(self):
        return self.replica.stats()

    async def trainer(self):
        return self.trainer_state


class GatedBackend(ReplicaBackend):
    """complete() and stream() wait at a gate (an asyncio.Event) after they started: requests stay in flight
    until the test opens it."""

    def __init__(self, cfg: OnspecConfig):
        super().__init__(cfg)
        self.gate = asyncio.Event()
        self.entered = 0
        self.streams_closed = 0

    async def complete(self, req):
        self.entered += 1
        await self.gate.wait()
        return await super().complete(req)

    async def stream(self, req):
        self.entered += 1
        try:
            async for ev in self.replica.astream(req):
                yield ev
                if ev["type"] == "start":
                    await self.gate.wait()
        finally:
            self.streams_closed += 1
