"""Every error Lifecycle raises on purpose, drawn once.

Each error keeps its fields and builds its message from them, so a caller can both show
the text to a person and act on the parts.

    LifecycleError
    ├── SourceProblem              (not raised: one located mistake, ``path:line:col: message``)
    ├── RulesInvalid               rule files or the fact catalog have mistakes (all of them)
    ├── PlaybookTestsInvalid       playbook test files (rules/tests/*.yaml) have mistakes (all)
    ├── RulesRevisionError         `rules diff --against` names no rules directory or revision
    ├── ConditionError             a condition expression cannot be parsed or type-checked
    │   └── ConditionSyntaxError   every syntax mistake of one condition
    ├── DurationError              "2x" is not a duration
    ├── RuleEngineError            durable_rules refused a ruleset or a fact (code translated)
    ├── FactValueError             a fact value that could compare wrongly in durable_rules
    ├── EvaluationWorkerCrashed    a worker process died while evaluating a batch
    ├── RulesVersionMismatch       a queued task names rules this worker does not have
    ├── TemplateError              a message template is missing or does not render
    ├── ImportRowError             one row of an import file is bad (row number and reason)
    ├── EventConflict              an event id seen before, now with a different payload
    ├── CustomerErased             data sent about a customer whose personal data was erased
    ├── ScratchCopyError           a database cannot be copied to work on (simulate)
    ├── WouldOverwrite             files that a command will not replace (lifecycle new)
    ├── NotFound                   a customer, case or message id that does not exist
    ├── AmbiguousPrefix            an id prefix that names more than one thing
    ├── IllegalTransition          an escalation or message cannot move to that state
    ├── InvalidChoice              a value that is not one of the allowed ones
    ├── ChannelError               a channel could not send
    │   ├── TransientChannelError  worth retrying (429, 5xx, timeout, connection refused)
    │   └── PermanentChannelError  never worth retrying (400, invalid number, unsubscribed)
    ├── WebhookSignatureError      a webhook whose signature does not verify
    ├── WebhookPayloadError        a signed webhook whose body is not what the provider sends
    └── ConfigurationError         a setting is missing or contradictory
        ├── StartupRefused         a command will not start: every setting in the way
        ├── DatabaseNotReady       no database (or an old one) where a command needs one
        └── BrokerUnreachable      LIFECYCLE_BROKER_URL does not answer (RabbitMQ or Redis down)
"""

from __future__ import annotations

from dataclasses import dataclass


class LifecycleError(Exception):
    """Base class of every error Lifecycle raises on purpose."""


@dataclass(frozen=True, order=True)
class SourceProblem:
    """One mistake at a place in a file, printed the way compilers do (1-based line and
    column). A ``warning`` (a deprecated key) does not stop the rules from loading."""

    path: str
    line: int
    column: int
    message: str
    warning: bool = False

    def __str__(self) -> str:
        # One line, always: editors and grep read it that way, and a key or value quoted
        # in the message may hold a line break or a control character.
        message = "".join(
            c if c.isprintable() else c.encode("unicode_escape").decode() for c in self.message
        )
        label = "warning: " if self.warning else ""
        return f"{self.path}:{self.line}:{self.column}: {label}{message}"


class RulesInvalid(LifecycleError):
    """Raised by the playbook loader with every problem it found, never only the first
    (and the warnings, which alone would not have stopped the rules)."""

    def __init__(
        self, problems: list[SourceProblem], warnings: tuple[SourceProblem, ...] = ()
    ) -> None:
        self.problems = sorted(problems)
        self.warnings = tuple(sorted(warnings))
        count = len(self.problems)
        lines = "\n".join(str(p) for p in self.problems)
        super().__init__(f"{count} problem{'s' if count != 1 else ''} in the rules:\n{lines}")


class PlaybookTestsInvalid(LifecycleError):
    """Raised by the playbook test loader (engine.usecases.playbook_tests) with every
    mistake of the test files, each at its ``path:line:col``."""

    def __init__(self, problems: list[SourceProblem]) -> None:
        self.problems = sorted(problems)
        count = len(self.problems)
        lines = "\n".join(str(p) for p in self.problems)
        super().__init__(f"{count} problem{'s' if count != 1 else ''} in the test files:\n{lines}")


class RulesRevisionError(LifecycleError):
    """`lifecycle rules diff --against X`: X is neither a rules directory nor a git
    revision that has the rules directory (``reason`` says which part failed)."""

    def __init__(self, against: str, reason: str) -> None:
        self.against = against
        self.reason = reason
        super().__init__(f"cannot read the rules of {against!r}: {reason}")


class ConditionError(LifecycleError):
    """A mistake in one condition expression; ``offset`` is 0-based within the expression."""

    def __init__(self, message: str, offset: int, source: str) -> None:
        self.message = message
        self.offset = offset
        self.source = source
        super().__init__(f"{message} (at column {offset + 1} of {source!r})")


