"""Evaluation of compiled conditions: through durable_rules, in plain Python, in workers.

``DurableEvaluator`` compiles every condition into ONE durable_rules ruleset, built once
per process, and evaluates a customer by asserting their encoded facts as one fact in one
fixed session ("0"), draining the actions that fired, and retracting the fact. That is
the only way of using durable_rules 2.0.28 that stays up for millions of customers (see
docs/ARCHITECTURE.md, "Evaluation"): no session per customer, no ``durable.lang`` host and its timer threads, no
events.

``ReferenceEvaluator`` answers the same question with ``engine.language.conditions.evaluate``;
the differential tests hold the two to the same answers, and it is the fallback engine.

durable-rules 2.0.28 (its last release) does not build on Python 3.13 and later, so it is
installed only below 3.13 (pyproject's environment marker). Where it is missing, the
engine name "durable" means the reference evaluator: ``make_evaluator`` builds that one,
the evaluator's ``engine`` says so, and ``durable_unavailable()`` is the sentence that
``lifecycle init``, ``rules check``, ``evaluate`` and the commands that serve or send print.

``engine.evaluation.workers`` runs either over batches in worker processes.

Before rules reach durable_rules, ``RuleBundle.partitions`` checks them against the limits
of durable's network that otherwise end in bare error codes at evaluation time (error 303:
more than 64 tests matching at once) or in an endless loop (a node with 512 children);
see ``_Network``. Rules too many for one network are split over a few rulesets, and a
single rule that no network can take is refused, by name, before durable_rules sees it.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from json.encoder import encode_basestring_ascii  # type: ignore[attr-defined]

try:
    import durable_rules_engine
except ImportError:  # Python 3.13+: durable-rules is not installed there (see the docstring)
    durable_rules_engine = None

from engine.errors import RuleEngineError
from engine.language.catalog import FactType
from engine.language.conditions import (
    MAX_GROUPS,
    MAX_INT,
    AllOf,
    AnyOf,
    Atom,
    Condition,
    Node,
    canonical_value,
    compile_predicate,
    durable_key,
    to_durable,
)

__all__ = [
    "DurableEvaluator",
    "ENGINES",
    "Evaluator",
    "ReferenceEvaluator",
    "RuleBundle",
    "create_ruleset",
    "durable_unavailable",
    "make_evaluator",
    "network_problem",
]

ENGINES = ("durable", "reference")
DURABLE_AVAILABLE = durable_rules_engine is not None


def durable_unavailable() -> str | None:
    """Why the engine "durable" is the reference evaluator on this Python, or None when
    durable_rules is installed."""
    if DURABLE_AVAILABLE:
        return None
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    return (
        f"durable_rules is not available on Python {version} (durable-rules 2.0.28 does not "
        "build there), so the reference evaluator is used: engine.language.conditions, the "
        "same semantics, held to durable_rules by differential tests"
    )


Row = tuple[str, Mapping[str, object]]
Result = tuple[str, frozenset[str]]

# durable_rules' limits (src/rules/rules.h, state.h), with a margin.
_MAX_FACTS = 250  # MAX_OBJECT_PROPERTIES is 255 per fact, sid and id included
_MAX_CHILDREN = 480  # a node's child table has 512 slots; a full one loops forever
_MAX_FORWARDS = 100  # NEXT_LIST_LENGTH 128: or-branches ending at one shared node
_MAX_RULES_PER_NODE = 200  # BETA_LIST_LENGTH 256: rules ending at one shared node
_MAX_STACK = 64  # MAX_STACK_SIZE: alpha nodes pending at once while evaluating a fact
_RESERVED_PROPERTIES = ("sid", "id", "$s", "$forward")
_ERR_EVENT_OBSERVED = 2
_CODE = re.compile(r"error code: (\d+)")


def _engine_error(operation: str, exc: Exception) -> RuleEngineError:
    match = _CODE.search(str(exc))
    return RuleEngineError(operation, int(match.group(1)) if match else None, str(exc))


def _fnv1a32(text: str) -> int:
    """durable_rules' hash of a property name (json.c getStringAndHash), which is all it
    keeps of a name: two names with the same hash would be the same property."""
    value = 0x811C9DC5
    for byte in text.encode():
        value = ((value ^ byte) * 16777619) & 0xFFFFFFFF
    return value


# --------------------------------------------------------------------------- the bundle


@dataclass(eq=False)
class _Alpha:
    """A node of durable_rules' alpha network, as rete.c builds it."""

    children: dict[tuple[str, str, type, object], _Alpha] = field(default_factory=dict)
    forwards: list[_Alpha] = field(default_factory=list)  # the or-nodes it feeds
    rules: int = 0  # rules that end here


