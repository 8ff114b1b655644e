"""Evaluation in worker processes: the C core holds the GIL, and a worker contains a crash.

``evaluate_in_workers`` runs an evaluator over batches in worker processes: results come
back in batch order, a batch whose worker died is retried on a fresh worker, and only a
batch that keeps killing its worker is given up, with ``EvaluationWorkerCrashed``.
"""

from __future__ import annotations

import concurrent.futures as cf
import importlib
import multiprocessing
import os
import pickle
import signal
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from hashlib import sha256
from typing import Any, Protocol

from engine.errors import EvaluationWorkerCrashed, LifecycleError
from engine.evaluation.evaluators import Result, Row, make_evaluator
from engine.language.conditions import Condition

__all__ = ["CrashTest", "Starter", "default_workers", "evaluate_in_workers", "run_in_workers"]


@dataclass(frozen=True)
class CrashTest:
    """TEST-ONLY hook: lets a row whose facts hold ``"__crash__"`` kill its worker with
    ``os.abort()`` (SIGABRT, like the C core aborting), to exercise crash containment.

    ``"__crash__": "always"`` aborts on every attempt; ``"once"`` aborts the first time
    only, remembered by a marker file per row key in ``marker_dir``. It is honoured only
    by workers started with ``evaluate_in_workers(..., crash_test=CrashTest(...))``; a
    ``__crash__`` fact does nothing otherwise, so production can never trigger it.
    """

    marker_dir: str | None = None

    def maybe_crash(self, rows: Iterable[Row]) -> None:
        for key, facts in rows:
            mode = facts.get("__crash__")
            if mode == "always" or (mode == "once" and self._first_time(key)):
                _abort()

    def _first_time(self, key: str) -> bool:
        if self.marker_dir is None:
            raise ValueError("CrashTest(marker_dir=...) is needed for '__crash__': 'once'")
        path = os.path.join(self.marker_dir, sha256(key.encode()).hexdigest())
        try:
            os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return False
        return True


def _abort() -> None:
    try:
        import resource

        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # no core file for a test crash
    except (ImportError, ValueError, OSError):
        pass
    os.abort()


@dataclass(frozen=True)
class _Failure:
    """An exception raised in a worker, carried back without pickling its class's
    constructor (Lifecycle's errors take their fields, not their message)."""

    module: str
    qualname: str
    message: str
    state: dict[str, object]

    @classmethod
    def of(cls, exc: BaseException) -> _Failure:
        state = {}
        for name, value in vars(exc).items():
            try:
                pickle.dumps(value)
            except Exception:
                value = repr(value)
            state[name] = value
        kind = type(exc)
        return cls(kind.__module__, kind.__qualname__, str(exc), state)

    def rebuild(self) -> BaseException:
        try:
            kind = getattr(importlib.import_module(self.module), self.qualname)
            exc = kind.__new__(kind)
            BaseException.__init__(exc, self.message)
            exc.__dict__.update(self.state)
            return exc  # type: ignore[no-any-return]
        except Exception:
            return LifecycleError(f"{self.qualname} in an evaluation worker: {self.message}")


class Starter(Protocol):
    """Builds, once in each worker process, the handler that does the work of one item
    (an evaluator for evaluation batches; a database engine and an evaluator for shards).
    It is pickled to the workers, so it carries only plain data."""

    def __call__(self) -> Callable[[Any], Any]: ...


@dataclass(frozen=True)
class _EvaluateStart:
    conditions: Mapping[str, Condition]
    engine: str
    crash_test: CrashTest | None

    def __call__(self) -> Callable[[list[Row]], list[Result]]:
        evaluator = make_evaluator(self.conditions, self.engine)
        crash_test = self.crash_test

        def evaluate(rows: list[Row]) -> list[Result]:
            if crash_test is not None:
                crash_test.maybe_crash(rows)
            return evaluator.evaluate_many(rows)

        return evaluate


_worker_handler: Callable[[Any], Any] | None = None
_worker_failure: _Failure | None = None


def _init_worker(start: Starter) -> None:
    global _worker_handler, _worker_failure
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    try:
        _worker_handler = start()
    except Exception as exc:
        _worker_failure = _Failure.of(exc)


def _run_item(item: Any) -> Any:
    if _worker_failure is not None:
        return _worker_failure
    assert _worker_handler is not None
    try:
        return _worker_handler(item)
    except Exception as exc:
        return _Failure.of(exc)


