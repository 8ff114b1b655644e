"""YAML with positions: every value remembers where it was written.

Marketers' mistakes are reported as ``path:line:col`` (1-based), so the loader keeps the
PyYAML node marks next to the plain data instead of throwing them away.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import yaml

from engine.errors import SourceProblem

Path_ = tuple[str | int, ...]

# Where PyYAML starts a new line (its marks count lines this way).
_LINE_BREAK = re.compile("\r\n|[\r\n\x85\u2028\u2029]")


@dataclass
class Located:
    """Plain data plus the (line, column) of every value and key, by path."""

    path: str
    data: Any
    values: dict[Path_, tuple[int, int]] = field(default_factory=dict)
    keys: dict[Path_, tuple[int, int]] = field(default_factory=dict)
    nodes: dict[Path_, yaml.Node] = field(default_factory=dict)
    problems: list[SourceProblem] = field(default_factory=list)
    converted: int = 0  # values built so far, aliases expanded: bounded (see MAX_VALUES)

    def at(self, where: Path_, message: str, *, key: bool = False) -> SourceProblem:
        """A problem at the value (or the key) found at ``where``, or its nearest parent."""
        table = self.keys if key else self.values
        probe = where
        while probe not in table and probe not in self.values and probe:
            probe = probe[:-1]
        line, column = table.get(probe) or self.values.get(probe) or (1, 1)
        return SourceProblem(self.path, line, column, message)

    def condition_column(self, where: Path_, offset: int) -> tuple[int, int]:
        """The file position of character ``offset`` inside the scalar at ``where``."""
        node = self.nodes.get(where)
        line, column = self.values.get(where, (1, 1))
        if not isinstance(node, yaml.ScalarNode):
            return line, column
        quote = 1 if node.style in ("'", '"') else 0
        if node.style in ("|", ">") or node.start_mark.line != node.end_mark.line:
            return line, column  # folded text: the start of the scalar is the honest answer
        return line, column + quote + offset


def _mark(node: yaml.Node) -> tuple[int, int]:
    return node.start_mark.line + 1, node.start_mark.column + 1


def load_located(path: str, text: str) -> Located:
    """Parse ``text``; syntax errors and duplicate keys become problems, not exceptions."""
    located = Located(path=path, data=None)
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line, column = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        located.problems.append(
            SourceProblem(path, line, column, f"not valid YAML: {exc.problem or exc}")
        )
        return located
    except yaml.reader.ReaderError as exc:
        # A control character (NUL, backspace...): PyYAML gives a character offset, not a mark.
        before = _LINE_BREAK.split(text[: exc.position])
        message = f"unacceptable character #x{exc.character:04x}: {exc.reason}"
        located.problems.append(
            SourceProblem(path, len(before), len(before[-1]) + 1, f"not valid YAML: {message}")
        )
        return located
    except yaml.YAMLError as exc:
        located.problems.append(SourceProblem(path, 1, 1, f"not valid YAML: {exc}"))
        return located
    except RecursionError:
        located.problems.append(SourceProblem(path, 1, 1, "not valid YAML: nested too deeply"))
        return located
    if root is None:
        located.data = {}
        return located
    try:
        located.data = _convert(root, (), located)
    except RecursionError:
        located.data = None
        located.problems.append(SourceProblem(path, 1, 1, "not valid YAML: nested too deeply"))
    except _TooLarge:
        located.data = None
        located.problems.append(
            SourceProblem(
                path, 1, 1, f"too large: more than {MAX_VALUES:,} values once aliases are expanded"
            )
        )
    return located


# A rule file has hundreds of values; aliases expanded over and over ("billion laughs")
# could make billions. Past this many the file is refused instead of hanging the check.
MAX_VALUES = 100_000


class _TooLarge(Exception):
    pass


def _convert(
    node: yaml.Node, where: Path_, located: Located, _open: frozenset[int] = frozenset()
) -> Any:
    located.converted += 1
    if located.converted > MAX_VALUES:
        raise _TooLarge
    if id(node) in _open:
        # `&a [*a]`: an alias inside the value it names would make the data infinite.
        located.problems.append(
            SourceProblem(
                located.path,
                *_mark(node),
                "not valid YAML: an alias (*name) refers to a value that contains it",
            )
        )
        return None
    located.values[where] = _mark(node)
    located.nodes[where] = node
    if isinstance(node, yaml.MappingNode | yaml.SequenceNode):
        _open = _open | {id(node)}
    if isinstance(node, yaml.MappingNode):
        result: dict[str, Any] = {}
        for key_node, value_node in node.value:
            # Keys are read as written: YAML 1.1 would turn the key `on` into True.
            if not isinstance(key_node, yaml.ScalarNode):
                located.problems.append(
                    SourceProblem(located.path, *_mark(key_node), "keys must be plain words")
                )
                continue
            key = str(key_node.value)
            if key in result:
                located.problems.append(
                    SourceProblem(located.path, *_mark(key_node), f"duplicate key {key!r}")
                )
                continue
            located.keys[(*where, key)] = _mark(key_node)
            result[key] = _convert(value_node, (*where, key), located, _open)
        return result
    if isinstance(node, yaml.SequenceNode):
        return [_convert(item, (*where, i), located, _open) for i, item in enumerate(node.value)]
    return _scalar(node, located)


def _scalar(node: yaml.Node, located: Located) -> Any:
    if not isinstance(node, yaml.ScalarNode):
        return None
    # Resolve plain scalars the safe way (ints, bools, null), keep everything else text.
    constructor = yaml.SafeLoader("")
    try:
        return constructor.construct_object(node, deep=True)
    except yaml.constructor.ConstructorError as exc:
        located.problems.append(
            SourceProblem(located.path, *_mark(node), f"cannot read value: {exc.problem}")
        )
        return None
    except Exception:
        # An explicit tag the text does not fit (`!!int twenty`, `!!int ''`, `!!bool maybe`,
        # `!!timestamp soon`): PyYAML's constructors raise whatever Python error they hit.
        tag = node.tag.replace("tag:yaml.org,2002:", "!!")
        located.problems.append(
            SourceProblem(
                located.path,
                *_mark(node),
                f"cannot read value: {node.value!r} is not a valid {tag}",
            )
        )
        return None
    finally:
        constructor.dispose()
