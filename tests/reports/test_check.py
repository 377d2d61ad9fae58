"""Tests of the regression checker: verdict rules, table, verdicts.csv, exit codes, baselines."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest

from bench.records import ResultRow, read_rows
from reports.check import (
    CheckInputError,
    baseline_path,
    load_results,
    main,
    render_table,
    run_check,
    update_baseline,
    write_verdicts_csv,
)
from reports.compare import VERDICTS, Side, Verdict, compare_rows, geometric_mean_ratio
from conftest import FIXTURES_DIR

FIXTURES = FIXTURES_DIR / "check"
BASELINE_RUN = FIXTURES / "baseline_run"
CANDIDATE_RUN = FIXTURES / "candidate_run"
CLEAN_RUN = FIXTURES / "clean_run"


@pytest.fixture(scope="module")
def verdicts_by_key() -> dict[str, Verdict]:
    """Verdicts of the candidate fixture run against the baseline fixture run."""
    verdicts = compare_rows(load_results(BASELINE_RUN), load_results(CANDIDATE_RUN))
    return {verdict.task_key: verdict for verdict in verdicts}


def _row(task_key="key", status="ok", samples=(1.0, 1.0, 1.0), error="", **fields) -> ResultRow:
    """A ResultRow built in code for the rules that need no fixture file."""
    return ResultRow(
        task_key=task_key,
        op="op",
        impl="impl",
        fingerprint=fields.pop("fingerprint", "fp"),
        code_version=fields.pop("code_version", "cv"),
        status=status,
        error=error,
        samples_s=json.dumps(list(samples)),
        **fields,
    )


def test_every_verdict_is_reached_with_the_expected_row(verdicts_by_key):
    expected = {
        "improved": "IMPROVED",
        "regressed": "REGRESSED",
        "noisy_equal": "UNCHANGED",
        "small_shift": "UNCHANGED",
        "new": "NEW",
        "missing": "MISSING",
        "newly_failing": "NEWLY_FAILING",
        "fixed": "FIXED",
        "both_error": "NOT_COMPARABLE",
        "both_skipped": "NOT_COMPARABLE",
        "other_fingerprint": "NOT_COMPARABLE",
        "code_changed": "NOT_COMPARABLE",
        "few_samples": "NOT_COMPARABLE",
    }
    assert {key: v.verdict for key, v in verdicts_by_key.items()} == expected
    # INCONCLUSIVE needs the spread between processes: tests/reports/test_replicates.py.
    assert set(expected.values()) == set(VERDICTS) - {"INCONCLUSIVE"}


def test_improved_and_regressed_carry_ratio_and_significant_p(verdicts_by_key):
    improved, regressed = verdicts_by_key["improved"], verdicts_by_key["regressed"]
    assert improved.ratio == pytest.approx(0.70)
    assert regressed.ratio == pytest.approx(1.50)
    assert improved.p_value < 0.01 and regressed.p_value < 0.01
    assert (regressed.op, regressed.impl, regressed.workload, regressed.precision) == (
        "embedding_bag",
        "naive",
        "small",
        "fp32",
    )


def test_not_comparable_reasons_name_the_cause(verdicts_by_key):
    assert verdicts_by_key["other_fingerprint"].reason == (
        "different host or timing policy: fingerprint fp-a1b2c3 vs fp-ffff00; the baseline and "
        "candidate record no fingerprint facts, so what differs cannot be listed"
    )
    assert verdicts_by_key["code_changed"].reason == "impl code changed; re-baseline"
    few = verdicts_by_key["few_samples"]
    assert "too few samples" in few.reason and "candidate 2" in few.reason
    # Nothing is measured in a NOT_COMPARABLE row, so nothing leaks into the geometric mean.
    for key in ("other_fingerprint", "code_changed", "few_samples", "both_error"):
        assert math.isnan(verdicts_by_key[key].ratio)
        assert math.isnan(verdicts_by_key[key].p_value)


def test_failures_carry_their_messages(verdicts_by_key):
    assert "RuntimeError: shape mismatch" in verdicts_by_key["newly_failing"].reason
    assert "RuntimeError: out of memory" in verdicts_by_key["fixed"].reason
    assert verdicts_by_key["both_error"].reason == (
        "error in both runs: NotImplementedError: int8 bag"
    )
    assert verdicts_by_key["both_skipped"].reason.startswith("skipped in both runs")


def test_noisy_equal_distributions_are_unchanged(verdicts_by_key):
    # Same spread of +-20% around 0.5 ms, different draws: no evidence of a change.
    noisy = verdicts_by_key["noisy_equal"]
    assert noisy.verdict == "UNCHANGED"
    assert noisy.p_value >= 0.01
    assert "not significant" in noisy.reason


def test_small_real_shift_is_significant_but_below_factor(verdicts_by_key):
    shifted = verdicts_by_key["small_shift"]
    assert shifted.p_value < 0.01
    assert shifted.ratio == pytest.approx(1.05, abs=0.002)
    assert shifted.verdict == "UNCHANGED"
    assert "within" in shifted.reason


def test_a_large_ratio_without_significance_is_unchanged():
    # A 2x median with only 3 samples each can never reach p < 0.01 in a rank test.
    baseline = [_row(samples=(1.0, 1.1, 0.9))]
    candidate = [_row(samples=(2.0, 2.1, 1.9))]
    (verdict,) = compare_rows(baseline, candidate)
    assert verdict.verdict == "UNCHANGED"
    assert verdict.ratio == pytest.approx(2.0)
    assert verdict.p_value >= 0.01


def test_factor_and_alpha_are_honoured(verdicts_by_key):
    rows = load_results(BASELINE_RUN), load_results(CANDIDATE_RUN)
    loose = {v.task_key: v.verdict for v in compare_rows(*rows, factor=0.01)}
    assert loose["small_shift"] == "REGRESSED"
    strict = {v.task_key: v.verdict for v in compare_rows(*rows, alpha=1e-6)}
    assert strict["regressed"] == "UNCHANGED"


@pytest.mark.parametrize(
    ("baseline_status", "candidate_status", "expected"),
    [
        ("ok", "error", "NEWLY_FAILING"),
        ("skipped", "error", "NEWLY_FAILING"),
        ("error", "ok", "FIXED"),
        ("error", "error", "NOT_COMPARABLE"),
        ("skipped", "skipped", "NOT_COMPARABLE"),
        ("ok", "skipped", "NOT_COMPARABLE"),
        ("skipped", "ok", "NOT_COMPARABLE"),
        ("error", "skipped", "NOT_COMPARABLE"),
    ],
)
def test_status_transitions(baseline_status, candidate_status, expected):
    baseline = [_row(status=baseline_status, error="why" * (baseline_status != "ok"))]
    candidate = [_row(status=candidate_status, error="why" * (candidate_status != "ok"))]
    (verdict,) = compare_rows(baseline, candidate)
    assert verdict.verdict == expected
    assert "why" in verdict.reason


def test_a_crash_after_a_code_change_is_still_newly_failing():
    baseline = [_row(code_version="old")]
    candidate = [_row(code_version="new", status="error", error="boom")]
    assert compare_rows(baseline, candidate)[0].verdict == "NEWLY_FAILING"


def test_duplicate_task_keys_raise():
    with pytest.raises(ValueError, match="duplicate task_key 'clean_emb'"):
        compare_rows(load_results(FIXTURES / "duplicate_keys.csv"), load_results(CLEAN_RUN))
    with pytest.raises(ValueError, match="in the candidate"):
        compare_rows([], [_row("twice"), _row("twice")])


def test_geometric_mean_on_a_hand_case():
    def verdict(ratio: float) -> Verdict:
        return Verdict("k", "op", "impl", "w", "fp32", "UNCHANGED", ratio=ratio)

    # (2 * 8 * 0.25)^(1/3) = 4^(1/3); NaN ratios are left out.
    ratios = [verdict(2.0), verdict(8.0), verdict(0.25), verdict(math.nan)]
    assert geometric_mean_ratio(ratios) == pytest.approx(4 ** (1 / 3))
    assert geometric_mean_ratio([verdict(0.5), verdict(2.0)]) == pytest.approx(1.0)
    assert math.isnan(geometric_mean_ratio([verdict(math.nan)]))


def test_run_checked_against_itself_exits_zero(tmp_path, capsys):
    assert run_check(CLEAN_RUN, CLEAN_RUN, out_dir=tmp_path) == 0
    output = capsys.readouterr().out
    assert "REGRESSED" not in output and "OK: no regression" in output
    verdicts = pd.read_csv(tmp_path / "verdicts.csv")
    assert set(verdicts["verdict"]) == {"UNCHANGED"}
    assert (verdicts["ratio"] == 1.0).all()


def test_baseline_at_six_tenths_regresses_and_prints_the_rebaseline_command(tmp_path, capsys):
    # A host known to be quiet between processes (sd 0.02); by default 1.67x is INCONCLUSIVE.
    code = run_check(FIXTURES / "baseline_fast.csv", CLEAN_RUN, out_dir=tmp_path,
                     process_sd=0.02)
    assert code == 1
    output = capsys.readouterr().out
    verdicts = pd.read_csv(tmp_path / "verdicts.csv")
    assert set(verdicts["verdict"]) == {"REGRESSED"}
    assert verdicts["ratio"].to_numpy() == pytest.approx(1 / 0.6, rel=1e-6)
    assert f"python run_bench.py check --candidate {CLEAN_RUN} --update-baseline" in output


def test_newly_failing_alone_exits_one(tmp_path):
    candidate = tmp_path / "candidate.csv"
    rows = read_rows(CLEAN_RUN / "results.csv")
    text = (CLEAN_RUN / "results.csv").read_text()
    assert rows[0].task_key == "clean_emb"
    # Turn the first data row into a failure by editing its status and error cells.
    lines = text.splitlines()
    lines[1] = lines[1].replace("{},ok,,", "{},error,RuntimeError: boom,")
    candidate.write_text("\n".join(lines) + "\n")
    assert run_check(CLEAN_RUN, candidate, out_dir=tmp_path) == 1
    verdicts = pd.read_csv(tmp_path / "verdicts.csv").set_index("task_key")
    assert verdicts.loc["clean_emb", "verdict"] == "NEWLY_FAILING"


def _same_host_candidate(tmp_path: Path) -> Path:
    """The candidate fixture run without its row from another fingerprint."""
    run = tmp_path / "run"
    run.mkdir()
    lines = (CANDIDATE_RUN / "results.csv").read_text().splitlines()
    (run / "results.csv").write_text(
        "\n".join(line for line in lines if "fp-ffff00" not in line) + "\n")
    return run


def test_custom_rebaseline_hint_is_printed_verbatim(tmp_path, capsys):
    run_check(BASELINE_RUN, _same_host_candidate(tmp_path), out_dir=tmp_path,
              rebaseline_hint="make rebaseline")
    assert "re-baseline with: make rebaseline" in capsys.readouterr().out


def test_missing_baseline_exits_two_with_one_stderr_line(tmp_path, capsys):
    assert run_check(tmp_path / "nope.csv", CLEAN_RUN, out_dir=tmp_path) == 2
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and "nope.csv" in captured.err
    assert not (tmp_path / "verdicts.csv").exists()


def test_missing_stored_baseline_for_fingerprint_exits_two(tmp_path, capsys):
    assert run_check(None, CLEAN_RUN, out_dir=tmp_path, baselines_root=tmp_path) == 2
    err = capsys.readouterr().err
    assert "fp-a1b2c3" in err and "--update-baseline" in err


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("malformed_header.csv", "not a dlrm-bench results CSV"),
        ("malformed_number.csv", "malformed cell"),
        ("malformed_samples.csv", "samples_s is not a JSON list"),
        ("duplicate_keys.csv", "duplicate task_key"),
    ],
)
def test_malformed_baseline_exits_two(tmp_path, capsys, name, message):
    assert run_check(FIXTURES / name, CLEAN_RUN, out_dir=tmp_path) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_load_results_accepts_a_directory_or_a_file_and_rejects_garbage():
    from_directory = load_results(CLEAN_RUN)
    from_file = load_results(CLEAN_RUN / "results.csv")
    assert [row.task_key for row in from_directory] == ["clean_emb", "clean_mlp", "clean_dot"]
    assert from_directory == from_file
    with pytest.raises(CheckInputError, match="no such run directory"):
        load_results(FIXTURES / "does_not_exist")
    with pytest.raises(CheckInputError) as error:
        load_results(FIXTURES / "malformed_number.csv")
    assert "\n" not in str(error.value)


def test_verdicts_csv_is_written_into_the_candidate_run_by_default(tmp_path):
    candidate = _same_host_candidate(tmp_path)
    assert run_check(BASELINE_RUN, candidate) == 1
    verdicts = pd.read_csv(candidate / "verdicts.csv", keep_default_na=False)
    assert list(verdicts.columns) == [
        "task_key", "op", "impl", "workload", "precision", "verdict", "ratio", "p_value", "reason"
    ]
    assert len(verdicts) == 13  # other_fingerprint, left out of the candidate, is MISSING
    by_key = verdicts.set_index("task_key")
    assert by_key.loc["missing", "ratio"] == ""  # NaN is written as an empty cell
    assert float(by_key.loc["regressed", "ratio"]) == pytest.approx(1.5)


def test_write_verdicts_csv_replaces_atomically(tmp_path):
    path = tmp_path / "out" / "verdicts.csv"
    path.parent.mkdir()
    path.write_text("stale\n")
    verdict = Verdict("k", "op", "impl", "w", "fp32", "REGRESSED", 1.5, 0.001, "slower")
    write_verdicts_csv([verdict], path)
    table = pd.read_csv(path)
    assert table.loc[0, "verdict"] == "REGRESSED" and table.loc[0, "p_value"] == 0.001
    assert sorted(p.name for p in path.parent.iterdir()) == ["verdicts.csv"]  # no temp left


def test_render_table_is_fixed_width_and_ends_with_geomean(verdicts_by_key):
    verdicts = list(verdicts_by_key.values())
    table = render_table(verdicts)
    lines = table.splitlines()
    assert lines[0].split() == [
        "op", "impl", "workload", "precision", "ratio", "p-value", "verdict", "reason"
    ]
    verdict_column = lines[0].index("verdict")
    for line in lines[2:-2]:
        assert line[verdict_column:].split()[0] in VERDICTS
    assert lines[-1].startswith("geomean")
    # Ratios 0.7, 1.5, 1.02 and 1.05 (by medians) give this geometric mean.
    assert f"{geometric_mean_ratio(verdicts):.3f}" in lines[-1]
    assert geometric_mean_ratio(verdicts) == pytest.approx((0.7 * 1.5 * 1.02 * 1.05) ** 0.25, 1e-3)
    assert "over 4 rows with a ratio" in lines[-1] and "1 REGRESSED" in lines[-1]


def test_baseline_path_uses_the_fingerprint():
    assert baseline_path("fp-a1b2c3") == Path("results/baselines/fp-a1b2c3.csv")
    assert baseline_path("abc", root="/tmp/b") == Path("/tmp/b/abc.csv")
    with pytest.raises(ValueError):
        baseline_path("../escape")


def test_update_baseline_then_check_against_it(tmp_path, capsys):
    path = update_baseline(CLEAN_RUN, root=tmp_path)
    assert path == tmp_path / "fp-a1b2c3.csv"
    assert read_rows(path) == read_rows(CLEAN_RUN / "results.csv")
    assert run_check(None, CLEAN_RUN, out_dir=tmp_path, baselines_root=tmp_path) == 0


def test_update_baseline_keeps_only_ok_rows(tmp_path):
    candidate = tmp_path / "candidate.csv"
    # The fixture candidate mixes fingerprints on purpose; keep only the common one.
    lines = (CANDIDATE_RUN / "results.csv").read_text().splitlines()
    candidate.write_text("\n".join(line for line in lines if "fp-ffff00" not in line) + "\n")
    path = update_baseline(candidate, root=tmp_path / "baselines")
    stored = read_rows(path)
    assert stored and all(row.status == "ok" for row in stored)
    assert "newly_failing" not in {row.task_key for row in stored}
    assert "fixed" in {row.task_key for row in stored}


def test_update_baseline_refuses_mixed_fingerprints(tmp_path):
    with pytest.raises(CheckInputError, match="fp-a1b2c3.*fp-ffff00"):
        update_baseline(CANDIDATE_RUN, root=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_command_line_entry_point(tmp_path, capsys):
    arguments = ["--candidate", str(CLEAN_RUN), "--baselines-root", str(tmp_path)]
    assert main([*arguments, "--out-dir", str(tmp_path)]) == 2
    assert main([*arguments, "--update-baseline"]) == 0
    assert main([*arguments, "--out-dir", str(tmp_path)]) == 0
    fast = ["--baseline", str(FIXTURES / "baseline_fast.csv"), "--out-dir", str(tmp_path)]
    assert main([*arguments, *fast]) == 0  # 1.67x, one process a side: INCONCLUSIVE
    assert main([*arguments, *fast, "--process-sd", "0.02"]) == 1
    output = capsys.readouterr().out
    assert f"--baselines-root {tmp_path}" in output


# Fingerprint facts as env.json records them (bench.run.devices.fingerprint_facts), for two hosts
# of one brand string that differ in L3 size, and a timing policy that differs too.
HOST_FACTS = {
    "cpu_model": "Intel(R) Xeon(R) Processor", "cpu_vendor": "GenuineIntel", "cpu_family": "6",
    "cpu_model_number": "143", "cpu_stepping": "8", "l1d_bytes": 49152, "l2_bytes": 2097152,
    "l3_bytes": 105 * 2**20, "logical_cpus": 2, "physical_cores": 1, "memory_total_gib": 24,
    "torch_version": "2.13.0+cpu", "device": "cpu", "device_name": "Intel(R) Xeon(R) Processor",
    "isa": "native", "threads": 1,
    "timing_policy": {"max_run_time_s": 5.0, "min_run_time_s": 0.3, "min_samples": 10,
                      "warmup_calls": 2},
}


def _run_with_facts(directory: Path, fingerprint: str, facts: dict) -> Path:
    """CLEAN_RUN's rows under another fingerprint, with env.json recording its facts."""
    directory.mkdir()
    text = (CLEAN_RUN / "results.csv").read_text().replace("fp-a1b2c3", fingerprint)
    (directory / "results.csv").write_text(text)
    (directory / "env.json").write_text(json.dumps({"fingerprint_facts": {fingerprint: facts}}))
    return directory


