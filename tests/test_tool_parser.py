"""tool_choice "auto": reading Hermes-format calls out of the model's text, whole and as a stream (the real model
and server: tests/test_serve.py); the shipped template that renders tools."""
import json

import pytest

from onspec.actors.models import ModelLoadError, chat_template_text
from onspec.cluster.api.responses import ChatRender
from onspec.cluster.api.tool_parsers import HermesToolParser

P = HermesToolParser()
NAMES = {"get_weather", "get_time"}
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'


def fn(call):
    return call["function"]["name"], json.loads(call["function"]["arguments"])


def test_parse_calls_and_the_text_before_them():
    content, calls = P.parse(CALL, NAMES)
    assert content is None and [fn(c) for c in calls] == [("get_weather", {"city": "Oslo"})]
    assert calls[0]["type"] == "function" and calls[0]["id"].startswith("call_")
    two = 'Let me look.\n' + CALL + '\n<tool_call>{"name": "get_time", "arguments": {"zone": "CET"}}</tool_call>'
    content, calls = P.parse(two, NAMES)
    assert content == "Let me look.\n"
    assert [fn(c) for c in calls] == [("get_weather", {"city": "Oslo"}), ("get_time", {"zone": "CET"})]
    # the model stopped right after the object (no closing tag): still the call it wrote
    assert [fn(c) for c in P.parse(CALL.removesuffix("\n</tool_call>"), NAMES)[1]] == [("get_weather", {"city": "Oslo"})]
    # no arguments: an empty object, as OpenAI sends for a function without parameters
    assert P.parse('<tool_call>{"name": "get_time"}</tool_call>', NAMES)[1][0]["function"]["arguments"] == "{}"


@pytest.mark.parametrize("text", [
    "It is sunny in Oslo.",                                                      # no call
    '<tool_call>{"name": "get_weather", "arguments": {"city": </tool_call>',      # cut short: not JSON
    '<tool_call>{"name": "launch_rockets", "arguments": {}}</tool_call>',        # a function nobody offered
    '<tool_call>["get_weather"]</tool_call>',                                    # not an object
    "<tool_call>",                                                               # nothing inside
])
def test_anything_but_a_valid_call_of_an_offered_function_stays_text(text):
    assert P.parse(text, NAMES) == (text, [])


def test_safe_length_holds_back_what_may_become_a_call():
    assert P.safe_length("Hello") == 5
    assert P.safe_length("Hello <to") == 6
    assert P.safe_length("Hello <") == 6
    assert P.safe_length("a < b") == 5
    assert P.safe_length("ok " + CALL) == 3


def test_render_whole_answers():
    r = ChatRender("m", auto=(P, NAMES))
    out = r.full([{"text": "Sure. " + CALL, "finish_reason": "stop"}, {"text": "Sunny.", "finish_reason": "stop"}],
                 {})
    call, text = out["choices"]
    assert call["finish_reason"] == "tool_calls" and call["message"]["content"] == "Sure. "
    assert fn(call["message"]["tool_calls"][0]) == ("get_weather", {"city": "Oslo"})
    assert text["finish_reason"] == "stop" and text["message"] == {"role": "assistant", "content": "Sunny."}


def streamed(pieces, reason="stop"):
    r = ChatRender("m", auto=(P, NAMES))
    chunks = r.opening(0) + [c for p in pieces for c in [r.delta(p)] if c is not None] + r.finish(reason)
    deltas = [c["choices"][0] for c in chunks]
    content = "".join(d["delta"].get("content") or "" for d in deltas)
    calls = [c for d in deltas for c in d["delta"].get("tool_calls") or []]
    return content, calls, [d["finish_reason"] for d in deltas if d["finish_reason"]]


def test_streamed_text_stops_where_a_call_begins_and_the_call_comes_whole():
    content, calls, reasons = streamed(["Sure", " <to", "ol_call>\n{\"name\": \"get_weather\", ",
                                        "\"arguments\": {\"city\": \"Oslo\"}}\n</tool_call>"])
    assert content == "Sure " and reasons == ["tool_calls"]
    assert [c["index"] for c in calls] == [0] and fn(calls[0]) == ("get_weather", {"city": "Oslo"})
    # a held-back "<" that turns out to be text is sent after all
    content, calls, reasons = streamed(["a <", " b", " <tool"], reason="length")
    assert content == "a < b <tool" and calls == [] and reasons == ["length"]


def test_shipped_template_and_template_files(tmp_path):
    assert "<tools>" in chat_template_text("hermes_tools")
    f = tmp_path / "t.jinja"
    f.write_text("{{ messages[0]['content'] }}")
    assert chat_template_text(str(f)) == "{{ messages[0]['content'] }}"
    with pytest.raises(ModelLoadError, match="hermes_tools"):
        chat_template_text("no_such_template")


def test_the_real_template_renders_tools_and_the_models_own_refuses_them(real_engine):
    from onspec.actors.requests import RequestError

    tok, hermes = real_engine.tokenizer, chat_template_text("hermes_tools")
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
    for msgs in ([{"role": "user", "content": "Hi"}],
                 [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                  {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}]):
        # without tools: exactly SmolLM2's own rendering, so serving this template changes no other prompt
        assert tok.apply_chat_template(msgs, chat_template=hermes, tokenize=False, add_generation_prompt=True) == \
            tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        text = tok.apply_chat_template(msgs, tools=[tool], chat_template=hermes, tokenize=False,
                                       add_generation_prompt=True)
        assert '<tools>\n{"name": "get_weather"' in text and text.endswith("<|im_start|>assistant\n")
    with pytest.raises(RequestError, match="does not render tools"):
        real_engine.encode(messages=[{"role": "user", "content": "Hi"}], tools=[tool])
