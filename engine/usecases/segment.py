"""Recording a batch of translated Segment calls (engine.data.segment) in one transaction.

Each call has its own outcome: a refused or ignored call changes nothing, and the others
are stored (a batch is never all-or-nothing: Segment's clients do not retry a 200, and a
4xx for one bad call would drop the good ones with it). Calls apply in the order sent, so
an identify followed by a track for the same new user works in one batch.

Cost: one query reads (and locks) every customer the batch names; identifies then change
those objects, and each run of consecutive tracks goes through ``record_events`` (four
statements whatever its length). Two deliveries of one batch racing on an event id make
the loser's commit fail; it is recorded once more from the start, and then sees the
winner's events as duplicates (or conflicts).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from sqlalchemy import Engine, select
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col

from engine.data.erasure import ErasedAddresses
from engine.data.ingest import Recorded, apply_customer, first_sighting, record_events
from engine.data.models import Customer
from engine.data.segment import Call, Identify, Ignored, Loc, Problem, Track
from engine.data.uow import unit_of_work
from engine.errors import CustomerErased, EventConflict

Status = Literal[
    "created", "updated", "unchanged", "accepted", "duplicate", "ignored", "rejected", "conflict"
]


@dataclass(frozen=True)
class Outcome:
    """What became of one call."""

    status: Status
    problems: tuple[Problem, ...] = ()
    warnings: tuple[str, ...] = ()


# Where an event's payload field came from in a track call (for conflicts).
_TRACK_FIELDS: dict[str, Loc] = {
    "customer_id": ("userId",),
    "type": ("event",),
    "occurred_at": ("timestamp",),
}


def record_calls(
    db: Engine,
    calls: Sequence[Call],
    now: datetime,
    *,
    create_unknown: bool = False,
    erased: ErasedAddresses | None = None,
) -> list[Outcome]:
    """Store the identifies and tracks of ``calls``; one outcome per call, in order.
    ``create_unknown`` (LIFECYCLE_CREATE_UNKNOWN_CUSTOMERS) lets a track create its user;
    ``erased`` suppresses again an erased person's address that an identify brings back."""
    for attempt in (1, 2):
        try:
            with unit_of_work(db) as session:
                outcomes = _Batch(session, now, create_unknown).record(calls)
                if erased is not None:
                    contacts = [
                        (c.customer.email, c.customer.phone)
                        for c, outcome in zip(calls, outcomes, strict=True)
                        if isinstance(c, Identify) and outcome.status != "rejected"
                    ]
                    erased.restore(session, contacts, now)
                return outcomes
        except IntegrityError:
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


class _Batch:
    def __init__(self, session: Session, now: datetime, create_unknown: bool) -> None:
        self.session = session
        self.now = now
        self.create_unknown = create_unknown
        self.known: dict[str, Customer] = {}

    def record(self, calls: Sequence[Call]) -> list[Outcome]:
        self._load(calls)
        outcomes: list[Outcome] = []
        run: list[Track] = []
        for call in calls:
            if isinstance(call, Track):
                run.append(call)
                continue
            outcomes.extend(self._tracks(run))
            run = []
            if isinstance(call, Identify):
                outcomes.append(self._identify(call))
            elif isinstance(call, Ignored):
                outcomes.append(Outcome("ignored", warnings=(call.reason,)))
            else:
                outcomes.append(Outcome("rejected", problems=call.problems))
        outcomes.extend(self._tracks(run))
        return outcomes

    def _load(self, calls: Sequence[Call]) -> None:
        ids = {c.customer.id for c in calls if isinstance(c, Identify)}
        ids |= {c.event.customer_id for c in calls if isinstance(c, Track)}
        if not ids:
            return
        statement = select(Customer).where(col(Customer.id).in_(sorted(ids))).with_for_update()
        self.known = {customer.id: customer for customer in self.session.scalars(statement)}

    def _identify(self, call: Identify) -> Outcome:
        existing = self.known.get(call.customer.id)
        if existing is not None and existing.erased_at is not None:
            refusal = Problem(("userId",), str(CustomerErased(existing.id)), "erased")
            return Outcome("rejected", problems=(refusal,))
        customer, changed = apply_customer(existing, call.customer, self.now)
        if existing is None:
            self.session.add(customer)
            self.known[customer.id] = customer
            return Outcome("created", warnings=call.warnings)
        return Outcome("updated" if changed else "unchanged", warnings=call.warnings)

    def _tracks(self, run: list[Track]) -> list[Outcome]:
        if not run:
            return []
        if self.create_unknown:
            for call in run:
                event = call.event
                if event.customer_id not in self.known:
                    customer = first_sighting(event.customer_id, event.occurred_at, self.now)
                    self.session.add(customer)
                    self.known[customer.id] = customer
        self.session.flush()  # the identifies before, for record_events' own queries
        results = record_events(self.session, [call.event for call in run], self.now)
        return [_track_outcome(call, result) for call, result in zip(run, results, strict=True)]


def _track_outcome(call: Track, result: Recorded | EventConflict) -> Outcome:
    if isinstance(result, EventConflict):
        problems = tuple(
            Problem(_TRACK_FIELDS.get(field) or tuple(field.split(".", 1)), str(result), "conflict")
            for field in result.differences
        )
        return Outcome("conflict", problems=problems, warnings=call.warnings)
    if result is Recorded.STORED:
        return Outcome("accepted", warnings=call.warnings)
    if result is Recorded.DUPLICATE:
        return Outcome("duplicate", warnings=call.warnings)
    if result is Recorded.ERASED_CUSTOMER:
        refusal = Problem(("userId",), str(CustomerErased(call.event.customer_id)), "erased")
        return Outcome("rejected", problems=(refusal,))
    customer_id = call.event.customer_id
    missing = Problem(
        ("userId",),
        f"no customer with id {customer_id!r}: identify them first, or set "
        "LIFECYCLE_CREATE_UNKNOWN_CUSTOMERS=true",
        "not_found",
    )
    return Outcome("rejected", problems=(missing,))
