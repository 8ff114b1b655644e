"""Writes the generated parts of README.md: the settings table and the HTTP API examples.

    python -m docs.readme          # rewrite them in README.md
    python -m docs.readme --check  # exit 1 if README.md is not in step (what the tests check)

The settings table comes from ``engine.settings.Settings`` (every field, its default and
description); the API section from ``docs/api_examples.json``, whose every request the
tests send to the real app, checking the answer shown.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

from pydantic import SecretStr

from engine.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
EXAMPLES = ROOT / "docs" / "api_examples.json"
BASE_URL = "http://127.0.0.1:8000"
REASONS = {200: "OK", 201: "Created", 401: "Unauthorized", 409: "Conflict", 422: "Unprocessable"}


def examples() -> list[dict[str, Any]]:
    """The API examples, in the order they are shown (and sent: each builds on the last)."""
    return list(json.loads(EXAMPLES.read_text(encoding="utf-8")))


def _default(value: Any) -> str:
    if value is None:
        return "unset"
    if isinstance(value, SecretStr):
        return "the published dev value"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if value == {}:
        return "none"
    if isinstance(value, int):
        return f"`{value:,}`" if value >= 10_000 else f"`{value}`"
    return f"`{value}`"


def render_settings() -> str:
    """Every setting as a Markdown table row: variable, default, meaning."""
    rows = ["| variable | default | meaning |", "|---|---|---|"]
    for name, field in Settings.model_fields.items():
        default = field.get_default(call_default_factory=True)
        meaning = (field.description or "").replace("|", "\\|")
        rows.append(f"| `LIFECYCLE_{name.upper()}` | {_default(default)} | {meaning} |")
    return "\n".join(rows)


def _curl(example: dict[str, Any]) -> str:
    parts = [f"curl -X {example['method']} {BASE_URL}{example['path']}"]
    if example["auth"] == "bearer":
        parts.append('-H "Authorization: Bearer $LIFECYCLE_API_KEY"')
    elif example["auth"] == "basic":
        parts.append('-u "$LIFECYCLE_API_KEY:"')
    if example["body"] is not None:
        parts.append('-H "Content-Type: application/json"')
        parts.append(f"-d '{json.dumps(example['body'], ensure_ascii=False)}'")
    return " \\\n  ".join(parts)


def render_api() -> str:
    """Each example: its title, the request as curl, the answer as JSON."""
    blocks = []
    for example in examples():
        status = example["status"]
        answer = json.dumps(example["answer"], indent=2, ensure_ascii=False)
        shown = f"`{status} {REASONS[status]}`"
        abridged = " (abridged)" if example.get("abridged") else ""
        block = [
            f"**{example['title']}**",
            "",
            "```sh",
            _curl(example),
            "```",
            "",
            f"answers {shown}{abridged}:",
            "",
            "```json",
            answer,
            "```",
        ]
        if example.get("note"):
            block += ["", example["note"]]
        blocks.append("\n".join(block))
    return "\n\n".join(blocks)


def _between(text: str, name: str, body: str) -> str:
    pattern = re.compile(rf"(<!-- {name}:start -->\n).*?(<!-- {name}:end -->)", re.S)
    if not pattern.search(text):
        raise SystemExit(f"README.md has no <!-- {name}:start --> ... <!-- {name}:end --> markers")
    return pattern.sub(lambda m: m.group(1) + body + "\n" + m.group(2), text)


def updated(text: str) -> str:
    """README text with its generated parts written afresh."""
    return _between(_between(text, "settings", render_settings()), "api", render_api())


def main(argv: list[str]) -> int:
    text = README.read_text(encoding="utf-8")
    fresh = updated(text)
    if "--check" in argv:
        if fresh != text:
            print("README.md is not in step: run python -m docs.readme", file=sys.stderr)
            return 1
        return 0
    README.write_text(fresh, encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
