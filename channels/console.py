"""The default channel: prints each message and keeps it as a file, so Lifecycle runs with
no credentials at all.

An email becomes ``<directory>/<message_id>.eml``, a complete RFC 5322 message with a
plain-text and an HTML alternative that any mail client opens; an SMS becomes
``<directory>/<message_id>.txt``. Sending the same message id again overwrites the same
file (written to a temporary name, then renamed, so a reader never sees half of it).
``lookup`` tells settlement whether a message's file is there.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from collections.abc import Callable
from email.message import EmailMessage
from email.policy import default as default_policy
from email.utils import formatdate
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import quote

from engine.delivery.outbound import Attempt, Email, ProviderRecord, Sent, Sms
from engine.errors import PermanentChannelError, TransientChannelError

PREVIEW_LINES = 8
# RFC 5322's own limit: folding a long List-Unsubscribe at 78 columns puts its value on a
# continuation line, which the stdlib parser then reads back with a leading space.
POLICY = default_policy.clone(max_line_length=998)


def file_stem(message_id: str) -> str:
    """A file name for a message id: no path separators, and never a hidden file."""
    stem = quote(message_id, safe="@+=-_.")
    return "%2E" + stem[1:] if stem.startswith(".") else stem


_STDOUT: Any = object()  # "sys.stdout as it is when printing", so pytest's capture works


class ConsoleChannel:
    """Writes messages to files under ``directory`` and a short block to ``stream``.

    ``stream`` defaults to the current ``sys.stdout``; ``None`` prints nothing.
    """

    name = "console"
    provider = "console"

    def __init__(
        self,
        directory: Path,
        stream: TextIO | None = _STDOUT,
        *,
        from_email: str = "Lifecycle <lifecycle@localhost>",
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.directory = Path(directory)
        self.stream = stream
        self.from_email = from_email
        self._clock = clock

    def __repr__(self) -> str:
        return f"ConsoleChannel(directory={str(self.directory)!r})"

    def path_for(self, message: Email | Sms) -> Path:
        suffix = ".eml" if isinstance(message, Email) else ".txt"
        return self.directory / (file_stem(message.message_id) + suffix)

    def send(self, message: Email | Sms) -> Sent:
        if isinstance(message, Email):
            data, preview = self._email(message), self._email_preview(message)
        elif isinstance(message, Sms):
            data, preview = self._sms(message), self._sms_preview(message)
        else:
            raise PermanentChannelError(
                self.name, f"cannot send a {type(message).__name__}, only Email or Sms"
            )
        path = self.path_for(message)
        self._write(path, data)
        stream = sys.stdout if self.stream is _STDOUT else self.stream
        if stream is not None:
            print(f"{preview}\n   → {path}\n", file=stream, flush=True)
        return Sent(provider_id=f"console-{message.message_id}", provider=self.provider)

    def lookup(self, attempt: Attempt) -> list[ProviderRecord]:
        """The file a send wrote, if it is there (settlement): it is written whole or not
        at all (renamed into place), so a file means the message went out."""
        stem = file_stem(attempt.message_id)
        return [
            ProviderRecord(f"console-{attempt.message_id}", "sent", matches=True)
            for suffix in (".eml", ".txt")
            if (self.directory / (stem + suffix)).exists()
        ]

    def _email(self, email: Email) -> bytes:
        msg = EmailMessage(policy=POLICY)
        msg["From"] = self.from_email
        msg["To"] = email.to
        msg["Subject"] = email.subject
        msg["Date"] = formatdate(self._clock(), localtime=False, usegmt=True)
        msg["Message-ID"] = f"<{file_stem(email.message_id)}@lifecycle.console>"
        msg["X-Lifecycle-Message-Id"] = email.message_id
        if email.category:
            msg["X-Lifecycle-Category"] = email.category
        for name, value in email.headers.items():
            msg[name] = value
        # Text first, then HTML: mail clients show the last alternative they understand.
        msg.set_content(email.text or " ")
        if email.html:
            msg.add_alternative(email.html, subtype="html")
        return msg.as_bytes()

    def _sms(self, sms: Sms) -> bytes:
        return f"To: {sms.to}\nMessage-Id: {sms.message_id}\n\n{sms.body}\n".encode()

    def _email_preview(self, email: Email) -> str:
        lines = (email.text or email.html).strip().splitlines()
        shown = lines[:PREVIEW_LINES] + (["   …"] if len(lines) > PREVIEW_LINES else [])
        body = "\n".join(f"   {line}" for line in shown)
        return f"── email {email.message_id} → {email.to}\n   Subject: {email.subject}\n{body}"

    def _sms_preview(self, sms: Sms) -> str:
        body = "\n".join(f"   {line}" for line in sms.body.splitlines())
        return f"── sms {sms.message_id} → {sms.to}\n{body}"

    def _write(self, path: Path, data: bytes) -> None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".", suffix=".part")
            try:
                with os.fdopen(fd, "wb") as handle:
                    handle.write(data)
                os.replace(tmp, path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        except OSError as exc:
            # A full disk or a permission problem may pass; the dispatcher retries later.
            raise TransientChannelError(self.name, f"cannot write {path}: {exc}") from exc
