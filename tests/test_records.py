"""Result rows: CSV round trip, NaN cells, truncated lines, schema checks, timing columns."""

from __future__ import annotations

import csv
import dataclasses
import json
import math

import pytest

from bench.records import (COLUMNS, SCHEMA_VERSION, STATUS_ERROR, STATUS_OK, STATUS_SKIPPED,
                          ResultRow, ResultsWriter, SchemaError, iter_ok, read_rows,
                          record_summary, samples_from_row, summarize, utc_timestamp)


def _row(index: int, **changes) -> ResultRow:
    row = ResultRow(
        run_id="run-a", task_key=f"key{index:04d}", op="sls", impl="embedding_bag",
        is_baseline=index % 2 == 0, code_version="abc123def456", workload="smoke",
        params=json.dumps({"mode": "sum", "rows": 1000 + index, "note": 'a "quoted", text'}),
        device="cpu", device_name="Some CPU @ 2.0GHz", isa="native", isa_effective="aten=avx2",
        threads=2, precision="fp32", batch_size=64, fingerprint="f" * 12, n_samples=3,
        median_s=1.5e-4 * (index + 1), mean_s=1.6e-4, p90_s=2e-4, p99_s=2.1e-4, iqr_s=1e-5,
        min_s=1.4e-4, samples_per_s=4.2e5, flops=2048.0, bytes_moved=12800.0, gbps=0.085,
        gflops=0.0137, rel_error=4.1e-8, metrics=json.dumps({"noisy": False}),
        status=STATUS_OK, samples_s=json.dumps([1.4e-4, 1.5e-4, 2e-4]),
        timestamp="2025-01-02T03:04:05+00:00")
    return dataclasses.replace(row, **changes)


def _same(first: ResultRow, second: ResultRow) -> bool:
    for field in dataclasses.fields(ResultRow):
        one, two = getattr(first, field.name), getattr(second, field.name)
        if isinstance(one, float) and isinstance(two, float) and math.isnan(one):
            if not math.isnan(two):
                return False
        elif one != two:
            return False
    return True


def _write(path, rows) -> None:
    with ResultsWriter(path) as writer:
        for row in rows:
            writer.write(row)


def test_round_trip(tmp_path):
    path = tmp_path / "results.csv"
    rows = [
        _row(0),
        _row(1, status=STATUS_SKIPPED, error="fc/torch_linear has no int4 kernel, it supports "
                                             "fp32, fp16", median_s=math.nan, n_samples=0,
             samples_s="[]", rel_error=math.nan),
        _row(2, status=STATUS_ERROR, error="relative error 0.5 exceeds ‘tolerance’ ≤ 1e-4",
             auc=0.81, logloss=0.45, ctr_abs_diff=0.0),
    ]
    _write(path, rows)
    back = read_rows(path)
    assert len(back) == 3
    for written, read in zip(rows, back):
        assert _same(written, read), (written, read)
    assert isinstance(back[0].threads, int) and isinstance(back[0].is_baseline, bool)
    assert back[0].is_baseline is True and back[1].is_baseline is False
    assert isinstance(back[0].median_s, float)
    assert samples_from_row(back[0]) == [1.4e-4, 1.5e-4, 2e-4]
    assert samples_from_row(back[1]) == []
    assert [row.task_key for row in iter_ok(back)] == ["key0000"]


def test_nan_is_an_empty_cell(tmp_path):
    path = tmp_path / "results.csv"
    _write(path, [_row(0, median_s=math.nan, auc=math.nan)])
    with open(path, newline="", encoding="utf-8") as handle:
        records = list(csv.DictReader(handle))
    assert records[0]["median_s"] == "" and records[0]["auc"] == ""
    assert records[0]["flops"] == "2048.0"
    back = read_rows(path)[0]
    assert math.isnan(back.median_s) and math.isnan(back.auc)


def test_header_is_the_schema_columns_and_written_once(tmp_path):
    path = tmp_path / "results.csv"
    _write(path, [_row(0)])
    _write(path, [_row(1), _row(2)])  # reopened: appends, no second header
    with open(path, newline="", encoding="utf-8") as handle:
        lines = list(csv.reader(handle))
    assert tuple(lines[0]) == COLUMNS
    assert sum(line == list(COLUMNS) for line in lines) == 1
    assert [row.task_key for row in read_rows(path)] == ["key0000", "key0001", "key0002"]
    assert COLUMNS[0] == "schema_version"
    assert {"task_key", "median_s", "samples_s", "status", "rel_error"} <= set(COLUMNS)


def test_empty_file_gets_a_header(tmp_path):
    path = tmp_path / "results.csv"
    path.write_text("")
    _write(path, [_row(0)])
    assert len(read_rows(path)) == 1


