"""The real server, started once for this module: real Ray Serve (1 engine replica), a real private
redis-server, the real model. Clients: the `openai` package (streaming included) and httpx."""
import json
import time

import httpx
import openai
import pytest
import redis

from onspec.actors.requests import SamplingParams
from onspec.actors.models import initial_version
from onspec.actors.stream_logger import SCHEMA_VERSION, decode_record
from onspec.actors.config import OnspecConfig
from onspec.cluster.redis_server import free_port

from tests.conftest import DATA_DIR

pytestmark = pytest.mark.real_model
MODEL = "SmolLM2-135M-Instruct"
BASE = initial_version(OnspecConfig().drafter)  # what the cluster's replica starts with: the default kind
PROMPT = "The capital of France is"
CHAT = [{"role": "user", "content": "Name a fruit."}]


def _wait(pred, timeout=30.0, every=0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(every)
    return None


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    from onspec.cluster.serve import Cluster

    # A data dir of its own (drafter versions land there), sharing the converted model.
    data = tmp_path_factory.mktemp("data")
    (data / "models").symlink_to(DATA_DIR / "models")
    cfg = OnspecConfig(data_dir=data).merged(**{
        "server.port": free_port(), "server.max_body_bytes": 65536,
        "redis.dir": str(tmp_path_factory.mktemp("redis")), "redis.stream_key": "test:serve",
        "redis.flush_interval_s": 0.02, "redis.reconnect_backoff_s": 0.05,
        # Fixed drafts from the drafter model: the base drafter is rejected in most rounds, so every request
        # leaves records (a suffix draft of an earlier answer to the same prompt would be accepted whole).
        "speculation.mode": "fixed", "speculation.fixed_k": 3, "speculation.source": "model",
        # No trainer: these tests promote drafter versions themselves (tests/test_online.py runs one).
        "trainer.enabled": False, "registry.poll_interval_s": 0.2,
        # tool_choice "auto": a template that renders tools (without tools it renders exactly SmolLM2's own,
        # tests/test_tool_parser.py) and the parser of its call format
        "model.chat_template": "hermes_tools", "server.tool_call_parser": "hermes",
    })
    c = Cluster(cfg).start()
    try:
        assert _wait(lambda: httpx.get(c.url + "/readyz", timeout=10).status_code == 200, 120)
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="module")
def client(cluster):
    return openai.OpenAI(base_url=cluster.url + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def expected(real_engine):
    import torch

    greedy = SamplingParams(max_tokens=10, temperature=0.0)
    # One torch thread while the server's processes share the machine (two thrash when a core is taken).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return {"prompt": real_engine.generate(real_engine.encode(PROMPT), greedy).text,
                "chat": real_engine.generate(real_engine.encode(messages=CHAT), greedy).text}
    finally:
        torch.set_num_threads(threads)


def _stream_records(cluster):
    r = redis.Redis.from_url(cluster.cfg.redis.url)
    try:
        return [decode_record(f) for _, f in r.xrange("test:serve")]
    finally:
        r.close()


def test_models_health_ready(cluster, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert httpx.get(cluster.url + "/healthz").json() == {"status": "ok"}
    ready = httpx.get(cluster.url + "/readyz", timeout=10).json()
    assert ready["status"] == "ok" and ready["model_loaded"] and ready["redis"] == "ok"


def test_tokenize_detokenize_round_trip_with_the_real_tokenizer(cluster, real_engine):
    tok = httpx.post(cluster.url + "/tokenize", json={"messages": CHAT}, timeout=30).json()
    assert tok["tokens"] == real_engine.encode(messages=CHAT) and tok["count"] == len(tok["tokens"])
    ids = httpx.post(cluster.url + "/tokenize", json={"prompt": PROMPT}, timeout=30).json()["tokens"]
    assert httpx.post(cluster.url + "/detokenize", json={"tokens": ids}, timeout=30).json() == {"prompt": PROMPT}


def test_completion_matches_generate(client, expected):
    res = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=10, temperature=0,
                                    extra_body={"label": "geo"})
    assert res.choices[0].text == expected["prompt"]
    assert res.choices[0].finish_reason == "length"
    u = res.usage.model_dump()
    assert u["completion_tokens"] == 10 and u["total_tokens"] == u["prompt_tokens"] + 10
    assert u["drafter_version"] == BASE and u["drafted_tokens"] > 0
    assert 0 <= u["accepted_tokens"] <= u["drafted_tokens"] and 0 <= u["acceptance_rate"] <= 1


