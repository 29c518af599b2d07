"""Structured outputs inside speculative decoding, on the real model: a grammar (actors/grammar.py) masks the
target's distribution at every verified position, a draft the grammar forbids is rejected like any mismatch, and
the grammar's state follows only the accepted tokens. So a constrained speculative run equals a constrained
target-only run token for token (greedy and seeded), and the text is JSON that validates against the schema."""
import json

import jsonschema
import pytest

from onspec.actors.requests import RequestError, SamplingParams

pytestmark = pytest.mark.real_model

PERSON = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                                           "role": {"enum": ["admin", "user", "guest"]}},
          "required": ["name", "age", "role"], "additionalProperties": False}
ITEMS = {"type": "object", "properties": {"items": {"type": "array", "maxItems": 2, "items": {
    "type": "object", "properties": {"fruit": {"type": "string", "maxLength": 12}, "count": {"type": "integer"}},
    "required": ["fruit", "count"], "additionalProperties": False}}}, "required": ["items"],
    "additionalProperties": False}
CASES = [
    ("Give me a user of a web app as JSON: name, email and age.", {"type": "json_object"}, None),
    ("Give me a person as JSON with name, age and role.",
     {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}, PERSON),
    ("List some fruits you would buy, as JSON.",
     {"type": "json_schema", "json_schema": {"name": "basket", "schema": ITEMS}}, ITEMS),
]


@pytest.mark.parametrize("prompt,fmt,schema", CASES, ids=["json_object", "person", "items"])
def test_constrained_speculation_equals_constrained_target_alone(real_engine, prompt, fmt, schema):
    ids = real_engine.encode(messages=[{"role": "user", "content": prompt}])
    params = SamplingParams(max_tokens=128, temperature=0.0, response_format=fmt)
    spec = real_engine.generate(ids, params, speculate=True)
    alone = real_engine.generate(ids, params, speculate=False)
    assert spec.token_ids == alone.token_ids
    assert spec.stats.drafted > 0  # drafts were really verified under the mask
    assert spec.stats.finish_reason == "stop", spec.text
    doc = json.loads(spec.text)
    assert isinstance(doc, dict)
    if schema is not None:
        jsonschema.validate(doc, schema)
    free = real_engine.generate(ids, SamplingParams(max_tokens=96, temperature=0.0), speculate=False)
    assert free.token_ids != alone.token_ids  # the mask changed what the target wrote


def test_seeded_constrained_sampling_equals_target_alone(real_engine):
    prompt, fmt, schema = CASES[1]
    ids = real_engine.encode(messages=[{"role": "user", "content": prompt}])
    for seed in (3, 11):
        params = SamplingParams(max_tokens=96, temperature=0.8, seed=seed, response_format=fmt)
        spec = real_engine.generate(ids, params, speculate=True)
        assert spec.token_ids == real_engine.generate(ids, params, speculate=False).token_ids
        if spec.stats.finish_reason == "stop":
            jsonschema.validate(json.loads(spec.text), schema)


def test_a_constrained_and_a_free_request_share_a_batch(real_engine):
    ids = real_engine.encode(messages=[{"role": "user", "content": CASES[1][0]}])
    fmt = CASES[1][1]
    solo = [real_engine.generate(ids, SamplingParams(max_tokens=40, temperature=0.0, response_format=f)).token_ids
            for f in (fmt, None)]
    seqs = [real_engine.submit(ids, SamplingParams(max_tokens=40, temperature=0.0, response_format=f))
            for f in (fmt, None)]
    out = {id(s): [] for s in seqs}
    while real_engine.busy:
        for s in real_engine.step():
            out[id(s)] += s.new
    assert [out[id(s)] for s in seqs] == solo


def test_an_invalid_schema_is_refused_naming_response_format(real_engine):
    bad = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "required": "name"}}}
    with pytest.raises(RequestError) as e:
        real_engine.submit([1, 2, 3], SamplingParams(max_tokens=4, response_format=bad))
    assert e.value.param == "response_format"


def test_records_of_a_structured_request_say_so(real_engine):
    records = []
    real_engine.round_observer = records.append
    coverage, real_engine.record_coverage = real_engine.record_coverage, 4  # a record every few tokens
    try:
        ids = real_engine.encode(messages=[{"role": "user", "content": CASES[1][0]}])
        real_engine.generate(ids, SamplingParams(max_tokens=24, temperature=0.0, response_format=CASES[1][1]))
        real_engine.generate(ids, SamplingParams(max_tokens=24, temperature=0.0))
    finally:
        real_engine.round_observer, real_engine.record_coverage = None, coverage
    flags = {r.constrained for r in records}
    assert flags == {True, False}
    # a constrained record's top-k is the masked target's: only tokens the grammar allowed at that position
    checked = 0
    for r in records:
        assert len(r.topk_ids) == len(r.topk_logprobs) and all(lp > float("-inf") for lp in r.topk_logprobs)
        window = r.context + r.drafts[:r.accepted]
        if r.constrained and window[:len(ids)] == ids:  # the whole prompt is in the record's context
            allowed = real_engine._constraint(CASES[1][1], window[len(ids):]).allowed()
            # (the choice is among the top-k, not always first: bf16 logits tie, and topk orders ties its own way)
            assert all(allowed[i] for i in r.topk_ids) and r.target_token in r.topk_ids
            checked += 1
    assert checked


def test_suffix_drafts_follow_the_grammar(real_engine, monkeypatch):
    """Under a grammar the suffix source cuts the indexes' proposals before their first forbidden token: every
    planned draft is legal where it starts, and a seen answer that the schema forbids is cut where it goes wrong."""
    from onspec.actors.suffix_index import SuffixIndex

    prompt, fmt, _ = CASES[1]
    ids = real_engine.encode(messages=[{"role": "user", "content": prompt}])
    params = SamplingParams(max_tokens=96, temperature=0.0, response_format=fmt)
    alone = real_engine.generate(ids, params, speculate=False)
    assert '"age": 25' in alone.text, alone.text
    drafts, cut = [], []
    plain, structured = type(real_engine)._suffix_proposal, type(real_engine)._structured_draft

    def draft(self, seq, cap):
        d, proposal = structured(self, seq, cap), plain(self, seq, cap)
        walk = seq.constraint.fork()
        tokens = d.tokens if d is not None else []
        drafts.append((tokens, walk.advance(tokens)))
        if proposal is not None and len(proposal.tokens) > len(tokens):
            cut.append(self.tokenizer.decode(proposal.tokens[len(tokens):]))
        return d

    monkeypatch.setattr(type(real_engine), "_structured_draft", draft)
    seen = alone.text.replace('"age": 25', '"age": "25"')  # an answer the schema forbids
    monkeypatch.setattr(real_engine, "suffix_index", SuffixIndex())
    real_engine.suffix_index.add(ids + real_engine.tokenizer.encode(seen, add_special_tokens=False))
    spec = real_engine.generate(ids, params, speculate=True)
    assert spec.token_ids == alone.token_ids
    assert drafts and all(legal == len(tokens) for tokens, legal in drafts)
    assert any(c.lstrip().startswith('"25') for c in cut), cut