@pytest.mark.parametrize("keep", [0.1, 0.5, 0.8])
def test_truncated_last_line_is_dropped(tmp_path, keep):
    path = tmp_path / "results.csv"
    _write(path, [_row(0), _row(1), _row(2)])
    text = path.read_text(encoding="utf-8")
    last_start = text.rstrip("\r\n").rfind("\n") + 1
    last = text[last_start:]
    path.write_text(text[:last_start] + last[:int(len(last) * keep)], encoding="utf-8")
    rows = read_rows(path)
    assert [row.task_key for row in rows] == ["key0000", "key0001"]


def _cut_inside_last_field(path):
    """Cut the file inside the last row's final field (its timestamp)."""
    text = path.read_text(encoding="utf-8")
    path.write_text(text.rstrip("\r\n")[:-10], encoding="utf-8")


def test_truncation_inside_last_field_is_dropped(tmp_path):
    path = tmp_path / "results.csv"
    _write(path, [_row(0), _row(1), _row(2)])
    _cut_inside_last_field(path)
    assert [row.task_key for row in read_rows(path)] == ["key0000", "key0001"]


@pytest.mark.parametrize("keep", [0.1, 0.5, 0.8])
def test_appending_after_a_truncated_line(tmp_path, keep):
    # What --resume does after a sweep was killed mid-write.
    path = tmp_path / "results.csv"
    _write(path, [_row(0), _row(1), _row(2)])
    text = path.read_text(encoding="utf-8")
    last_start = text.rstrip("\r\n").rfind("\n") + 1
    last = text[last_start:]
    path.write_text(text[:last_start] + last[:int(len(last) * keep)], encoding="utf-8")
    _write(path, [_row(3)])
    rows = read_rows(path)
    assert [row.task_key for row in rows] == ["key0000", "key0001", "key0003"]
    assert _same(rows[-1], _row(3))


def test_wrong_schema_version_raises(tmp_path):
    path = tmp_path / "results.csv"
    _write(path, [_row(0, schema_version=SCHEMA_VERSION + 1)])
    with pytest.raises(SchemaError, match="schema_version"):
        read_rows(path)


def test_wrong_schema_version_on_a_later_row_raises(tmp_path):
    path = tmp_path / "results.csv"
    _write(path, [_row(0), _row(1, schema_version=0)])
    with pytest.raises(SchemaError):
        read_rows(path)


@pytest.mark.parametrize("content", [
    "name,value\nalpha,1\nbeta,2\n",
    "op,median_s\nsls,0.1\n",  # no schema_version column
    "",
    "just some text\n",
])
def test_non_results_csv_raises(tmp_path, content):
    path = tmp_path / "other.csv"
    path.write_text(content)
    with pytest.raises(SchemaError):
        read_rows(path)


def test_missing_file_raises(tmp_path):
    with pytest.raises(SchemaError, match="no such results file"):
        read_rows(tmp_path / "absent.csv")
    with pytest.raises(SchemaError):
        read_rows(tmp_path)  # a directory is not a results file


def test_unknown_columns_ignored_missing_columns_default(tmp_path):
    path = tmp_path / "results.csv"
    columns = [name for name in COLUMNS if name != "auc"] + ["future_column"]
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        record = {name: value for name, value in dataclasses.asdict(_row(0)).items()
                  if name != "auc"}
        writer.writerow({**record, "future_column": "x"})
    rows = read_rows(path)
    assert len(rows) == 1 and rows[0].task_key == "key0000"
    assert math.isnan(rows[0].auc)


# --- raw samples at GPU counts: a row of a million samples stays readable ------------------

MILLION = 1_000_000


def _million_samples():
    import numpy as np

    # Distinct µs-scale times, so a reader that dropped, reordered or truncated any is caught.
    return (1e-5 + 1e-11 * np.arange(MILLION)).tolist()


def test_samples_cell_encodes_every_sample_in_float32():
    from bench.records import SAMPLES_PREFIX, decode_samples, encode_samples

    samples = [1.4e-4, 2.5e-6, 3.0]
    cell = encode_samples(samples)
    assert cell.startswith(SAMPLES_PREFIX)
    assert decode_samples(cell) == pytest.approx(samples, rel=1e-7)
    assert encode_samples([]) == "[]" and decode_samples("[]") == []
    assert decode_samples("[1e-4, 2e-4]") == [1e-4, 2e-4]  # schema 1 cells: JSON lists


@pytest.mark.parametrize("cell", ["f32le:@@@@", "f32le:AAAAAAA=", '{"a": 1}', "[1, [2]]"])
def test_malformed_samples_cells_raise(cell):
    from bench.records import decode_samples

    with pytest.raises((ValueError, TypeError)):
        decode_samples(cell)


