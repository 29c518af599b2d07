"""OpenAI / vLLM sampling controls as transforms of the target's logits, over P consecutive positions at once.

Speculative decoding stays lossless only if the drafts are verified against the distribution the request
would sample from without speculation: these transforms produce that distribution's logits. Position j of a
verification round over [pending, x_1..x_k] predicts the token after x_j, so its history is the request's
output so far plus the drafts x_1..x_j before it (were they accepted, they are its output then; were they
not, position j's verdict is never used). Order as vLLM's sampler: min_tokens, logit_bias, penalties; then
temperature, min-p, top-k, top-p (kernels.sampling.logits_to_probs).
"""
from __future__ import annotations

import torch


def output_counts(output_ids: torch.Tensor, drafts: torch.Tensor, positions: int, vocab: int) -> torch.Tensor:
    """c_j[v]: how often v occurs in the output followed by drafts[:j], for j = 0..positions-1, as [P, V].

    The output's counts are built once; each later position adds the one-hot of the draft before it, a
    cumulative sum over P rows instead of P counts. (index_add_, not bincount: on CUDA bincount reads the
    largest id back to size its output, a host sync per call.)"""
    base = torch.zeros(vocab, device=output_ids.device).index_add_(
        0, output_ids, torch.ones(output_ids.shape, device=output_ids.device))
    inc = torch.zeros(positions, vocab, device=base.device)
    if positions > 1:
        inc[torch.arange(1, positions, device=base.device), drafts[:positions - 1]] = 1.0
    return base + inc.cumsum(0)


def apply_penalties(logits: torch.Tensor, counts: torch.Tensor, in_prompt: torch.Tensor,
                    frequency_penalty: float = 0.0, presence_penalty: float = 0.0,
                    repetition_penalty: float = 1.0) -> torch.Tensor:
    """Repetition penalty (Keskar et al. 2019, CTRL, sec. 4.1, with HF/vLLM's sign rule): a token seen in the
    prompt or output has its logit divided by r if positive, multiplied by r if not. Then OpenAI's documented
    penalties, over output tokens only: logit[v] -= c[v] * frequency_penalty + (c[v] > 0) * presence_penalty.

    logits, counts: [P, V]; in_prompt: [V] bool."""
    if repetition_penalty != 1.0:
        seen = (counts > 0) | in_prompt
        scaled = torch.where(logits > 0, logits / repetition_penalty, logits * repetition_penalty)
        logits = torch.where(seen, scaled, logits)
    if frequency_penalty or presence_penalty:
        logits = logits - counts * frequency_penalty - (counts > 0).float() * presence_penalty
    return logits


def process_logits(logits: torch.Tensor, prompt_ids: torch.Tensor, output_ids: torch.Tensor, drafts: torch.Tensor,
                   *, frequency_penalty: float = 0.0, presence_penalty: float = 0.0, repetition_penalty: float = 1.0,
                   logit_bias: torch.Tensor | None = None, stop_ids: torch.Tensor | None = None,
                   min_tokens: int = 0) -> torch.Tensor:
    """The request's controls applied to logits [P, V] of P consecutive positions; position j's history is
    ``output_ids`` + ``drafts[:j]`` (``drafts`` holds at least P - 1 tokens).

    min_tokens (vLLM): the stop ids get -inf at every position whose token would be generated output token
    number < min_tokens (0-based), i.e. where len(output_ids) + j < min_tokens.
    logit_bias (OpenAI): a dense [V] tensor added to every position.
    """
    P, V = logits.shape
    logits = logits.float()
    n_out = output_ids.numel()
    if stop_ids is not None and stop_ids.numel() and n_out < min_tokens:
        early = torch.arange(P, device=logits.device) + n_out < min_tokens
        banned = torch.zeros(P, V, dtype=torch.bool, device=logits.device)
        banned[:, stop_ids] = early[:, None]
        logits = logits.masked_fill(banned, float("-inf"))
    if logit_bias is not None:
        logits = logits + logit_bias
    if frequency_penalty or presence_penalty or repetition_penalty != 1.0:
        counts = output_counts(output_ids, drafts, P, V)
        in_prompt = torch.zeros(V, dtype=torch.bool, device=logits.device)
        in_prompt[prompt_ids] = True
        logits = apply_penalties(logits, counts, in_prompt, frequency_penalty, presence_penalty, repetition_penalty)
    return logits

