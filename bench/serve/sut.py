"""One LoadGen test against the worker pool: LoadGen issues, the pool answers, LoadGen times."""

from __future__ import annotations

import dataclasses
import queue
import threading
from pathlib import Path
from typing import Optional

from bench.run import timing
from bench.serve import loadgen_logs
from bench.serve.queries import QueryTable, size_summary
from bench.serve.workers import WorkerPool

SCENARIOS = ("singlestream", "server", "offline")
LOADGEN_INSTALL = "pip install mlcommons-loadgen==6.0.17"


class LoadGenMissing(RuntimeError):
    """mlperf_loadgen cannot be imported; the message gives the install command."""


def loadgen():
    """The mlperf_loadgen module, or LoadGenMissing naming the install command."""
    try:
        import mlperf_loadgen
    except ImportError as error:
        raise LoadGenMissing(f"serving needs MLPerf LoadGen (module mlperf_loadgen: {error}); "
                             f"install it with: {LOADGEN_INSTALL}  (or pip install -e "
                             "'.[test]')") from None
    return mlperf_loadgen


@dataclasses.dataclass(frozen=True)
class RunSettings:
    """The LoadGen test settings of one run (recorded in params)."""

    scenario: str
    target_qps: float  # server: Poisson arrival rate; offline: LoadGen's expected QPS
    target_latency_s: float  # the latency bound LoadGen judges the percentile against
    percentile: float  # e.g. 0.99
    min_duration_s: float
    min_query_count: int
    max_duration_s: float  # 0: no cap
    policy_index: int  # which BatchPolicy the workers apply
    seed: int

    def to_dict(self) -> dict:
        """The settings as params."""
        return {"scenario": self.scenario, "target_qps": self.target_qps,
                "sla_ms": round(self.target_latency_s * 1e3, 6),
                "percentile": self.percentile, "min_duration_s": self.min_duration_s,
                "min_query_count": self.min_query_count, "max_duration_s": self.max_duration_s}


@dataclasses.dataclass
class Outcome:
    """What one run gave: LoadGen's figures, what each worker did, and any abort reason."""

    figures: dict
    workers: dict
    served_sizes: dict
    log_dir: Path
    error: str = ""

    @property
    def valid(self) -> bool:
        """LoadGen judged the run VALID (and it was not aborted)."""
        return not self.error and bool(self.figures.get("valid"))


def _test_settings(lg, settings: RunSettings, sample_count: int):
    test = lg.TestSettings()
    test.mode = lg.TestMode.PerformanceOnly
    test.scenario = {"singlestream": lg.TestScenario.SingleStream,
                     "server": lg.TestScenario.Server,
                     "offline": lg.TestScenario.Offline}[settings.scenario]
    latency_ns = int(round(settings.target_latency_s * 1e9))
    if settings.scenario == "server":
        test.server_target_qps = settings.target_qps
        test.server_target_latency_ns = latency_ns
        test.server_target_latency_percentile = settings.percentile
    elif settings.scenario == "offline":
        test.offline_expected_qps = settings.target_qps
    else:
        test.single_stream_expected_latency_ns = latency_ns
        test.single_stream_target_latency_percentile = settings.percentile
    test.min_duration_ms = int(round(settings.min_duration_s * 1e3))
    test.max_duration_ms = int(round(settings.max_duration_s * 1e3))
    test.min_query_count = settings.min_query_count
    test.performance_sample_count_override = sample_count
    test.qsl_rng_seed = test.sample_index_rng_seed = test.schedule_rng_seed = settings.seed
    return test