class _Network:
    """Replays how durable_rules links alpha nodes (createAlpha/findAlpha in rete.c) to
    check its limits before it sees the rules: a test under the same parent with the same
    property, operator and value is shared; each ``$or`` adds a fresh forward node that
    every branch links to; an ``$and`` chains its terms."""

    def __init__(self) -> None:
        self.root = _Alpha()
        self.nodes = [self.root]

    def add(self, tree: Node) -> None:
        self._add(tree, self.root).rules += 1

    def _add(self, node: Node, parent: _Alpha) -> _Alpha:
        if isinstance(node, Atom):
            key = (durable_key(node.fact), node.op, type(node.value), node.value)
            child = parent.children.get(key)
            if child is None:
                child = parent.children[key] = _Alpha()
                self.nodes.append(child)
            return child
        if isinstance(node, AllOf):
            current = parent
            for term in node.terms:
                current = self._add(term, current)
            return current
        assert isinstance(node, AnyOf)
        forward = _Alpha()
        self.nodes.append(forward)
        for term in node.terms:
            self._add(term, parent).forwards.append(forward)
        return forward

    def problem(self) -> str | None:
        for node in self.nodes:
            if len(node.children) > _MAX_CHILDREN:
                return (
                    f"{len(node.children)} different tests hang from one node of its network "
                    f"(at most {_MAX_CHILDREN}; durable_rules loops forever at 512): "
                    "shorten the longest 'in' lists"
                )
            if len(node.forwards) > _MAX_FORWARDS:
                return (
                    f"{len(node.forwards)} 'or' branches end at one test (at most {_MAX_FORWARDS})"
                )
            if node.rules > _MAX_RULES_PER_NODE:
                return f"{node.rules} rules end at one test (at most {_MAX_RULES_PER_NODE})"
        depth = self._stack(self.root, {})
        if depth > _MAX_STACK:
            return (
                f"a customer could match {depth} of its tests at once "
                f"(durable_rules evaluates at most {_MAX_STACK})"
            )
        return None

    def _stack(self, node: _Alpha, memo: dict[int, int]) -> int:
        """The most alpha nodes durable_rules could hold on its evaluation stack while
        visiting ``node`` (handleAlpha in events.c; 64 at most, or error 303): it pushes
        every successor that matches, and of the ``==`` tests of one property at most one
        can match."""
        known = memo.get(id(node))
        if known is not None:
            return known
        equal_tests: set[str] = set()
        pushed = len(node.forwards)
        for key, op, _, _ in node.children:
            if op == "==":
                equal_tests.add(key)
            else:
                pushed += 1
        pushed += len(equal_tests)
        successors = [*node.children.values(), *node.forwards]
        depth = 1
        if successors:
            depth = pushed - 1 + max(self._stack(s, memo) for s in successors)
        memo[id(node)] = depth
        return depth


