"""Evaluation shards: a slice of the customers, read, evaluated and planned where it runs.

A shard is an id range (or a list of ids, for incremental ticks). ``run_shard`` reads
the shard's facts and pending events, evaluates them and moves their journeys on (or,
``write=False``, only counts what they match): the same function in this process, in
the inline runner's worker processes, and in a distributed worker. Each worker process
builds its database engine and its evaluator once (``ShardStart``) and reads its own
shards, so nothing but shard boundaries and counts crosses between processes.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import Engine, select
from sqlmodel import col

from engine.data.db import engine_url, make_engine
from engine.data.facts import pending_events, subjects_for, subjects_in_range
from engine.data.models import Customer
from engine.data.uow import reading
from engine.evaluation.evaluators import Evaluator, make_evaluator
from engine.evaluation.model import Evaluation, Subject, Summary
from engine.evaluation.workers import run_in_workers
from engine.journeys.plan import JourneyReport
from engine.journeys.run import advance_journeys
from engine.playbooks.model import RuleSet


@dataclass(frozen=True)
class Shard:
    """Customers with ids in (``after``, ``upto``], or exactly ``ids``."""

    after: str | None = None
    upto: str | None = None
    ids: tuple[str, ...] | None = None

    def describe(self) -> tuple[str, int]:
        """(its first id, how many ids) when known; for crash reports."""
        if self.ids is not None:
            return (self.ids[0] if self.ids else "", len(self.ids))
        return (f"after {self.after!r} up to {self.upto!r}", 0)


@dataclass
class ShardResult:
    """What a shard did: journeys moved (writing), or what it matched (not writing)."""

    customers: int = 0
    journeys: JourneyReport = field(default_factory=JourneyReport)
    summary: Summary = field(default_factory=Summary)
    evaluations: list[Evaluation] = field(default_factory=list)  # when asked to keep them

    def merge(self, other: ShardResult) -> None:
        self.customers += other.customers
        self.journeys.merge(other.journeys)
        self.summary.merge(other.summary)
        self.evaluations.extend(other.evaluations)


def shards_of_everyone(db: Engine, size: int) -> Iterator[Shard]:
    """Every customer, in shards of ``size`` ids by keyset over the primary key."""
    last: str | None = None
    while True:
        statement = select(col(Customer.id)).order_by(col(Customer.id)).limit(size).offset(size - 1)
        if last is not None:
            statement = statement.where(col(Customer.id) > last)
        with reading(db) as session:
            upto = session.scalar(statement)
        if upto is None:
            yield Shard(after=last, upto=None)  # the rest, fewer than ``size``
            return
        yield Shard(after=last, upto=upto)
        last = upto


def shards_of(ids: Sequence[str], size: int) -> list[Shard]:
    return [Shard(ids=tuple(ids[i : i + size])) for i in range(0, len(ids), size)]


def run_shard(
    db: Engine,
    rules: RuleSet,
    evaluator: Evaluator,
    shard: Shard,
    now: datetime,
    *,
    write: bool,
    keep: bool = False,
) -> ShardResult:
    """Read, evaluate and (``write``) move the journeys of one shard."""
    with reading(db) as session:
        if shard.ids is not None:
            events = pending_events(session, list(shard.ids))
            subjects = subjects_for(
                session, list(shard.ids), rules.catalog, now, events, stages=rules.stages
            )
        else:
            subjects = subjects_in_range(
                session,
                rules.catalog,
                now,
                after=shard.after,
                upto=shard.upto,
                stages=rules.stages,
            )
    evaluations = _evaluate(evaluator, subjects)
    result = ShardResult(customers=sum(1 for s in subjects if s.event_id is None))
    if write:
        span = None if shard.ids is not None else (shard.after, shard.upto)
        result.journeys = advance_journeys(db, rules, evaluations, now, span)
    else:
        for evaluation in evaluations:
            result.summary.add(rules, evaluation)
    if keep:
        result.evaluations = evaluations
    return result


def _evaluate(evaluator: Evaluator, subjects: Sequence[Subject]) -> list[Evaluation]:
    fired = evaluator.evaluate_many([(s.key, s.facts) for s in subjects])
    return [Evaluation(s, f) for s, (_, f) in zip(subjects, fired, strict=True)]


def run_shards(
    db: Engine,
    rules: RuleSet,
    shards: Sequence[Shard] | Iterator[Shard],
    now: datetime,
    *,
    write: bool,
    workers: int,
    engine: str = "durable",
) -> ShardResult:
    """Every shard, in this process (``workers=0``) or in worker processes."""
    total = ShardResult()
    if workers <= 0:
        with make_evaluator(rules.conditions(), engine) as evaluator:
            for shard in shards:
                total.merge(run_shard(db, rules, evaluator, shard, now, write=write))
        return total
    make_evaluator(rules.conditions(), engine).close()  # a ruleset durable refuses fails here
    start = ShardStart(engine_url(db), rules, engine, write)
    items = ((shard, now) for shard in shards)
    for result in run_in_workers(
        start, items, workers=workers, describe=lambda item: item[0].describe()
    ):
        total.merge(result)
    return total


@dataclass(frozen=True)
class ShardStart:
    """What a worker process needs to run shards: built once per process."""

    database_url: str
    rules: RuleSet
    engine: str
    write: bool

    def __call__(self) -> Any:
        db = make_engine(self.database_url)
        evaluator = make_evaluator(self.rules.conditions(), self.engine)
        rules, write = self.rules, self.write

        def run(item: tuple[Shard, datetime]) -> ShardResult:
            shard, now = item
            return run_shard(db, rules, evaluator, shard, now, write=write)

        return run