class ConditionSyntaxError(ConditionError):
    """Every syntax mistake of one condition (``errors``, by offset), raised by the
    condition parser; its own message and offset are the first mistake's."""

    def __init__(self, errors: list[ConditionError]) -> None:
        self.errors = tuple(errors)
        first = self.errors[0]
        super().__init__(first.message, first.offset, first.source)


class DurationError(LifecycleError):
    """A duration that is not one of the accepted spellings (``90m``, ``36h``, ``2d``, ``1w``)."""

    def __init__(self, text: str) -> None:
        self.text = text
        super().__init__(
            f"bad duration {text!r}: write a whole number and a unit, like 90m, 36h, 2d or 1w"
        )


class RuleEngineError(LifecycleError):
    """durable_rules answered with a bare error code; this names what the code means."""

    # The codes and their names come from durable_rules 2.0.28's C header (rules.h); the
    # wording is ours.
    CODES = {
        1: "no rule handled the message (ERR_EVENT_NOT_HANDLED)",
        2: "the same fact was already asserted (ERR_EVENT_OBSERVED)",
        3: "the message was deferred (ERR_EVENT_DEFERRED)",
        101: "the engine ran out of memory (ERR_OUT_OF_MEMORY)",
        102: "a value has a type the engine does not accept (ERR_UNEXPECTED_TYPE)",
        103: "a name is too long (ERR_IDENTIFIER_LENGTH)",
        104: "a value the engine does not accept (ERR_UNEXPECTED_VALUE)",
        105: "an operator or key the engine does not know (ERR_UNEXPECTED_NAME)",
        106: "too many rules (ERR_RULE_LIMIT_EXCEEDED)",
        107: "too many rules test existence (ERR_RULE_EXISTS_LIMIT_EXCEEDED)",
        108: "too many joins in a rule (ERR_RULE_BETA_LIMIT_EXCEEDED)",
        109: "a rule without a condition (ERR_RULE_WITHOUT_QUALIFIER)",
        110: "a setting was not found (ERR_SETTING_NOT_FOUND)",
        111: "an invalid ruleset handle (ERR_INVALID_HANDLE)",
        112: "too many rulesets in one process (ERR_HANDLE_LIMIT_EXCEEDED)",
        113: "a condition is too complex (ERR_EXPRESSION_LIMIT_EXCEEDED)",
        201: "a value could not be parsed (ERR_PARSE_VALUE)",
        202: "a string could not be parsed, or the ruleset has an unexpected shape (ERR_PARSE_STRING)",
        203: "a number could not be parsed, e.g. a float with an exponent (ERR_PARSE_NUMBER)",
        204: "an object could not be parsed (ERR_PARSE_OBJECT)",
        205: "a list could not be parsed (ERR_PARSE_ARRAY)",
        302: "a fact has too many properties (ERR_EVENT_MAX_PROPERTIES)",
        303: "too many rules matched one fact at once (ERR_MAX_STACK_SIZE)",
        304: "too many messages in one frame (ERR_MAX_MESSAGES_IN_FRAME)",
        305: "a message was not found (ERR_MESSAGE_NOT_FOUND)",
        306: "a location was not found (ERR_LOCATION_NOT_FOUND)",
        307: "a node was deleted (ERR_NODE_DELETED)",
        308: "a node is dispatching (ERR_NODE_DISPATCHING)",
        309: "the session was not found (ERR_SID_NOT_FOUND)",
        310: "no action is available (ERR_NO_ACTION_AVAILABLE)",
        311: "a property was not found (ERR_PROPERTY_NOT_FOUND)",
        312: "the operation is not supported (ERR_OPERATION_NOT_SUPPORTED)",
        313: "a fact is too large (ERR_EVENT_MAX_OBJECT_SIZE)",
        314: "a fact property is too large (ERR_EVENT_MAX_OBJECT_PROPERTY_SIZE)",
    }

    def __init__(self, operation: str, code: int | None, detail: str) -> None:
        self.operation = operation
        self.code = code
        if code is None:
            super().__init__(f"durable_rules failed to {operation}: {detail}")
            return
        meaning = self.CODES.get(code, "an undocumented engine error")
        super().__init__(f"durable_rules failed to {operation}: {meaning} (error code {code})")


class EvaluationWorkerCrashed(LifecycleError):
    """A worker process died (the C core aborted) while evaluating a batch."""

    def __init__(self, batch_start: str, batch_size: int, attempts: int, cause: str) -> None:
        self.batch_start = batch_start
        self.batch_size = batch_size
        self.attempts = attempts
        super().__init__(
            f"evaluation worker died {attempts} time(s) on the batch of {batch_size} customers "
            f"starting at {batch_start!r}: {cause}"
        )


