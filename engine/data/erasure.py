"""The suppressions of erased people, kept without their addresses.

A GDPR erasure (engine.usecases.gdpr) removes a person's email address and phone number,
but the business must still never write to them again. So the suppression of each of
their addresses stays, as a keyed digest instead of the address:
``erased:`` + HMAC-SHA256(secret key, ``channel:address``). A digest tells nobody the
address (the key is not in the database) yet matches it again: whenever a customer is
created or updated with an email address or a phone number (API, Segment identify,
import), ``ErasedAddresses.restore`` looks the digests of those addresses up, under the
current and the previous secret keys, and puts a plain suppression back for each one
found, in the same transaction. Every other suppression lookup (the facts' ``has_email``
and ``has_phone``, dispatch at send time) then works unchanged.

A secret key dropped from LIFECYCLE_SECRET_KEY_PREVIOUS stops matching the digests made
with it: keep retired keys listed there while erased addresses must stay suppressed.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import insert, select, tuple_
from sqlmodel import Session, col

from engine.data.models import Suppression

DIGEST_PREFIX = "erased:"
RESTORED_REASON = "the address of an erased person"


def address_digest(key: str, channel: str, address: str) -> str:
    """The keyed digest that stands for ``address`` on ``channel`` (71 characters)."""
    mac = hmac.new(key.encode(), f"{channel}:{address}".encode(), hashlib.sha256)
    return DIGEST_PREFIX + mac.hexdigest()


@dataclass(frozen=True)
class ErasedAddresses:
    """The digests of erased addresses under the secret keys (the current one last)."""

    keys: Sequence[str]

    def digest(self, channel: str, address: str) -> str:
        """The digest an erasure stores now: under the current key."""
        return address_digest(self.keys[-1], channel, address)

    def restore(
        self, session: Session, contacts: Iterable[tuple[str | None, str | None]], now: datetime
    ) -> int:
        """Suppress again each of these (email, phone) pairs' addresses that belonged to an
        erased person; returns how many plain suppressions were put back (two queries,
        and one insert when any is found)."""
        wanted = {("email", email) for email, _ in contacts if email}
        wanted |= {("sms", phone) for _, phone in contacts if phone}
        if not wanted:
            return 0
        by_digest = {
            address_digest(key, channel, address): (channel, address)
            for channel, address in wanted
            for key in self.keys
        }
        found = session.execute(
            select(col(Suppression.address), col(Suppression.reason)).where(
                col(Suppression.address).in_(sorted(by_digest))
            )
        )
        matched = {by_digest[row.address]: row.reason for row in found}
        if not matched:
            return 0
        pairs = tuple_(col(Suppression.channel), col(Suppression.address))
        statement = select(col(Suppression.channel), col(Suppression.address)).where(
            pairs.in_(sorted(matched))
        )
        present = {(channel, address) for channel, address in session.execute(statement)}
        rows = [
            {
                "channel": channel,
                "address": address,
                "reason": f"{RESTORED_REASON} ({reason})"[:200],
                "source": "erasure",
                "created_at": now,
            }
            for (channel, address), reason in sorted(matched.items())
            if (channel, address) not in present
        ]
        if rows:
            session.execute(insert(Suppression.__table__), rows)  # type: ignore[attr-defined]
        return len(rows)
