"""Prompt files: JSONL, one prompt a line: {"prompt": "..."} or {"messages": [...]} (OpenAI chat format),
optionally with "id"; a line that is not a JSON object is a raw-text prompt."""
from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path


class PromptFileError(ValueError):
    """A prompt file that cannot be read; the message names the file and line."""


@dataclass
class PromptSpec:
    id: str
    prompt: str | None = None
    messages: list[dict] | None = None


def _check_messages(messages, where: str) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise PromptFileError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise PromptFileError(f"{where}: each message needs a string 'role' and a string 'content'")
        if m["role"] not in ("system", "user", "assistant"):
            raise PromptFileError(f"{where}: unknown role {m['role']!r}")
    if not any(m["content"].strip() for m in messages):
        raise PromptFileError(f"{where}: the messages are empty")
    return messages


def parse_line(line: str, where: str, default_id: str) -> PromptSpec | None:
    text = line.strip()
    if not text:
        return None
    if text.startswith("{"):
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise PromptFileError(f"{where}: malformed JSON ({e.msg} at column {e.colno})") from None
        pid = str(obj.get("id", default_id))
        if "messages" in obj:
            return PromptSpec(pid, messages=_check_messages(obj["messages"], where))
        if "prompt" in obj:
            if not isinstance(obj["prompt"], str) or not obj["prompt"].strip():
                raise PromptFileError(f"{where}: 'prompt' must be a non-empty string")
            return PromptSpec(pid, prompt=obj["prompt"])
        raise PromptFileError(f"{where}: a JSON line needs 'prompt' or 'messages'")
    return PromptSpec(default_id, prompt=line.rstrip("\n"))


def read_prompts(path: Path | str) -> list[PromptSpec]:
    path = Path(path)
    if not path.is_file():
        raise PromptFileError(f"prompts file not found: {path}")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise PromptFileError(f"{path}: not UTF-8 text") from None
    specs = []
    for n, line in enumerate(lines, start=1):
        spec = parse_line(line, f"{path}:{n}", default_id=str(n))
        if spec is not None:
            specs.append(spec)
    if not specs:
        raise PromptFileError(f"{path}: no prompts in the file")
    return specs


def packaged_prompts(name: str = "default_prompts.jsonl") -> Path:
    return Path(str(resources.files("onspec.actors") / "data" / name))
