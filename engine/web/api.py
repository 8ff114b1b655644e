"""The ingest API: customers and events in, as JSON, behind an API key.

Each request is one transaction: a refused request writes nothing. A refusal is a 422
whose ``detail`` lists every problem as ``{"loc": [...], "msg": ..., "type": ...}``, the
shape FastAPI uses for its own validation errors, whether pydantic or the fact catalog
found it. Events are idempotent by id, also when two deliveries of one event race: the
same id sent again with an identical payload is a duplicate (200), with a different one a
conflict (409 naming the id and each field that differs), and nothing changes.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from datetime import datetime
from typing import Annotated, Any, Literal, TypeVar

from fastapi import APIRouter, Body, Depends, Request, Response
from fastapi.exceptions import HTTPException, RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ValidationError
from sqlalchemy import Engine
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session

from engine.data.ingest import (
    CustomerIn,
    EventIn,
    check_attributes,
    check_event_properties,
    check_same_event,
    ingest_context,
    record_event,
    upsert_customer,
)
from engine.data.models import Customer, Event
from engine.data.topics import check_topics
from engine.data.uow import reading, unit_of_work
from engine.errors import CustomerErased, EventConflict, NotFound
from engine.usecases.gdpr import erase_customer, export_customer
from engine.web import web_state
from engine.web.auth import api_key_problem

Validated = TypeVar("Validated", bound=BaseModel)


def key_problem(request: Request) -> tuple[int, str] | None:
    """(status, reason) when the request may not use the API, None when its key is right."""
    configured = web_state(request).app.settings.api_key
    secret = configured.get_secret_value() if configured is not None else None
    return api_key_problem(secret, request.headers.get("authorization"))


def _refusal(problem: tuple[int, str]) -> JSONResponse:
    status, reason = problem
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else {}
    return JSONResponse({"detail": reason}, status_code=status, headers=headers)


class ApiKeyRoute(APIRoute):
    """Checks the API key before FastAPI reads or validates the body, so a caller without
    the key learns nothing about the schema (not even that its JSON is malformed)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def checked(request: Request) -> Response:
            problem = key_problem(request)
            if problem is not None:
                return _refusal(problem)
            return await handler(request)

        return checked


_bearer = HTTPBearer(auto_error=False, description="Authorization: Bearer <LIFECYCLE_API_KEY>")


