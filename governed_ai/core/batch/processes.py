"""One batch across several processes: a task's share of a worker's cores when governance CPU is the limit.

A task is one process, and one process runs Python on one core at a time. :func:`run_in_processes`
splits the items among ``processes`` forked children (item ``i`` goes to child ``i % processes``), each
running a :class:`~governed_ai.core.batch.runner.BatchRunner` with its own governed client for the
*same* task instance: the same policy, one shared budget ledger and one replay journal in the governance
store, every call audited in the one chain. Each child spools its outcomes; the parent reads the spools
together in item order, so the results are exactly those of a one-process run.

Children are forked (not spawned) so that what the DAG defined (an ``output_schema`` class, a prompt's
globals) needs no pickling; everything that talks to Airflow (connections, the task's log channel) is
resolved or set up in the parent before the fork. Children log nothing themselves: their progress and
log records travel to the parent, which writes them to the task log.
"""

from __future__ import annotations

import contextlib
import logging
import logging.handlers
import multiprocessing
import os
import queue
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from multiprocessing.connection import Connection
from typing import Any

from sqlalchemy import Engine

from governed_ai.core.batch.inputs import BatchItem
from governed_ai.core.batch.runner import BatchProgress, BatchRun, BatchRunner
from governed_ai.core.client import GovernedClient

log = logging.getLogger(__name__)

#: Builds a child's runner around a fresh governed client (called in the child, after the fork).
RunnerFactory = Callable[[GovernedClient], BatchRunner]


#: ``processes="auto"`` adds a process only for this many items or more: forking, a child's own client and
#: store connections cost tens of milliseconds, nothing next to a few hundred calls.
MIN_ITEMS_PER_PROCESS = 250
#: ... and for this many calls in flight: below it a process waits on the endpoint, not on its core, and a
#: second one adds CPU (its own commits, client and connections) without adding calls (measured with
#: benchmarks/bench_batch.py: at concurrency 32, two processes of 16 gave 3% more calls/s for 35% more CPU;
#: at 64, two of 32 gave 14% more for the same CPU per call).
MIN_CALLS_IN_FLIGHT_PER_PROCESS = 32


