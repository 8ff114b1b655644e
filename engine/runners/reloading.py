"""Reloading the rule files while running: the scheduler (`lifecycle run`) and the web app
(`lifecycle serve`) both reload every ``LIFECYCLE_RULES_RELOAD_S`` seconds through this.

A good change replaces the rules (and the message templates) and is logged at INFO with
the new version; a broken one is logged at ERROR with every problem, and the last good
rules stay in force. Nothing changed is logged at DEBUG only, and the same problems are
not logged again on every reload, only when they change.
"""

from __future__ import annotations

import logging

from engine.bootstrap import App
from engine.errors import RulesInvalid
from engine.playbooks.model import RuleSet


class RulesReloader:
    """Reloads ``app``'s rules and says what became of it in ``log``."""

    def __init__(self, app: App, log: logging.Logger) -> None:
        self.app = app
        self.log = log
        self._reported: str | None = None  # the problems logged last, until they change

    def reload(self) -> RuleSet | None:
        """The new rules, or None when the files are broken (the last good rules stay)."""
        before = self.app.loaded_version
        try:
            rules = self.app.reload_rules()
        except RulesInvalid as exc:
            if str(exc) != self._reported:
                self.log.error(
                    "rule files have problems; keeping the last good rules (version %s):\n%s",
                    before or "none",
                    exc,
                )
                self._reported = str(exc)
            return None
        self._reported = None
        if rules.version == before:
            self.log.debug("rules reloaded: version %s, unchanged", rules.version)
            return rules
        self.log.info(
            "rules reloaded: version %s (was %s), %d playbooks",
            rules.version,
            before or "none",
            len(rules.playbooks),
        )
        for warning in rules.warnings:
            self.log.warning("%s", warning)
        return rules
