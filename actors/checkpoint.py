"""Drafter checkpoints: safetensors weights plus a manifest (version, parent, sha256, config, created time).

The weights are hashed before they are parsed; a mismatch is refused, never loaded.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

from onspec.actors.models import Drafter, sha256_file

WEIGHTS = "drafter.safetensors"
MANIFEST = "manifest.json"


class CheckpointError(ValueError):
    """A checkpoint that is missing, malformed, tampered with or made for another target."""


def drafter_kinds() -> dict:
    """Drafter class by the ``kind`` a manifest's config records (both take the same constructor arguments)."""
    from onspec.actors.feature_drafter import FeatureDrafter

    return {Drafter.kind: Drafter, FeatureDrafter.kind: FeatureDrafter}


def save_checkpoint(drafter: Drafter, folder: Path | str, version: str, parent: str | None = None,
                    extra: dict | None = None, dtype: torch.dtype | None = None, shared_head: bool = False) -> dict:
    """``dtype``: store floating weights in it (e.g. float16 for a checkpoint shipped in the repository);
    ``shared_head``: leave out the head, whose rows are then the target's output embeddings of ``kept_ids``
    (true of a drafter trained with its head frozen): the loader copies them from the target."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    weights = folder / WEIGHTS
    state = {k: v.detach().contiguous().cpu() for k, v in drafter.own_state_dict().items()
             if not (shared_head and k == "head.weight")}
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    save_file(state, weights, metadata={"version": version})
    spec = {**drafter.spec(), **({"head": "target"} if shared_head else {})}
    manifest = {"version": version, "parent_version": parent, "sha256": sha256_file(weights),
                "config": spec, "created": time.time(), "files": [WEIGHTS], **(extra or {})}
    tmp = folder / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2))
    os.replace(tmp, folder / MANIFEST)
    return manifest


def read_manifest(folder: Path | str) -> dict:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise CheckpointError(f"not a drafter checkpoint (no {MANIFEST}): {folder}")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"malformed manifest {path}: {e}") from None
    for key in ("version", "sha256", "config"):
        if key not in manifest:
            raise CheckpointError(f"manifest {path} lacks '{key}'")
    return manifest


def load_checkpoint(folder: Path | str, target) -> tuple[Drafter, dict]:
    """Verify the weights' sha256 against the manifest, then build the drafter of the recorded kind ("truncated":
    Drafter, "feature": FeatureDrafter) over the target's embedding."""
    from safetensors.torch import load_file

    folder = Path(folder)
    manifest = read_manifest(folder)
    weights = folder / WEIGHTS
    if not weights.is_file():
        raise CheckpointError(f"checkpoint {folder} has no {WEIGHTS}")
    digest = sha256_file(weights)
    if digest != manifest["sha256"]:
        raise CheckpointError(f"checkpoint {folder}: sha256 of {WEIGHTS} is {digest[:12]}..., manifest says "
                              f"{manifest['sha256'][:12]}...; refusing to load tampered or truncated weights")
    spec = manifest["config"]
    kinds = drafter_kinds()
    if spec.get("kind") not in kinds:
        raise CheckpointError(f"checkpoint {folder}: unknown drafter kind {spec.get('kind')!r}")
    if spec.get("full_vocab") != target.config.vocab_size or spec.get("hidden_size") != target.config.hidden_size:
        raise CheckpointError(f"checkpoint {folder} was made for another target (vocab/hidden size differ)")
    state = load_file(weights)
    drafter = kinds[spec["kind"]](target.config, int(spec["layers"]), state["kept_ids"],
                                  target.get_input_embeddings())
    missing, unexpected = drafter.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("body.embed_tokens")]
    if spec.get("head") == "target" and missing == ["head.weight"]:
        with torch.no_grad():  # a shared head: the target's output embedding rows of the kept ids
            drafter.head.weight.copy_(target.get_output_embeddings().weight[drafter.kept_ids])
        missing = []
    if missing or unexpected:
        raise CheckpointError(f"checkpoint {folder}: missing {missing[:3]} unexpected {unexpected[:3]}")
    param = next(target.parameters())
    drafter.version = manifest["version"]
    return drafter.to(device=param.device, dtype=param.dtype).eval(), manifest
