"""The second drafter kind, "feature" (EAGLE, arXiv 2401.15077): a drafter that also reads the target's own last
hidden state.

At position i the drafter's input pairs the token x_i with features[:, i] = f_{i-1}, the target's last hidden
state at position i-1: the output of the target's final norm, what its lm_head reads
(``target.model(...).last_hidden_state``). They are fused EAGLE's way, fc(concat(emb(x_i), s * f_{i-1}))
(2H -> H; s = ``feature_scale``, a fixed buffer that brings features to the embedding's size), run through
``layers`` Llama decoder layers (rotary positions; a DynamicCache continues from its length like a LlamaModel),
then through a copy of the target's final norm. The result ĥ_i predicts f_i, and the VocabTrim head
(target lm_head rows of ``kept_ids``) turns it into logits.

``hidden`` is returned *after* the norm: it lives in the space of the features the target provides (post-norm
last_hidden_state), so drafting ahead feeds it straight back as the next feature, and the feature loss regresses
it onto the target's f_i. After drafting d1 from ĥ_p (the prediction at position p), the next call is
``forward([[d1]], ĥ_p[:, None], cache)``: d1 sits at position p+1 and its feature is the (predicted) f_p.

The verification forward of the engine already computes the target features; the drafter never needs an extra
target pass there. Position 0 of a sequence has no predecessor: its feature is zeros.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from onspec.actors.int4_linear import float_state_dict
from onspec.actors.models import base_version, default_token_counts
from onspec.actors.skinny_linear import use_skinny_linear
from onspec.kernels.vocab_trim import select_kept_ids


class FeatureDrafter(nn.Module):
    """kind "feature": fc(concat(emb, feature)) + ``layers`` decoder layers + the target's final norm (copied) +
    a VocabTrim head over ``kept_ids``. Shares the target's (frozen) input embedding, like Drafter."""

    kind = "feature"
    version = "unversioned"

    def __init__(self, target_config, layers: int, kept_ids: torch.Tensor, embed: nn.Embedding):
        super().__init__()
        from transformers import LlamaModel

        cfg = copy.deepcopy(target_config)
        cfg.num_hidden_layers = layers
        cfg.vocab_size, cfg.pad_token_id = 1, None  # placeholder embedding, replaced by the shared one
        hidden = cfg.hidden_size
        # The body is a LlamaModel fed inputs_embeds: its rotary embedding, causal mask and cache handling are
        # exactly a normal LlamaModel's. body.embed_tokens holds the shared embedding (the fused input is built
        # here, outside the body), under the same name as in Drafter, so trainer and checkpoint code treat both
        # kinds alike.
        self.body = LlamaModel(cfg)
        self.body.embed_tokens = embed
        self.fc = nn.Linear(2 * hidden, hidden, bias=True)
        self.head = nn.Linear(hidden, kept_ids.numel(), bias=False)
        use_skinny_linear(self)
        self.register_buffer("kept_ids", kept_ids.clone().long(), persistent=True)
        # Features enter fc scaled to the embedding's size (set by derive_feature_drafter, saved in checkpoints):
        # the target's post-norm features are ~17x larger than its input embeddings (SmolLM2-135M), so without
        # it every optimizer step on fc's feature block would swamp the token's share of the fused input.
        self.register_buffer("feature_scale", torch.ones(()), persistent=True)
        self.layers = layers
        self.hidden_size = hidden
        self.full_vocab = embed.num_embeddings

    def forward(self, input_ids: torch.Tensor, features: torch.Tensor, cache=None) -> tuple[torch.Tensor, torch.Tensor]:
        """input_ids [1 or B, n], features [B, n, H] (features[:, i] = the target's f at position i-1).
        Returns (logits over the kept ids [B, n, Vk], predicted post-norm features [B, n, H])."""
        emb = self.body.embed_tokens(input_ids)
        if emb.shape[0] != features.shape[0]:
            emb = emb.expand(features.shape[0], -1, -1)
        fused = self.fc(torch.cat([emb, features.to(emb.dtype) * self.feature_scale.to(emb.dtype)], dim=-1))
        hidden = self.body(inputs_embeds=fused, cache=cache, use_cache=cache is not None).last_hidden_state
        return self.head(hidden), hidden

    def own_state_dict(self) -> dict[str, torch.Tensor]:
        """Everything but the shared embedding (which belongs to the target); float weights also when this is
        a 4-bit served copy (engine.for_serving)."""
        from onspec.actors.int4_linear import float_state_dict

        return {k: v for k, v in float_state_dict(self).items() if not k.startswith("body.embed_tokens")}

    def spec(self) -> dict:
        return {"kind": self.kind, "layers": self.layers, "vocab_keep": int(self.kept_ids.numel()),
                "hidden_size": self.hidden_size, "full_vocab": self.full_vocab}


