"""`lifecycle messages` and `preview`: the outbox, and what a template renders to."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, TypedDict

import typer
from rich import box
from rich.table import Table

from engine.bootstrap import App
from engine.cli.common import (
    NowOption,
    app,
    err,
    fail,
    load_app,
    moment_of,
    out,
    print_json,
    rules_of,
)
from engine.data.facts import subjects_for
from engine.data.models import Customer
from engine.data.uow import reading, unit_of_work
from engine.errors import LifecycleError
from engine.language.durations import parse_duration
from engine.usecases.messages import (
    SHOWN_ID,
    find_messages,
    parse_retryable,
    parse_status,
    retry,
    retry_matching,
)
from engine.wording import plural


class _MessageRecord(TypedDict):
    """One outbox message as `messages` lists it."""

    id: str
    customer: str | None
    playbook: str | None
    step: str | None
    channel: str
    to: str
    status: str
    due_at: str
    attempted_at: str | None
    sent_at: str | None
    attempts: int
    provider_id: str | None
    last_error: str | None


messages_app = typer.Typer(no_args_is_help=True, help="Inspect and retry outbox messages.")
app.add_typer(messages_app, name="messages")


def _older_than(application: App, older_than: str | None, now: datetime | None) -> datetime | None:
    """The cutoff for ``--older-than 1h`` (durations as the rule files spell them)."""
    if older_than is None:
        return None
    try:
        return moment_of(application, now) - parse_duration(older_than)
    except LifecycleError as exc:
        raise fail(f"--older-than: {exc}") from exc
    except OverflowError:
        raise fail(
            f"--older-than: {older_than} is out of range: it reaches before year 1"
        ) from None


OlderThanOption = Annotated[
    str | None,
    typer.Option(
        "--older-than",
        metavar="DURATION",
        help="Only messages last attempted (else changed) longer ago than this: 90m, 36h, 2d.",
    ),
]


@messages_app.command("list")
def messages_list(
    status: Annotated[
        str | None,
        typer.Option(
            help="queued, sending, sent, delivered, failed, bounced, cancelled, ambiguous"
        ),
    ] = None,
    customer: Annotated[str | None, typer.Option()] = None,
    older_than: OlderThanOption = None,
    limit: Annotated[int, typer.Option()] = 50,
    json_output: Annotated[bool, typer.Option("--json")] = False,
    now: NowOption = None,
) -> None:
    """List outbox messages, newest first (ids shortened; retry takes them)."""
    application = load_app()
    cutoff = _older_than(application, older_than, now)
    with reading(application.db) as session:
        try:
            wanted = parse_status(status) if status else None
        except LifecycleError as exc:
            raise fail(str(exc)) from exc
        rows = find_messages(
            session, status=wanted, customer=customer, older_than=cutoff, limit=limit
        )
    records: list[_MessageRecord] = [
        {
            "id": m.id,
            "customer": m.customer_id,
            "playbook": m.playbook,
            "step": m.step_id,
            "channel": m.channel,
            "to": m.to_address,
            "status": str(m.status),
            "due_at": m.due_at.isoformat(),
            "attempted_at": m.attempted_at.isoformat() if m.attempted_at else None,
            "sent_at": m.sent_at.isoformat() if m.sent_at else None,
            "attempts": m.attempts,
            "provider_id": m.provider_id,
            "last_error": m.last_error,
        }
        for m in rows
    ]
    if json_output:
        print_json(records)
        return
    # Readable at 80 columns: three lines a row, ids and times never cut; notes wrap.
    table = Table(box=box.SIMPLE_HEAD)
    table.add_column("message", no_wrap=True)
    table.add_column("customer\nto\njourney step")
    table.add_column("status", no_wrap=True)
    table.add_column("due (UTC)\nattempted\nsent", no_wrap=True)
    table.add_column("note")
    for r in records:
        table.add_row(
            f"{r['id'][:SHOWN_ID]}\n{r['channel']}",
            f"{r['customer'] or '-'}\n{r['to'] or '-'}\n{r['playbook'] or '-'} · {r['step'] or '-'}",
            f"{r['status']}\n{plural(r['attempts'], 'try', 'tries')}",
            f"{_minute(r['due_at'])}\n{_minute(r['attempted_at']) if r['attempted_at'] else 'not tried'}"
            f"\n{_minute(r['sent_at']) if r['sent_at'] else 'not sent'}",
            r["last_error"] or "",
        )
    out.print(table)


def _minute(iso: str) -> str:
    """``2026-03-02T09:00:00+00:00`` → ``2026-03-02 09:00``."""
    return iso[:16].replace("T", " ")


@messages_app.command("retry")
def messages_retry(
    ids: Annotated[
        list[str] | None,
        typer.Argument(metavar="[ID]...", help="Message ids, or unique prefixes of them."),
    ] = None,
    status: Annotated[
        str | None,
        typer.Option(help="Retry every message with this status: ambiguous or failed."),
    ] = None,
    older_than: OlderThanOption = None,
    now: NowOption = None,
) -> None:
    """Queue ambiguous or failed messages again (you accept they may arrive twice).

    Name them by id (or the 8 characters `messages list` shows), or all of a status:
    `--status ambiguous --older-than 1h`.
    """
    application = load_app()
    if bool(ids) == bool(status):
        raise fail("give message ids, or --status (with --older-than), not both")
    if older_than is not None and not status:
        raise fail("--older-than goes with --status")
    moment = moment_of(application, now)
    try:
        with unit_of_work(application.db) as session:
            if status:
                cutoff = _older_than(application, older_than or "0m", now) or moment
                outcomes = retry_matching(session, parse_retryable(status), cutoff, moment)
            else:
                outcomes = retry(session, ids or [], moment)
    except LifecycleError as exc:
        raise fail(str(exc)) from exc
    refused = [o for o in outcomes if not o.queued]
    for o in refused:
        err.print(f"[red]refused:[/red] {o.refusal}", markup=True, soft_wrap=True)
    queued = [o.message_id or "" for o in outcomes if o.queued]
    shown = ", ".join(i[:SHOWN_ID] for i in queued[:10]) + (" ..." if len(queued) > 10 else "")
    out.print(
        f"{len(queued)} message(s) queued again{': ' + shown if queued else ''}"
        f"; {len(refused)} refused",
        markup=False,
    )
    if refused:
        raise typer.Exit(1)


@app.command()
def preview(
    template: Annotated[
        str, typer.Argument(help="Template name, e.g. welcome or sms/last_chance.")
    ],
    customer: Annotated[
        str, typer.Option("--customer", help="Render with this customer's real facts.")
    ],
    channel: Annotated[
        str | None, typer.Option(help="email or sms (default: guessed from the template).")
    ] = None,
    now: NowOption = None,
) -> None:
    """Render a template with a customer's real facts, exactly as dispatch would."""
    from engine.delivery.dispatch import DispatchConfig, unsubscribe_token
    from engine.delivery.sms_segments import segments
    from engine.delivery.templates import RenderedEmail
    from engine.errors import TemplateError

    application = load_app()
    rules = rules_of(application)
    moment = moment_of(application, now)
    if "/" in template:
        channel, template = template.split("/", 1)
    if channel is None:
        channel = "email" if template in application.templates.names("email") else "sms"
    with reading(application.db) as session:
        row = session.get(Customer, customer)
        if row is None:
            raise fail(f"no customer with id {customer!r}")
        facts = subjects_for(session, [customer], rules.catalog, moment, stages=rules.stages)[
            0
        ].facts
    config = DispatchConfig(
        public_base_url=application.settings.public_base_url,
        secret_key=application.settings.secret_key.get_secret_value(),
    )
    token = unsubscribe_token(config.secret_key, customer, channel, "preview")
    context = {
        "customer": {
            "id": row.id,
            "first_name": row.first_name,
            "email": row.email,
            "phone": row.phone,
            "locale": row.locale,
            "timezone": row.timezone,
        },
        "facts": facts,
        "event": {},
        "unsubscribe_url": f"{config.public_base_url}/u/{token}",
        "brand": rules.policies.brand,
        "message_id": "preview",
    }
    try:
        rendered = application.templates.render(
            channel, template, context, locale=row.locale, currency=rules.policies.currency
        )
    except TemplateError as exc:
        raise fail(str(exc)) from exc
    variant = f"the {rendered.variant} variant" if rendered.variant else "the default"
    out.print(
        f"Template: {channel}/{template}, {variant} (customer locale {row.locale})",
        markup=False,
    )
    if isinstance(rendered, RenderedEmail):
        out.print(
            f"To: {row.email}\nSubject: {rendered.subject}\n\n{rendered.text}\n\n--- HTML ---\n{rendered.html}",
            markup=False,
        )
    else:
        counted = segments(rendered.body)
        out.print(
            f"To: {row.phone}\n{rendered.body}\n\n({counted.encoding}, {plural(counted.characters, 'character')}, {plural(counted.segments, 'segment')})",
            markup=False,
        )
