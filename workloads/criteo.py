"""Reader for real Criteo click-log TSV files (Kaggle train.txt, Terabyte day_N), numpy only."""

from __future__ import annotations

import gzip
import os
import re
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

NUM_DENSE = 13
NUM_SPARSE = 26
NUM_FIELDS = 1 + NUM_DENSE + NUM_SPARSE

# Hashed ids are stored as int64, so the modulus must keep every id representable.
_MAX_ROWS_LIMIT = int(np.iinfo(np.int64).max)
_GZIP_MAGIC = b"\x1f\x8b"
# Key for the empty categorical value; parsed hex values are never negative, so it cannot clash.
_MISSING_KEY = -1
# Longest offending value quoted in an error, so messages stay one readable line.
_QUOTE_LIMIT = 40

# One regex over the whole line validates every field at C speed on the fast path; the per-field
# diagnosis below only runs once a line has already failed, to say exactly what is wrong.
_LINE_PATTERN = re.compile(
    rb"[01]\t(?:(?:-?[0-9]+)?\t){%d}(?:[0-9a-fA-F]*\t){%d}[0-9a-fA-F]*"
    % (NUM_DENSE, NUM_SPARSE - 1)
)
_DENSE_PATTERN = re.compile(rb"-?[0-9]+")
_HEX_PATTERN = re.compile(rb"[0-9a-fA-F]+")


class CriteoFormatError(ValueError):
    """Raised for a missing, unreadable or malformed Criteo file; str() is one line.

    The message reads '<path>:<line>: <what is wrong>; <how to fix>', with ':<line>' left out
    when the problem is not tied to a line (missing file, bad argument).
    """

    def __init__(self, path: str, line: int | None, problem: str, fix: str) -> None:
        location = path if line is None else f"{path}:{line}"
        super().__init__(f"{location}: {problem}; {fix}")
        self.path = path
        self.line = line


@dataclass(frozen=True)
class CriteoData:
    """One Criteo file as arrays."""

    path: str
    labels: np.ndarray  # float32 [n]
    dense: np.ndarray  # float32 [n, 13], log(max(x, 0) + 1), missing -> 0
    sparse: np.ndarray  # int64 [n, 26], row id per table in [0, table_rows[t])
    table_rows: tuple[int, ...]  # 26 table sizes
    hashed: bool  # True when ids were hashed modulo max_rows_per_table


def _quote(value: bytes) -> str:
    """Return a short printable quotation of a raw field for an error message."""
    text = value.decode("ascii", errors="backslashreplace")
    if len(text) > _QUOTE_LIMIT:
        text = text[:_QUOTE_LIMIT] + "..."
    return repr(text)


def _check_count(path: str, name: str, value: object) -> None:
    """Reject a limit argument that is not None or a positive int."""
    # bool is an int subclass, but True as a sample count is certainly a caller mistake.
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise CriteoFormatError(
            path, None, f"{name} must be an int or None, got {value!r}",
            f"pass a positive integer for {name}, or None for no limit",
        )
    if value < 1:
        raise CriteoFormatError(
            path, None, f"{name} must be at least 1, got {value}",
            f"pass a positive integer for {name}, or None for no limit",
        )
    if value > _MAX_ROWS_LIMIT:
        raise CriteoFormatError(
            path, None, f"{name} must fit in int64, got {value}",
            f"pass a value no larger than {_MAX_ROWS_LIMIT}",
        )


def _open_binary(path: Path, display: str) -> BinaryIO:
    """Open a plain or gzip-compressed file for binary line iteration."""
    if not path.exists():
        raise CriteoFormatError(
            display, None, "file does not exist",
            "check the path, or download and unpack the Criteo data set first",
        )
    if path.is_dir():
        raise CriteoFormatError(
            display, None, "path is a directory, not a file",
            "point at one Criteo file such as train.txt or day_0",
        )
    try:
        # Sniff the magic bytes rather than trusting the suffix, so renamed files still work.
        with open(path, "rb") as probe:
            magic = probe.read(len(_GZIP_MAGIC))
        if magic == _GZIP_MAGIC or path.suffix == ".gz":
            return gzip.open(path, "rb")
        return open(path, "rb")
    except OSError as error:
        raise CriteoFormatError(
            display, None, f"cannot open file ({error.strerror or error})",
            "check the file permissions",
        ) from error


