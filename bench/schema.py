"""The result row: one measured (or skipped, or failed) configuration, and its CSV form."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
from pathlib import Path
from typing import Any, Iterable

# Bump when a column is added, removed or changes meaning; readers refuse other versions.
SCHEMA_VERSION = 1

STATUS_OK = "ok"
STATUS_SKIPPED = "skipped"
STATUS_ERROR = "error"
STATUSES = (STATUS_OK, STATUS_SKIPPED, STATUS_ERROR)


@dataclasses.dataclass
class ResultRow:
    """One row of results.csv; times are seconds per call of the timed closure."""

    schema_version: int = SCHEMA_VERSION
    run_id: str = ""
    task_key: str = ""  # stable identity of the configuration (resume, matching across runs)
    op: str = ""
    impl: str = ""
    is_baseline: bool = False
    code_version: str = ""  # hash of the impl's source: changed code is not comparable
    workload: str = ""
    params: str = "{}"  # JSON: op-specific configuration (table shape, pooling, mode...)
    device: str = ""
    device_name: str = ""
    isa: str = ""  # requested ISA level ("native" = no cap)
    isa_effective: str = ""  # what the libraries report they used
    threads: int = 1
    precision: str = ""
    batch_size: int = 0
    fingerprint: str = ""  # hash of hardware + software identity (see bench.devices)
    n_samples: int = 0  # number of timed repetitions in samples_s
    # Calls of the timed closure averaged into each sample (CPU times blocks of calls, so
    # p90_s/p99_s are percentiles of block means when > 1); 0 = not recorded.
    calls_per_sample: int = 0
    median_s: float = math.nan
    mean_s: float = math.nan
    p90_s: float = math.nan
    p99_s: float = math.nan
    iqr_s: float = math.nan
    min_s: float = math.nan
    samples_per_s: float = math.nan  # model samples (batch items) per second at the median
    flops: float = math.nan  # per call, by formula
    bytes_moved: float = math.nan  # per call, by formula (compulsory traffic)
    gbps: float = math.nan
    gflops: float = math.nan
    rel_error: float = math.nan  # relative L2 error against the float64 reference
    auc: float = math.nan  # dlrm_infer on teacher-labelled data
    logloss: float = math.nan
    ctr_abs_diff: float = math.nan  # mean |predicted CTR - fp32 predicted CTR|
    cpu_util: float = math.nan  # worker CPU seconds per wall second while timing
    peak_rss_bytes: float = math.nan  # worker resident-set high-water mark after this row
    avg_power_w: float = math.nan  # GPU (NVML) or CPU package (RAPL) power while timing
    energy_j: float = math.nan  # energy over the timed window
    joules_per_sample: float = math.nan  # avg_power_w x median_s / samples per call
    metrics: str = "{}"  # JSON: other op-specific measurements
    status: str = STATUS_OK
    error: str = ""
    samples_s: str = "[]"  # JSON list of per-repetition seconds
    timestamp: str = ""


COLUMNS = tuple(field.name for field in dataclasses.fields(ResultRow))
_FIELD_TYPES = {field.name: field.type for field in dataclasses.fields(ResultRow)}


def row_to_record(row: ResultRow) -> dict[str, Any]:
    """Row as a flat dict with NaN written as an empty cell."""
    record = dataclasses.asdict(row)
    for key, value in record.items():
        if isinstance(value, float) and math.isnan(value):
            record[key] = ""
    return record


def _parse(name: str, text: str) -> Any:
    """Convert one CSV cell back to the field's Python type."""
    kind = _FIELD_TYPES[name]
    if kind == "float":
        return float(text) if text not in ("", "nan") else math.nan
    if kind == "int":
        return int(float(text)) if text != "" else 0
    if kind == "bool":
        return text.strip().lower() in ("true", "1", "yes")
    return text


def record_to_row(record: dict[str, str]) -> ResultRow:
    """Inverse of row_to_record for a dict of CSV strings; unknown columns are ignored."""
    return ResultRow(**{name: _parse(name, record[name]) for name in COLUMNS if name in record})


def _drop_partial_last_line(path: Path) -> None:
    """Cut a file back to its last newline: a writer killed mid-row leaves a partial line."""
    with open(path, "rb+") as handle:
        data = handle.read()
        if data and not data.endswith(b"\n"):
            handle.truncate(data.rfind(b"\n") + 1)


class ResultsWriter:
    """Appends rows to a results CSV, flushing each row so a later crash never loses it."""

    def __init__(self, path: Path):
        self.path = Path(path)
        if self.path.exists():
            _drop_partial_last_line(self.path)
        new_file = not self.path.exists() or self.path.stat().st_size == 0
        self._handle = open(self.path, "a", newline="", encoding="utf-8")
        self._writer = csv.DictWriter(self._handle, fieldnames=COLUMNS)
        if new_file:
            self._writer.writeheader()
            self._flush()

    def _flush(self) -> None:
        self._handle.flush()
        os.fsync(self._handle.fileno())

    def write(self, row: ResultRow) -> None:
        """Append one row and push it to disk."""
        self._writer.writerow(row_to_record(row))
        self._flush()

    def close(self) -> None:
        """Close the file."""
        self._handle.close()

    def __enter__(self) -> "ResultsWriter":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


class SchemaError(ValueError):
    """A results file that is not a dlrm-bench results CSV of this schema version."""


def read_rows(path: Path) -> list[ResultRow]:
    """Read a results CSV; a truncated last line (a killed writer) is dropped, not fatal."""
    path = Path(path)
    if not path.is_file():
        raise SchemaError(f"{path}: no such results file")
    text = path.read_text(encoding="utf-8")
    if text and not text.endswith("\n"):
        text = text[:text.rfind("\n") + 1]  # the last line was cut short by a crash mid-write
    reader = csv.DictReader(io.StringIO(text, newline=""))
    missing = set(COLUMNS) - set(reader.fieldnames or ())
    if reader.fieldnames is None or "schema_version" in missing or "op" in missing:
        raise SchemaError(
            f"{path}: not a dlrm-bench results CSV (header lacks op/schema_version)")
    rows = []
    for record in reader:
        if None in record.values():
            raise SchemaError(f"{path}:{reader.line_num}: row has fewer cells than the header")
        if str(record["schema_version"]) != str(SCHEMA_VERSION):
            raise SchemaError(
                f"{path}: schema_version {record['schema_version']}, this tool reads "
                f"{SCHEMA_VERSION}; re-run the sweep with this version")
        try:
            rows.append(record_to_row(record))
        except ValueError as error:
            raise SchemaError(f"{path}:{reader.line_num}: malformed cell ({error})") from None
    return rows


def dumps_compact(value: Any) -> str:
    """JSON with sorted keys and no spaces: stable text for params and task keys."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def samples_from_row(row: ResultRow) -> list[float]:
    """The raw per-repetition times of a row."""
    return [float(value) for value in json.loads(row.samples_s or "[]")]


def iter_ok(rows: Iterable[ResultRow]) -> Iterable[ResultRow]:
    """Only the rows that were measured."""
    return (row for row in rows if row.status == STATUS_OK)
