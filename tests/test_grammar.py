"""Grammar-constrained decoding (actors/grammar.py) on the real SmolLM2 tokenizer."""
import json
from pathlib import Path

import pytest
import torch

from onspec.actors.grammar import GrammarCompiler, mask_logits_

DATA_DIR = Path(__file__).resolve().parents[1] / ".onspec-data"
EOS = 2  # <|im_end|>

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "role": {"enum": ["admin", "editor", "viewer"]},
    },
    "required": ["name", "age", "role"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def folder():
    from onspec.actors.models import converted_model_dir
    from onspec.actors.config import OnspecConfig

    cfg = OnspecConfig(data_dir=DATA_DIR)
    return cfg, converted_model_dir(cfg.model, cfg.data_dir)


@pytest.fixture(scope="module")
def tok(folder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder[1], local_files_only=True)


@pytest.fixture(scope="module")
def compiler(tok):
    return GrammarCompiler(tok, vocab_size=49152, stop_token_ids=[EOS])


def ids(tok, text):
    return tok.encode(text, add_special_tokens=False)


def test_json_object_first_token(tok, compiler):
    c = compiler.constraint({"type": "json_object"})
    a = c.allowed()
    assert a.dtype == torch.bool and a.shape == (49152,)
    assert a[ids(tok, "{")[0]]
    for text in ("Hello", "Sure", "[", "1", '"'):
        assert not a[ids(tok, text)[0]], text
    assert not a[EOS]  # an empty answer is not a JSON object


def test_walk_valid_json(tok, compiler):
    doc = '{"id": 17, "items": [{"sku": "A-1", "qty": 2.5e3}], "note": "ring twice\\n", "ok": null}'
    c = compiler.constraint({"type": "json_object"})
    for i, t in enumerate(ids(tok, doc)):
        mask = c.allowed()
        assert mask[t], f"token {i} {tok.decode([t])!r} forbidden"
        assert not mask[EOS]  # EOS only once the object is complete
        assert not c.is_finished()
        c.commit([t])
    assert c.is_complete() and c.is_finished()
    assert c.allowed()[EOS]
    c.commit([EOS])
    assert c.is_finished()


def test_masks_for_partial_illegal_drafts(tok, compiler):
    c = compiler.constraint({"type": "json_object"})
    c.commit(ids(tok, '{"a": '))
    before = c.allowed()
    legal = ids(tok, '[1, 2')
    drafts = legal + ids(tok, "}") + ids(tok, "]")  # '}' cannot close an array
    masks = c.masks_for(drafts)
    assert masks.shape == (len(drafts) + 1, 49152)
    # Reference: a fresh constraint committed token by token.
    ref = compiler.constraint({"type": "json_object"})
    ref.commit(ids(tok, '{"a": '))
    for j, t in enumerate(legal):
        assert torch.equal(masks[j], ref.allowed()), j
        assert masks[j, t]
        ref.commit([t])
    j = len(legal)
    assert torch.equal(masks[j], ref.allowed()) and not masks[j, drafts[j]]  # the illegal draft is rejected
    assert masks[j + 1:].all()  # never read by verification
    # The state did not move: the same mask as before, and the legal drafts commit.
    assert torch.equal(c.allowed(), before)
    c.commit(legal)
    assert torch.equal(c.allowed(), masks[j])


def test_masks_for_all_legal_and_stop(tok, compiler):
    c = compiler.constraint({"type": "json_object"})
    drafts = ids(tok, '{"x": 1}') + [EOS]
    masks = c.masks_for(drafts)
    assert all(masks[j, t] for j, t in enumerate(drafts))
    assert masks[-1].all()  # after an accepted EOS: nothing to verify
    assert not c.is_complete()
    c.commit(drafts)
    assert c.is_finished()


def test_fork_for_drafting(tok, compiler):
    c = compiler.constraint({"type": "json_object"})
    c.commit(ids(tok, '{"a"'))
    before = c.allowed()
    f = c.fork()
    f.commit(ids(tok, ': 1}'))
    assert f.is_finished() and not c.is_finished()
    assert torch.equal(c.allowed(), before)


def test_drafting_walks_and_rewinds(tok, compiler):
    """``advance`` takes a draft up to its first forbidden token and ``rewind`` puts the state back."""
    c = compiler.constraint({"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON, "strict": True}})
    c.commit(ids(tok, '{"name": "Ann", "age": 3, "role": "ed'))
    before = c.allowed()
    draft = ids(tok, 'itor"}') + ids(tok, " more")
    assert c.advance(draft) == len(draft) - 1  # nothing may follow the closed object but its end
    c.rewind(len(draft) - 1)
    assert torch.equal(c.allowed(), before)
    assert compiler.constraint({"type": "json_object"}).advance(ids(tok, "Hello")) == 0


def test_commit_rejects_forbidden_token(tok, compiler):
    c = compiler.constraint({"type": "json_object"})
    with pytest.raises(ValueError, match="not allowed"):
        c.commit(ids(tok, "Hello"))


def test_vocab_padding(tok):
    wide = GrammarCompiler(tok, vocab_size=49152 + 64, stop_token_ids=[EOS])
    c = wide.constraint({"type": "json_object"})
    m = c.masks_for(ids(tok, '{"k": "'))
    assert m.shape == (len(ids(tok, '{"k": "')) + 1, 49152 + 64)
    assert m[-1, :49152].sum() > 1000  # inside a string almost anything goes...
    assert not m[:, 49152:].any()  # ...but never an id the tokenizer does not have
    logits = torch.zeros(2, 49152 + 64)
    mask_logits_(logits, m[:2])
    assert torch.isinf(logits[:, 49152:]).all()


def test_compile_formats_and_errors(tok, compiler):
    assert compiler.compile(None) is None and compiler.compile({"type": "text"}) is None
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    g = compiler.compile(fmt)
    assert compiler.compile(json.loads(json.dumps(fmt))) is g  # cached by the schema's JSON
    c = g.constraint()
    c.commit(ids(tok, '{"name": "Ada", "age": 36, "role": "admin"}'))  # properties in the schema's order
    assert c.is_finished()
    swapped = dict(PERSON, properties=dict(reversed(list(PERSON["properties"].items()))))
    c = compiler.compile({"type": "json_schema", "json_schema": {"name": "p", "schema": swapped,
                                                                "strict": True}}).constraint()
    c.commit(ids(tok, '{"role": "admin", "age": 36, "name": "Ada"}'))
    assert c.is_finished()
    for bad, what in [({"type": "json_schema", "json_schema": {"name": "p", "schema": {"type": "nonsense"}}},
                       "nonsense"),
                      ({"type": "json_schema", "json_schema": {"name": "p", "schema": {"type": "object",
                                                                                    "required": "x"}}},
                       "required"),
                      ({"type": "json_schema", "json_schema": {"name": "p", "schema": [1]}}, "JSON object"),
                      ({"type": "json_schema"}, "json_schema"),
                      ({"type": "yaml"}, "yaml")]:
        with pytest.raises(ValueError, match=what):
            compiler.compile(bad)
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["C", "F"]}},
        "required": ["city", "unit"]}}}
    c = compiler.compile_tool(tool).constraint()
    c.commit(ids(tok, '{"city": "Paris", "unit": "C"}'))
    assert c.is_finished()
    c = compiler.compile_tool(tool).constraint()
    c.commit(ids(tok, '{"city": "Paris"'))
    assert not c.allowed()[ids(tok, "}")[0]]  # 'unit' is required


@pytest.mark.real_model
def test_greedy_real_model_follows_schema(folder, tok, compiler):
    from onspec.actors.models import load_target

    cfg, _ = folder
    model, _ = load_target(cfg.model, cfg.data_dir)
    c = compiler.compile({"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON,
                                                                "strict": True}}).constraint()
    prompt = tok.apply_chat_template([{"role": "user", "content": "Describe a user of our wiki as JSON with "
                                                                  "name, age and role."}],
                                     add_generation_prompt=True, tokenize=False)
    x, out, past = torch.tensor([ids(tok, prompt)]), [], None
    with torch.no_grad():
        for _ in range(40):  # the CPU is shared: a KV cache keeps each step to one token
            res = model(x, past_key_values=past, use_cache=True)
            logits, past = res.logits[0, -1:].float(), res.past_key_values
            mask_logits_(logits, c.allowed()[None])
            t = int(logits.argmax())
            c.commit([t])
            out.append(t)
            if c.is_finished():
                break
            x = torch.tensor([[t]])
    text = tok.decode(out, skip_special_tokens=True)
    assert c.is_finished(), text
    value = json.loads(text)
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.validate(value, PERSON)
    assert list(value) == ["name", "age", "role"]