def _diagnose(fields: list[bytes], display: str, line_number: int) -> CriteoFormatError:
    """Build the error for a line that failed the fast whole-line validation."""
    if len(fields) != NUM_FIELDS:
        return CriteoFormatError(
            display, line_number,
            f"found {len(fields)} tab-separated fields, {NUM_FIELDS} expected",
            "each line must be label, 13 dense and 26 categorical values separated by tabs",
        )
    if fields[0] not in (b"0", b"1"):
        return CriteoFormatError(
            display, line_number, f"label {_quote(fields[0])} is not 0 or 1",
            "the first field of every line must be the click label 0 or 1",
        )
    for index, value in enumerate(fields[1:1 + NUM_DENSE], start=1):
        if value and _DENSE_PATTERN.fullmatch(value) is None:
            return CriteoFormatError(
                display, line_number, f"dense feature I{index} value {_quote(value)} "
                "is not an integer",
                "dense fields must be decimal integers or empty for missing",
            )
    for index, value in enumerate(fields[1 + NUM_DENSE:], start=1):
        if value and _HEX_PATTERN.fullmatch(value) is None:
            return CriteoFormatError(
                display, line_number, f"categorical feature C{index} value {_quote(value)} "
                "is not hexadecimal",
                "categorical fields must be hex strings such as 68fd1e64 or empty for missing",
            )
    # Unreachable while _LINE_PATTERN and the checks above agree; kept so a drift between them
    # still yields a CriteoFormatError instead of silently accepting the line.
    return CriteoFormatError(
        display, line_number, "line is malformed", "compare the line with the Criteo format",
    )


def _sample_lines(
    handle: BinaryIO, display: str, max_samples: int | None
) -> Iterator[tuple[int, list[bytes]]]:
    """Yield (line number, 40 validated fields) per sample, tolerating trailing blank lines."""
    count = 0
    line_number = 0
    blank_line = None  # first blank line seen; only an error if a sample follows it
    try:
        for line_number, raw in enumerate(handle, start=1):
            line = raw.rstrip(b"\r\n")
            if not line:
                if blank_line is None:
                    blank_line = line_number
                continue
            if blank_line is not None:
                raise CriteoFormatError(
                    display, blank_line, "blank line between samples",
                    "remove empty lines; only trailing blank lines are allowed",
                )
            fields = line.split(b"\t")
            if _LINE_PATTERN.fullmatch(line) is None:
                raise _diagnose(fields, display, line_number)
            yield line_number, fields
            count += 1
            # Stop before reading the next line so content past the limit is never examined.
            if count == max_samples:
                return
    except (OSError, EOFError, zlib.error) as error:
        # Covers truncated or corrupt gzip streams and read failures in the middle of the file.
        raise CriteoFormatError(
            display, line_number + 1, f"cannot read file ({error})",
            "the file is truncated or corrupt; re-download or re-compress it",
        ) from error


def _resolve_new_spellings(
    row_ids: list[int | None],
    categorical: list[bytes],
    mappings: list[dict[int, int]],
    spelling_ids: list[dict[bytes, int]],
) -> None:
    """Fill in ids for spellings not seen before, assigning new ids in first-appearance order."""
    for table, value in enumerate(categorical):
        if row_ids[table] is None:
            mapping = mappings[table]
            key = int(value, 16) if value else _MISSING_KEY
            row_ids[table] = spelling_ids[table][value] = mapping.setdefault(key, len(mapping))


