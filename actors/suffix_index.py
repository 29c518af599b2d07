"""SuffixDecoding's index (Oliaro et al. 2024, arXiv 2411.04975): drafts read off earlier text, no model forward.

The paper keeps suffix trees (one per request over its prompt and output so far, one global over earlier
requests) whose nodes count the suffixes through them. A node is a pattern P; its count is how often P occurs;
its children are the tokens that followed P. This index holds the same counts in flat form: a token buffer and,
for every bigram, the positions right after its occurrences. The node of any pattern P ending in that bigram is
the subset of those positions whose preceding tokens spell P, and walking to a child is filtering that subset by
the next token. One int per token and one list per distinct bigram, which keeps the memory bound simple.
Written by hand because no maintained Python library offers a count-carrying suffix tree with FIFO eviction.

Proposing (the paper's Section 4): for each match length m of the context's tail, follow the most frequent
continuation, multiplying prob by count(child) / count(node), stop when prob < min_prob or after alpha * m
tokens; score = sum of the probs (the expected number of accepted tokens); the best-scoring candidate wins.
"""
from __future__ import annotations

import math
from array import array
from collections import Counter, deque
from dataclasses import dataclass

SEP = -1  # between sequences: never equal to a token, so matches and walks stop at a boundary


@dataclass
class SuffixDraft:
    tokens: list[int]
    probs: list[float]    # cumulative: probs[j] estimates P(tokens[:j + 1] all accepted)
    match_len: int

    @property
    def score(self) -> float:
        """Expected accepted tokens under the index's own counts (the paper's candidate score)."""
        return sum(self.probs)


class SuffixIndex:
    """Token sequences, FIFO-evicted beyond ``max_tokens``; ``propose`` drafts a continuation of a context.

    Not thread-safe: one engine thread owns it (other threads hand sequences over through the engine's inbox).
    """

    def __init__(self, max_tokens: int = 65536, max_depth: int = 64, max_occurrences: int = 256):
        self.max_tokens, self.max_depth, self.max_occurrences = max_tokens, max_depth, max_occurrences
        self.buf = array("i")       # tokens and SEPs; buf[i] is global position base + i
        self.base = 0
        self.starts: deque[int] = deque()   # global start of each sequence kept, oldest first
        self.index: dict[tuple[int, int], list[int]] = {}
        self.positions = 0          # entries over all lists (bounded by the tokens kept)

    # ---- building -----------------------------------------------------------------------------------------
    @property
    def end(self) -> int:
        return self.base + len(self.buf)

    def start_sequence(self) -> None:
        if self.buf:
            self.buf.append(SEP)
        self.starts.append(self.end)

    def append(self, tokens) -> None:
        """Extend the current sequence (the per-request index grows this way as tokens are generated)."""
        if not self.starts:
            self.start_sequence()
        start = self.starts[-1]
        for t in tokens:
            g = self.end
            self.buf.append(int(t))
            if g - 1 >= start:  # the bigram (g-1, g) is followed by position g + 1
                key = (self.buf[g - 1 - self.base], int(t))
                occ = self.index.get(key)
                if occ is None:
                    self.index[key] = [g + 1]
                else:
                    occ.append(g + 1)
                    # Trimmed in batches: the most recent occurrences are the ones kept.
                    if len(occ) >= 2 * self.max_occurrences:
                        removed = len(occ) - self.max_occurrences
                        del occ[:removed]
                        self.positions -= removed
                self.positions += 1
        self._evict()

    def add(self, tokens) -> None:
        """A whole sequence (a finished request's prompt and output); only its last ``max_tokens`` are kept."""
        tokens = list(tokens)[-self.max_tokens:]
        if len(tokens) < 3:
            return
        self.start_sequence()
        self.append(tokens)

    def _evict(self) -> None:
        if len(self.buf) <= self.max_tokens:
            return
        # Whole sequences go, oldest first; a sequence longer than the bound loses its head.
        target = self.end - self.max_tokens
        while len(self.starts) > 1 and self.starts[0] < target:
            self.starts.popleft()
        if self.starts[0] < target:
            self.starts[0] = target
        new_base = self.starts[0]
        for g in range(self.base + 1, min(new_base + 1, self.end)):
            key = (self.buf[g - 1 - self.base], self.buf[g - self.base])
            occ = self.index.get(key)
            if occ is None:
                continue
            # Positions are appended in increasing order: the evicted ones are at the front.
            n = 0
            while n < len(occ) and occ[n] - 2 < new_base:
                n += 1
            if n:
                del occ[:n]
                self.positions -= n
            if not occ:
                del self.index[key]
        del self.buf[:new_base - self.base]
        self.base = new_base

    def stats(self) -> dict:
        return {"tokens": len(self.buf), "sequences": len(self.starts), "keys": len(self.index),
                "positions": self.positions}

    # ---- proposing ----------------------------------------------------------------------------------------
    def _match_len(self, p: int, context: list[int]) -> int:
        """How many tokens before position p equal the context's tail (at least the bigram, at most max_depth)."""
        n, limit = 2, min(self.max_depth, len(context), p - self.base)
        buf, base = self.buf, self.base
        while n < limit and buf[p - n - 1 - base] == context[-n - 1]:
            n += 1
        return n

    def _walk(self, live: list[int], budget: int, min_prob: float) -> tuple[list[int], list[float]]:
        buf, base, end = self.buf, self.base, self.end
        tokens, probs, prob = [], [], 1.0
        for j in range(budget):
            nxt = [buf[p + j - base] for p in live if p + j < end]
            counts = Counter(t for t in nxt if t != SEP)
            if not counts:
                break
            tok, c = counts.most_common(1)[0]
            # count(node) includes occurrences that end here: they lower the estimate, as in the tree.
            prob *= c / len(live)
            if prob < min_prob:
                break
            tokens.append(tok)
            probs.append(prob)
            live = [p for p in live if p + j < end and buf[p + j - base] == tok]
        return tokens, probs

    def propose(self, context: list[int], max_len: int, alpha: float = 1.0, min_prob: float = 0.1,
                max_lengths: int = 4) -> SuffixDraft | None:
        """The best-scoring continuation of ``context`` (None when its last bigram never occurred with a
        continuation). ``max_lengths`` distinct match lengths are tried, longest first."""
        if len(context) < 2 or max_len < 1:
            return None
        occ = self.index.get((int(context[-2]), int(context[-1])))
        if not occ:
            return None
        lowest = self.base + 2
        live = [p for p in occ if p >= lowest and p < self.end]
        if not live:
            return None
        lengths = [self._match_len(p, context) for p in live]
        best = None
        for m in sorted(set(lengths), reverse=True)[:max_lengths]:
            pos = [p for p, n in zip(live, lengths) if n >= m]
            budget = min(max_len, max(1, math.ceil(alpha * m)))
            tokens, probs = self._walk(pos, budget, min_prob)
            if tokens and (best is None or sum(probs) > best.score):
                best = SuffixDraft(tokens, probs, m)
        return best