class RulesVersionMismatch(LifecycleError):
    """A queued task (engine.runners.tasks) was planned with other rules than the worker
    that received it has, even after reading its rule files again; the worker refuses it
    (the broker retries it later, on this worker once its rules change, or another)."""

    def __init__(self, task: str, wanted: str, loaded: str, worker: str) -> None:
        self.task = task
        self.wanted = wanted
        self.loaded = loaded
        self.worker = worker
        super().__init__(
            f"worker {worker} refuses {task}: it was planned with rules version {wanted}, "
            f"this worker has {loaded}; deploy the same rule files to every worker and the "
            "scheduler"
        )


class TemplateError(LifecycleError):
    """A template is missing, has a syntax error, or refers to something the facts lack."""

    def __init__(self, template: str, message: str, line: int | None = None) -> None:
        self.template = template
        self.line = line
        self.message = message
        where = f"{template}:{line}" if line else template
        super().__init__(f"template {where}: {message}")


class ImportRowError(LifecycleError):
    """One bad row of an import file; the good rows are kept."""

    def __init__(self, path: str, row: int, reason: str) -> None:
        self.path = path
        self.row = row
        self.reason = reason
        super().__init__(f"{path}: row {row}: {reason}")


class EventConflict(LifecycleError):
    """An event id that was recorded before with a different payload; raised (or returned,
    for a batch) by ``engine.data.ingest``, which then changes nothing. ``differences``
    names each field that differs: ``customer_id``, ``type``, ``occurred_at`` or
    ``properties.<name>``."""

    def __init__(self, event_id: str, differences: tuple[str, ...]) -> None:
        self.event_id = event_id
        self.differences = differences
        super().__init__(
            f"event {event_id!r} was recorded before with a different payload "
            f"({', '.join(differences)} differ{'s' if len(differences) == 1 else ''}); "
            "nothing was changed: send a new event with a new id"
        )


class CustomerErased(LifecycleError):
    """Data sent about a customer erased under GDPR (engine.usecases.gdpr): refused by
    ingestion (API, Segment, importer), so an erasure is not undone by the next sync."""

    def __init__(self, customer_id: str) -> None:
        self.customer_id = customer_id
        super().__init__(
            f"customer {customer_id!r} was erased (GDPR): nothing more about them is taken "
            "in; erase them at the source too"
        )


class ScratchCopyError(LifecycleError):
    """A database that cannot be copied for work that must not change it (a simulation);
    raised by engine.data.scratch before anything is written."""

    def __init__(self, where: str, reason: str) -> None:
        self.where = where
        self.reason = reason
        super().__init__(f"cannot copy {where}: {reason}")


class WouldOverwrite(LifecycleError):
    """A command that writes new files found some already there; it wrote nothing."""

    def __init__(self, directory: str, existing: list[str]) -> None:
        self.directory = directory
        self.existing = existing
        shown = ", ".join(existing[:5]) + (
            f" and {len(existing) - 5} more" if len(existing) > 5 else ""
        )
        super().__init__(
            f"{directory} already has {shown}: nothing was written; "
            "choose a new directory or move those files away"
        )


class NotFound(LifecycleError):
    """Something was asked for by id and does not exist."""

    def __init__(self, kind: str, key: object) -> None:
        self.kind = kind
        self.key = key
        super().__init__(f"no {kind} with id {key!r}")


class AmbiguousPrefix(LifecycleError):
    """An id given by a prefix that more than one id starts with."""

    SHOWN = 5

    def __init__(self, kind: str, prefix: str, matches: list[str]) -> None:
        self.kind = kind
        self.prefix = prefix
        self.matches = matches
        shown = ", ".join(matches[: self.SHOWN])
        more = f" and {len(matches) - self.SHOWN} more" if len(matches) > self.SHOWN else ""
        super().__init__(
            f"{kind} id prefix {prefix!r} matches {len(matches)} {kind}s: {shown}{more}; "
            "give more of the id"
        )


class IllegalTransition(LifecycleError):
    """A state machine (escalation case, outbox message) refused a move."""

    def __init__(self, kind: str, key: object, current: str, action: str) -> None:
        self.kind = kind
        self.key = key
        self.current = current
        self.action = action
        super().__init__(f"cannot {action} {kind} {key}: it is {current}")


class InvalidChoice(LifecycleError):
    """A value (a status filter, a channel name...) that is not one of the allowed ones."""

    def __init__(self, what: str, value: object, choices: list[str]) -> None:
        self.what = what
        self.value = value
        self.choices = choices
        super().__init__(f"unknown {what} {value!r}; use one of: {', '.join(choices)}")


