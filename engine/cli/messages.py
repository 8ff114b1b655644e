"""`lifecycle messages` and `preview`: the outbox, and what a template renders to."""

from __future__ import annotations

from typing import Annotated, TypedDict

import typer
from rich import box
from rich.table import Table

from engine.cli.common import (
    NowOption,
    app,
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
from engine.usecases.messages import find_messages, parse_status, retry
from engine.wording import plural


class _MessageRecord(TypedDict):
    """One outbox message as `messages` lists it."""

    id: str
    customer: str | None
    playbook: str | None
    step: str | None
    channel: str
    status: str
    due_at: str
    sent_at: str | None
    attempts: int
    provider_id: str | None
    last_error: str | None


messages_app = typer.Typer(no_args_is_help=True, help="Inspect and retry outbox messages.")
app.add_typer(messages_app, name="messages")


@messages_app.command("list")
def messages_list(
    status: Annotated[
        str | None,
        typer.Option(
            help="queued, sending, sent, delivered, failed, bounced, cancelled, ambiguous"
        ),
    ] = None,
    customer: Annotated[str | None, typer.Option()] = None,
    limit: Annotated[int, typer.Option()] = 50,
    json_output: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """List outbox messages, newest first."""
    application = load_app()
    with reading(application.db) as session:
        try:
            wanted = parse_status(status) if status else None
        except LifecycleError as exc:
            raise fail(str(exc)) from exc
        rows = find_messages(session, status=wanted, customer=customer, limit=limit)
    records: list[_MessageRecord] = [
        {
            "id": m.id,
            "customer": m.customer_id,
            "playbook": m.playbook,
            "step": m.step_id,
            "channel": m.channel,
            "status": str(m.status),
            "due_at": m.due_at.isoformat(),
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
    # Readable at 80 columns: two lines a row, ids and times never cut; notes wrap.
    table = Table(box=box.SIMPLE_HEAD)
    table.add_column("message", no_wrap=True)
    table.add_column("customer\njourney step")
    table.add_column("status", no_wrap=True)
    table.add_column("due (UTC)\nsent", no_wrap=True)
    table.add_column("note")
    for r in records:
        table.add_row(
            f"{r['id'][:8]}\n{r['channel']}",
            f"{r['customer'] or '-'}\n{r['playbook'] or '-'} · {r['step'] or '-'}",
            f"{r['status']}\n{plural(r['attempts'], 'try', 'tries')}",
            f"{_minute(r['due_at'])}\n{_minute(r['sent_at']) if r['sent_at'] else 'not sent'}",
            r["last_error"] or "",
        )
    out.print(table)


def _minute(iso: str) -> str:
    """``2026-03-02T09:00:00+00:00`` → ``2026-03-02 09:00``."""
    return iso[:16].replace("T", " ")


@messages_app.command("retry")
def messages_retry(
    message_id: Annotated[str, typer.Argument(metavar="ID")], now: NowOption = None
) -> None:
    """Queue an ambiguous or failed message again (you accept it may arrive twice)."""
    application = load_app()
    moment = moment_of(application, now)
    try:
        with unit_of_work(application.db) as session:
            retry(session, message_id, moment)
    except LifecycleError as exc:
        raise fail(str(exc)) from exc
    out.print(f"message {message_id} queued again")


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
        facts = subjects_for(session, [customer], rules.catalog, moment)[0].facts
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
