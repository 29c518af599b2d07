import torch

from onspec.actors.requests import SamplingParams
from onspec.actors.offline_distill import count_generated_tokens, distill, teacher_targets
from tests.conftest import tiny_engine


def test_offline_distillation_raises_acceptance():
    eng = tiny_engine(drafter_layers=1, mode="fixed", fixed_k=3)
    torch.manual_seed(0)
    with torch.no_grad():  # start from a poor drafter
        eng.drafter.head.weight.add_(torch.randn_like(eng.drafter.head.weight) * 4.0)
    prompts = [[i, (3 * i) % 90 + 1, (7 * i) % 90 + 2] for i in range(1, 25)]
    corpus = []
    for p in prompts:
        g = eng.generate(p, SamplingParams(max_tokens=24), speculate=False)
        corpus.append({"ids": p + g.token_ids, "prompt_len": len(p)})

    def acceptance():
        drafted = accepted = 0
        for p in prompts[:8]:
            s = eng.generate(p, SamplingParams(max_tokens=24)).stats
            drafted, accepted = drafted + s.drafted, accepted + s.accepted
        return accepted / drafted

    before = acceptance()
    report = distill(eng.drafter, eng.target, corpus, minutes=0.15, lr=3e-3, log=lambda *_: None)
    after = acceptance()
    assert report["steps"] > 0
    assert after > before + 0.15, (before, after)


def test_teacher_targets_are_the_target_restricted_to_kept_ids():
    eng = tiny_engine()
    ids = [3, 1, 4, 1, 5]
    idx, prob = teacher_targets(eng.target, eng.drafter.kept_ids, ids, topk=8)
    with torch.no_grad():
        full = torch.softmax(eng.target(input_ids=torch.tensor([ids])).logits[0][:, eng.drafter.kept_ids], -1)
    assert idx.shape == (5, 8)
    assert torch.allclose(prob, full.gather(-1, idx), atol=1e-6)
    assert torch.equal(idx[:, 0], full.argmax(-1))


def test_count_generated_tokens_skips_the_prompt():
    counts = count_generated_tokens([{"ids": [1, 2, 3, 3], "prompt_len": 2}], vocab_size=5)
    assert counts.tolist() == [0, 0, 0, 2, 0]
