"""`onspec` as a user runs it: real processes, the real model."""
import json
import subprocess
import sys

import pytest

from onspec.cluster.cli import main
from tests.conftest import DATA_DIR


def onspec(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "onspec.cluster.cli", *args, "--data-dir", str(DATA_DIR)],
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture()
def prompts_file(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps({"id": "chat", "messages": [{"role": "user", "content": "Name a fruit."}]}) + "\n"
                 + "Once upon a time\n")
    return f


@pytest.mark.real_model
def test_generate_json_and_no_speculate_agree(prompts_file, capsys):
    # In this process: the real model is loaded per call, but none of a subprocess's imports.
    argv = ["generate", "--prompts-file", str(prompts_file), "--max-tokens", "12", "--json", "--data-dir",
            str(DATA_DIR)]
    assert main(argv) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert main(argv + ["--no-speculate"]) == 0
    base = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["id"] for r in rows] == ["chat", "2"]
    for r, b in zip(rows, base):
        assert set(r) == {"id", "text", "token_ids", "stats"}
        assert {"acceptance_rate", "drafted", "accepted", "tokens_per_step", "tokens_per_s",
                "drafter_version"} <= set(r["stats"])
        assert 0 < len(r["token_ids"]) <= 12 and r["text"]
        assert r["token_ids"] == b["token_ids"]
        assert b["stats"]["drafted"] == 0


@pytest.mark.real_model
def test_bench_decode_json(tmp_path, prompts_file, real_engine, capsys):
    """Side by side in one run: the target alone, the default drafter, the other kind derived, and a saved
    checkpoint (as `bench online` leaves them); every speculative output the target's own. In this process:
    the real model is loaded once more, but none of a subprocess's imports."""
    from onspec.actors.checkpoint import save_checkpoint
    from onspec.actors.models import make_drafter
    from onspec.actors.config import DrafterConfig

    saved = make_drafter(real_engine.target, DrafterConfig(kind="feature"))
    save_checkpoint(saved, tmp_path / "f1", version="f1", parent="base-feature")
    argv = ["bench", "decode", "--prompts-file", str(prompts_file), "--max-tokens", "8", "--json", "--drafter",
            "model", "--mode", "fixed", "--data-dir", str(DATA_DIR)]
    assert main(argv + ["--compare-drafter", "truncated", "--compare-drafter", str(tmp_path / "f1")]) == 0
    out = json.loads(capsys.readouterr().out)
    for key in ("target_tokens_per_s", "spec_tokens_per_s", "speedup", "acceptance_rate", "tokens_per_step",
                "identical", "drafter_cost_per_token_ms"):
        assert key in out
    assert out["identical"] is True and out["drafter_kind"] == "feature"
    assert out["target_tokens_per_s"] > 0 and out["spec_tokens_per_s"] > 0
    # measured in fixed mode too (a 1-layer drafter costs less than a 30-layer target step), not the default guess
    assert 0 < out["drafter_cost_per_token_ms"] < out["target_forward_ms"][0]
    assert set(out["drafters"]) == {"truncated", "f1"}
    assert (out["drafters"]["truncated"]["kind"], out["drafters"]["f1"]["kind"]) == ("truncated", "feature")
    for figures in out["drafters"].values():
        assert figures["identical"] is True and figures["drafted"] > 0 and figures["drafter_cost_per_token_ms"] > 0
    assert [set(row) >= {"model", "truncated", "f1"} for row in out["prompts"]] == [True, True]

    assert main(argv + ["--compare-drafter", str(tmp_path / "nothing")]) == 2
    assert "--compare-drafter" in capsys.readouterr().err


@pytest.mark.parametrize("content,needle", [
    (None, "not found"),
    ('{"prompt": "ok"}\n{"prompt": "broken"\n', "p.jsonl:2: malformed JSON"),
    ('{"prompt": "   "}\n', "p.jsonl:1: 'prompt' must be a non-empty string"),
    ('{"messages": [{"role": "robot", "content": "hi"}]}\n', "p.jsonl:1: unknown role"),
    ('{"text": "hi"}\n', "p.jsonl:1: a JSON line needs 'prompt' or 'messages'"),
    ("\n\n", "no prompts"),
])
def test_bad_prompt_files_get_a_clear_error(tmp_path, content, needle, capsys):
    # In this process (a subprocess costs seconds of imports per case); an error that is not a user error
    # propagates out of main() and fails the test, as a traceback would.
    f = tmp_path / "p.jsonl"
    if content is not None:
        f.write_text(content)
    assert main(["generate", "--prompts-file", str(f), "--data-dir", str(DATA_DIR)]) == 2
    assert needle in capsys.readouterr().err


def test_bad_parameters_and_checkpoint_get_clear_errors(tmp_path, prompts_file, capsys):
    for flags, needle in ((["--docstring-share", "1.5"], "--docstring-share"), (["--bulk-rows", "-1"], "--bulk-rows")):
        assert main(["drafter", "pretrain", "--out", str(tmp_path / "p"), *flags, "--data-dir", str(DATA_DIR)]) == 2
        assert needle in capsys.readouterr().err
    assert main(["generate", "--prompts-file", str(prompts_file), "--drafter-checkpoint", str(tmp_path / "none"),
                 "--data-dir", str(DATA_DIR)]) == 2
    assert "no manifest.json" in capsys.readouterr().err


