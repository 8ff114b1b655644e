"""Fuzzing the rule-file loader: whatever a marketer saves, ``load_rules`` answers with
either a complete RuleSet or RulesInvalid listing ``path:line:col: message`` problems that
point inside the file. Never another exception: a crash would take a running scheduler's
rules reload (or ``lifecycle rules check``) down with a traceback instead of a report.

Three sources of input, each written into a small temporary rules directory (the catalog,
the policies, the roster and one playbook: enough for every check, fast to load):

- random text, plain or built from YAML punctuation;
- random YAML documents built from the real schema keys plus noise, and the shipped
  welcome series with random parts replaced;
- the shipped files with random edits: lines deleted, duplicated, swapped, re-indented,
  tokens replaced, the file truncated, random characters or bytes inserted.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from engine.errors import RulesInvalid
from engine.playbooks.loader import load_rules
from engine.playbooks.model import RuleSet
from tests.support.paths import FIXTURE_RULES, FIXTURE_TEMPLATES

ROOT = Path(__file__).resolve().parents[2]
RULES = FIXTURE_RULES
TEMPLATES = FIXTURE_TEMPLATES
RESERVED = ("catalog.yaml", "policies.yaml", "support_roster.yaml")
SHIPPED: dict[str, str] = {
    p.name: p.read_text(encoding="utf-8") for p in sorted(RULES.glob("*.yaml"))
}
PLAYBOOKS = sorted(name for name in SHIPPED if name not in RESERVED)

PROBLEM = re.compile(r"(?P<path>[^\n]+\.yaml):(?P<line>\d+):(?P<column>\d+): (?P<message>[^\n]+)")
# Where PyYAML starts a new line (marks count lines this way); read_text has already turned
# \r\n and a lone \r into \n.
LINE_BREAK = re.compile("\r\n|[\r\n\x85\u2028\u2029]")

# Deeper than PyYAML's recursive composer can go (about two frames a level) with Python's
# default recursion limit of 1000.
DEEP = 700

FUZZ = settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


# ---------------------------------------------------------------- the property


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One rules directory for the whole module, rewritten by every example."""
    directory = tmp_path_factory.mktemp("fuzz") / "rules"
    directory.mkdir()
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


def base_files(playbook: str = "welcome_series.yaml") -> dict[str, str | bytes]:
    files: dict[str, str | bytes] = {name: SHIPPED[name] for name in RESERVED}
    files[playbook] = SHIPPED[playbook]
    return files


def load_checked(directory: Path, files: dict[str, str | bytes]) -> RuleSet | None:
    """Write ``files`` as the whole rules directory, load it, and check the outcome.

    Returns the RuleSet, or None when the loader refused the files the right way; any
    other exception propagates and fails the example.
    """
    try:
        rules = load_rules(written(directory, files), TEMPLATES)
    except RulesInvalid as exc:
        check_problems(directory, exc)
        return None
    assert rules.playbooks, "a RuleSet with no playbook"
    for playbook in rules.playbooks.values():
        assert Path(playbook.source).resolve().parent == directory.resolve()
    return rules


def written(directory: Path, files: dict[str, str | bytes]) -> Path:
    """``directory`` holding exactly ``files``."""
    for old in directory.iterdir():
        old.unlink()
    for name, content in files.items():
        target = directory / name
        if isinstance(content, bytes):
            target.write_bytes(content)
        else:
            target.write_text(content, encoding="utf-8")
    return directory


def check_problems(directory: Path, exc: RulesInvalid) -> None:
    assert exc.problems, "RulesInvalid without a problem"
    count = len(exc.problems)
    header = f"{count} problem{'s' if count != 1 else ''} in the rules:"
    assert str(exc).splitlines()[0] == header
    for problem in exc.problems:
        text = str(problem)
        match = PROBLEM.fullmatch(text)
        assert match, f"not path:line:col: message on one line: {text!r}"
        path = Path(match["path"])  # relative to the working directory when inside it
        assert path.resolve().parent == directory.resolve(), text
        assert path.is_file(), f"the problem names a file that does not exist: {text}"
        lines = file_lines(path)
        line, column = int(match["line"]), int(match["column"])
        # The last entry is what follows the last line break: the file's line count + 1.
        assert 1 <= line <= len(lines), f"line {line} of a {len(lines) - 1}-line file: {text}"
        width = len(lines[line - 1])
        assert 1 <= column <= width + 1, f"column {column} of a {width}-wide line: {text}"