class _Server:
    """LoadGen's SUT callbacks and the thread that turns worker answers into completions."""

    def __init__(self, lg, pool: WorkerPool, table: QueryTable, policy_index: int,
                 stall_timeout_s: float):
        self.lg, self.pool, self.table = lg, pool, table
        self.policy_index, self.stall_timeout_s = policy_index, stall_timeout_s
        self.lock = threading.Lock()
        self.outstanding: dict[int, int] = {}  # LoadGen response id -> sample index
        self.error = ""
        self.sizes: list[int] = []
        self.workers = {config.index: {"queries": 0, "items": 0, "batches": 0}
                        for config in pool.configs}
        self.finished = threading.Event()
        self.collector = threading.Thread(target=self._collect, daemon=True)

    def issue(self, samples) -> None:
        """LoadGen's issue callback: hand each query to the shared inbox."""
        with self.lock:
            if self.error:  # the run is being ended: answer at once, serve nothing
                self.lg.QuerySamplesComplete([self.lg.QuerySampleResponse(sample.id, 0, 0)
                                              for sample in samples])
                return
            for sample in samples:
                self.outstanding[sample.id] = sample.index
        for sample in samples:
            self.pool.inbox.put((self.policy_index, sample.id, sample.index))

    def flush(self) -> None:
        """LoadGen's flush callback: nothing is held back."""

    def abort(self, reason: str) -> None:
        """End the run: complete every outstanding query now so LoadGen returns."""
        with self.lock:
            if not self.error:
                self.error = reason
            ids = list(self.outstanding)
            self.outstanding.clear()
        if ids:
            self.lg.QuerySamplesComplete([self.lg.QuerySampleResponse(query_id, 0, 0)
                                          for query_id in ids])

    def _collect(self) -> None:
        last_answer_s = timing.monotonic_s()
        while not self.finished.is_set():
            try:
                message = self.pool.outbox.get(timeout=0.1)
            except queue.Empty:
                dead = self.pool.dead()
                if dead:
                    index, code = dead[0]
                    self.abort(f"serving worker {index} died (exit code {code}) during the run")
                elif (self.outstanding and not self.error
                      and timing.monotonic_s() - last_answer_s > self.stall_timeout_s):
                    self.abort(f"no worker answered for {self.stall_timeout_s:g} s with "
                               f"{len(self.outstanding)} queries outstanding (a hung worker)")
                continue
            if message[0] == "failed":
                self.abort(f"serving worker {message[1]}: {message[2]}")
                continue
            if message[0] != "done":
                continue
            last_answer_s = timing.monotonic_s()
            _, worker, answered, batch_items = message
            stats = self.workers[worker]
            stats["batches"] += 1
            responses = []
            with self.lock:
                for query_id, items in answered:
                    sample_index = self.outstanding.pop(query_id, None)
                    if sample_index is None:
                        continue  # already completed by an abort
                    expected = self.table.sizes[sample_index]
                    if items != expected:
                        self.error = self.error or (
                            f"serving worker {worker} answered a query of {expected} items "
                            f"with {items} logits (a batching bug)")
                    responses.append(self.lg.QuerySampleResponse(query_id, 0, 0))
                    self.sizes.append(expected)
                    stats["queries"] += 1
                    stats["items"] += expected
            if responses:
                self.lg.QuerySamplesComplete(responses)


def run_test(pool: WorkerPool, table: QueryTable, settings: RunSettings, log_dir: Path,
             stall_timeout_s: float = 60.0) -> Outcome:
    """Run one LoadGen test and read its figures from the logs LoadGen wrote in log_dir."""
    lg = loadgen()
    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    server = _Server(lg, pool, table, settings.policy_index, stall_timeout_s)
    sut = lg.ConstructSUT(server.issue, server.flush)
    qsl = lg.ConstructQSL(len(table.sizes), len(table.sizes), lambda samples: None,
                          lambda samples: None)
    log_settings = lg.LogSettings()
    log_settings.log_output.outdir = str(log_dir)
    log_settings.log_output.copy_summary_to_stdout = False
    log_settings.enable_trace = False
    server.collector.start()
    try:
        lg.StartTestWithLogSettings(sut, qsl, _test_settings(lg, settings, len(table.sizes)),
                                    log_settings)
    finally:
        server.finished.set()
        server.collector.join()
        lg.DestroyQSL(qsl)
        lg.DestroySUT(sut)
    figures: dict = {}
    error = server.error
    if not error:
        try:
            figures = loadgen_logs.figures(log_dir)
        except loadgen_logs.LoadGenLogError as problem:
            error = str(problem)
    return Outcome(figures=figures, workers=server.workers,
                   served_sizes=size_summary(server.sizes), log_dir=log_dir, error=error)


def bare_forward(pool: WorkerPool, min_run_time_s: float,
                 timeout_s: float = 300.0) -> Optional[dict]:
    """Ask one (idle) worker to time the op's own closure; its summary, or None."""
    pool.inbox.put(("bare", min_run_time_s))
    deadline_s = timing.monotonic_s() + timeout_s
    while timing.monotonic_s() < deadline_s:
        try:
            message = pool.outbox.get(timeout=1.0)
        except queue.Empty:
            if pool.dead():
                return None
            continue
        if message[0] == "bare":
            return message[2]
    return None