def derive_feature_drafter(target, layers: int, vocab_keep: int, counts: torch.Tensor | None = None,
                           always_keep: tuple[int, ...] = (), init: str = "first") -> FeatureDrafter:
    """The untrained feature drafter: the final norm copied, the VocabTrim head from the target's output
    embedding rows of the ``vocab_keep`` most generated tokens, and by ``init``:

    "first" (default): decoder layers from the target's first ``layers`` layers, fc = [I | 0] (the fused input is
    emb(x_i)): at start exactly the truncated drafter of that depth, features ignored until training moves fc's
    feature block (its gradient is not zero: the features are). "last": the target's last layers, fc = [0 | I]
    (the input is f_{i-1}: "one more layer" over the target's output). ``feature_scale`` is set to
    rms(embedding) / rms(final norm weight), so that features enter fc at the size of an embedding.

    Measured on SmolLM2-135M (greedy teacher-forced top-1 agreement with the target on its own greedy text of
    the 9 packaged default prompts, 847 positions, vocab_keep 8192): "first" 0.064 (= the 1-layer truncated
    drafter), truncated 2-layer default 0.035; "last" with fc [0|I], [I|I] or [I|0]: 0.001 (a last layer fed
    f_{i-1} re-predicts x_i, which the target already predicted there; fed emb(x_i) it is out of distribution).
    After 60 offline forward-KL steps (batch 4, lr 1e-3, the 96-sequence distill corpus): "first" 0.194, "last"
    0.100, truncated 2-layer 0.197; after 150: "first" 0.234, truncated 2-layer 0.235."""
    vocab = target.config.vocab_size
    counts = default_token_counts(vocab) if counts is None else counts
    kept = select_kept_ids(counts, vocab_keep, always_keep)
    drafter = FeatureDrafter(target.config, layers, kept, target.get_input_embeddings())
    src = target.model
    if init not in ("first", "last"):
        raise ValueError(f"init must be 'first' or 'last', not {init!r}")
    first = 0 if init == "first" else len(src.layers) - layers
    hidden = target.config.hidden_size
    with torch.no_grad():
        for i in range(layers):
            drafter.body.layers[i].load_state_dict(float_state_dict(src.layers[first + i]))
        drafter.body.norm.load_state_dict(src.norm.state_dict())
        # A post-norm feature is w * x / rms(x): its RMS is about the norm weight's RMS (1.83 here, against
        # 0.136 for the embedding rows: feature_scale 0.074 on SmolLM2-135M).
        emb_rms = target.get_input_embeddings().weight.float().pow(2).mean().sqrt()
        scale = emb_rms / src.norm.weight.float().pow(2).mean().sqrt().clamp_min(1e-12)
        drafter.feature_scale.fill_(float(scale))
        eye, zero = torch.eye(hidden), torch.zeros(hidden, hidden)
        drafter.fc.weight.copy_(torch.cat([eye, zero] if init == "first" else [zero, eye / scale], dim=1))
        drafter.fc.bias.zero_()
        drafter.head.weight.copy_(target.get_output_embeddings().weight[kept])
    drafter.version = base_version("feature")
    param = next(target.parameters())
    return drafter.to(device=param.device, dtype=param.dtype).eval()


def drafter_logits(drafter, input_ids: torch.Tensor, features: torch.Tensor | None = None,
                   cache=None) -> torch.Tensor:
    """Kept-vocabulary logits of either drafter kind: one line at every call site."""
    if getattr(drafter, "kind", "truncated") == "feature":
        if features is None:
            raise ValueError("a feature drafter needs the target's features (features[:, i] = f_{i-1})")
        return drafter(input_ids, features, cache)[0]
    return drafter(input_ids, cache)


def shift_features(hidden: torch.Tensor) -> torch.Tensor:
    """Target last hidden states [B, T, H] (h_j at position j) -> drafter input features [B, T, H]
    (position i gets h_{i-1}, position 0 zeros)."""
    return torch.cat([torch.zeros_like(hidden[:, :1]), hidden[:, :-1]], dim=1)


@torch.inference_mode()
def target_features(target, input_ids: torch.Tensor) -> torch.Tensor:
    """The target's post-norm last hidden states [B, T, H] (what its lm_head reads)."""
    return target.model(input_ids=input_ids).last_hidden_state