@dataclass(frozen=True)
class RuleBundle:
    """Rule ids and their conditions, compiled for durable_rules.

    Conditions that normalise to the same tree (in any order) share one durable rule;
    constant ones never reach durable_rules (``always`` holds the ids that are constantly
    true). Durable rule names are ``r0``, ``r1``...: safe, short, and cheap to read back.
    """

    conditions: Mapping[str, Condition]
    always: frozenset[str]
    rules: Mapping[str, tuple[str, ...]]  # durable rule name -> the rule ids it decides
    trees: Mapping[str, Node]  # durable rule name -> the normal form it tests
    used: tuple[str, ...]  # the facts to encode, in a fixed order
    types: Mapping[str, FactType]

    @classmethod
    def build(cls, conditions: Mapping[str, Condition]) -> RuleBundle:
        always: set[str] = set()
        by_tree: dict[Node, list[str]] = {}
        types: dict[str, FactType] = {}
        for rule_id in sorted(conditions):
            condition = conditions[rule_id]
            if condition.constant is not None:
                if condition.constant:
                    always.add(rule_id)
                continue
            by_tree.setdefault(_canonical(condition.tree), []).append(rule_id)
            for name in condition.facts:
                kind = condition.types[name]
                if types.setdefault(name, kind) is not kind:
                    raise ValueError(
                        f"fact {name!r} is {types[name]} in one condition and {kind} in "
                        f"{rule_id!r}: compile every condition against the same catalog"
                    )
        rules = {f"r{i}": tuple(ids) for i, ids in enumerate(by_tree.values())}
        trees = {name: conditions[ids[0]].tree for name, ids in rules.items()}
        return cls(
            conditions=dict(conditions),
            always=frozenset(always),
            rules=rules,
            trees=trees,
            used=tuple(sorted(types)),
            types=types,
        )

    def problems(self) -> list[str]:
        """Why durable_rules could not take these rules (empty when it can), each naming
        the rule or the facts at fault. ``partitions`` raises the first of them."""
        found: list[str] = []
        if len(self.used) > _MAX_FACTS:
            found.append(f"the rules use {len(self.used)} facts (at most {_MAX_FACTS})")
        seen: dict[int, str] = {_fnv1a32(name): name for name in _RESERVED_PROPERTIES}
        for name in self.used:
            other = seen.setdefault(_fnv1a32(durable_key(name)), name)
            if other != name:
                found.append(f"facts {other!r} and {name!r} have the same hash in durable_rules")
        for name, tree in self.trees.items():
            problem = _alone(tree)
            if problem is not None:
                found.append(f"{self.rules[name][0]!r}: {problem}")
        return found

    def partitions(self) -> list[tuple[str, ...]]:
        """The durable rule names split into rulesets that each stay within durable_rules'
        limits (one ruleset, unless there are many rules); raises ``RuleEngineError``
        when some rule cannot be taken at all."""
        found = self.problems()
        if found:
            raise RuleEngineError("take the ruleset", None, "; ".join(found))
        groups: list[tuple[str, ...]] = []
        current: list[str] = []
        network = _Network()
        for name, tree in self.trees.items():
            network.add(tree)
            if network.problem() is not None:  # it fits alone (checked above): start anew
                groups.append(tuple(current))
                current, network = [], _Network()
                network.add(tree)
            current.append(name)
        if current:
            groups.append(tuple(current))
        return groups

    def ruleset(self, names: Iterable[str] | None = None) -> dict[str, object]:
        """The durable_rules ruleset ``{"r0": {"all": [{"m": ...}]}, ...}`` of ``names``
        (of every rule by default)."""
        return {
            name: {"all": [{"m": to_durable(self.conditions[self.rules[name][0]])}]}
            for name in (self.rules if names is None else names)
        }


def network_problem(condition: Condition) -> str | None:
    """Why durable_rules could not take ``condition`` even as its only rule (the limits of
    its network, see ``_Network``), or None. The loader reports it where the condition is
    written; otherwise `rules check` passes it and every tick stops at ``partitions``."""
    if condition.constant is not None:
        return None  # constant conditions never reach durable_rules
    return _alone(condition.tree)


def _alone(tree: Node) -> str | None:
    groups = _groups(tree)
    if groups > MAX_GROUPS:
        return f"{groups} and/or groups (at most {MAX_GROUPS})"
    network = _Network()
    network.add(tree)
    return network.problem()


def _canonical(node: Node) -> Node:
    """``node`` with the terms of every group in a fixed order: ``a and b`` is ``b and a``."""
    if isinstance(node, AllOf | AnyOf):
        terms = sorted((_canonical(t) for t in node.terms), key=repr)
        return type(node)(tuple(terms))
    return node


def _groups(node: Node) -> int:
    if isinstance(node, AllOf | AnyOf):
        return 1 + sum(_groups(t) for t in node.terms)
    return 0


# --------------------------------------------------------------------------- evaluators