def default_workers() -> int:
    """One worker per core this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def _context() -> multiprocessing.context.BaseContext:
    # Never fork: the parent may have threads (the scheduler, the pool's own), and a
    # forked child of a threaded process can deadlock. forkserver forks from a clean,
    # single-threaded server that has already imported this module.
    if "forkserver" in multiprocessing.get_all_start_methods():
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload([__name__])
        return context
    return multiprocessing.get_context("spawn")


@dataclass
class _Job:
    index: int
    item: Any
    attempts: int = 0  # how many times a worker died while this item was being worked
    future: cf.Future[Any] | None = None
    done: bool = False
    result: Any = None


class _Pool:
    """Runs batches on a ProcessPoolExecutor, rebuilding it whenever a worker dies.

    A dead worker breaks the whole executor, failing every unfinished batch, so after a
    death nobody knows which batch was to blame: the unfinished ones are re-run one at a
    time, and a batch is given up only when it has killed a worker running on its own.
    """

    def __init__(
        self,
        start: Starter,
        workers: int,
        max_attempts: int,
        describe: Callable[[Any], tuple[str, int]],
    ) -> None:
        self.initargs = (start,)
        self.describe = describe
        self.workers = workers
        self.max_attempts = max_attempts
        self.executor: cf.ProcessPoolExecutor | None = None
        self.suspects: deque[_Job] = deque()  # to re-run one at a time, after a death

    def _submit(self, job: _Job) -> None:
        if self.executor is None:
            self.executor = cf.ProcessPoolExecutor(
                max_workers=self.workers,
                mp_context=_context(),
                initializer=_init_worker,
                initargs=self.initargs,
            )
        try:
            job.future = self.executor.submit(_run_item, job.item)
        except BrokenProcessPool as exc:
            # A worker died before we noticed: this batch fails like the ones in flight.
            failed: cf.Future[Any] = cf.Future()
            failed.set_exception(exc)
            job.future = failed

    def _shutdown(self) -> None:
        executor, self.executor = self.executor, None
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)

    def run(self, items: Iterable[Any]) -> Iterator[Any]:
        source = enumerate(items)
        jobs: dict[int, _Job] = {}  # submitted and not yet handed back, by batch index
        window = 2 * self.workers
        following = 0  # the index of the next batch to hand back
        exhausted = False
        try:
            while True:
                while not exhausted and not self.suspects and len(jobs) < window:
                    try:
                        index, item = next(source)
                    except StopIteration:
                        exhausted = True
                        break
                    jobs[index] = job = _Job(index, item)
                    self._submit(job)
                head = jobs.get(following)
                if head is None:
                    return  # exhausted, and everything handed back
                if head.done:
                    del jobs[following]
                    following += 1
                    yield head.result
                    continue
                running = [j.future for j in jobs.values() if j.future is not None]
                if not running:
                    self._submit(self.suspects[0])
                    continue
                cf.wait(running, return_when=cf.FIRST_COMPLETED)
                self._collect(jobs)
        finally:
            self._shutdown()

    def _collect(self, jobs: Mapping[int, _Job]) -> None:
        unfinished: list[_Job] = []
        for job in jobs.values():
            future = job.future
            if future is None or not future.done():
                continue
            job.future = None
            try:
                outcome = future.result()
            except BrokenProcessPool:
                unfinished.append(job)
                continue
            if isinstance(outcome, _Failure):
                raise outcome.rebuild()
            job.result, job.done = outcome, True
            if self.suspects and self.suspects[0] is job:
                self.suspects.popleft()
        if not unfinished:
            return
        # The executor is broken: every batch still in it fails the same way.
        cause = self._cause()
        for job in jobs.values():
            if job.future is not None:
                job.future.cancel()
                job.future = None
                unfinished.append(job)
        self._shutdown()
        alone = len(unfinished) == 1
        for job in unfinished:
            job.attempts += 1
            if alone and job.attempts >= self.max_attempts:
                first, size = self.describe(job.item)
                raise EvaluationWorkerCrashed(first, size, job.attempts, cause)
        queued = {id(j) for j in self.suspects}
        self.suspects.extend(j for j in unfinished if id(j) not in queued)
        self.suspects = deque(sorted(self.suspects, key=lambda j: j.index))

    def _cause(self) -> str:
        processes = list((getattr(self.executor, "_processes", None) or {}).values())
        for process in processes:
            # The worker that crashed may not be reaped yet; without its status, the
            # others' (255 after a broken pipe) would be taken for the cause.
            process.join(timeout=2)
        # 255 is what a forkserver child reports when its real status could not be read.
        codes = [p.exitcode for p in processes if p.exitcode and p.exitcode != 255]
        # A signal other than the SIGTERM with which the broken pool stops the other
        # workers is the cause.
        for code in sorted(codes, key=lambda c: (c == -signal.SIGTERM, c > 0)):
            if code < 0:
                try:
                    return f"the worker was killed by {signal.Signals(-code).name}"
                except ValueError:
                    return f"the worker was killed by signal {-code}"
            return f"the worker exited with status {code}"
        return "a worker process died abruptly"


def run_in_workers(
    start: Starter,
    items: Iterable[Any],
    *,
    workers: int | None = None,
    max_attempts: int = 3,
    describe: Callable[[Any], tuple[str, int]],
) -> Iterator[Any]:
    """Run the handler that ``start`` builds in each of ``workers`` processes over
    ``items``; yields each item's result in item order.

    At most two items per worker are read ahead of the one being handed back, so memory
    stays flat however many there are. An item whose worker dies is retried on a fresh
    one; an item that kills a worker ``max_attempts`` times (the last time running alone)
    raises ``EvaluationWorkerCrashed``, named by ``describe(item)`` (its first key and
    size). An exception raised by the handler is raised here, in the caller.
    """
    if max_attempts < 1:
        raise ValueError("max_attempts must be at least 1")
    pool = _Pool(start, workers or default_workers(), max_attempts, describe)
    return pool.run(items)


def evaluate_in_workers(
    conditions: Mapping[str, Condition],
    batches: Iterable[Sequence[Row]],
    workers: int | None = None,
    engine: str = "durable",
    max_attempts: int = 3,
    *,
    crash_test: CrashTest | None = None,
) -> Iterator[list[Result]]:
    """Evaluate batches of ``(key, facts)`` rows in worker processes; yields each batch's
    ``[(key, fired rule ids)]`` in batch order (see ``run_in_workers``).

    Each worker builds its evaluator once. The rules are checked here first, so a ruleset
    durable_rules refuses raises ``RuleEngineError`` in the caller, before any worker.
    ``crash_test`` is a test-only hook (see ``CrashTest``).
    """
    make_evaluator(conditions, engine).close()
    start = _EvaluateStart(dict(conditions), engine, crash_test)
    return run_in_workers(
        start,
        (list(batch) for batch in batches),
        workers=workers,
        max_attempts=max_attempts,
        describe=_describe_rows,
    )


def _describe_rows(rows: list[Row]) -> tuple[str, int]:
    return (rows[0][0] if rows else "", len(rows))
