"""Email through SendGrid's v3 Mail Send API, with the official ``sendgrid`` SDK.

Every email goes out as one personalization carrying its own ``to``, the custom arg
``lifecycle_message_id`` (our outbox id, which SendGrid's event webhook sends back) and
its headers (``List-Unsubscribe`` differs per recipient, so headers always live in the
personalization). Subject, text and HTML are the message-level ``subject`` and
``content`` (text/plain first, then text/html, as SendGrid requires); the playbook id is
a ``category``.

Batching (``send_batch``): emails whose rendered content is identical (same subject,
HTML, text and category) share one request, with one personalization per email and at
most 1000 personalizations per request, SendGrid's limit. Emails with different
content go in separate requests, so batching pays off only for content without
per-recipient variables. All emails of one request get the same outcome: the same
``X-Message-Id`` (SendGrid's events tell them apart by our custom arg) or the same error.

Errors are translated here and nowhere else:

=========================================  ==========================================
429                                        transient; ``retry_after`` from
                                           ``X-RateLimit-Reset`` or ``Retry-After``
5xx, 408, timeouts, refused connections    transient
400, 401, 403, 413 and any other 4xx       permanent, with SendGrid's ``errors[0]``
=========================================  ==========================================

A timeout is ambiguous (SendGrid may have accepted the mail before the answer was lost);
it is reported as transient, so a retry may rarely deliver twice.

The API key is never printed: ``repr`` hides it, and the ``Authorization`` header that
``python_http_client`` logs at DEBUG level is redacted.
"""

from __future__ import annotations

import http.client
import json
import logging
import re
import time
from collections.abc import Callable, Hashable, Sequence
from typing import Any
from urllib.error import URLError

import python_http_client.exceptions as http_errors
from sendgrid import SendGridAPIClient
from sendgrid.helpers.mail import (
    ApiKeyIncludedException,
    Category,
    Content,
    CustomArg,
    From,
    Header,
    Mail,
    MimeType,
    Personalization,
    Subject,
    To,
)

from engine.delivery.outbound import (
    Email,
    ProviderCall,
    Sent,
    Sms,
    content_key,
    retry_after_seconds,
    send_many,
)
from engine.errors import (
    ChannelError,
    ConfigurationError,
    PermanentChannelError,
    TransientChannelError,
)

log = logging.getLogger(__name__)

MAX_PERSONALIZATIONS = 1000  # per request, SendGrid's limit
MESSAGE_ID_ARG = "lifecycle_message_id"
PROVIDER = "sendgrid"


class _RedactBearer(logging.Filter):
    """python_http_client logs request headers at DEBUG, the API key among them."""

    pattern = re.compile(r"Bearer\s+[^\s'\",}]+")

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        if "Bearer" in text:
            record.msg, record.args = self.pattern.sub("Bearer [redacted]", text), ()
        return True


_http_logger = logging.getLogger("python_http_client.client")
if not any(isinstance(f, _RedactBearer) for f in _http_logger.filters):
    _http_logger.addFilter(_RedactBearer())


