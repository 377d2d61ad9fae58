"""The ground floor, free of torch: the result row and its CSV form, summary statistics, and the
one atomic writer and the readers of a run directory (results.csv, env.json, args.json)."""

from __future__ import annotations

import base64
import binascii
import csv
import dataclasses
import datetime
import io
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable, Union

import numpy as np

# Bump when a column is added, removed or changes meaning; readers refuse other versions.
# 2: samples_s holds base64 float32 (see encode_samples); 1 held a JSON list, still read.
# 3: adds the wall-split columns (setup_s ... timing_s); older rows read them as NaN.
SCHEMA_VERSION = 3
READABLE_SCHEMA_VERSIONS = (1, 2, 3)

STATUS_OK = "ok"
STATUS_SKIPPED = "skipped"
STATUS_ERROR = "error"
STATUSES = (STATUS_OK, STATUS_SKIPPED, STATUS_ERROR)

class SchemaError(ValueError):
    """A results file that is not a dlrm-bench results CSV of this schema version."""


RESULTS_FILENAME = "results.csv"
ENV_FILENAME = "env.json"
ARGS_FILENAME = "args.json"

# IQR above this share of the median marks a measurement as noisy (torch.utils.benchmark
# uses the same idea for its own warning).
NOISY_IQR_RATIO = 0.1


@dataclasses.dataclass(frozen=True)
class Summary:
    """Statistics of raw per-repetition times."""

    samples_s: tuple[float, ...]
    median_s: float
    mean_s: float
    p90_s: float
    p99_s: float
    iqr_s: float
    min_s: float
    calls_per_sample: int = 1  # calls averaged into each sample (CPU blocks; 1 on CUDA)
    # Wall of the measurement that produced the samples (bench.run.timing.measure): the
    # untimed warm-up calls, and the rest (repetition count, timed repetitions, telemetry).
    warmup_wall_s: float = math.nan
    timed_wall_s: float = math.nan

    @property
    def noisy(self) -> bool:
        """Whether the spread is large relative to the median."""
        return self.iqr_s > NOISY_IQR_RATIO * self.median_s


def summarize(samples_s, calls_per_sample: int = 1) -> Summary:
    """Median, percentiles and spread (interquartile range, linear interpolation) of raw times,
    each the mean of calls_per_sample calls."""
    values = np.asarray(samples_s, dtype=np.float64)
    if values.size == 0:
        raise ValueError("no timing samples")
    return Summary(
        samples_s=tuple(float(value) for value in values),
        median_s=float(np.median(values)),
        mean_s=float(values.mean()),
        p90_s=float(np.percentile(values, 90)),
        p99_s=float(np.percentile(values, 99)),
        iqr_s=float(np.percentile(values, 75) - np.percentile(values, 25)),
        min_s=float(values.min()),
        calls_per_sample=int(calls_per_sample),
    )