def test_streams_concatenate_to_the_same_text(client, expected):
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=10, temperature=0,
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected["prompt"]
    assert chunks[-1].choices[0].finish_reason == "length"

    full = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=10, temperature=0)
    assert full.choices[0].message.content == expected["chat"]
    chunks = list(client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=10, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected["chat"]
    assert chunks[-1].usage.completion_tokens == 10 and chunks[-1].usage.model_extra["drafted_tokens"] > 0


BAD = [
    # (path, body (str = raw), status, param, code)
    ("/v1/completions", "{not json", 400, None, "invalid_json"),
    ("/v1/completions", {"model": MODEL, "prompt": ""}, 400, "prompt", "empty_prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": -5}, 400, "max_tokens", None),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 0}, 400, "max_tokens", None),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 10**9}, 400, "max_tokens", None),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "temperature": 7}, 400, "temperature", None),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "temperature": -1}, 400, "temperature", None),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "top_p": 0}, 400, "top_p", None),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "top_p": 1.5}, 400, "top_p", None),
    ("/v1/completions", {"model": "gpt-4o", "prompt": "hi"}, 404, "model", "model_not_found"),
    ("/v1/completions", {"model": MODEL, "prompt": "word " * 3000}, 400, "prompt", "context_length_exceeded"),
    ("/v1/completions", {"model": MODEL, "prompt": "x" * 70000}, 413, None, "body_too_large"),
    ("/v1/completions", {"model": MODEL}, 400, "prompt", None),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "seed": 2**70}, 400, "seed", None),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "n": 9}, 400, "n", None),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop", None),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "logprobs": 6}, 400, "logprobs", None),
    ("/v1/chat/completions", {"model": MODEL, "messages": CHAT, "top_logprobs": 2}, 400, "top_logprobs", None),
    ("/nowhere", {}, 404, None, None),
    ("/v1/completions", {"model": MODEL, "prompt": "", "stream": True}, 400, "prompt", "empty_prompt"),
    ("/v1/chat/completions", {"model": MODEL, "messages": []}, 400, "messages", None),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": ""}]}, 400, "messages",
     "empty_prompt"),
    ("/v1/chat/completions", {"model": MODEL, "messages": CHAT, "max_completion_tokens": -1}, 400,
     "max_completion_tokens", None),
    ("/v1/chat/completions", "[1, 2]", 400, None, "invalid_json"),
]


@pytest.mark.parametrize("path,body,status,param,code", BAD,
                         ids=[f"{i}-{b[2]}-{b[4] or b[3]}" for i, b in enumerate(BAD)])
def test_bad_input_gets_openai_error(cluster, path, body, status, param, code):
    kw = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, str) \
        else {"json": body}
    r = httpx.post(cluster.url + path, timeout=30, **kw)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["param"] == param
    if code:
        assert err["code"] == code


def test_seeded_sampling_repeats(client):
    kw = dict(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0.9, seed=1234)
    assert client.completions.create(**kw).choices[0].text == client.completions.create(**kw).choices[0].text


