"""Co-located serving workers: each a process pinned to its cores, building and checking the
model, then answering queries from the shared inbox with its own dynamic batcher."""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import queue
import signal
import traceback
import warnings
from typing import Any, Optional

from bench import faults
from bench.faults import PlantedFault
from bench.run import lifeline
from bench.serve.batching import STOP, Batcher, BatchPolicy, Query
from bench.serve.queries import QueryTable

READY_TIMEOUT_S = 900.0  # building a large model (or torch.compile) can take minutes


@dataclasses.dataclass(frozen=True)
class WorkerConfig:
    """What one serving worker builds and how it serves."""

    index: int
    first_cpu: int  # pinned to CPUs [first_cpu, first_cpu + threads) of the allowed ones
    threads: int
    workload: Any  # workloads.specs.WorkloadSpec
    impl: str  # a dlrm_infer impl
    precision: str
    seed: int
    policies: tuple[BatchPolicy, ...]
    table: QueryTable
    fault: Optional[PlantedFault] = None  # what a test plants (bench/faults.py, serve.batch)
    device: str = "cpu"  # cpu, or the one GPU this worker serves on (cuda:N)


def _message(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}".replace("\n", " ")[:400]


def build_checked(config: WorkerConfig):
    """The impl's Prepared, checked against its float64 reference; (prepared, check facts)."""
    import torch

    from bench import registry
    from bench.records import ResultRow
    from bench.registry import BuildContext
    from bench.run.worker import check

    implementation = registry.impls("dlrm_infer")[config.impl]
    prepared = implementation.build(BuildContext(
        workload=config.workload, variant={}, precision=config.precision,
        device=torch.device(config.device), seed=config.seed))
    if prepared.forward is None:
        raise RuntimeError(f"dlrm_infer impl {config.impl!r} has no forward to serve")
    scratch = ResultRow()
    problem = check(prepared, scratch, config.precision)
    if problem:
        raise ValueError(problem)
    return prepared, {"rel_error": scratch.rel_error, "check": scratch.metrics,
                      "code_version": implementation.code_version,
                      "model_params": prepared.params}


def warm_up_windows(items: int, pool_rows: int) -> list[tuple[int, int]]:
    """Windows of the pool that add up to items rows (a batch may be larger than the pool)."""
    windows = [(0, pool_rows)] * (items // pool_rows)
    return windows + ([(0, items % pool_rows)] if items % pool_rows else [])


def serve_forever(config: WorkerConfig, inbox, outbox) -> None:
    """A worker process's body: build, check, warm up, report ready, then serve until STOP."""
    parent = multiprocessing.parent_process()
    if parent is not None:
        # A serve command killed outright runs no cleanup, and this worker holds the write
        # end of its own inbox: it would wait (or serve) forever as an orphan.
        lifeline.die_with_parent(parent.pid, signal.SIGKILL)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message=".*quantiz.*")
    try:
        import torch

        from bench.run import timing
        from bench.run.worker import pin_threads
        from bench.serve.pool import SamplePool

        cpus = pin_threads(config.threads, config.device, config.first_cpu)
        prepared, facts = build_checked(config)
        pool = SamplePool(config.workload, config.seed, config.table.pool_rows, config.device)
        forward = prepared.forward
        # Warm-up outside LoadGen's clock: the largest merged batch and a small one (a
        # compiled impl compiles again for a new batch size, then runs with dynamic shapes).
        largest = max([max(config.table.sizes)]
                      + [policy.max_batch_items for policy in config.policies])
        for items in (largest, 1, 3, max(config.table.sizes)):
            forward(*pool.batch(warm_up_windows(items, config.table.pool_rows)))
    except Exception as error:
        outbox.put(("failed", config.index, _message(error), traceback.format_exc(limit=4)))
        return
    outbox.put(("ready", config.index, {**facts, "cpus": cpus, "pid": os.getpid(),
                                        "device": config.device}))
    batches = 0
    answered_items: dict[int, int] = {}

    def receive(timeout_s: Optional[float]):
        try:
            message = inbox.get(timeout=timeout_s)
        except queue.Empty:
            return None
        if message[0] == "stop":
            return STOP
        if message[0] == "bare":
            # The op's own timed closure (the bare dlrm_infer batch), by the project's timing.
            policy = timing.TimingPolicy(min_run_time_s=float(message[1]), min_samples=10)
            summary, _ = timing.measure(prepared.run, torch.device(config.device), policy,
                                        config.threads)
            outbox.put(("bare", config.index, {"median_s": summary.median_s,
                                               "iqr_s": summary.iqr_s,
                                               "samples": prepared.samples}))
            return None
        policy_index, response_id, sample_index = message
        return Query(policy_index, response_id, config.table.starts[sample_index],
                     config.table.sizes[sample_index])

    batcher = Batcher(list(config.policies), receive, timing.monotonic_s)
    while True:
        pieces = batcher.next_batch()
        if pieces is None:
            break
        faults.trigger(config.fault, "serve.batch", visit=batches)
        logits = forward(*pool.batch([(piece.start, piece.items) for piece in pieces]))
        items = sum(piece.items for piece in pieces)
        produced = int(logits.shape[0])
        if produced != items or not bool(torch.isfinite(logits).all()):
            outbox.put(("failed", config.index, f"the model returned {produced} logits (finite: "
                        f"{bool(torch.isfinite(logits).all())}) for a batch of {items} items",
                        ""))
            return
        batches += 1
        done = []
        for piece in pieces:
            total = answered_items.pop(piece.query.response_id, 0) + piece.items
            if piece.last:
                done.append((piece.query.response_id, total))
            else:
                answered_items[piece.query.response_id] = total
        outbox.put(("done", config.index, done, items))


