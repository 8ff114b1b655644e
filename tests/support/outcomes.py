"""What a run of the engine left in the database, as counts to compare between runs (an
inline control and a distributed run over the same data)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Engine, text


def outcome_counts(db: Engine) -> dict[str, Any]:
    """Enrollments by (playbook, status), messages by (playbook, step, channel), the
    events still pending, and any (customer, playbook, step, channel) queued twice."""
    with db.connect() as connection:
        enrollments = {
            f"{playbook}/{status}": n
            for playbook, status, n in connection.execute(
                text(
                    "SELECT playbook, status, COUNT(*) FROM enrollments "
                    "GROUP BY playbook, status ORDER BY playbook, status"
                )
            )
        }
        messages = {
            f"{playbook}/{step}/{channel}": n
            for playbook, step, channel, n in connection.execute(
                text(
                    "SELECT COALESCE(playbook, ''), COALESCE(step_id, ''), channel, COUNT(*) "
                    "FROM messages GROUP BY 1, 2, 3 ORDER BY 1, 2, 3"
                )
            )
        }
        doubled = connection.execute(
            text(
                "SELECT COUNT(*) FROM (SELECT customer_id, playbook, step_id, channel, "
                "enrollment_id FROM messages WHERE kind <> 'staff' GROUP BY 1, 2, 3, 4, 5 "
                "HAVING COUNT(*) > 1) AS d"
            )
        ).scalar_one()
        pending = connection.execute(
            text("SELECT COUNT(*) FROM events WHERE evaluated_at IS NULL")
        ).scalar_one()
    return {
        "enrollments": enrollments,
        "messages": messages,
        "doubled": int(doubled),
        "pending_events": int(pending),
    }