def file_lines(path: Path) -> list[str]:
    """The file's lines as PyYAML counts them (what a problem's line and column refer to),
    and what follows the last line break."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        return [""]  # unreadable: the only honest place is 1:1
    return LINE_BREAK.split(text)


# ---------------------------------------------------------------- (a) random text

# fmt: off
SCHEMA_KEYS = [
    "playbook", "stage", "description", "priority", "kind", "enter", "on", "when", "reentry",
    "exit", "when_capped", "send_window", "quiet_hours", "sms_opt_out_hint", "max_sms_segments", "steps",
    "id", "wait", "send", "channel", "template", "escalate", "sla", "queue", "attributes",
    "events", "properties", "type", "example", "leads", "name", "email", "phone", "tier",
    "on_duty", "frequency_caps", "max", "per", "brand", "address", "sms",
]
YAML_PUNCTUATION = [
    ":", ": ", "- ", "-", "[", "]", "{", "}", ",", "? ", "|", ">", "'", '"', "#", "&a", "*a",
    "!!str", "!!int", "!!map", "!!timestamp", "!tag", "<<", "---", "...", "%YAML 1.2", "\n",
    "\n  ", "\n    ", "\n- ", "\t", " ", "  ", "\\", "\r\n", "\ufeff", "\u2028", "\x85",
    "\x00", "\x1f",
]
VALUES = [
    "welcome_series", "onboarding", "marketing", "transactional", "defer", "drop", "never",
    "after 90d", "after", "after 99999999999w", "2d", "36h", "90m", "1w", "3dd", "0m",
    "99999999999d", "-1d", "email", "sms", "fax", "welcome", "getting_started",
    "last_chance", "loyalty_reward_sms", "no_such_template", "../../etc/passwd", "urgent",
    "high", "normal", "low", "complaints", "signed_up", "complaint", "order_placed",
    "08:00-21:00", "21:00-08:00", "08:00-08:00", "25:00-26:00", "8-9", "orders_count >= 1",
    "orders_count == 0", "order_count > 1", "email_opt_in", "not sms_opt_in",
    'plan in ["plus", "pro"]', "total_spend_cents > $500", "total_spend_cents > $5.5.5",
    'event.reason == "late"', "event_days_ago < 2", "birthday >= 1990-01-01",
    "birthday >= 1990-13-45", "(a or b) and not c", "orders_count >= 5 and", "((((",
    '"unterminated', "orders_count >= 99999999999999999999", "int", "bool", "money", "date",
    "string", "float", "+447700900001", "a@b.example", "null", "~", "yes", "0x1F", "1e3",
    ".inf", "2026-03-02", "é", "日本",
]
# fmt: on
YAMLISH_TEXT = st.lists(st.sampled_from(SCHEMA_KEYS + YAML_PUNCTUATION + VALUES), max_size=40).map(
    "".join
)
TARGETS = st.sampled_from(["extra.yaml", "welcome_series.yaml", *RESERVED])


@FUZZ
@given(text=st.text(max_size=400) | YAMLISH_TEXT, target=TARGETS)
@example(text="&a [*a]\n", target="welcome_series.yaml")
@example(text="playbook: &a {steps: [*a]}\n", target="welcome_series.yaml")
@example(text="[" * DEEP + "]" * DEEP + "\n", target="welcome_series.yaml")
@example(text="".join(" " * n + "k:\n" for n in range(DEEP)), target="catalog.yaml")
@example(text="playbook: !!timestamp not-a-date\n", target="welcome_series.yaml")
@example(text="priority: !!int twenty\n", target="welcome_series.yaml")
@example(text="priority: !!float x\n", target="extra.yaml")
@example(text="!!int", target="extra.yaml")
@example(text="kind: !!bool maybe\n", target="extra.yaml")
@example(text="brand: !!binary '%%%'\n", target="policies.yaml")
@example(text="playbook: a\x00b\nstage: x\n", target="extra.yaml")
@example(text="", target="catalog.yaml")
def test_random_text_is_loaded_or_refused_with_located_problems(
    workdir: Path, text: str, target: str
) -> None:
    files = base_files()
    files[target] = text
    load_checked(workdir, files)


# ---------------------------------------------------------------- (a) random YAML documents

KEYS = (
    st.sampled_from(SCHEMA_KEYS)
    | st.text(max_size=12)
    | st.integers(-5, 5)
    | st.sampled_from(["On", "ON", "y", "<<"])
)
SCALARS = (
    st.sampled_from(VALUES)
    | st.text(max_size=20)
    | st.integers()
    | st.floats()
    | st.booleans()
    | st.none()
    | st.dates()
)
DOCUMENTS = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(KEYS, inner, max_size=6),
    max_leaves=30,
)


@st.composite
def patched_shipped(draw: st.DrawFn) -> tuple[str, Any]:
    """A shipped file's document with one to three parts replaced, added or removed."""
    name = draw(st.sampled_from(sorted(SHIPPED)))
    document = yaml.safe_load(SHIPPED[name])
    for _ in range(draw(st.integers(1, 3))):
        parent, key = draw(_place(document))
        action = draw(st.sampled_from(["replace", "delete", "add"]))
        if action == "delete":
            if isinstance(parent, dict):
                parent.pop(key, None)
            elif parent:
                parent.pop(key)
        elif action == "add" and isinstance(parent, dict):
            parent[draw(KEYS)] = draw(DOCUMENTS)
        else:
            parent[key] = draw(DOCUMENTS)
    return name, document