def write_atomic(path: Union[str, os.PathLike], data: Union[bytes, str]) -> Path:
    """Write a whole file or nothing: a temporary file in the same folder, then os.replace."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = data.encode("utf-8") if isinstance(data, str) else data
    # Same folder as the target, so os.replace is a rename on one filesystem and a reader
    # sees either the old file or the new one, never a half-written one.
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.",
                                             suffix=".tmp")
    try:
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temporary, 0o644)  # mkstemp makes 0600; results are ordinary files
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def write_json(path: Union[str, os.PathLike], value: Any) -> Path:
    """Write a JSON document atomically (indented, unknown types as strings)."""
    return write_atomic(path, json.dumps(value, indent=2, default=str) + "\n")


def read_recorded_argv(directory: Union[str, os.PathLike]) -> list[str]:
    """The sweep arguments a run directory recorded in args.json; SchemaError when unreadable."""
    path = Path(directory) / ARGS_FILENAME
    recorded = read_json(path)
    argv = recorded.get("argv") if isinstance(recorded, dict) else None
    if not isinstance(argv, list) or not all(isinstance(part, str) for part in argv):
        raise SchemaError(f"{path}: has no list of sweep arguments under 'argv'")
    return list(argv)


def read_json(path: Union[str, os.PathLike]) -> Any:
    """A JSON document of a run directory; a missing or malformed file is a SchemaError."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise SchemaError(f"{path}: cannot read ({error.strerror or error})") from None
    except ValueError as error:
        raise SchemaError(f"{path}: not valid JSON ({error})") from None


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
    fingerprint: str = ""  # hash of hardware + software identity (see bench.run.devices)
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
    # --metric instructions (callgrind, under Valgrind: no AVX-512/AMX): per call of the timed
    # closure, averaged over instruction_calls calls; the misses come from callgrind's cache
    # SIMULATION (--cache-sim), not from hardware counters.
    instructions: float = math.nan
    instruction_calls: int = 0
    d1_misses_simulated: float = math.nan
    ll_misses_simulated: float = math.nan
    # Where the worker's wall for this row went (seconds, one clock, contiguous phases: they
    # add up to the task's wall in the worker). setup_s: building inputs and the closure;
    # check_s: the impl's checked call and model accuracy; reference_s: the float64 reference;
    # warmup_s: untimed warm-up calls; timing_s: the rest of the measurement (choosing the
    # repetition count, the timed repetitions; a counted row's whole count). NaN: not reached.
    setup_s: float = math.nan
    check_s: float = math.nan
    reference_s: float = math.nan
    warmup_s: float = math.nan
    timing_s: float = math.nan
    metrics: str = "{}"  # JSON: other op-specific measurements
    status: str = STATUS_OK
    error: str = ""
    samples_s: str = "[]"  # per-repetition seconds: encode_samples form (or a JSON list)
    timestamp: str = ""


def utc_timestamp() -> str:
    """Now in UTC to the second, as rows record it (ISO 8601 with +00:00)."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def record_summary(row: ResultRow, summary: Summary) -> None:
    """A measurement's sample count, raw samples (all of them) and statistics into the row's
    timing columns."""
    row.n_samples, row.calls_per_sample = len(summary.samples_s), summary.calls_per_sample
    row.samples_s = encode_samples(summary.samples_s)
    row.median_s, row.mean_s, row.min_s = summary.median_s, summary.mean_s, summary.min_s
    row.p90_s, row.p99_s, row.iqr_s = summary.p90_s, summary.p99_s, summary.iqr_s


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


def _header(path: Path) -> tuple[str, ...]:
    """The column names of an existing results CSV's first line."""
    with open(path, newline="", encoding="utf-8") as handle:
        return tuple(next(csv.reader(handle), ()) or COLUMNS)


class ResultsWriter:
    """Appends rows to a results CSV, flushing each row so a later crash never loses it."""

    def __init__(self, path: Path):
        self.path = Path(path)
        if self.path.exists():
            _drop_partial_last_line(self.path)
        new_file = not self.path.exists() or self.path.stat().st_size == 0
        # Appending (a resume) keeps the file's own header: rows of an older schema version
        # lack later columns, and a wider row under that header would shift every cell.
        fieldnames = COLUMNS if new_file else _header(self.path)
        self._handle = open(self.path, "a", newline="", encoding="utf-8")
        self._writer = csv.DictWriter(self._handle, fieldnames=fieldnames,
                                      extrasaction="ignore")
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


_MAX_CELL_CHARACTERS = 2**31 - 1


def _allow_long_cells() -> None:
    """Lift csv's 131,072-character cell limit: a samples_s cell of a GPU row holding 10^5-10^6
    samples is megabytes long (the limit is per process; 2**31 - 1 fits every C long)."""
    if csv.field_size_limit() < _MAX_CELL_CHARACTERS:
        csv.field_size_limit(_MAX_CELL_CHARACTERS)