@pytest.mark.real_model
def test_prompt_longer_than_context_names_the_entry(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text("short one\n" + json.dumps({"id": "huge", "prompt": "word " * 3000}) + "\n")
    r = onspec("generate", "--prompts-file", str(f))
    assert r.returncode == 2
    assert "prompt 'huge' (entry 2)" in r.stderr and "context length" in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.real_model
def test_bench_quality_json(prompts_file, capsys):
    """Each precision against fp32 in one run: fp32 agrees with itself exactly; bf16 is scored on the same
    positions and nearly agrees."""
    argv = ["bench", "quality", "--prompts-file", str(prompts_file), "--tokens", "256", "--window", "128",
            "--max-tokens", "4", "--json", "--data-dir", str(DATA_DIR)]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    ref, bf16 = out["precisions"]
    assert (ref["dtype"], bf16["dtype"]) == ("float32", "bfloat16")
    assert ref["perplexity_vs_fp32_pct"] == 0.0 and ref["argmax_agreement"] == 1.0
    assert ref["greedy_identical"] == out["prompts"] and ref["candidate_default"]
    assert bf16["positions"] == ref["positions"] > 200 and bf16["argmax_agreement"] > 0.8
    assert abs(bf16["perplexity_vs_fp32_pct"]) < 10 and bf16["forward_1_ms"] > 0


def test_bench_forward_times_the_engines_own_forward(capsys):
    assert main(["bench", "forward", "--reps", "1", "--data-dir", str(DATA_DIR)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out["linear"]) == set(out["skinny"]) == {"1", "2", "3", "4", "5", "7", "9"}
    assert out["compiled_layers"] and set(out["eager_layers"]) == set(out["skinny"])  # served vs eager, side by side
    assert all(ms > 0 for ms in out["linear"].values()) and out["ratio_to_one_token"]["linear"]["1"] == 1.0
    # the floor: the served int4 target reads its packed linears (66 MB) and the Q8_0 head (35 MB) per token
    assert 80 < out["weight_mb_per_token"] < 130 and out["bandwidth_gb_s"] > 0
    assert out["floor_ms"] == pytest.approx(out["weight_mb_per_token"] / out["bandwidth_gb_s"], rel=0.02)


class _TargetPeer:
    """A peer that decodes with the engine's own target: what bench decode reports for a peer, checkable."""

    def __init__(self, engine):
        self.engine, self.calls = engine, []

    def generate(self, ids, max_tokens, stop_ids, lookup):
        from onspec.actors.requests import SamplingParams

        self.calls.append(lookup)
        g = self.engine.generate(ids, SamplingParams(max_tokens=max_tokens, temperature=0.0), speculate=False)
        return g.token_ids, g.stats.elapsed_s


@pytest.mark.real_model
def test_bench_decode_reports_peers_side_by_side(real_engine):
    from onspec.actors.prompts import PromptSpec
    from onspec.cluster.bench.decode import bench_decode

    peer = _TargetPeer(real_engine)
    specs = [PromptSpec(id="a", prompt="def add(a, b):"), PromptSpec(id="b", prompt="The capital of France")]
    out = bench_decode(real_engine, specs, 6, peers={"same": peer})
    p = out["peers"]["same"]
    assert p["agreement_with_target"] == 1.0 and p["tokens_per_s"] > 0 and p["lookup_tokens_per_s"] > 0
    assert p["onspec_target_vs_peer"] == pytest.approx(out["target_tokens_per_s"] / p["tokens_per_s"], rel=1e-3)
    assert p["onspec_default_vs_peer"] == pytest.approx(out["spec_tokens_per_s"] / p["tokens_per_s"], rel=1e-3)
    assert peer.calls == [False, True] * 3  # a warm-up, then plain and lookup on every prompt
    assert all({"same_plain_tokens_per_s", "same_lookup_tokens_per_s"} <= set(row) for row in out["prompts"])


@pytest.mark.real_model
def test_llamacpp_peer_decodes_the_same_gguf():
    pytest.importorskip("llama_cpp", reason="the optional extra onspec[peers]")
    from onspec.actors.models import default_gguf_path
    from onspec.cluster.bench.peers import LlamaCppPeer, agreement

    peer = LlamaCppPeer(default_gguf_path(), threads=2, n_ctx=256)
    ids = [1, 504, 1232, 42, 253]
    plain, secs = peer.generate(ids, 8, set(), lookup=False)
    looked, _ = peer.generate(ids, 8, set(), lookup=True)
    assert len(plain) == 8 and secs > 0
    assert agreement(plain, looked) == 1.0  # prompt lookup is lossless under greedy decoding


def test_bench_decode_peer_missing_is_a_clear_error(capsys):
    try:
        import llama_cpp  # noqa: F401
        pytest.skip("llama-cpp-python is installed")
    except ImportError:
        pass
    assert main(["bench", "decode", "--peer", "llamacpp"]) == 2
    assert "llama-cpp-python" in capsys.readouterr().err


def test_bench_decode_refuses_an_unreadable_response_format(capsys):
    assert main(["bench", "decode", "--response-format", "/nonexistent/schema.json"]) == 2
    assert "--response-format" in capsys.readouterr().err


def test_bench_quality_refuses_bad_sizes(capsys):
    assert main(["bench", "quality", "--tokens", "10", "--window", "64"]) == 2
    assert "--tokens" in capsys.readouterr().err