class WorkerPool:
    """N spawned, pinned workers sharing one inbox (queries) and one outbox (answers)."""

    def __init__(self, configs: list[WorkerConfig]):
        context = multiprocessing.get_context("spawn")  # a fresh interpreter: no forked torch
        self.inbox = context.Queue()
        self.outbox = context.Queue()
        self.configs = configs
        self.processes = [context.Process(target=serve_forever, args=(config, self.inbox,
                                                                      self.outbox),
                                          name=f"serve-worker-{config.index}", daemon=True)
                          for config in configs]
        self.facts: dict[int, dict] = {}

    def start(self, on_progress=None) -> None:
        """Start every worker and wait until each has checked its model; RuntimeError with
        the reason when one fails or dies."""
        for process in self.processes:
            process.start()
        waiting = set(range(len(self.processes)))
        while waiting:
            try:
                message = self.outbox.get(timeout=1.0)
            except queue.Empty:
                dead = self.dead()
                if dead:
                    raise RuntimeError(f"serving worker {dead[0][0]} died while building its "
                                       f"model (exit code {dead[0][1]})") from None
                continue
            if message[0] == "failed":
                raise RuntimeError(f"serving worker {message[1]}: {message[2]}")
            if message[0] == "ready":
                self.facts[message[1]] = message[2]
                waiting.discard(message[1])
                if on_progress is not None:
                    on_progress(message[1])

    def dead(self) -> list[tuple[int, Optional[int]]]:
        """(worker index, exit code) of each worker that is no longer running."""
        return [(config.index, process.exitcode)
                for config, process in zip(self.configs, self.processes)
                if process.exitcode is not None]

    def stop(self, timeout_s: float = 10.0) -> None:
        """Tell the workers to finish; end any that do not within timeout_s."""
        for _ in self.processes:
            try:
                self.inbox.put(("stop",))
            except (OSError, ValueError):
                break
        for process in self.processes:
            process.join(timeout_s)
            if process.is_alive():
                process.terminate()
                process.join(timeout_s)
        # The queues' feeder threads must not block interpreter exit on undelivered items.
        for channel in (self.inbox, self.outbox):
            channel.cancel_join_thread()
            channel.close()