def test_openai_client_penalties_and_logit_bias_match_target_alone_under_them(client, real_engine):
    """The sampling controls change the output exactly as target-only decoding under them does (greedy)."""
    ids = real_engine.encode(messages=CHAT)
    plain = real_engine.generate(ids, SamplingParams(max_tokens=16, temperature=0.0), speculate=False)
    banned = plain.token_ids[1]  # a token the plain answer uses, pushed out of reach
    controls = dict(frequency_penalty=1.5, presence_penalty=0.5, logit_bias={banned: -100.0})
    ref = real_engine.generate(ids, SamplingParams(max_tokens=16, temperature=0.0, **controls), speculate=False)
    assert ref.text != plain.text and banned not in ref.token_ids
    res = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=16, temperature=0,
                                         frequency_penalty=1.5, presence_penalty=0.5,
                                         logit_bias={str(banned): -100})
    assert res.choices[0].message.content == ref.text
    ext = dict(repetition_penalty=1.3, min_tokens=12)
    ref = real_engine.generate(ids, SamplingParams(max_tokens=16, temperature=0.0, **ext), speculate=False)
    res = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=16, temperature=0, extra_body=ext)
    assert res.choices[0].message.content == ref.text and res.usage.completion_tokens >= 12


WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "the weather in a city",
                                           "parameters": {"type": "object", "properties": {
                                               "city": {"type": "string", "maxLength": 20},
                                               "unit": {"enum": ["celsius", "fahrenheit"]}},
                                               "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"type": "string", "maxLength": 20}}, "required": ["zone"],
    "additionalProperties": False}}}


def test_openai_client_structured_outputs(client, real_engine):
    import jsonschema

    person = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 24}, "age": {"type": "integer"}},
              "required": ["name", "age"], "additionalProperties": False}
    msgs = [{"role": "user", "content": "Make up a person, as JSON."}]
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": person, "strict": True}}
    res = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=64, temperature=0,
                                         response_format=fmt)
    doc = json.loads(res.choices[0].message.content)
    jsonschema.validate(doc, person)
    ref = real_engine.generate(real_engine.encode(messages=msgs),
                               SamplingParams(max_tokens=64, temperature=0.0, response_format=fmt), speculate=False)
    assert res.choices[0].message.content == ref.text  # speculative under the grammar = target alone under it
    text = client.completions.create(model=MODEL, prompt="A person, as JSON:", max_tokens=64, temperature=0,
                                     extra_body={"response_format": fmt})
    assert text.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(text.choices[0].text), person)


def test_openai_client_tool_calls(client):
    import jsonschema

    msgs = [{"role": "user", "content": "What is the weather in Paris?"}]
    named = {"type": "function", "function": {"name": "get_weather"}}
    res = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=64, temperature=0,
                                         tools=[WEATHER, TIME], tool_choice=named)
    choice = res.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    call = choice.message.tool_calls[0]
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])
    # streamed: the call's id and name first, then its arguments as they are written
    chunks = list(client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=64, temperature=0,
                                                 tools=[WEATHER, TIME], tool_choice=named, stream=True))
    deltas = [d for ch in chunks for c in ch.choices for d in (c.delta.tool_calls or [])]
    assert deltas[0].id and deltas[0].function.name == "get_weather"
    assert "".join(d.function.arguments or "" for d in deltas) == call.function.arguments
    assert [c.finish_reason for ch in chunks for c in ch.choices if c.finish_reason] == ["tool_calls"]
    # "required": the model picks the function, and its arguments fit that function's schema
    res = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=80, temperature=0,
                                         tools=[WEATHER, TIME], tool_choice="required")
    call = res.choices[0].message.tool_calls[0]
    schema = {"get_weather": WEATHER, "get_time": TIME}[call.function.name]["function"]["parameters"]
    jsonschema.validate(json.loads(call.function.arguments), schema)
    # the call and the tool's answer in the history render through the chat template
    history = msgs + [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                      {"role": "tool", "tool_call_id": call.id, "content": "18 degrees and sunny"}]
    answer = client.chat.completions.create(model=MODEL, messages=history, max_tokens=12, temperature=0,
                                            tools=[WEATHER], tool_choice="none")
    assert answer.choices[0].message.content and answer.choices[0].finish_reason in ("stop", "length")


