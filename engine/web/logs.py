"""Access logs without personal data or tokens.

uvicorn logs each request as ``client - "METHOD /path?query HTTP/1.1" status``. The query
string can hold what staff searched for (an email address, a phone number) and the
unsubscribe path holds a signed token that unsubscribes its recipient, so both are
dropped before the line is written: the log keeps ``/console/customers`` and
``/u/<token>``. Installed by ``create_app`` on the ``uvicorn.access`` logger, whoever
serves the app.
"""

from __future__ import annotations

import logging
import re

ACCESS_LOGGER = "uvicorn.access"
# Path segments that are credentials: /u/<unsubscribe token>.
_TOKEN_PATHS = re.compile(r"^(/u/)[^/?#]+")


def redact_path(path: str) -> str:
    """``/u/abc.def?x=1`` → ``/u/<token>``; ``/console/customers?q=ann@x.org`` → ``/console/customers``."""
    bare = path.split("?", 1)[0].split("#", 1)[0]
    return _TOKEN_PATHS.sub(r"\1<token>", bare)


class RedactedAccessLog(logging.Filter):
    """Rewrites the path argument of uvicorn's access log records."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) >= 3 and isinstance(args[2], str):
            record.args = (*args[:2], redact_path(args[2]), *args[3:])
        return True


def install_access_log_filter() -> None:
    logger = logging.getLogger(ACCESS_LOGGER)
    if not any(isinstance(f, RedactedAccessLog) for f in logger.filters):
        logger.addFilter(RedactedAccessLog())
