"""Reading tool calls out of a model's free text, for ``tool_choice: "auto"`` (vLLM's ``--tool-call-parser``).

With "auto" the model decides between answering and calling: the chat template describes the tools, the model
writes a call in its own format, and the server turns that text into OpenAI's ``tool_calls``. Named and
"required" calls need none of this: a grammar makes the answer the call (cluster/api/serving.py).

"hermes" (NousResearch's Hermes format, also Qwen's): each call is a JSON object
``{"name": ..., "arguments": {...}}`` between ``<tool_call>`` and ``</tool_call>``; text before the first call
is the message's content. A call that does not parse, or names a function the request did not offer, is left as
text: a client gets either calls it can run or the words the model wrote, never a broken call.
"""
from __future__ import annotations

import json
import re
import uuid


class HermesToolParser:
    open, close = "<tool_call>", "</tool_call>"
    _call = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)

    def parse(self, text: str, names: set[str]) -> tuple[str | None, list[dict]]:
        """(content, calls) of a whole answer: calls as OpenAI's tool_calls; content the text before the first
        call (None when there is none), or the whole text when it holds no valid call."""
        start = text.find(self.open)
        if start < 0:
            return text, []
        calls = []
        for body in self._call.findall(text[start:]):
            try:
                made = json.loads(body)
            except ValueError:
                return text, []
            if not isinstance(made, dict) or made.get("name") not in names:
                return text, []
            args = made.get("arguments", {})
            calls.append({"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                          "function": {"name": made["name"],
                                       "arguments": args if isinstance(args, str) else json.dumps(args)}})
        if not calls:
            return text, []
        content = text[:start]
        return (content if content.strip() else None), calls

    def safe_length(self, text: str) -> int:
        """How much of a stream's text so far may go out as content: everything before a call, less a tail
        that may yet become one (``<tool`` could be the start of ``<tool_call>``)."""
        start = text.find(self.open)
        if start >= 0:
            return start
        for keep in range(min(len(self.open) - 1, len(text)), 0, -1):
            if self.open.startswith(text[-keep:]):
                return len(text) - keep
        return len(text)


PARSERS = {"hermes": HermesToolParser}


def tool_parser(name: str | None) -> HermesToolParser | None:
    return None if name is None else PARSERS[name]()