def test_openai_client_tool_choice_auto(client, real_engine):
    from onspec.actors.models import chat_template_text
    from onspec.cluster.api.tool_parsers import HermesToolParser

    def called(city):
        return {"role": "assistant", "content": None, "tool_calls": [{
            "id": f"call_{city}", "type": "function",
            "function": {"name": "get_weather", "arguments": json.dumps({"city": city})}}]}
    # Two earlier calls in the history: the 135M model then answers a third question with a call of its own.
    msgs = [{"role": "user", "content": "What is the weather in Paris?"}, called("Paris"),
            {"role": "user", "content": "What is the weather in Madrid?"}, called("Madrid"),
            {"role": "user", "content": "What is the weather in Berlin?"}]
    res = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=60, temperature=0,
                                         tools=[WEATHER, TIME])  # "auto": the default with tools
    choice = res.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    call = choice.message.tool_calls[0]
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Berlin"}
    # the very call target-only decoding writes under the same template (speculation changes nothing)
    hist = [{"role": m["role"], "content": m["content"] or "",
             **({"tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": json.loads(
                 m["tool_calls"][0]["function"]["arguments"])}}]} if m.get("tool_calls") else {})} for m in msgs]
    ids = real_engine.tokenizer.apply_chat_template(hist, tools=[WEATHER, TIME], add_generation_prompt=True,
                                                    chat_template=chat_template_text("hermes_tools"),
                                                    tokenize=True, return_dict=True)["input_ids"]
    ref = real_engine.generate(list(ids), SamplingParams(max_tokens=60, temperature=0.0), speculate=False)
    _, want = HermesToolParser().parse(ref.text, {"get_weather", "get_time"})
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in want] == \
        [(call.function.name, call.function.arguments)]
    # streamed: no call text leaks as content, and the call arrives whole
    chunks = list(client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=60, temperature=0,
                                                 tools=[WEATHER, TIME], tool_choice="auto", stream=True))
    assert "".join(c.delta.content or "" for ch in chunks for c in ch.choices) == ""
    deltas = [d for ch in chunks for c in ch.choices for d in (c.delta.tool_calls or [])]
    assert [(d.function.name, d.function.arguments) for d in deltas] == [(call.function.name, call.function.arguments)]
    assert [c.finish_reason for ch in chunks for c in ch.choices if c.finish_reason] == ["tool_calls"]
    # a question no tool answers: text (the model decided; nothing forced it into a call)
    res = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Tell me a joke."}],
                                         max_tokens=24, temperature=0, tools=[WEATHER], tool_choice="auto")
    assert res.choices[0].message.content and not res.choices[0].message.tool_calls


def test_openai_client_gets_n_choices_stop_strings_usage_and_logprobs(client, real_engine):
    ref = real_engine.generate(real_engine.encode(messages=CHAT), SamplingParams(max_tokens=24, temperature=0.0),
                               speculate=False).text
    mid = ref[len(ref) // 2:len(ref) // 2 + 3]  # a stop string the answer surely holds (and OpenAI's usual one)
    want = ref[:min(i for i in (ref.find(mid), ref.find("\n\n")) if i >= 0)]
    kw = dict(model=MODEL, messages=CHAT, max_tokens=24, temperature=0, n=2, stop=["\n\n", mid])
    res = client.chat.completions.create(**kw, logprobs=True, top_logprobs=2)
    assert [c.index for c in res.choices] == [0, 1]
    assert [c.message.content for c in res.choices] == [want, want]
    assert {c.finish_reason for c in res.choices} == {"stop"}
    lp = res.choices[0].logprobs.content
    assert lp and all(e.logprob <= 0 and len(e.top_logprobs) == 2 for e in lp)
    assert all(abs(e.top_logprobs[0].logprob - e.logprob) < 1e-3 for e in lp)  # greedy: the chosen is the top
    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    texts = {0: "", 1: ""}
    for ch in chunks:
        for c in ch.choices:
            texts[c.index] += c.delta.content or ""
    assert texts == {0: want, 1: want}
    assert [c.finish_reason for ch in chunks for c in ch.choices if c.finish_reason] == ["stop", "stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens >= 2
    assert all(ch.usage is None for ch in chunks[:-1])
    text = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5, temperature=0, logprobs=1)
    got = text.choices[0].logprobs
    assert "".join(got.tokens) == text.choices[0].text and len(got.token_logprobs) == len(got.tokens)


def test_openai_client_sees_typed_errors(client):
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="hi", max_tokens=4)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=CHAT, temperature=3)
    assert e.value.body["param"] == "temperature"