def create_ruleset(name: str, ruleset: Mapping[str, object] | str) -> int:
    """``durable_rules_engine.create_ruleset``, its bare error codes translated into
    ``RuleEngineError``. Returns the ruleset's handle."""
    text = ruleset if isinstance(ruleset, str) else json.dumps(ruleset)
    try:
        return int(durable_rules_engine.create_ruleset(name, text))
    except durable_rules_engine.error as exc:
        raise _engine_error(f"create the ruleset {name!r}", exc) from exc


_NUMBERS = frozenset({FactType.INT, FactType.MONEY, FactType.DATE})


class _ForeignAction(Exception):
    """durable_rules handed back an action for a fact other than the one just asserted."""


_ruleset_serial = itertools.count(1)


class DurableEvaluator:
    """Evaluates through durable_rules: one ruleset for the evaluator's lifetime (or a few,
    when there are more rules than one network takes), one fixed session, one fact per
    customer: asserted, its actions drained, retracted.

    Not thread-safe (nor is durable_rules); use one per process, and ``close`` it (or use
    it as a context manager) to free the rulesets' C memory.
    """

    engine = "durable"

    def __init__(self, conditions: Mapping[str, Condition]) -> None:
        if durable_rules_engine is None:
            raise RuleEngineError("start durable_rules", None, str(durable_unavailable()))
        self.bundle = RuleBundle.build(conditions)
        self.partitions = self.bundle.partitions()
        self._always = self.bundle.always
        self._names = {
            name: frozenset(ids) | self._always for name, ids in self.bundle.rules.items()
        }
        self._plan = tuple(
            (name, encode_basestring_ascii(durable_key(name)) + ":", self.bundle.types[name])
            for name in self.bundle.used
        )
        self._ids = itertools.count(1)
        self._texts = [json.dumps(self.bundle.ruleset(names)) for names in self.partitions]
        self._handles: list[int] = []
        self._closed = False
        self._open()

    def _open(self) -> None:
        for text in self._texts:
            name = f"lifecycle_{os.getpid()}_{next(_ruleset_serial)}"
            self._handles.append(create_ruleset(name, text))

    def close(self) -> None:
        self._closed = True
        handles, self._handles = self._handles, []
        failure = None
        for handle in handles:
            try:
                durable_rules_engine.delete_ruleset(handle)
            except durable_rules_engine.error as exc:
                failure = failure or _engine_error("delete the ruleset", exc)
        if failure is not None:
            raise failure

    def __enter__(self) -> DurableEvaluator:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # nothing to do about it at collection time
            self.close()

    def encode(self, facts: Mapping[str, object]) -> str:
        """The properties of the durable fact for ``facts``, as JSON members (no braces).
        Raises ``FactValueError`` for a value that cannot be compared safely."""
        parts = []
        get = facts.get
        for name, key, kind in self._plan:
            value = get(name)
            if value is None:
                continue
            cls = type(value)
            if cls is int and kind in _NUMBERS and -MAX_INT <= value <= MAX_INT:  # type: ignore[operator]
                parts.append(f"{key}{value}")
            elif cls is bool and kind is FactType.BOOL:
                parts.append(key + ("1" if value else "0"))
            elif cls is str and kind is FactType.STRING and len(value) <= 5000:  # type: ignore[arg-type]
                parts.append(key + encode_basestring_ascii(value))  # type: ignore[arg-type]
            else:  # the slow path: converts a date, or raises FactValueError
                typed = canonical_value(name, value, kind)
                if typed is not None:
                    shown = encode_basestring_ascii(typed) if isinstance(typed, str) else int(typed)
                    parts.append(f"{key}{shown}")
        return ",".join(parts)

    def evaluate(self, facts: Mapping[str, object], key: str = "") -> frozenset[str]:
        """The ids of the rules that hold for ``facts`` (``key`` names them in errors)."""
        if self._closed:
            raise ValueError("this DurableEvaluator is closed")
        members = self.encode(facts)
        if not members:  # every durable test needs a property: only constants can hold
            return self._always
        text = f'{{"sid":"0","id":"{next(self._ids)}",{members}}}'
        names = self._names
        fired: set[str] = set()
        try:
            for handle in self._handles:
                self._run(handle, text, fired)
        except durable_rules_engine.error as exc:
            self._recover(text)
            raise _engine_error(f"evaluate customer {key!r}", exc) from exc
        except _ForeignAction as foreign:
            self._recover(text)
            raise RuleEngineError(
                f"evaluate customer {key!r}",
                None,
                f"it handed back an action that is not for this customer ({foreign}); "
                "the ruleset was rebuilt",
            ) from None
        except BaseException:  # e.g. KeyboardInterrupt between the assert and the retract
            self._recover(text)
            raise
        if not fired:
            return self._always
        if len(fired) == 1:
            return names[fired.pop()]
        result = set(self._always)
        for name in fired:
            result |= names[name]
        return frozenset(result)

    def _run(self, handle: int, text: str, fired: set[str]) -> None:
        """Assert the fact ``text``, add the rules that fire to ``fired``, retract it."""
        code, state = durable_rules_engine.assert_fact(handle, text)
        if code == _ERR_EVENT_OBSERVED:  # the id was seen before: nothing was evaluated
            raise durable_rules_engine.error(f"fact id reused, error code: {code}")
        action = durable_rules_engine.start_action_for_state(handle, state)
        message = action[1] if action else None
        while message:
            # '{"<rule name>":{"m":<our fact, verbatim>}}': our rule names need no
            # escaping, so the name lies between the first two quotes
            end = message.index('"', 2)
            if not message.startswith(text, end + 7) or message[2:end] not in self._names:
                raise _ForeignAction(message[:200])
            fired.add(message[2:end])
            message = durable_rules_engine.complete_and_start_action(handle, state)
        durable_rules_engine.retract_fact(handle, text)

    def _recover(self, text: str) -> None:
        """After an engine error, start again from fresh rulesets: the old ones may hold
        the fact, or pending actions that would leak into the next customer."""
        for handle in self._handles:
            with contextlib.suppress(durable_rules_engine.error):
                durable_rules_engine.retract_fact(handle, text)
        with contextlib.suppress(RuleEngineError):
            self.close()
        self._closed = False
        self._open()

    def evaluate_many(self, rows: Iterable[Row]) -> list[Result]:
        evaluate = self.evaluate
        return [(key, evaluate(facts, key)) for key, facts in rows]