def _other_host_facts() -> dict:
    return {**HOST_FACTS, "l3_bytes": 480 * 2**20,
            "timing_policy": {**HOST_FACTS["timing_policy"], "min_run_time_s": 0.5}}


def test_different_fingerprints_are_not_compared_and_the_differing_facts_are_named(
        tmp_path, capsys):
    baseline = _run_with_facts(tmp_path / "base", "fp-host-a", HOST_FACTS)
    candidate = _run_with_facts(tmp_path / "cand", "fp-host-b", _other_host_facts())
    # The candidate's samples equal the baseline's: a comparison would say UNCHANGED, exit 0.
    assert run_check(baseline, candidate, out_dir=tmp_path) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1
    assert captured.err.startswith("check: cannot compare: NOT_COMPARABLE")
    assert "fp-host-a vs fp-host-b" in captured.err
    assert "l3: 105 MiB vs 480 MiB" in captured.err
    assert "timing_policy.min_run_time_s: 0.3 vs 0.5" in captured.err
    assert "cpu_vendor" not in captured.err and "l2:" not in captured.err  # only what differs
    assert not (tmp_path / "verdicts.csv").exists()


def test_mixed_fingerprint_candidate_is_not_compared(capsys, tmp_path):
    # The fixture candidate holds one row from fingerprint fp-ffff00 among fp-a1b2c3 rows.
    assert run_check(BASELINE_RUN, CANDIDATE_RUN, out_dir=tmp_path) == 2
    err = capsys.readouterr().err
    assert "fp-a1b2c3 vs fp-ffff00" in err and "record no fingerprint facts" in err