def test_records_in_the_stream_follow_the_schema(cluster, client):
    client.completions.create(model=MODEL, prompt="Two plus two is", max_tokens=8, temperature=0,
                              extra_body={"label": "math"})
    recs = _wait(lambda: [r for r in _stream_records(cluster) if r["label"] == "math"])
    assert recs, "no record with label 'math' reached Redis"
    r = recs[0]
    assert r["schema_version"] == SCHEMA_VERSION and r["drafter_version"] == BASE and r["request_id"]
    assert 0 < len(r["context"]) <= cluster.cfg.stream.context_window
    assert 0 <= r["rejected_pos"] < len(r["drafts"]) <= 3
    assert len(r["topk_ids"]) == len(r["topk_logprobs"]) == cluster.cfg.stream.topk
    # Greedy: the target's token has the top log-probability (exact ties come back from topk in any order).
    assert r["target_token"] in r["topk_ids"] and r["topk_logprobs"] == sorted(r["topk_logprobs"], reverse=True)
    assert r["topk_logprobs"][r["topk_ids"].index(r["target_token"])] == r["topk_logprobs"][0]
    assert abs(r["ts_ms"] / 1000 - time.time()) < 600
    metrics = httpx.get(cluster.url + "/metrics").text
    assert 'onspec_spec_draft_tokens_total{label="math"}' in metrics
    assert "onspec_stream_records_written_total" in metrics


def test_client_disconnect_frees_the_replica(cluster, client):
    with httpx.stream("POST", cluster.url + "/v1/completions", timeout=60,
                      json={"model": MODEL, "prompt": PROMPT, "max_tokens": 1000, "temperature": 0,
                            "stream": True}) as r:
        for line in r.iter_lines():
            if line.startswith("data: {") and '"text":"' in line:
                break  # one token arrived: hang up
    t = time.perf_counter()
    res = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0)
    took = time.perf_counter() - t
    assert res.usage.completion_tokens == 4
    # 1000 tokens would take minutes here; the next request must not wait for them.
    assert took < 30, f"the next request waited {took:.0f} s behind an abandoned stream"
    assert _wait(lambda: httpx.get(cluster.url + "/readyz", timeout=10).json()["replica"]["cancelled"] >= 1)


def _replica(cluster):
    return httpx.get(cluster.url + "/readyz", timeout=10).json()["replica"]


def test_stream_switch_updates_replicas_in_place(cluster, client):
    before = _replica(cluster)["replica_id"]
    cluster.set_stream_enabled(False)
    try:
        assert _wait(lambda: _replica(cluster)["stream_enabled"] is False)
        client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0,
                                  extra_body={"label": "quiet"})
        assert _replica(cluster)["replica_id"] == before, "the switch restarted the replica"
    finally:
        cluster.set_stream_enabled(True)
    assert _wait(lambda: _replica(cluster)["stream_enabled"] is True)
    client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0,
                              extra_body={"label": "loud"})
    assert _wait(lambda: [r for r in _stream_records(cluster) if r["label"] == "loud"])
    assert not [r for r in _stream_records(cluster) if r["label"] == "quiet"]


def test_redis_killed_serving_continues_and_logger_catches_up(cluster, client):
    srv = cluster.redis
    srv.kill()
    try:
        res = client.completions.create(model=MODEL, prompt="Water boils at", max_tokens=8, temperature=0,
                                        extra_body={"label": "outage"})
        assert res.usage.completion_tokens == 8
        ready = httpx.get(cluster.url + "/readyz", timeout=10)
        assert ready.status_code == 200 and ready.json()["status"] == "degraded"
        assert _wait(lambda: httpx.get(cluster.url + "/readyz", timeout=10).json()["replica"]["logger"]
                     ["errors"] > 0)
    finally:
        srv.start()  # same port, same AOF
    assert _wait(lambda: [r for r in _stream_records(cluster) if r["label"] == "outage"]), \
        "the records buffered during the outage never reached Redis"
    assert [r for r in _stream_records(cluster) if r["label"] == "math"], "the AOF lost earlier records"
    assert _wait(lambda: httpx.get(cluster.url + "/readyz", timeout=10).json()["status"] == "ok")


