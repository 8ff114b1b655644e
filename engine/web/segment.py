"""The Segment-compatible API: ``POST /v1/identify``, ``/v1/track`` and ``/v1/batch``.

Shaped like Segment's HTTP Tracking API, so a Segment or RudderStack SDK (or destination)
pointed at Lifecycle sends to it unchanged: the write key is LIFECYCLE_API_KEY, sent as
HTTP Basic (the key as user name) or as a bearer token; bodies may be gzip-compressed
(``Content-Encoding: gzip``, as SDKs send them when asked), and are capped at
LIFECYCLE_MAX_BODY_BYTES before and after decompression.

What each call means is engine.data.segment's; storing is engine.usecases.segment's. Each
call gets its own result (``status``, ``errors``, ``warnings``): ``/v1/batch`` answers 200
with one result per call in order, ``/v1/identify`` and ``/v1/track`` answer their one
result with the status code of the native API (201 stored, 200 unchanged, duplicate or
ignored, 409 conflict, 422 refused).
"""

from __future__ import annotations

import json
import zlib
from datetime import datetime
from typing import Any, Literal

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from engine.bootstrap import App
from engine.data.ingest import ingest_context
from engine.data.segment import Call, Problem, Translator
from engine.usecases.segment import Outcome, Status, record_calls
from engine.web import web_state
from engine.web.api import ApiKeyRoute, body_schema, require_api_key

router = APIRouter(
    prefix="/v1",
    tags=["segment"],
    route_class=ApiKeyRoute,
    dependencies=[Depends(require_api_key)],
    responses={
        400: {"description": "The body is not JSON, or not gzip as it says"},
        401: {"description": "Missing or wrong API key (the Segment write key)"},
        413: {"description": "The body (or its decompressed form) is too large"},
    },
)

STATUS_CODES: dict[Status, int] = {
    "created": 201,
    "accepted": 201,
    "updated": 200,
    "unchanged": 200,
    "duplicate": 200,
    "ignored": 200,
    "conflict": 409,
    "rejected": 422,
}


class _Call(BaseModel):
    """The fields of Segment's spec that Lifecycle reads (others are accepted and unused)."""

    model_config = ConfigDict(extra="allow")

    userId: str | None = Field(default=None, description="the customer id")
    anonymousId: str | None = Field(default=None, description="not stored alone")
    messageId: str | None = Field(default=None, description="the event id (idempotency)")
    timestamp: datetime | None = Field(default=None, description="ISO 8601 with an offset")
    context: dict[str, Any] = Field(default_factory=dict, description="timezone, locale used")


class SegmentIdentify(_Call):
    """A Segment identify call."""

    type: Literal["identify"] = "identify"
    traits: dict[str, Any] = Field(default_factory=dict)


class SegmentTrack(_Call):
    """A Segment track call."""

    type: Literal["track"] = "track"
    event: str = Field(description="mapped to an event type (LIFECYCLE_SEGMENT_EVENT_TYPES)")
    properties: dict[str, Any] = Field(default_factory=dict)


class SegmentBatch(BaseModel):
    """A Segment batch: calls of any type; ``context`` applies to every call."""

    model_config = ConfigDict(extra="allow")

    batch: list[dict[str, Any]]
    context: dict[str, Any] = Field(default_factory=dict)


class CallResult(BaseModel):
    index: int
    type: str | None
    messageId: str | None
    userId: str | None
    status: Status
    errors: list[dict[str, Any]] = []
    warnings: list[str] = []


class BatchResult(BaseModel):
    success: bool = Field(description="every call was stored, or ignored on purpose")
    results: list[CallResult]


@router.post(
    "/identify",
    summary="Segment identify: create or update a customer",
    response_model=CallResult,
    status_code=201,
    openapi_extra=body_schema(SegmentIdentify),
)
async def identify(request: Request) -> Response:
    return await _single(request, "identify")


@router.post(
    "/track",
    summary="Segment track: record an event (idempotent by messageId)",
    response_model=CallResult,
    status_code=201,
    openapi_extra=body_schema(SegmentTrack),
)
async def track(request: Request) -> Response:
    return await _single(request, "track")