def default_processes() -> int:
    """The cores this process may run on (its CPU affinity), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def auto_processes(items: int, concurrency: int, cores: int | None = None) -> int:
    """``processes="auto"``: one per core, as far as the batch has :data:`MIN_ITEMS_PER_PROCESS` items and
    :data:`MIN_CALLS_IN_FLIGHT_PER_PROCESS` calls in flight for each."""
    cores = default_processes() if cores is None else cores
    return max(1, min(cores, concurrency // MIN_CALLS_IN_FLIGHT_PER_PROCESS, items // MIN_ITEMS_PER_PROCESS))


def concurrency_share(concurrency: int, processes: int, shard: int) -> int:
    """Shard ``shard``'s part of the task's ``concurrency``: the parts add up to it, none differs from
    another by more than one, and none is 0 (the caller keeps ``processes <= concurrency``)."""
    return max(1, concurrency // processes + (1 if shard < concurrency % processes else 0))


@dataclass(frozen=True)
class _Progress:
    shard: int
    progress: BatchProgress


def run_in_processes(
    items: Sequence[BatchItem],
    *,
    processes: int,
    make_client: Callable[[], GovernedClient],
    make_runner: RunnerFactory,
    engines: Sequence[Engine] = (),
    on_progress: Callable[[BatchProgress], None] | None = None,
    progress_interval_seconds: float = 10.0,
) -> BatchRun:
    """Run ``items`` in ``processes`` forked children; see the module docstring.

    :param make_client: builds a child's governed client (from settings the parent resolved).
    :param make_runner: builds the child's runner around that client.
    :param engines: the governance store's engines, whose pooled connections a child must not share.
    """
    if processes < 2 or len(items) < 2:
        raise ValueError("run_in_processes needs at least 2 processes and 2 items")
    processes = min(processes, len(items))
    context = multiprocessing.get_context("fork")
    messages: Any = context.Queue()
    children = []
    pipes: list[Connection] = []
    for shard in range(processes):
        receive, send = context.Pipe(duplex=False)
        child = context.Process(
            target=_child,
            args=(shard, processes, items, make_client, make_runner, engines, messages, send),
            name=f"governed-ai-batch-{shard}",
            daemon=True,
        )
        child.start()
        send.close()
        children.append(child)
        pipes.append(receive)
    runs: dict[int, BatchRun] = {}
    failures: dict[int, str] = {}
    latest: dict[int, BatchProgress] = {}
    started = time.monotonic()
    last_report = started
    try:
        while len(runs) + len(failures) < processes:
            _drain(messages, latest)
            for shard, pipe in enumerate(pipes):
                # A child that died has closed its end: poll() is then true and recv() raises EOFError.
                if shard in runs or shard in failures or not pipe.poll():
                    continue
                try:
                    kind, value = pipe.recv()
                except EOFError:
                    child = children[shard]
                    child.join(timeout=5)
                    failures[shard] = f"process {child.pid} died (exit code {child.exitcode})"
                    continue
                if kind == "run":
                    runs[shard] = value
                else:
                    failures[shard] = value
            now = time.monotonic()
            if on_progress is not None and latest and now - last_report >= progress_interval_seconds:
                last_report = now
                on_progress(_combined(list(latest.values()), len(items), now - started))
            time.sleep(0.05)
    finally:
        deadline = time.monotonic() + 30
        for child in children:
            while child.is_alive() and time.monotonic() < deadline:
                _drain(messages, latest)  # a child flushing its last messages must not block on a full pipe
                child.join(timeout=0.05)
            if child.is_alive():
                child.kill()
        _drain(messages, latest)
        for pipe in pipes:
            pipe.close()
    if failures:
        for run in runs.values():
            run.discard()
        detail = "; ".join(f"share {shard}: {reason}" for shard, reason in sorted(failures.items()))
        raise RuntimeError(
            f"{len(failures)} of {processes} batch processes failed ({detail}). What the others completed "
            "is journaled: a retry of the task replays it."
        )
    merged = _merge([runs[shard] for shard in range(processes)], len(items), time.monotonic() - started)
    if on_progress is not None:
        on_progress(merged.progress)
    return merged


def _child(
    shard: int,
    processes: int,
    items: Sequence[BatchItem],
    make_client: Callable[[], GovernedClient],
    make_runner: RunnerFactory,
    engines: Sequence[Engine],
    messages: Any,
    send: Connection,
) -> None:
    # Pooled connections belong to the parent; the child opens its own.
    for engine in engines:
        engine.dispose(close=False)
    # The parent's log handlers may write to the task's log channel; a child writing there too would
    # interleave with the parent. Records go to the parent instead.
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.addHandler(logging.handlers.QueueHandler(messages))
    try:
        share = [item for item in items if item.position % processes == shard]
        client = make_client()
        with client:
            runner = make_runner(client)
            # ``concurrency`` is the task's calls in flight, not each process's: the endpoint sees one load.
            share_of_calls = concurrency_share(runner.settings.concurrency, processes, shard)
            runner.settings = runner.settings.model_copy(update={"concurrency": share_of_calls})
            runner.on_progress = lambda progress: messages.put(_Progress(shard, progress))
            run = client.run(runner.run(share, total=len(items)))
        send.send(("run", run))
    except BaseException as error:  # reported to the parent, which fails the task
        with contextlib.suppress(Exception):
            send.send(("error", f"{type(error).__name__}: {error}"))
    finally:
        send.close()
        messages.close()
        messages.join_thread()


def _drain(messages: Any, latest: dict[int, BatchProgress]) -> None:
    while True:
        try:
            message = messages.get_nowait()
        except queue.Empty:
            return
        if isinstance(message, _Progress):
            latest[message.shard] = message.progress
        elif isinstance(message, logging.LogRecord):
            logging.getLogger(message.name).handle(message)


def _combined(parts: Sequence[BatchProgress], total: int, elapsed: float) -> BatchProgress:
    return BatchProgress(
        total=total,
        done=sum(p.done for p in parts),
        ok=sum(p.ok for p in parts),
        replayed=sum(p.replayed for p in parts),
        failed=sum(p.failed for p in parts),
        not_run=sum(p.not_run for p in parts),
        tokens=sum(p.tokens for p in parts),
        cost_usd=sum(p.cost_usd for p in parts),
        elapsed_s=elapsed,
    )


def _merge(runs: Sequence[BatchRun], total: int, elapsed: float) -> BatchRun:
    first_stop = next((run for run in runs if run.stopped), None)
    examples = [example for run in runs for example in run.failure_examples]
    examples.sort(key=lambda outcome: outcome.position)
    return replace(
        runs[0],
        progress=_combined([run.progress for run in runs], total, elapsed),
        http_retries=sum(run.http_retries for run in runs),
        budget_reservations=sum(run.budget_reservations for run in runs),
        spools=[spool for run in runs for spool in run.spools],
        stopped=first_stop.stopped if first_stop else None,
        stopped_by_budget=first_stop.stopped_by_budget if first_stop else False,
        prompt_tokens=sum(run.prompt_tokens for run in runs),
        completion_tokens=sum(run.completion_tokens for run in runs),
        rule=next((run.rule for run in runs if run.rule), None),
        model=next((run.model for run in runs if run.model), None),
        redactions=sum(run.redactions for run in runs),
        fallbacks_tried=tuple(sorted({m for run in runs for m in run.fallbacks_tried})),
        failure_examples=examples[:3],
        processes=len(runs),
        cache_hits=sum(run.cache_hits for run in runs),
        cache_misses=sum(run.cache_misses for run in runs),
    )