def test_hot_swap_under_load_keeps_every_greedy_output_identical(cluster, real_engine):
    """Promotions and rollbacks every few hundred ms while two clients keep the replica busy: each output must
    be the target's own, and the replica must really have swapped drafters mid-traffic."""
    import threading

    import torch

    from onspec.actors.models import derive_drafter, make_drafter, stop_token_ids
    from onspec.actors.registry import DrafterRegistry

    registry = DrafterRegistry.from_url(cluster.cfg.redis.url, cluster.cfg.data_dir, cluster.cfg.registry.prefix)
    target = real_engine.target
    base = make_drafter(target, cluster.cfg.drafter, always_keep=tuple(stop_token_ids(target, real_engine.tokenizer)))
    assert registry.ensure_registered(base) == BASE  # what the replica started with
    deep = derive_drafter(target, 6, 8192)
    with torch.no_grad():  # a different drafter (the other kind when the default is feature), another depth,
        deep.head.weight.mul_(0.5)  # and a head that disagrees more often
    versions = [BASE, registry.register(deep, parent=BASE)["version"]]
    prompts = ["The capital of France is", "Water boils at", "Once upon a time", "The best way to learn is"]
    greedy = SamplingParams(max_tokens=12, temperature=0.0)
    expected = {p: real_engine.generate(real_engine.encode(p), greedy, speculate=False).text for p in prompts}

    stop = threading.Event()
    results, errors = [], []

    def client_loop(offset):
        with httpx.Client(timeout=120) as c:
            i = offset
            while not stop.is_set():
                p = prompts[i % len(prompts)]
                r = c.post(cluster.url + "/v1/completions",
                           json={"model": MODEL, "prompt": p, "max_tokens": 12, "temperature": 0})
                if r.status_code != 200:
                    errors.append(r.text)
                else:
                    results.append((p, r.json()["choices"][0]["text"], r.json()["usage"]["drafter_version"]))
                i += 1

    swaps_before = _replica(cluster)["drafter_swaps"]
    threads = [threading.Thread(target=client_loop, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    try:
        deadline = time.monotonic() + 60
        flips = 0
        # until both drafters have finished requests (a swap's served copy takes ~0.1 s to make) and the replica has
        # swapped a few times (on a busy machine its watcher may see two flips as one), or the deadline
        while time.monotonic() < deadline and (flips < 8 or len(results) < 8 or len({v for *_, v in results}) < 2
                                               or _replica(cluster)["drafter_swaps"] - swaps_before < 3):
            registry.promote(versions[flips % 2 == 0], reason="test: swap under load")
            flips += 1
            time.sleep(0.4)  # the cadence of the swaps, not a wait for an outcome
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=120)
    assert not errors, errors[:3]
    assert len(results) >= 8
    for p, text, _ in results:
        assert text == expected[p], f"output changed under a swap for {p!r}"
    assert _replica(cluster)["drafter_swaps"] - swaps_before >= 3
    assert {v for _, _, v in results} == set(versions), "requests should have run with both drafters"

    # A rollback reaches the replica the same way.
    now = registry.serving()
    back = registry.rollback()
    assert back["version"] != now
    # (The replica may still be taking the loop's last promotion when the rollback lands, and then comes back:
    # requests are sent until one has run with the rolled-back version, with a deadline.)
    def rolled_back():
        r = httpx.post(cluster.url + "/v1/completions", timeout=120,
                       json={"model": MODEL, "prompt": prompts[0], "max_tokens": 12, "temperature": 0}).json()
        return r if r["usage"]["drafter_version"] == back["version"] else None
    r = _wait(rolled_back, 60, every=0.2)
    assert r is not None and r["choices"][0]["text"] == expected[prompts[0]]