@st.composite
def _place(draw: st.DrawFn, document: Any) -> tuple[Any, Any]:
    """A container inside ``document`` and a key (or index) of it, walking down at random."""
    parent, key = None, None
    node = document
    while isinstance(node, dict | list) and node:
        keys = list(node) if isinstance(node, dict) else list(range(len(node)))
        parent, key = node, draw(st.sampled_from(keys))
        node = node[key]
        if draw(st.booleans()):
            break
    if parent is None:
        return {"x": document}, "x"
    return parent, key


@FUZZ
@given(case=st.tuples(TARGETS, DOCUMENTS) | patched_shipped(), flow=st.booleans())
def test_random_yaml_documents_are_loaded_or_refused_with_located_problems(
    workdir: Path, case: tuple[str, Any], flow: bool
) -> None:
    target, document = case
    text = yaml.safe_dump(document, default_flow_style=flow, allow_unicode=True, sort_keys=False)
    files = base_files(target if target in PLAYBOOKS else "welcome_series.yaml")
    files[target] = text
    load_checked(workdir, files)


# ---------------------------------------------------------------- (b) edits of the shipped files

# fmt: off
RANDOM_TEXT = st.text(max_size=8) | st.sampled_from(
    ["\t", "  ", "\x00", "\ufeff", "\r", "\u2028", "é", "日本", ":", "- ", "#", "'", '"', "{", "&x", "*x"]
)
EDITS = ["delete", "duplicate", "swap", "indent", "token", "truncate", "insert", "bytes"]
# fmt: on
RANDOM_WORD = (
    st.from_regex(r"[a-z_]{1,12}", fullmatch=True)
    | st.integers().map(str)
    | st.sampled_from(["-1", "0", "99999999999999999999", "1.5", "1e-05", "null", "true"])
)


@st.composite
def edited(draw: st.DrawFn, text: str) -> str | bytes:
    """``text`` with one to three random edits; bytes when an edit is not UTF-8."""
    lines = text.split("\n")
    raw: bytes | None = None
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(EDITS))
        at = draw(st.integers(0, max(len(lines) - 1, 0)))
        if kind == "delete" and lines:
            del lines[at]
        elif kind == "duplicate" and lines:
            lines.insert(at, lines[at])
        elif kind == "swap" and lines:
            other = draw(st.integers(0, len(lines) - 1))
            lines[at], lines[other] = lines[other], lines[at]
        elif kind == "indent" and lines:
            change = draw(st.sampled_from(["  ", " ", "\t", "    ", "-1", "-2", "-all"]))
            line = lines[at]
            if change.startswith("-"):
                strip = len(line) if change == "-all" else int(change[1:])
                indent = len(line) - len(line.lstrip(" "))
                lines[at] = line[min(strip, indent) :]
            else:
                lines[at] = change + line
        elif kind == "token" and lines:
            tokens = list(re.finditer(r"[\w$.]+", lines[at]))
            if tokens:
                token = draw(st.sampled_from(tokens))
                line = lines[at]
                lines[at] = line[: token.start()] + draw(RANDOM_WORD) + line[token.end() :]
        elif kind == "truncate":
            joined = "\n".join(lines)
            cut = draw(st.integers(0, len(joined)))
            lines = joined[:cut].split("\n")
        elif kind == "insert":
            joined = "\n".join(lines)
            where = draw(st.integers(0, len(joined)))
            lines = (joined[:where] + draw(RANDOM_TEXT) + joined[where:]).split("\n")
        elif kind == "bytes":
            joined = "\n".join(lines).encode("utf-8")
            where = draw(st.integers(0, len(joined)))
            raw = joined[:where] + draw(st.binary(min_size=1, max_size=6)) + joined[where:]
            try:
                lines = raw.decode("utf-8").split("\n")
                raw = None
            except UnicodeDecodeError:
                break  # not UTF-8: the file is written as these bytes
    return raw if raw is not None else "\n".join(lines)


