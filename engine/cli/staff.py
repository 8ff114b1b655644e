"""`lifecycle staff add / revoke / sessions`: console accounts and their sessions."""

from __future__ import annotations

import getpass
import sys
from typing import Annotated

import typer
from rich import box
from rich.table import Table

from engine.cli.common import app, fail, load_app, out
from engine.usecases.staff import live_sessions, revoke_staff
from engine.web.auth import hash_password

staff_app = typer.Typer(no_args_is_help=True, help="Console staff accounts and sessions.")
app.add_typer(staff_app, name="staff")


@staff_app.command("add")
def add(name: Annotated[str, typer.Argument(help="The staff member's name.")]) -> None:
    """Print a LIFECYCLE_STAFF_PASSWORDS entry for NAME; the password is read from standard
    input (asked twice on a terminal), never from the command line."""
    if not name.strip() or "," in name or ":" in name:
        raise fail("a staff name cannot be empty or hold ',' or ':'")
    if sys.stdin.isatty():
        password = getpass.getpass("password: ")
        if password != getpass.getpass("again: "):
            raise fail("the passwords differ")
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    if not password:
        raise fail("the password is empty")
    out.print(f"{name.strip()}:{hash_password(password)}", markup=False, soft_wrap=True)


@staff_app.command("revoke")
def revoke(name: Annotated[str, typer.Argument(help="The staff member's name.")]) -> None:
    """End every console session of NAME at once (a lost laptop, a leaver)."""
    application = load_app()
    count = revoke_staff(application.db, name, application.clock())
    out.print(f"revoked {count} session{'' if count == 1 else 's'} of {name}", markup=False)


@staff_app.command("sessions")
def sessions(
    name: Annotated[str | None, typer.Argument(help="Only this staff member's.")] = None,
) -> None:
    """List the console sessions that are signed in now."""
    application = load_app()
    rows = live_sessions(application.db, application.clock(), name)
    table = Table(title="Console sessions signed in (UTC)", box=box.SIMPLE_HEAD)
    table.add_column("staff")
    table.add_column("from", overflow="fold")  # an IPv6 address has no spaces to wrap at
    for column in ("signed in", "last seen", "expires"):
        table.add_column(column, no_wrap=True)
    for row in rows:
        table.add_row(
            row.staff,
            row.client or "?",
            f"{row.created_at:%Y-%m-%d %H:%M}",
            f"{row.last_seen_at:%Y-%m-%d %H:%M}",
            f"{row.expires_at:%Y-%m-%d %H:%M}",
        )
    out.print(table)