class ChannelError(LifecycleError):
    """A channel failed to send; subclasses say whether trying again can help."""

    transient = False

    def __init__(
        self,
        channel: str,
        reason: str,
        *,
        status: int | None = None,
        code: str | None = None,
        retry_after: float | None = None,
        suppress: bool = False,
    ) -> None:
        self.channel = channel
        self.reason = reason
        self.status = status
        self.code = code
        self.retry_after = retry_after
        self.suppress = suppress
        parts = [f"{channel}: {reason}"]
        if status is not None:
            parts.append(f"HTTP {status}")
        if code:
            parts.append(f"code {code}")
        super().__init__(" · ".join(parts))


class TransientChannelError(ChannelError):
    """Worth retrying with backoff: rate limits, provider 5xx, timeouts, refused connections."""

    transient = True


class PermanentChannelError(ChannelError):
    """Never worth retrying; ``suppress`` says the address or number must get nothing more."""


class WebhookSignatureError(LifecycleError):
    """A webhook request whose signature is missing, forged, or too old."""

    def __init__(self, provider: str, reason: str) -> None:
        self.provider = provider
        self.reason = reason
        super().__init__(f"{provider} webhook refused: {reason}")


class ConfigurationError(LifecycleError):
    """A setting is missing or contradictory (for example a channel with no credentials)."""

    def __init__(self, setting: str, reason: str) -> None:
        self.setting = setting
        self.reason = reason
        super().__init__(f"setting {setting}: {reason}")


class StartupRefused(ConfigurationError):
    """The start-up check (engine.bootstrap.check_startup) refused to let a command start;
    ``problems`` holds one ConfigurationError per setting in the way, all at once."""

    def __init__(self, command: str, problems: list[ConfigurationError]) -> None:
        self.command = command
        self.problems = problems
        self.setting = ", ".join(problem.setting for problem in problems)
        self.reason = "; ".join(problem.reason for problem in problems)
        listed = "\n".join(f"  {problem}" for problem in problems)
        LifecycleError.__init__(self, f"lifecycle {command} refuses to start:\n{listed}")


class WebhookPayloadError(LifecycleError):
    """A webhook body that does not parse; names every bad element by its 0-based index."""

    def __init__(self, provider: str, problems: list[str]) -> None:
        self.provider = provider
        self.problems = problems
        count = len(problems)
        listed = "; ".join(problems)
        super().__init__(
            f"{provider} webhook payload refused ({count} problem{'s' if count != 1 else ''}): "
            f"{listed}"
        )


class FactValueError(LifecycleError):
    """A customer's fact has a value the engine cannot compare safely (a float, a bool for a
    number, a number too large to stay exact). Raised by the evaluators, naming the fact."""

    def __init__(self, fact: str, value: object, reason: str) -> None:
        self.fact = fact
        self.value = value
        self.reason = reason
        shown = repr(value)
        if len(shown) > 60:
            shown = shown[:57] + "..."
        super().__init__(f"fact {fact!r} = {shown} ({type(value).__name__}): {reason}")


class DatabaseNotReady(ConfigurationError):
    """A command that must not create or migrate a database found none ready at
    LIFECYCLE_DATABASE_URL; raised by the command line before anything is written."""

    def __init__(self, url: str, problem: str) -> None:
        self.url = url
        self.problem = problem
        self.setting = "LIFECYCLE_DATABASE_URL"
        self.reason = problem
        LifecycleError.__init__(
            self,
            f"{problem} at LIFECYCLE_DATABASE_URL={url}; nothing was created. Run "
            "`lifecycle init` to create or upgrade it (or point LIFECYCLE_DATABASE_URL at "
            "your database)",
        )


class DatabaseUnavailable(ConfigurationError):
    """The database at LIFECYCLE_DATABASE_URL could not be opened, created or used (a
    directory that is not there, a server that refuses, a connection lost mid-command)."""

    def __init__(self, url: str, reason: str) -> None:
        self.url = url
        self.setting = "LIFECYCLE_DATABASE_URL"
        self.reason = reason
        LifecycleError.__init__(
            self, f"the database at LIFECYCLE_DATABASE_URL={url} cannot be used: {reason}"
        )


class BrokerUnreachable(ConfigurationError):
    """The broker at LIFECYCLE_BROKER_URL does not answer: a worker will not start (it
    would only log connection errors and look alive), and ``lifecycle status`` says so."""

    def __init__(self, url: str, reason: str) -> None:
        self.url = url
        self.setting = "LIFECYCLE_BROKER_URL"
        self.reason = reason or "no answer"
        LifecycleError.__init__(
            self,
            f"the broker at LIFECYCLE_BROKER_URL={url} does not answer ({self.reason}); "
            "start RabbitMQ or Redis there, or point LIFECYCLE_BROKER_URL at one that runs",
        )
