import json

import pytest
import torch

from onspec.actors.checkpoint import CheckpointError, load_checkpoint, read_manifest, save_checkpoint
from tests.conftest import tiny_engine


@pytest.fixture()
def saved(tmp_path):
    eng = tiny_engine(drafter_layers=2)
    with torch.no_grad():
        eng.drafter.head.weight.add_(0.01)  # differs from a freshly derived drafter
    manifest = save_checkpoint(eng.drafter, tmp_path / "ck", version="v7", parent="v6")
    return eng, tmp_path / "ck", manifest


def test_round_trip_keeps_weights_and_manifest(saved):
    eng, folder, manifest = saved
    assert {"version", "parent_version", "sha256", "config", "created"} <= set(manifest)
    assert read_manifest(folder)["parent_version"] == "v6"
    drafter, m = load_checkpoint(folder, eng.target)
    assert m["version"] == "v7" and drafter.version == "v7"
    x = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.equal(drafter(x), eng.drafter(x))
    assert torch.equal(drafter.kept_ids, eng.drafter.kept_ids)
    # The shared embedding is the target's, not a copy in the file.
    assert drafter.body.embed_tokens is eng.target.get_input_embeddings()


def test_tampered_weights_are_refused(saved):
    eng, folder, _ = saved
    path = folder / "drafter.safetensors"
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256"):
        load_checkpoint(folder, eng.target)


def test_truncated_weights_are_refused(saved):
    eng, folder, _ = saved
    path = folder / "drafter.safetensors"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="sha256"):
        load_checkpoint(folder, eng.target)


def test_manifest_problems_are_clear(saved, tmp_path):
    eng, folder, _ = saved
    with pytest.raises(CheckpointError, match="no manifest.json"):
        load_checkpoint(tmp_path / "nowhere", eng.target)
    (folder / "manifest.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="malformed"):
        load_checkpoint(folder, eng.target)
    (folder / "manifest.json").write_text(json.dumps({"version": "x", "config": {}}))
    with pytest.raises(CheckpointError, match="sha256"):
        load_checkpoint(folder, eng.target)
