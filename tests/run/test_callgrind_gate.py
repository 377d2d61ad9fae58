"""The instruction gate and the corrected statistics: counts by factor, BH across rows, policies."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from bench.records import ResultRow
from reports import check
from reports.compare import Side, adjust_p_values, compare_rows


def _counted(task_key="k", instructions=1_000_000.0, code_version="cv", **fields) -> ResultRow:
    """An ok row of a --metric instructions run (no times)."""
    return ResultRow(task_key=task_key, op="sls", impl="embedding_bag", fingerprint="fp",
                     code_version=code_version, instructions=instructions,
                     instruction_calls=3, **fields)


def test_instruction_counts_are_decided_by_the_factor():
    baseline = [_counted("same"), _counted("up"), _counted("down"), _counted("small")]
    candidate = [_counted("same"), _counted("up", 1_250_000.0), _counted("down", 700_000.0),
                 _counted("small", 1_010_000.0)]
    verdicts = {v.task_key: v for v in compare_rows(baseline, candidate, factor=0.02,
                                                    metric="instructions")}
    assert verdicts["up"].verdict == "REGRESSED" and verdicts["up"].ratio == pytest.approx(1.25)
    assert "1,000,000 -> 1,250,000" in verdicts["up"].reason
    assert verdicts["down"].verdict == "IMPROVED"
    assert verdicts["small"].verdict == "UNCHANGED" and verdicts["same"].verdict == "UNCHANGED"
    assert all(math.isnan(v.p_value) for v in verdicts.values())


def test_changed_code_is_reported_as_changed_with_its_count_not_as_regressed():
    (verdict,) = compare_rows([_counted()], [_counted(instructions=1_250_000.0,
                                                      code_version="new")],
                              factor=0.02, metric="instructions")
    assert verdict.verdict == "NOT_COMPARABLE"
    assert "impl code changed" in verdict.reason and "x1.250" in verdict.reason


def test_rows_without_counts_are_not_comparable_in_instruction_mode():
    timed = ResultRow(task_key="k", op="sls", impl="embedding_bag", fingerprint="fp",
                      code_version="cv", samples_s="[1.0, 1.0, 1.0]", median_s=1.0)
    (verdict,) = compare_rows([timed], [_counted()], metric="instructions")
    assert verdict.verdict == "NOT_COMPARABLE" and "baseline" in verdict.reason


def test_benjamini_hochberg_raises_a_lone_small_p_among_many_rows():
    adjusted = adjust_p_values([0.004] + [0.5] * 9)
    assert adjusted[0] == pytest.approx(0.04)  # 0.004 x 10 rows / rank 1
    assert all(value <= 1 for value in adjusted)
    assert adjust_p_values([]) == []


def test_p_values_are_adjusted_across_rows():
    # Ten rows: one with a small within-run shift that a lone rank test calls significant.
    baseline = [ResultRow(task_key=f"k{i}", op="op", impl="impl", fingerprint="fp",
                          code_version="cv", samples_s=json.dumps([1.0 + 0.01 * j
                                                                   for j in range(8)]))
                for i in range(10)]
    shifted = [1.5 + 0.01 * j for j in range(8)]
    candidate = [ResultRow(**{**row.__dict__, "samples_s": json.dumps(
        shifted if row.task_key == "k0" else [1.0 + 0.01 * j for j in range(8)])})
        for row in baseline]
    single = compare_rows(baseline[:1], candidate[:1], factor=0.1, alpha=0.01)
    together = {v.task_key: v for v in compare_rows(baseline, candidate, factor=0.1, alpha=0.01)}
    assert together["k0"].p_value > single[0].p_value  # the correction costs the lone row
    assert together["k0"].verdict == "REGRESSED"  # a clear shift still passes it
    assert all(together[f"k{i}"].verdict == "UNCHANGED" for i in range(1, 10))


def test_different_timing_policies_are_not_comparable():
    row = ResultRow(task_key="k", op="op", impl="impl", fingerprint="fp", code_version="cv",
                    samples_s="[1.0, 1.0, 1.0]")
    (verdict,) = compare_rows(Side([row], policy={"min_run_time_s": 0.3}),
                              Side([row], policy={"min_run_time_s": 1.0}))
    assert verdict.verdict == "NOT_COMPARABLE"
    assert "min_run_time_s: 0.3 vs 1.0" in verdict.reason


def _write_run(directory, rows):
    from bench.records import ResultsWriter

    directory.mkdir(parents=True)
    with ResultsWriter(directory / "results.csv") as writer:
        for row in rows:
            writer.write(row)
    return directory


def test_a_failing_instruction_check_names_the_moved_rows_and_the_rebaseline_command(
        tmp_path, capsys):
    baseline = _write_run(tmp_path / "base", [_counted("a"), _counted("b")])
    candidate = _write_run(tmp_path / "cand", [_counted("a"), _counted("b", 1_250_000.0)])
    code = check.run_check(baseline, candidate, factor=0.02, metric="instructions")
    output = capsys.readouterr().out
    assert code == check.EXIT_REGRESSED
    assert "REGRESSED: sls/embedding_bag" in output and "+25.0% instructions" in output
    assert f"--candidate {candidate} --update-baseline" in output


def test_the_check_refuses_a_run_of_the_other_metric(tmp_path, capsys):
    counted = _write_run(tmp_path / "counted", [_counted()])
    code = check.run_check(counted, counted)  # metric time, but the runs hold counts
    assert code == check.EXIT_CANNOT_COMPARE
    assert "add --metric instructions" in capsys.readouterr().err


# --- callgrind: dump parsing and the counter, without Valgrind --------------------------------

_DUMP = """# callgrind format
version: 1
creator: callgrind-3.19.0
desc: I1 cache: 32768 B, 64 B, 8-way associative
desc: D1 cache: 49152 B, 64 B, 12-way associative
desc: LL cache: 33554432 B, 64 B, 16-way associative
desc: Trigger: Client Request
positions: line
events: Ir Dr Dw I1mr D1mr D1mw ILmr DLmr DLmw
summary: 3000 900 300 5 60 30 4 12
fn=(1) f
0 3000 900 300 5 60 30 4 12
totals: 3000 900 300 5 60 30 4 12
"""


def test_a_cache_simulating_dump_gives_counts_and_data_misses_per_call(tmp_path):
    from bench.run import callgrind

    path = tmp_path / "callgrind.out.1"
    path.write_text(_DUMP)
    dump = callgrind.parse_dump(path)
    assert dump["events"]["Ir"] == 3000 and dump["events"]["DLmw"] == 0  # trailing zero
    assert dump["caches"]["D1"].startswith("49152 B")
    figures = callgrind.per_call(dump["events"], calls=3)
    assert figures == {"instructions": 1000.0, "d1_misses": 30.0, "ll_misses": 4.0}
    assert callgrind.per_call({"Ir": 10}, 2) == {"instructions": 5.0}  # no cache simulation


def test_a_file_that_is_not_a_dump_is_refused(tmp_path):
    from bench.run import callgrind

    path = tmp_path / "callgrind.out.1"
    path.write_text("not a dump\n")
    with pytest.raises(callgrind.CallgrindError, match="not a callgrind dump"):
        callgrind.parse_dump(path)


def test_the_counter_collects_exactly_the_counted_calls(tmp_path, monkeypatch):
    """Warm-up calls run outside the collected window; each dump holds calls_per_count calls."""
    from bench.run import callgrind

    counter = callgrind.Counter(tmp_path)
    collecting = []
    calls = {"total": 0, "collected": 0}

    def work():
        calls["total"] += 1
        calls["collected"] += bool(collecting)

    def toggle():
        collecting.append(True)

    def toggle_and_dump():  # what callgrind writes: the collected calls' instructions
        collecting.clear()
        dump = _DUMP.replace("3000", str(500 * calls["collected"]))
        (tmp_path / f"callgrind.out.{counter.dumps + 1}").write_text(dump)
        calls["collected"] = 0

    monkeypatch.setattr(counter, "_toggle", toggle)
    monkeypatch.setattr(counter, "_toggle_and_dump", toggle_and_dump)
    count = counter.count(work, callgrind.CountPolicy(warmup_calls=2, calls_per_count=4,
                                                      counts=2))
    assert calls["total"] == 2 + 4 * 2
    assert count.median("instructions") == 500.0 and count.calls == 8
    assert not list(tmp_path.iterdir())  # dumps are read and removed


def test_counting_outside_valgrind_fails_with_a_clear_message(tmp_path, monkeypatch):
    from bench.run import callgrind

    counter = callgrind.Counter(tmp_path)
    monkeypatch.setattr(counter, "_toggle", lambda: None)
    monkeypatch.setattr(counter, "_toggle_and_dump", lambda: None)
    with pytest.raises(callgrind.CallgrindError, match="not running under valgrind"):
        counter.count_once(lambda: None, 1)


def test_instruction_mode_without_valgrind_is_refused_before_any_work(monkeypatch, tmp_path,
                                                                      capsys):
    from bench.commands import main
    from bench.run import callgrind

    monkeypatch.setattr(callgrind, "valgrind_path", lambda: None)
    code = main(["--metric", "instructions", "--ops", "sls", "--workload", "smoke",
                 "--out", str(tmp_path)])
    assert code == 2 and "apt-get install valgrind" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())
    assert main(["--cache-sim", "--ops", "sls", "--out", str(tmp_path)]) == 2
    assert "--cache-sim needs --metric instructions" in capsys.readouterr().err


@pytest.mark.slow
def test_a_sweep_under_callgrind_records_counts_and_what_ran(tmp_path):
    """One worker under callgrind (about a minute of Valgrind start-up): counts, no times."""
    import subprocess
    import sys

    from bench import PROJECT_ROOT
    from bench.records import read_rows
    from bench.run import callgrind

    if callgrind.valgrind_path() is None:
        pytest.skip("valgrind is not installed (apt-get install valgrind)")
    command = [sys.executable, "run_bench.py", "--metric", "instructions", "--cache-sim",
               "--ops", "sls", "--impls", "embedding_bag", "--workload", "smoke",
               "--precision", "fp32", "--sls-modes", "sum", "--calls-per-rep", "2",
               "--no-report", "--out", str(tmp_path), "--run-id", "counted"]
    finished = subprocess.run(command, cwd=PROJECT_ROOT, capture_output=True, text=True,
                              timeout=900)
    assert finished.returncode == 0, finished.stderr[-2000:]
    (row,) = read_rows(tmp_path / "counted" / "results.csv")
    policy = callgrind.CountPolicy()
    assert row.status == "ok" and row.instructions > 0
    assert row.instruction_calls == policy.calls_per_count * policy.counts
    assert row.d1_misses_simulated >= 0 and row.ll_misses_simulated >= 0
    assert math.isnan(row.median_s) and row.samples_s == "[]"  # nothing timed under Valgrind
    assert "avx512" not in row.isa_effective.lower()  # Valgrind hides AVX-512 and AMX
    metrics = json.loads(row.metrics)
    assert metrics["calls_per_rep"] == 2 and "D1" in metrics["simulated_caches"]
    assert not list((tmp_path / "counted").glob("callgrind-*"))  # dumps cleaned up


def test_the_report_labels_simulated_misses_as_simulated():
    from reports import build, runs, values, workingset

    counted = _counted(d1_misses_simulated=2000.0, ll_misses_simulated=100.0)
    timed = ResultRow(task_key="t", op="sls", impl="embedding_bag", median_s=1.0)
    frame = runs.rows_to_frame([counted, timed])
    table = workingset.simulated_misses_table(frame)
    assert len(table) == 1 and table.loc[0, "d1_misses_per_kinstr"] == pytest.approx(2.0)
    assert table.loc[0, "ll_bytes_simulated"] == values.format_bytes(6400)
    section = build.working_set_section(frame, {})
    assert section.blocks[0].title.startswith("SIMULATED cache misses")
    assert workingset.simulated_misses_table(runs.rows_to_frame([timed])).empty


def test_checker_power_refuses_bad_input_before_any_sweep(tmp_path, capsys, monkeypatch):
    import importlib.util
    import sys

    from bench import PROJECT_ROOT

    spec = importlib.util.spec_from_file_location("checker_power",
                                                  PROJECT_ROOT / "tools" / "checker_power.py")
    tool = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "checker_power", tool)  # dataclasses look the module up
    spec.loader.exec_module(tool)
    assert tool.main(["--mode", "ab", "--rounds", "1", "--out", str(tmp_path / "x")]) == 2
    assert "--rounds must be >= 2" in capsys.readouterr().err
    assert tool.main(["--pairs", "0", "--out", str(tmp_path / "x")]) == 2
    assert not (tmp_path / "x").exists()
    verdicts = [type("V", (), {"verdict": "UNCHANGED", "ratio": 1.004})(),
                type("V", (), {"verdict": "REGRESSED", "ratio": 0.99})(),
                type("V", (), {"verdict": "NEW", "ratio": 3.0})()]
    assert tool._largest_change(verdicts) == pytest.approx(0.01)  # NEW rows are not tested


def _load_checker_power(monkeypatch):
    """tools/checker_power.py as a module (it is a script, not a package member)."""
    import importlib.util
    import sys

    from bench import PROJECT_ROOT

    spec = importlib.util.spec_from_file_location("checker_power",
                                                  PROJECT_ROOT / "tools" / "checker_power.py")
    tool = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "checker_power", tool)  # dataclasses look the module up
    spec.loader.exec_module(tool)
    return tool


def test_checker_power_refuses_bad_round_counts(tmp_path, capsys, monkeypatch):
    tool = _load_checker_power(monkeypatch)
    out = tmp_path / "x"
    for bad in ("1", "8", "three", ""):
        assert tool.main(["--mode", "ab", "--rounds", "7", "--evaluate-rounds", bad,
                          "--out", str(out)]) == 2
        assert "--evaluate-rounds must list integers in 2..7" in capsys.readouterr().err
    assert tool.main(["--mode", "ci", "--evaluate-rounds", "3", "--out", str(out)]) == 2
    assert "applies to --mode ab only" in capsys.readouterr().err
    assert not out.exists()


def test_an_ab_pair_is_checked_on_each_prefix_of_its_rounds(tmp_path, monkeypatch):
    """The first K rounds decide a K-round check: a slowdown that only the later rounds show
    is invisible to the 2-round prefix and found by all 6."""
    from reports.merge import write_results

    tool = _load_checker_power(monkeypatch)
    pair = tmp_path / "power-1"
    # Per-round B/A ratios: 1.0 and 1.01 in the first two rounds, about 1.3 after.
    ratios = (1.0, 1.01, 1.30, 1.31, 1.30, 1.29)
    for number, ratio in enumerate(ratios, start=1):
        for side, median in (("A", 1.0), ("B", ratio)):
            samples = [median * (1 + 0.001 * k) for k in range(5)]
            row = ResultRow(task_key="t", op="sls", impl="embedding_bag", workload="smoke",
                            precision="fp32", status="ok", fingerprint="fp", code_version="cv",
                            samples_s=json.dumps(samples), n_samples=5,
                            median_s=float(np.median(samples)),
                            metrics='{"calls_per_rep":1}')
            write_results([row], pair / f"{side}-{number}")
    records = tool._check_pair("ab", "power", 1, pair / "A", pair / "B",
                               [tool.Setting("ab", 0.1, 0.05)], [2, 6])
    by_rounds = {record["rounds"]: record for record in records}
    assert by_rounds[2]["regressed"] == 0 and by_rounds[2]["rows_tested"] == 1
    assert by_rounds[2]["geomean_ratio"] == pytest.approx(math.sqrt(1.01), rel=1e-3)
    assert by_rounds[6]["regressed"] == 1
    assert by_rounds[6]["geomean_ratio"] == pytest.approx(math.prod(ratios) ** (1 / 6), rel=1e-3)
    # Merged sides per prefix pool exactly that prefix's rounds.
    assert (pair / "first-2" / "A" / "results.csv").exists()