def test_same_fingerprint_is_still_compared(tmp_path):
    baseline = _run_with_facts(tmp_path / "base", "fp-host-a", HOST_FACTS)
    candidate = _run_with_facts(tmp_path / "cand", "fp-host-a", HOST_FACTS)
    assert run_check(baseline, candidate, out_dir=tmp_path) == 0


def test_per_row_reason_lists_the_facts():
    rows = load_results(CLEAN_RUN)
    other = [ResultRow(**{**row.__dict__, "fingerprint": "fp-b"}) for row in rows]
    verdicts = compare_rows(Side(rows, facts={"fp-a1b2c3": HOST_FACTS}),
                            Side(other, facts={"fp-b": _other_host_facts()}))
    assert {v.verdict for v in verdicts} == {"NOT_COMPARABLE"}
    assert "l3: 105 MiB vs 480 MiB" in verdicts[0].reason


def test_update_baseline_stores_the_facts_beside_it_and_check_reads_them(tmp_path, capsys):
    recorded = _run_with_facts(tmp_path / "base", "fp-host-a", HOST_FACTS)
    stored = update_baseline(recorded, root=tmp_path / "baselines")
    sidecar = tmp_path / "baselines" / "fp-host-a.facts.json"
    assert json.loads(sidecar.read_text()) == {"fingerprint_facts": {"fp-host-a": HOST_FACTS}}
    candidate = _run_with_facts(tmp_path / "cand", "fp-host-b", _other_host_facts())
    assert run_check(stored, candidate, out_dir=tmp_path) == 2
    assert "l3: 105 MiB vs 480 MiB" in capsys.readouterr().err


