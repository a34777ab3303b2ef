"""Chat-format SFT data: OpenAI `messages` / ShareGPT `conversations` rows, each with its file line, so an
error found after parsing (e.g. while tokenizing) still names file:line."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from thinkforge.errors import ThinkforgeError
from thinkforge.utils import read_jsonl

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def numbered_rows(path: str | Path) -> list[tuple[int, dict[str, Any]]]:
    """(1-based line number, row) for every non-blank line; parse errors name the line (`read_jsonl`)."""
    rows = read_jsonl(path)
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    numbers = [i for i, line in enumerate(lines, 1) if line.strip()]
    return list(zip(numbers, rows, strict=True))


def normalize_conversation(row: dict[str, Any], where: str) -> list[dict[str, str]]:
    """OpenAI `messages` or ShareGPT `conversations` -> [{"role", "content"}]."""
    if "messages" in row:
        msgs = row["messages"]
        if not isinstance(msgs, list) or not all(isinstance(m, dict) and "role" in m and "content" in m for m in msgs):
            raise ThinkforgeError(f"{where}: field 'messages' must be a list of {{role, content}}")
        return [{"role": m["role"], "content": str(m["content"])} for m in msgs]
    if "conversations" in row:
        if not isinstance(row["conversations"], list):
            raise ThinkforgeError(f"{where}: field 'conversations' must be a list of {{from, value}}")
        out = []
        if isinstance(row.get("system"), str) and row["system"]:
            out.append({"role": "system", "content": row["system"]})
        for turn in row["conversations"]:
            role = SHAREGPT_ROLES.get(turn.get("from", "")) if isinstance(turn, dict) else None
            if role is None or "value" not in turn:
                raise ThinkforgeError(f"{where}: ShareGPT turn needs from in {sorted(SHAREGPT_ROLES)} and value")
            out.append({"role": role, "content": str(turn["value"])})
        return out
    raise ThinkforgeError(f"{where}: row has neither 'messages' nor 'conversations'")