class SendGridEmailChannel:
    """Sends ``Email`` through SendGrid; see the module docstring for batching and errors."""

    name = "email"
    provider = PROVIDER
    max_batch = MAX_PERSONALIZATIONS

    def __init__(
        self,
        api_key: str,
        from_email: str,
        from_name: str,
        host: str = "https://api.sendgrid.com",
        timeout: float = 10,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not api_key or not api_key.strip():
            raise ConfigurationError("sendgrid_api_key", "is empty; SendGrid needs an API key")
        if "@" not in from_email:
            raise ConfigurationError("from_email", f"{from_email!r} is not an email address")
        if timeout <= 0:
            raise ConfigurationError("sendgrid timeout", f"must be positive, not {timeout}")
        self.from_email = from_email
        self.from_name = from_name
        self.host = host.rstrip("/")
        self.timeout = timeout
        self._clock = clock
        self._sdk = SendGridAPIClient(api_key, host=self.host)
        # SendGridAPIClient takes no timeout, but its python_http_client.Client does, and
        # hands it to urllib for the connection and for every socket read.
        self._sdk.client.timeout = timeout

    def __repr__(self) -> str:
        return (
            f"SendGridEmailChannel(from_email={self.from_email!r}, host={self.host!r}, "
            f"timeout={self.timeout}, api_key=[hidden])"
        )

    def send(self, message: Email | Sms) -> Sent:
        if not isinstance(message, Email):
            raise self._not_email(message)
        return self._post([message])

    def send_batch(self, messages: Sequence[Email]) -> list[Sent | ChannelError]:
        """One outcome per email, in order; identical content shares requests."""
        outcomes: list[Sent | ChannelError | None] = [None] * len(messages)
        groups: dict[Hashable, list[int]] = {}
        for index, message in enumerate(messages):
            if isinstance(message, Email):
                groups.setdefault(content_key(message), []).append(index)
            else:
                outcomes[index] = PermanentChannelError(
                    PROVIDER, f"can only send email, not a {type(message).__name__}"
                )
        for indexes in groups.values():
            for start in range(0, len(indexes), MAX_PERSONALIZATIONS):
                chunk = indexes[start : start + MAX_PERSONALIZATIONS]
                outcome: Sent | ChannelError
                try:
                    outcome = self._post([messages[i] for i in chunk])
                except ChannelError as error:
                    outcome = error
                for i in chunk:
                    outcomes[i] = outcome
        return [o for o in outcomes if o is not None]

    def build_request(self, emails: Sequence[Email]) -> dict[str, Any]:
        """The JSON body for ``/v3/mail/send``; ``emails`` must share their content."""
        first = emails[0]
        if any(content_key(e) != content_key(first) for e in emails):
            raise ValueError("emails in one SendGrid request must have identical content")
        mail = Mail()
        mail.from_email = From(self.from_email, self.from_name or None)
        mail.subject = Subject(first.subject)
        if first.text:
            mail.add_content(Content(MimeType.text, first.text))
        if first.html:
            mail.add_content(Content(MimeType.html, first.html))
        if first.category:
            mail.add_category(Category(first.category))
        for email in emails:
            personalization = Personalization()
            personalization.add_to(To(email.to))
            for header_name, value in email.headers.items():
                personalization.add_header(Header(header_name, value))
            personalization.add_custom_arg(CustomArg(MESSAGE_ID_ARG, email.message_id))
            # Mail.add_personalization inserts at index 0 by default: keep the given order.
            mail.add_personalization(personalization, index=len(mail.personalizations))
        body: dict[str, Any] = mail.get()
        return body

    def prepare(self, messages: Sequence[Email | Sms]) -> ProviderCall:
        """Build the request now and return the call that posts it (``PreparingChannel``):
        the dispatcher marks the emails attempted in between, so all that is left after
        the mark is the HTTP request itself."""
        emails = [m for m in messages if isinstance(m, Email)]
        keys = {content_key(e) for e in emails}
        if len(emails) != len(messages) or len(keys) != 1 or len(emails) > self.max_batch:
            return lambda: send_many(self, messages)  # not one request: as it comes
        try:
            body = self._body(emails)
        except ChannelError as error:
            refused = error
            return lambda: [refused] * len(emails)

        def call() -> list[Sent | ChannelError]:
            try:
                outcome: Sent | ChannelError = self._deliver(body, len(emails))
            except ChannelError as error:
                outcome = error
            return [outcome] * len(emails)

        return call

    def _not_email(self, message: Email | Sms) -> ChannelError:
        return PermanentChannelError(
            PROVIDER, f"can only send email, not a {type(message).__name__}"
        )

    def _post(self, emails: Sequence[Email]) -> Sent:
        return self._deliver(self._body(emails), len(emails))

    def _body(self, emails: Sequence[Email]) -> dict[str, Any]:
        try:
            return self.build_request(emails)
        except ApiKeyIncludedException as exc:
            raise PermanentChannelError(
                PROVIDER, "the body looks like it contains a SendGrid API key; not sending it"
            ) from exc

    def _deliver(self, body: dict[str, Any], count: int) -> Sent:
        try:
            response = self._sdk.send(body)
        except http_errors.HTTPError as exc:
            raise self._translate_http(exc) from exc
        except TimeoutError as exc:
            raise self._timeout() from exc
        except URLError as exc:
            if isinstance(exc.reason, TimeoutError):
                raise self._timeout() from exc
            raise TransientChannelError(
                PROVIDER, f"cannot reach {self.host}: {exc.reason}"
            ) from exc
        except (OSError, http.client.HTTPException) as exc:
            raise TransientChannelError(
                PROVIDER, f"connection to {self.host} failed: {exc!r}"
            ) from exc
        provider_id = response.headers.get("X-Message-Id") or ""
        if not provider_id:
            log.warning("SendGrid accepted %d email(s) without an X-Message-Id", count)
        return Sent(provider_id=provider_id, provider=PROVIDER)

    def _timeout(self) -> TransientChannelError:
        return TransientChannelError(
            PROVIDER, f"no answer from {self.host} within {self.timeout:g} s"
        )

    def _translate_http(self, exc: http_errors.HTTPError) -> ChannelError:
        status = int(exc.status_code)
        detail = _provider_message(exc.body) or str(exc.reason)
        if status == 429:
            return TransientChannelError(
                PROVIDER,
                f"rate limited: {detail}",
                status=status,
                retry_after=self._retry_after(exc.headers),
            )
        if status >= 500 or status == 408:
            return TransientChannelError(PROVIDER, f"provider error: {detail}", status=status)
        return PermanentChannelError(PROVIDER, f"refused the email: {detail}", status=status)

    def _retry_after(self, headers: Any) -> float | None:
        if headers is None:
            return None
        reset = headers.get("X-RateLimit-Reset")
        if reset:
            try:
                return max(0.0, float(reset) - self._clock())
            except ValueError:
                pass
        return retry_after_seconds(headers.get("Retry-After"), self._clock())


def _provider_message(body: bytes | str | None) -> str:
    """SendGrid's ``errors[0].message`` (with its field), or the start of the body."""
    if not body:
        return ""
    text = body.decode("utf-8", "replace") if isinstance(body, bytes) else body
    try:
        first = json.loads(text)["errors"][0]
        message = str(first.get("message") or "").strip()
        field = first.get("field")
        return f"{message} (field {field})" if message and field else message
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        return text.strip()[:300]