def test_update_baseline_without_facts_removes_a_stale_sidecar(tmp_path):
    root = tmp_path / "baselines"
    root.mkdir()
    (root / "fp-a1b2c3.facts.json").write_text('{"fingerprint_facts": {"fp-a1b2c3": {}}}')
    update_baseline(CLEAN_RUN, root=root)
    assert not (root / "fp-a1b2c3.facts.json").exists()


def test_ci_without_a_baseline_for_this_host_passes_with_a_note_naming_stored_ones(
        tmp_path, capsys):
    root = tmp_path / "baselines"
    update_baseline(_run_with_facts(tmp_path / "base", "fp-host-a", HOST_FACTS), root=root)
    candidate = _run_with_facts(tmp_path / "cand", "fp-host-b", _other_host_facts())
    assert run_check(None, candidate, out_dir=tmp_path, baselines_root=root,
                     missing_baseline_ok=True) == 0
    output = capsys.readouterr().out
    assert output.startswith("check: skipped: no baseline for fingerprint fp-host-b")
    assert "fp-host-a (l3: 105 MiB vs 480 MiB" in output
    # Without the CI flag the same situation cannot compare.
    assert run_check(None, candidate, out_dir=tmp_path, baselines_root=root) == 2


def test_unreadable_facts_file_is_a_one_line_error(tmp_path, capsys):
    baseline = _run_with_facts(tmp_path / "base", "fp-host-a", HOST_FACTS)
    candidate = _run_with_facts(tmp_path / "cand", "fp-host-b", HOST_FACTS)
    (candidate / "env.json").write_text("{not json")
    assert run_check(baseline, candidate, out_dir=tmp_path) == 2
    err = capsys.readouterr().err
    assert "unreadable fingerprint facts" in err and err.count("\n") == 1
