"""Evaluation runs: facts from the database in batches, through the rules, to matches.

The parent process reads the database (three queries a batch, engine.data.facts) and hands
plain fact dicts to evaluation workers (engine.evaluation.evaluators), which return the ids of the
rules that hold. ``workers=0`` evaluates in this process, which suits a single customer.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Engine

from engine.data.facts import iter_customer_id_batches, pending_events, subjects_for
from engine.data.uow import reading
from engine.evaluation.evaluators import make_evaluator
from engine.evaluation.model import Evaluation, Subject
from engine.evaluation.workers import evaluate_in_workers
from engine.playbooks.model import RuleSet


def evaluate_batches(
    rules: RuleSet,
    batches: Iterable[list[Subject]],
    *,
    workers: int,
    engine: str = "durable",
) -> Iterator[list[Evaluation]]:
    """Evaluate batches of subjects, in order; ``workers=0`` runs in this process."""
    if workers <= 0:
        evaluator = make_evaluator(rules.conditions(), engine)
        for batch in batches:
            fired = evaluator.evaluate_many([(s.key, s.facts) for s in batch])
            yield [Evaluation(s, f) for s, (_, f) in zip(batch, fired, strict=True)]
        return
    pending: list[list[Subject]] = []

    def keyed() -> Iterator[list[tuple[str, dict[str, object]]]]:
        for batch in batches:
            pending.append(batch)
            yield [(s.key, s.facts) for s in batch]

    results = evaluate_in_workers(rules.conditions(), keyed(), workers=workers, engine=engine)
    for fired in results:
        batch = pending.pop(0)
        yield [Evaluation(s, f) for s, (_, f) in zip(batch, fired, strict=True)]


def subject_batches(
    db: Engine,
    rules: RuleSet,
    now: datetime,
    *,
    batch_size: int,
    customer_ids: Sequence[str] | None = None,
    include_events: bool = True,
    include_sweep: bool = True,
) -> Iterator[list[Subject]]:
    """Subjects for every customer (or the given ones), a batch at a time, in id order."""
    with reading(db) as session:
        if customer_ids is not None:
            id_batches: Iterable[list[str]] = (
                list(customer_ids[i : i + batch_size])
                for i in range(0, len(customer_ids), batch_size)
            )
        else:
            id_batches = iter_customer_id_batches(session, batch_size)
        for ids in id_batches:
            events = pending_events(session, ids) if include_events else []
            yield subjects_for(
                session, ids, rules.catalog, now, events, include_sweep=include_sweep
            )


@dataclass
class Summary:
    """Counts per playbook over one evaluation run."""

    subjects: int = 0
    customers: int = 0

    def __post_init__(self) -> None:
        self.entered: dict[str, int] = {}
        self.exited: dict[str, int] = {}
        self.steps: dict[str, dict[str, int]] = {}

    def add(self, rules: RuleSet, evaluation: Evaluation) -> None:
        self.subjects += 1
        if evaluation.subject.event_id is None:
            self.customers += 1
        for playbook in rules.playbooks:
            match = evaluation.match(rules, playbook)
            if match.entered:
                self.entered[playbook] = self.entered.get(playbook, 0) + 1
                per_step = self.steps.setdefault(playbook, {})
                for step in match.steps:
                    per_step[step] = per_step.get(step, 0) + 1
            if match.exited:
                self.exited[playbook] = self.exited.get(playbook, 0) + 1