def require_api_key(
    request: Request, _: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> None:
    """Also a dependency, so OpenAPI documents the scheme (and a second line of defence)."""
    problem = key_problem(request)
    if problem is not None:
        raise HTTPException(problem[0], problem[1])


router = APIRouter(
    prefix="/v1",
    tags=["ingest"],
    route_class=ApiKeyRoute,
    dependencies=[Depends(require_api_key)],
    responses={
        400: {"description": "The body is not JSON (or nests too deeply to parse)"},
        401: {"description": "Missing or wrong API key"},
        413: {"description": "The body is larger than LIFECYCLE_MAX_BODY_BYTES"},
        503: {"description": "LIFECYCLE_API_KEY is not set: the API is disabled"},
    },
)


class CustomerResult(BaseModel):
    id: str
    status: Literal["created", "updated", "unchanged"]


class EventResult(BaseModel):
    id: str
    status: Literal["accepted", "duplicate"]


SCHEMA_REF = "#/components/schemas/{model}"
# The bodies that routes validate themselves (see body_schema), added to the schema's
# components by add_body_schemas.
SELF_VALIDATED: list[type[BaseModel]] = []


def body_schema(model: type[BaseModel]) -> dict[str, Any]:
    """The OpenAPI request body of a route that validates its JSON itself (with a context
    FastAPI cannot hand in, such as the default phone region)."""
    SELF_VALIDATED.append(model)
    reference = {"schema": {"$ref": SCHEMA_REF.format(model=model.__name__)}}
    return {"requestBody": {"required": True, "content": {"application/json": reference}}}


def add_body_schemas(schema: dict[str, Any]) -> dict[str, Any]:
    """The OpenAPI schema with the self-validated bodies among its components."""
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for model in SELF_VALIDATED:
        own = model.model_json_schema(ref_template=SCHEMA_REF)
        components.update(own.pop("$defs", {}))
        components.setdefault(model.__name__, own)
    return schema


def validated(
    model: type[Validated],
    payload: Any,
    context: dict[str, Any],
    loc: tuple[str | int, ...] = ("body",),
) -> Validated:
    """``payload`` as ``model``, or a 422 in FastAPI's own shape (each problem at ``loc``)."""
    try:
        # from_attributes as FastAPI validates bodies: the same messages as its own 422s
        return model.model_validate(payload, context=context, from_attributes=True)
    except ValidationError as exc:
        errors = [{**e, "loc": (*loc, *e["loc"])} for e in exc.errors(include_url=False)]
        raise RequestValidationError(errors) from None


def catalog_errors(problems: list[str], kind: str = "catalog") -> list[dict[str, Any]]:
    """``"attributes.plan: expected string, got 5"`` → FastAPI's error shape."""
    errors = []
    for problem in problems:
        where, _, message = problem.partition(": ")
        errors.append({"loc": ["body", *where.split(".")], "msg": message, "type": kind})
    return errors


@router.post(
    "/customers",
    response_model=CustomerResult,
    status_code=201,
    summary="Create or update a customer",
    openapi_extra=body_schema(CustomerIn),
    responses={200: {"description": "An existing customer was updated (or was already so)"}},
)
def post_customer(
    payload: Annotated[Any, Body()], request: Request, response: Response
) -> CustomerResult:
    """Fields left out are left alone; ``attributes`` are merged key by key and must be
    declared in ``rules/catalog.yaml`` with their type; ``topics`` are the customer's
    choices of subscription topics (``{"offers": false}``), each declared there too.
    ``email`` is normalised (lower case), ``phone`` stored as E.164 (a national number is
    read in ``LIFECYCLE_DEFAULT_PHONE_REGION``)."""
    app = web_state(request).app
    data = validated(CustomerIn, payload, ingest_context(app.phone_region))
    problems = check_attributes(data.attributes, app.rules.catalog, app.input_limits)
    problems += check_topics(data.topics, app.rules.catalog)
    if problems:
        raise RequestValidationError(catalog_errors(problems))
    now = app.clock()
    for attempt in (1, 2):
        with Session(app.db, expire_on_commit=False) as session:
            existed = session.get(Customer, data.id) is not None
            try:
                stored, changed = upsert_customer(session, data, now)
            except CustomerErased as exc:
                raise RequestValidationError(_erased(exc, "id")) from None
            app.erased_addresses.restore(session, [(stored.email, stored.phone)], now)
            try:
                session.commit()
            except IntegrityError:
                # Two first sightings of one customer raced; the second becomes an update.
                session.rollback()
                if attempt == 2:
                    raise
                continue
        break
    if existed:
        response.status_code = 200
        return CustomerResult(id=data.id, status="updated" if changed else "unchanged")
    return CustomerResult(id=data.id, status="created")


@router.post(
    "/events",
    response_model=EventResult,
    status_code=201,
    summary="Record an event (idempotent by id)",
    responses={
        200: {"description": "This event was recorded before, identical; nothing changed"},
        409: {
            "description": "This id was recorded before with a different payload; nothing changed"
        },
    },
)
def post_event(data: EventIn, request: Request, response: Response) -> Any:
    """The customer must exist (unless ``LIFECYCLE_CREATE_UNKNOWN_CUSTOMERS`` creates
    them); the event type and its properties must be declared in ``rules/catalog.yaml``.
    Sending the same event again changes nothing and answers 200; sending its id with a
    different payload changes nothing and answers 409."""
    app = web_state(request).app
    problems = check_event_properties(data, app.rules.catalog, app.input_limits)
    if problems:
        raise RequestValidationError(catalog_errors(problems))
    now = app.clock()
    try:
        stored = _record(app.db, data, now, app.settings.create_unknown_customers)
    except EventConflict as exc:
        return conflict_response(exc)
    if stored is None:
        response.status_code = 200
        return EventResult(id=data.id, status="duplicate")
    return EventResult(id=data.id, status="accepted")


def _erased(exc: CustomerErased, field: str) -> list[dict[str, Any]]:
    return [{"loc": ["body", field], "msg": str(exc), "type": "erased"}]


def conflict_response(exc: EventConflict) -> JSONResponse:
    """409 in the shape of the API's other refusals: one entry per field that differs."""
    return JSONResponse(
        {
            "detail": [
                {"loc": ["body", *field.split(".", 1)], "msg": str(exc), "type": "conflict"}
                for field in exc.differences
            ]
        },
        status_code=409,
    )


def _record(db: Engine, data: EventIn, now: datetime, create_unknown: bool) -> Event | None:
    """The stored event, or None for a duplicate; raises EventConflict."""
    with Session(db, expire_on_commit=False) as session:
        try:
            stored = record_event(session, data, now, create_unknown=create_unknown)
        except CustomerErased as exc:
            raise RequestValidationError(_erased(exc, "customer_id")) from None
        except LookupError:
            raise RequestValidationError(
                [
                    {
                        "loc": ["body", "customer_id"],
                        "msg": f"no customer with id {data.customer_id!r} (create them "
                        "first, or set LIFECYCLE_CREATE_UNKNOWN_CUSTOMERS=true)",
                        "type": "not_found",
                    }
                ]
            ) from None
        if stored is not None:
            try:
                session.commit()
            except IntegrityError:
                # A concurrent delivery of the same id won the insert: ours is a duplicate
                # of it, or a conflict with it.
                session.rollback()
                winner = session.get(Event, data.id)
                if winner is None:
                    raise
                check_same_event(winner, data)
                stored = None
    return stored


# ── GDPR: a person's data out, or erased ────────────────────────────────────────────


class ErasureResult(BaseModel):
    customer_id: str
    erased_at: datetime
    audit_id: int
    counts: dict[str, int]


def _not_found(customer_id: str) -> HTTPException:
    return HTTPException(404, f"no customer with id {customer_id!r}")


@router.get(
    "/customers/{customer_id:path}/export",
    summary="Everything held about a customer (GDPR access)",
    responses={404: {"description": "No customer with this id"}},
)
def export_customer_data(customer_id: str, request: Request) -> dict[str, Any]:
    """The customer, events, journeys, messages, decisions, cases and the suppressions of
    their addresses, as JSON (the same as ``lifecycle customers export``). An id holding
    ``/`` is sent as it is or encoded (``%2F``)."""
    app = web_state(request).app
    with reading(app.db) as session:
        try:
            return export_customer(session, customer_id, app.clock())
        except NotFound:
            raise _not_found(customer_id) from None


@router.post(
    "/customers/{customer_id:path}/erase",
    summary="Erase a customer's personal data (GDPR erasure)",
    response_model=ErasureResult,
    responses={404: {"description": "No customer with this id"}},
)
def erase_customer_data(customer_id: str, request: Request) -> ErasureResult:
    """Removes or anonymises the personal data, keeps counts and the suppression of the
    addresses (as keyed digests), and records an audit row (the same as ``lifecycle
    customers erase``). Afterwards, data sent about the id is refused."""
    app = web_state(request).app
    try:
        with unit_of_work(app.db) as session:
            audit = erase_customer(session, customer_id, "api", app.erased_addresses, app.clock())
    except NotFound:
        raise _not_found(customer_id) from None
    assert audit.id is not None
    return ErasureResult(
        customer_id=customer_id, erased_at=audit.erased_at, audit_id=audit.id, counts=audit.counts
    )
