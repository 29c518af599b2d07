"""Every request field is honoured, a declared no-op, or refused with a 400 naming it: never accepted and dropped.
In-process app over a real Replica with a fake engine (tests/fake_backend.py)."""
import json

import pytest
from fastapi.testclient import TestClient

from onspec.cluster.api import create_app
from onspec.actors.config import OnspecConfig
from tests.fake_backend import ReplicaBackend

CHAT = {"messages": [{"role": "user", "content": "a b"}], "max_tokens": 2}
TEXT = {"prompt": "a b", "max_tokens": 2}
TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}


@pytest.fixture()
def client(tmp_path):
    cfg = OnspecConfig(data_dir=tmp_path)
    with TestClient(create_app(cfg, ReplicaBackend(cfg))) as c:
        yield c


@pytest.mark.parametrize("path,body,field", [
    ("/v1/chat/completions", {**CHAT, "frequency_penalty": 2.5}, "frequency_penalty"),
    ("/v1/chat/completions", {**CHAT, "presence_penalty": "high"}, "presence_penalty"),
    ("/v1/chat/completions", {**CHAT, "logit_bias": {"the": 5}}, "logit_bias"),
    ("/v1/chat/completions", {**CHAT, "logit_bias": {"42": 101}}, "logit_bias"),
    ("/v1/completions", {**TEXT, "min_tokens": 3}, "min_tokens"),                          # > max_tokens
    ("/v1/completions", {**TEXT, "repetition_penalty": 0}, "repetition_penalty"),
    ("/v1/completions", {**TEXT, "min_p": 1.5}, "min_p"),
    ("/v1/chat/completions", {**CHAT, "response_format": {"type": "yaml"}}, "response_format.type"),
    ("/v1/chat/completions", {**CHAT, "response_format": {"type": "json_schema"}}, "response_format.json_schema"),
    ("/v1/chat/completions", {**CHAT, "tools": [TOOL]}, "tool_choice"),                   # "auto" by default
    ("/v1/chat/completions", {**CHAT, "tools": [TOOL], "tool_choice": "auto"}, "tool_choice"),
    ("/v1/chat/completions", {**CHAT, "tool_choice": "required"}, "tool_choice"),          # no tools
    ("/v1/chat/completions", {**CHAT, "tools": [TOOL], "tool_choice": {"type": "function", "function": {
        "name": "g"}}}, "tool_choice"),
    ("/v1/chat/completions", {**CHAT, "tools": [TOOL], "tool_choice": "required",
                              "response_format": {"type": "json_object"}}, "response_format"),
    ("/v1/completions", {**TEXT, "echo": 1}, "echo"),
    ("/v1/completions", {**TEXT, "best_of": 3}, "best_of"),
    ("/v1/completions", {**TEXT, "frequency_penalty": True}, "frequency_penalty"),
    ("/v1/chat/completions", {**CHAT, "reasoning_effort": "high"}, "reasoning_effort"),  # unknown to onspec
    ("/v1/completions", {**TEXT, "temprature": 0.5}, "temprature"),                      # a typo
])
def test_a_field_that_would_change_the_answer_is_refused_by_name(client, path, body, field):
    r = client.post(path, json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == field and field in r.json()["error"]["message"]


def test_tool_choice_auto_needs_a_parser_and_a_template_that_renders_tools(tmp_path):
    body = {**CHAT, "tools": [TOOL], "tool_choice": "auto"}
    cfg = OnspecConfig(data_dir=tmp_path)
    with TestClient(create_app(cfg, ReplicaBackend(cfg))) as c:
        r = c.post("/v1/chat/completions", json=body)
    assert r.status_code == 400 and "server.tool_call_parser" in r.json()["error"]["message"]
    cfg = cfg.merged(**{"server.tool_call_parser": "hermes"})
    with TestClient(create_app(cfg, ReplicaBackend(cfg))) as c:
        r = c.post("/v1/chat/completions", json=body)
        assert r.status_code == 400 and r.json()["error"]["param"] == "tool_choice"
        assert "does not render tools" in r.json()["error"]["message"]
        # the tools reach the template only when the model decides: a named call stays grammar-shaped
        named = {**body, "tool_choice": {"type": "function", "function": {"name": "f"}}}
        assert c.post("/v1/chat/completions", json=named).status_code == 200


@pytest.mark.parametrize("path,body", [
    ("/v1/chat/completions", {**CHAT, "frequency_penalty": 0, "presence_penalty": 0.0, "logit_bias": {},
                              "response_format": {"type": "text"}, "tools": [], "tool_choice": "none",
                              "parallel_tool_calls": True, "user": "u-1", "metadata": {"k": "v"}, "store": False}),
    ("/v1/completions", {**TEXT, "best_of": 1, "echo": False, "suffix": "", "user": "u-1", "logit_bias": {}}),
])
def test_no_op_fields_and_off_values_are_accepted(client, path, body):
    assert client.post(path, json=body).status_code == 200


def test_the_routes_vllm_clients_probe(client):
    from importlib.metadata import version

    assert client.get("/health").status_code == 200
    assert client.get("/version").json() == {"version": version("onspec")}
    card = client.get("/v1/models").json()["data"][0]
    assert card["max_model_len"] == OnspecConfig().model.max_context


def test_tokenize_and_detokenize(client):
    r = client.post("/tokenize", json={"prompt": "ab cde f", "return_token_strs": True})
    assert r.status_code == 200, r.text
    assert r.json() == {"count": 3, "max_model_len": 64, "tokens": [2, 3, 1], "token_strs": ["w2", "w3", "w1"]}
    chat = client.post("/tokenize", json={"messages": [{"role": "user", "content": "ab c"}]}).json()
    assert chat["tokens"] == [2, 1] and "token_strs" not in chat
    assert client.post("/detokenize", json={"tokens": [2, 3]}).json() == {"prompt": " w2 w3"}


@pytest.mark.parametrize("path,body,param", [
    ("/tokenize", {}, "prompt"),
    ("/tokenize", {"prompt": "a", "messages": [{"role": "user", "content": "a"}]}, "prompt"),
    ("/tokenize", {"prompt": "a", "add_special_tokens": True}, "add_special_tokens"),
    ("/tokenize", {"prompt": "a", "model": "gpt-4"}, "model"),
    ("/detokenize", {"tokens": [1, 5000]}, "tokens"),
    ("/detokenize", {"tokens": ["a"]}, "tokens.0"),
])
def test_tokenize_refusals_name_the_field(client, path, body, param):
    r = client.post(path, json=body)
    assert r.status_code in (400, 404), r.text
    assert r.json()["error"]["param"] == param


def test_echo_scores_the_prompt(client):
    """Evaluation harnesses' log-likelihood requests: echo + logprobs + max_tokens 0."""
    r = client.post("/v1/completions", json={"prompt": "ab cde f", "max_tokens": 0, "echo": True, "logprobs": 2})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["text"] == "ab cde f" and choice["finish_reason"] == "length"
    lp = choice["logprobs"]
    # (the fake tokenizer decodes token i as " wi"; its "log-probability" is -i)
    assert lp["tokens"] == [" w2", " w3", " w1"] and lp["token_logprobs"] == [None, -3.0, -1.0]
    assert lp["top_logprobs"] == [None, {" w0": 0.0, " w1": -1.0}, {" w0": 0.0, " w1": -1.0}]
    assert lp["text_offset"] == [0, 3, 6]
    assert r.json()["usage"]["prompt_tokens"] == 3 and r.json()["usage"]["completion_tokens"] == 0
    # with generation: the prompt, then the completion, in text and in logprobs
    full = client.post("/v1/completions", json={"prompt": "ab", "max_tokens": 2, "echo": True, "logprobs": 0}).json()
    plain = client.post("/v1/completions", json={"prompt": "ab", "max_tokens": 2, "logprobs": 0}).json()
    assert full["choices"][0]["text"] == "ab" + plain["choices"][0]["text"]
    assert full["choices"][0]["logprobs"]["tokens"] == [" w2"] + plain["choices"][0]["logprobs"]["tokens"]
    # streamed: the first chunk carries the prompt
    with client.stream("POST", "/v1/completions", json={"prompt": "ab", "max_tokens": 2, "echo": True,
                                                        "stream": True}) as s:
        chunks = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: {")]
    assert chunks[0]["choices"][0]["text"] == "ab"
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == full["choices"][0]["text"]
    assert client.post("/v1/completions", json={"prompt": "ab", "max_tokens": 0}).status_code == 400


def test_structured_requests_are_counted_apart_in_the_metrics(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "p", "schema": {"type": "object"}}}
    assert client.post("/v1/chat/completions", json={**CHAT, "response_format": fmt}).status_code == 200
    assert client.post("/v1/chat/completions", json={**CHAT, "response_format": {"type": "text"}}).status_code == 200
    text = client.get("/metrics").text
    assert 'onspec_spec_draft_tokens_by_output_total{output="structured"}' in text
    assert 'onspec_spec_accepted_tokens_by_output_total{output="text"}' in text