@st.composite
def edited_rules(draw: st.DrawFn) -> dict[str, str | bytes]:
    name = draw(st.sampled_from(sorted(SHIPPED)))
    playbook = name if name in PLAYBOOKS else draw(st.sampled_from(PLAYBOOKS))
    files = base_files(playbook)
    files[name] = draw(edited(SHIPPED[name]))
    return files


@FUZZ
@given(files=edited_rules())
@example(
    files={
        **base_files(),
        "welcome_series.yaml": SHIPPED["welcome_series.yaml"].replace("2d", "99999999999d"),
    }
)
@example(
    files={**base_files(), "policies.yaml": SHIPPED["policies.yaml"].replace("7d", "99999999999w")}
)
@example(files={**base_files(), "welcome_series.yaml": b"playbook: \xff\xfe welcome\n"})
@example(files={**base_files(), "catalog.yaml": SHIPPED["catalog.yaml"][:200]})
def test_edited_shipped_files_are_loaded_or_refused_with_located_problems(
    workdir: Path, files: dict[str, str | bytes]
) -> None:
    load_checked(workdir, files)


# ---------------------------------------------------------------- what the fuzzing found


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param(
            "&a [*a]\n",
            "welcome_series.yaml:1:1: not valid YAML: an alias (*name) refers to a value "
            "that contains it",
            id="alias-inside-itself",
        ),
        pytest.param(
            "steps: " + "[" * DEEP + "]" * DEEP + "\n",
            "welcome_series.yaml:1:1: not valid YAML: nested too deeply",
            id="deep-nesting",
        ),
        pytest.param(
            "playbook: !!timestamp not-a-date\n",
            "welcome_series.yaml:1:11: cannot read value: 'not-a-date' is not a valid !!timestamp",
            id="bad-timestamp-tag",
        ),
        pytest.param(
            "priority: !!int twenty\n",
            "welcome_series.yaml:1:11: cannot read value: 'twenty' is not a valid !!int",
            id="bad-int-tag",
        ),
        pytest.param(
            "playbook: welcome\nstage: a\x00b\n",
            "welcome_series.yaml:2:9: not valid YAML: unacceptable character #x0000: "
            "special characters are not allowed",
            id="nul-character",
        ),
    ],
)
def test_what_the_fuzzing_found_is_reported_not_raised(
    workdir: Path, text: str, expected: str
) -> None:
    files = base_files()
    files["welcome_series.yaml"] = text
    assert refusal(workdir, files) == [expected]


@pytest.mark.parametrize(
    ("name", "old", "new", "expected"),
    [
        (
            "welcome_series.yaml",
            "wait: 2d ",
            "wait: 99999999999d ",
            "welcome_series.yaml:17:11: bad duration '99999999999d': write a whole number "
            "and a unit, like 90m, 36h, 2d or 1w",
        ),
        (
            "policies.yaml",
            "per: 7d}",
            "per: 99999999999w}",
            "policies.yaml:16:33: bad duration '99999999999w': write a whole number and a "
            "unit, like 90m, 36h, 2d or 1w",
        ),
    ],
)
def test_a_duration_too_long_to_represent_is_a_bad_duration(
    workdir: Path, name: str, old: str, new: str, expected: str
) -> None:
    files = base_files()
    assert old in str(files[name])
    files[name] = str(files[name]).replace(old, new, 1)
    assert refusal(workdir, files) == [expected]


def refusal(directory: Path, files: dict[str, str | bytes]) -> list[str]:
    """The problems loading ``files`` raises, each with the file's bare name."""
    with pytest.raises(RulesInvalid) as caught:
        load_rules(written(directory, files), TEMPLATES)
    return [f"{Path(p.path).name}:{p.line}:{p.column}: {p.message}" for p in caught.value.problems]


def test_the_shipped_files_pass_the_property(workdir: Path) -> None:
    """The fuzzing starts from files that load: a broken base would make it vacuous."""
    for playbook in PLAYBOOKS:
        rules = load_checked(workdir, base_files(playbook))
        assert rules is not None and len(rules.playbooks) == 1