@router.post(
    "/batch",
    summary="Segment batch: many calls, one result each",
    response_model=BatchResult,
    openapi_extra=body_schema(SegmentBatch),
)
async def batch(request: Request) -> Response:
    app = web_state(request).app
    body = await _json_body(request, app.settings.max_body_bytes)
    if isinstance(body, Response):
        return body
    calls = body.get("batch") if isinstance(body, dict) else None
    if not isinstance(calls, list):
        return _refusal(422, ["body", "batch"], "a batch is a JSON object with a list 'batch'")
    shared = body.get("context")
    if isinstance(shared, dict):
        calls = [_with_context(call, shared) for call in calls]
    results = await run_in_threadpool(_record, app, calls, None, ("body", "batch"))
    success = all(result["status"] not in ("rejected", "conflict") for result in results)
    return JSONResponse({"success": success, "results": results})


async def _single(request: Request, kind: str) -> Response:
    app = web_state(request).app
    body = await _json_body(request, app.settings.max_body_bytes)
    if isinstance(body, Response):
        return body
    [result] = await run_in_threadpool(_record, app, [body], kind, ("body",))
    return JSONResponse(result, status_code=STATUS_CODES[result["status"]])


def _record(
    app: App, calls: list[Any], expected: str | None, loc: tuple[str, ...]
) -> list[dict[str, Any]]:
    settings = app.settings
    translator = Translator(
        catalog=app.rules.catalog,
        event_types=settings.segment_event_types,
        context=ingest_context(app.phone_region),
        limits=app.input_limits,
    )
    now = app.clock()
    translated: list[Call] = [translator.translate(call, now, expected) for call in calls]
    outcomes = record_calls(
        app.db,
        translated,
        now,
        create_unknown=settings.create_unknown_customers,
        erased=app.erased_addresses,
    )
    # A single call's problems are at body.<field>; a batch's at body.batch.<index>.<field>.
    return [
        _result(index, call, outcome, loc if expected else (*loc, index), expected)
        for index, (call, outcome) in enumerate(zip(calls, outcomes, strict=True))
    ]


def _result(
    index: int, call: Any, outcome: Outcome, loc: tuple[str | int, ...], expected: str | None
) -> dict[str, Any]:
    sent = call if isinstance(call, dict) else {}
    return {
        "index": index,
        "type": _text(sent.get("type", expected)),
        "messageId": _text(sent.get("messageId")),
        "userId": _text(sent.get("userId")),
        "status": outcome.status,
        "errors": [_error(problem, loc) for problem in outcome.problems],
        "warnings": list(outcome.warnings),
    }


def _error(problem: Problem, loc: tuple[str | int, ...]) -> dict[str, Any]:
    return {"loc": [*loc, *problem.loc], "msg": problem.msg, "type": problem.type}


def _text(value: Any) -> str | None:
    return str(value) if isinstance(value, str | int) and not isinstance(value, bool) else None


def _with_context(call: Any, shared: dict[str, Any]) -> Any:
    """The batch's context under the call's own (the call's keys win)."""
    if not isinstance(call, dict):
        return call
    own = call.get("context")
    return {**call, "context": {**shared, **own} if isinstance(own, dict) else shared}


async def _json_body(request: Request, limit: int) -> Any:
    """The JSON body, gunzipped if it says so; a refusal Response otherwise."""
    raw = await request.body()
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding == "gzip":
        inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
        try:
            raw = inflater.decompress(raw, limit + 1)
        except zlib.error as exc:
            return _refusal(400, ["body"], f"the body is not gzip as Content-Encoding says: {exc}")
        if len(raw) > limit or inflater.unconsumed_tail:
            return _refusal(413, ["body"], f"the decompressed body is larger than {limit:,} bytes")
    elif encoding != "identity":
        return _refusal(415, ["body"], f"Content-Encoding {encoding!r}: send gzip or nothing")
    try:
        return json.loads(raw, parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:
        why = exc.msg if isinstance(exc, json.JSONDecodeError) else str(exc) or "nested too deeply"
        return _refusal(400, ["body"], f"the body is not JSON: {why}", "json_invalid")


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value")


def _refusal(status: int, loc: list[Any], msg: str, kind: str = "value_error") -> JSONResponse:
    return JSONResponse({"detail": [{"loc": loc, "msg": msg, "type": kind}]}, status_code=status)