def test_a_million_sample_row_reads_back_through_the_reader_csv_and_pandas(tmp_path):
    import sys

    import numpy as np
    import pandas as pd

    from bench.records import decode_samples, encode_samples

    samples = _million_samples()
    path = tmp_path / "results.csv"
    big = _row(1, samples_s=encode_samples(samples), n_samples=MILLION)
    _write(path, [_row(0), big, _row(2)])
    back = read_rows(path)
    assert [row.task_key for row in back] == ["key0000", "key0001", "key0002"]
    decoded = samples_from_row(back[1])
    assert len(decoded) == MILLION
    assert decoded == np.asarray(samples, dtype=np.float32).astype(np.float64).tolist()
    assert samples_from_row(back[0]) == [1.4e-4, 1.5e-4, 2e-4]
    # Outside the suite: pandas reads the file as it is; the csv module once its limit is lifted.
    frame = pd.read_csv(path, keep_default_na=False)
    assert len(decode_samples(frame.loc[1, "samples_s"])) == MILLION
    csv.field_size_limit(sys.maxsize if sys.maxsize < 2**63 else 2**31 - 1)
    with open(path, newline="", encoding="utf-8") as handle:
        assert len(list(csv.DictReader(handle))) == 3


def test_a_million_sample_row_survives_an_append_after_a_crash(tmp_path):
    from bench.records import encode_samples

    # Resume appends to a file whose last row a crash cut short; the big row before it stays.
    path = tmp_path / "results.csv"
    _write(path, [_row(0, samples_s=encode_samples(_million_samples()))])
    with open(path, "a", encoding="utf-8") as handle:
        handle.write("2,run-a,key0001,sls,embedding_bag,True,abc,smo")
    _write(path, [_row(2)])
    back = read_rows(path)
    assert [row.task_key for row in back] == ["key0000", "key0002"]
    assert len(samples_from_row(back[0])) == MILLION


def test_schema_1_results_stay_readable(tmp_path):
    path = tmp_path / "results.csv"
    _write(path, [_row(0, schema_version=1), _row(1)])
    back = read_rows(path)
    assert [row.schema_version for row in back] == [1, SCHEMA_VERSION]
    assert samples_from_row(back[0]) == [1.4e-4, 1.5e-4, 2e-4]


def _with_million_samples(source, target):
    """A copy of a fixture run whose first ok row holds a million samples."""
    import shutil

    from bench.records import encode_samples

    shutil.copytree(source, target)
    rows = read_rows(target / "results.csv")
    index = next(i for i, row in enumerate(rows) if row.status == STATUS_OK)
    rows[index] = dataclasses.replace(rows[index], schema_version=SCHEMA_VERSION,
                                      samples_s=encode_samples(_million_samples()),
                                      n_samples=MILLION)
    (target / "results.csv").unlink()
    _write(target / "results.csv", rows)
    return target


@pytest.mark.slow  # about 20 s: the report draws the million samples' box
def test_report_and_check_read_a_million_sample_row(tmp_path, capsys):
    from bench import commands
    from tests.conftest import FIXTURES_DIR

    run = _with_million_samples(FIXTURES_DIR / "reports" / "handmade", tmp_path / "run")
    assert commands.main(["report", str(run), "--out", str(tmp_path / "report")]) == 0
    assert "Traceback" not in capsys.readouterr().err
    baseline = _with_million_samples(FIXTURES_DIR / "check" / "baseline_run", tmp_path / "base")
    code = commands.main(["check", "--baseline", str(baseline), "--candidate", str(baseline),
                          "--out-dir", str(tmp_path / "check")])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "malformed" not in captured.out + captured.err


def test_record_summary_fills_every_timing_column():
    row = ResultRow()
    record_summary(row, summarize([3e-3, 1e-3, 2.0000004e-3, 4e-3], calls_per_sample=8))
    assert row.n_samples == 4 and row.calls_per_sample == 8
    assert samples_from_row(row) == pytest.approx([3e-3, 1e-3, 2.0000004e-3, 4e-3], rel=1e-7)
    assert (row.min_s, row.median_s, row.mean_s) == pytest.approx((1e-3, 2.5e-3, 2.5e-3))
    assert row.iqr_s == pytest.approx(1.5e-3) and row.p90_s == pytest.approx(3.7e-3)
    assert row.p99_s == pytest.approx(3.97e-3)


def test_utc_timestamp_is_iso_seconds_in_utc():
    import datetime

    stamp = utc_timestamp()
    parsed = datetime.datetime.fromisoformat(stamp)
    assert stamp.endswith("+00:00") and parsed.microsecond == 0
    assert abs((datetime.datetime.now(datetime.timezone.utc) - parsed).total_seconds()) < 60