def read_criteo(
    path: str | os.PathLike[str],
    max_samples: int | None = None,
    max_rows_per_table: int | None = None,
) -> CriteoData:
    """Read a Criteo TSV file (plain or .gz) into labels, log-scaled dense and sparse row ids."""
    display = os.fspath(path)
    _check_count(display, "max_samples", max_samples)
    _check_count(display, "max_rows_per_table", max_rows_per_table)
    hashed = max_rows_per_table is not None

    labels: list[float] = []
    dense_values: list[float] = []
    sparse_ids: list[int] = []
    # One dict per table from parsed hex value to id; ids are handed out in order of first
    # appearance. Keying on the parsed integer makes 68FD1E64 and 68fd1e64 the same value.
    mappings: list[dict[int, int]] = [{} for _ in range(NUM_SPARSE)]
    # Per table, raw spelling -> id. Criteo values repeat heavily, so one dict.get on the raw
    # bytes resolves almost every field and skips the comparatively slow int(value, 16).
    spelling_ids: list[dict[bytes, int]] = [{} for _ in range(NUM_SPARSE)]

    with _open_binary(Path(display), display) as handle:
        for _, fields in _sample_lines(handle, display, max_samples):
            labels.append(1.0 if fields[0] == b"1" else 0.0)
            # float() rather than int() so huge integers become inf instead of overflowing int64.
            dense_values.extend(
                [float(value) if value else 0.0 for value in fields[1:1 + NUM_DENSE]]
            )
            categorical = fields[1 + NUM_DENSE:]
            if hashed:
                sparse_ids.extend(
                    [int(value, 16) % max_rows_per_table if value else 0
                     for value in categorical]
                )
            else:
                row_ids = list(map(dict.get, spelling_ids, categorical))
                if None in row_ids:
                    _resolve_new_spellings(row_ids, categorical, mappings, spelling_ids)
                sparse_ids.extend(row_ids)

    if not labels:
        raise CriteoFormatError(
            display, 1, "file contains no samples",
            "the file is empty; check that the download or decompression finished",
        )

    sample_count = len(labels)
    raw_dense = np.asarray(dense_values, dtype=np.float64).reshape(sample_count, NUM_DENSE)
    # DLRM reference preprocessing: negatives clip to 0 before log(x + 1).
    dense = np.log1p(np.maximum(raw_dense, 0.0)).astype(np.float32)
    sparse = np.asarray(sparse_ids, dtype=np.int64).reshape(sample_count, NUM_SPARSE)
    if hashed:
        table_rows = (max_rows_per_table,) * NUM_SPARSE
    else:
        table_rows = tuple(max(len(mapping), 1) for mapping in mappings)
    return CriteoData(
        path=display,
        labels=np.asarray(labels, dtype=np.float32),
        dense=dense,
        sparse=sparse,
        table_rows=table_rows,
        hashed=hashed,
    )


def write_criteo_tsv(
    path: str | os.PathLike[str],
    labels: Sequence[int],
    dense_rows: Sequence[Sequence[int | None]],
    cat_rows: Sequence[Sequence[str | None]],
    line_ending: str = "\n",
) -> Path:
    """Write a small Criteo TSV file (gzip when the name ends in .gz); None means missing."""
    if not len(labels) == len(dense_rows) == len(cat_rows):
        raise ValueError(
            f"labels, dense_rows and cat_rows differ in length: "
            f"{len(labels)}, {len(dense_rows)}, {len(cat_rows)}"
        )
    lines = []
    for row_index, (label, dense_row, cat_row) in enumerate(zip(labels, dense_rows, cat_rows)):
        if len(dense_row) != NUM_DENSE or len(cat_row) != NUM_SPARSE:
            raise ValueError(
                f"row {row_index} has {len(dense_row)} dense and {len(cat_row)} categorical "
                f"values, {NUM_DENSE} and {NUM_SPARSE} expected"
            )
        fields = [str(int(label))]
        fields += ["" if value is None else str(int(value)) for value in dense_row]
        fields += ["" if value is None else str(value) for value in cat_row]
        lines.append("\t".join(fields) + line_ending)
    payload = "".join(lines).encode("ascii")
    target = Path(path)
    if target.suffix == ".gz":
        with gzip.open(target, "wb") as handle:
            handle.write(payload)
    else:
        target.write_bytes(payload)
    return target