def read_rows(path: Path) -> list[ResultRow]:
    """Read a results CSV; a truncated last line (a killed writer) is dropped, not fatal."""
    path = Path(path)
    if not path.is_file():
        raise SchemaError(f"{path}: no such results file")
    text = path.read_text(encoding="utf-8")
    if text and not text.endswith("\n"):
        text = text[:text.rfind("\n") + 1]  # the last line was cut short by a crash mid-write
    _allow_long_cells()
    reader = csv.DictReader(io.StringIO(text, newline=""))
    try:
        fieldnames = reader.fieldnames
    except csv.Error as error:
        raise SchemaError(f"{path}: not a readable CSV ({error})") from None
    missing = set(COLUMNS) - set(fieldnames or ())
    if fieldnames is None or "schema_version" in missing or "op" in missing:
        raise SchemaError(
            f"{path}: not a dlrm-bench results CSV (header lacks op/schema_version)")
    rows = []
    readable = {str(version) for version in READABLE_SCHEMA_VERSIONS}
    try:
        for record in reader:
            if None in record.values():
                raise SchemaError(f"{path}:{reader.line_num}: row has fewer cells than the header")
            if str(record["schema_version"]) not in readable:
                raise SchemaError(
                    f"{path}: schema_version {record['schema_version']}, this tool reads "
                    f"{', '.join(sorted(readable))}; re-run the sweep with this version")
            try:
                rows.append(record_to_row(record))
            except ValueError as error:
                raise SchemaError(
                    f"{path}:{reader.line_num}: malformed cell ({error})") from None
    except csv.Error as error:
        raise SchemaError(f"{path}:{reader.line_num}: not a readable CSV row ({error})") from None
    return rows


def dumps_compact(value: Any) -> str:
    """JSON with sorted keys and no spaces: stable text for params and task keys."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


# A samples_s cell: this prefix, then the samples as little-endian float32 bytes in base64.
# float32 keeps 7 significant digits (the JSON cells kept 6) in 5.3 characters a sample, so a
# million samples take 5.3 MB in one cell, one line: appends stay one flushed row each.
SAMPLES_PREFIX = "f32le:"
_SAMPLE_DTYPE = np.dtype("<f4")


def encode_samples(samples_s) -> str:
    """The samples_s cell of raw per-repetition seconds ("[]" when there are none)."""
    values = np.asarray(samples_s, dtype=np.float64).ravel()
    if values.size == 0:
        return "[]"
    return SAMPLES_PREFIX + base64.b64encode(values.astype(_SAMPLE_DTYPE).tobytes()).decode("ascii")


def decode_samples(text: str) -> list[float]:
    """Raw per-repetition seconds of a samples_s cell: the encoded form, or the JSON list of
    schema 1 rows (and of hand-made rows); ValueError when it is neither."""
    text = (text or "").strip()
    if text.startswith(SAMPLES_PREFIX):
        try:
            raw = base64.b64decode(text[len(SAMPLES_PREFIX):], validate=True)
        except binascii.Error as error:
            raise ValueError(f"samples_s is not valid base64 ({error})") from None
        if len(raw) % _SAMPLE_DTYPE.itemsize:
            raise ValueError(f"samples_s holds {len(raw)} bytes, not whole float32 values")
        return np.frombuffer(raw, dtype=_SAMPLE_DTYPE).astype(np.float64).tolist()
    values = json.loads(text or "[]")
    if not isinstance(values, list):
        raise ValueError(f"samples_s is a JSON {type(values).__name__}, not a list")
    return [float(value) for value in values]


def samples_from_row(row: ResultRow) -> list[float]:
    """The raw per-repetition times of a row."""
    return decode_samples(row.samples_s)


def iter_ok(rows: Iterable[ResultRow]) -> Iterable[ResultRow]:
    """Only the rows that were measured."""
    return (row for row in rows if row.status == STATUS_OK)