class ReferenceEvaluator:
    """Evaluates in plain Python (``engine.language.conditions``): the oracle for the durable path,
    with the same answers and the same refusals of unsafe values."""

    engine = "reference"

    def __init__(self, conditions: Mapping[str, Condition]) -> None:
        self.bundle = RuleBundle.build(conditions)
        self._always = self.bundle.always
        self._predicates = tuple(
            (compile_predicate(self.bundle.conditions[ids[0]]), frozenset(ids))
            for ids in self.bundle.rules.values()
        )
        self._plan = tuple((name, self.bundle.types[name]) for name in self.bundle.used)

    def close(self) -> None:
        """Nothing to free; here so both evaluators can be used alike."""

    def __enter__(self) -> ReferenceEvaluator:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def evaluate(self, facts: Mapping[str, object], key: str = "") -> frozenset[str]:
        values = {}
        for name, kind in self._plan:
            value = canonical_value(name, facts.get(name), kind)
            if value is not None:
                values[name] = value
        fired = set(self._always)
        for predicate, ids in self._predicates:
            if predicate(values):
                fired |= ids
        return frozenset(fired)

    def evaluate_many(self, rows: Iterable[Row]) -> list[Result]:
        evaluate = self.evaluate
        return [(key, evaluate(facts, key)) for key, facts in rows]


Evaluator = DurableEvaluator | ReferenceEvaluator


def make_evaluator(conditions: Mapping[str, Condition], engine: str = "durable") -> Evaluator:
    """The evaluator named ``engine``; "durable" is the reference evaluator where
    durable_rules is not installed (``durable_unavailable`` says why; the evaluator's
    ``engine`` says which one it is)."""
    if engine == "durable":
        if not DURABLE_AVAILABLE:
            return ReferenceEvaluator(conditions)
        return DurableEvaluator(conditions)
    if engine == "reference":
        return ReferenceEvaluator(conditions)
    raise ValueError(f"unknown engine {engine!r}: expected one of {', '.join(ENGINES)}")
