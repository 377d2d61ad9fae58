"""Tests for the Criteo TSV reader in workloads.criteo."""

from __future__ import annotations

import gzip
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO_ROOT
from workloads.criteo import (
    NUM_DENSE,
    NUM_SPARSE,
    CriteoData,
    CriteoFormatError,
    read_criteo,
    write_criteo_tsv,
)


def dense_row(first: int | None = 1, rest: int | None = 0) -> list[int | None]:
    """Return 13 dense values: a chosen first value and the rest all equal."""
    return [first] + [rest] * (NUM_DENSE - 1)


def cat_row(first: str | None = "00000001", rest: str | None = "0000000a") -> list[str | None]:
    """Return 26 categorical values: a chosen first value and the rest all equal."""
    return [first] + [rest] * (NUM_SPARSE - 1)


def valid_line(label: str = "1") -> str:
    """Return one well-formed TSV line without a line ending."""
    return "\t".join([label] + ["3"] * NUM_DENSE + ["68fd1e64"] * NUM_SPARSE)


def write_text(path: Path, lines: list[str]) -> Path:
    """Write raw lines joined by newlines, for files the helper refuses to produce."""
    path.write_text("\n".join(lines) + "\n")
    return path


def assert_error(error: pytest.ExceptionInfo, path: Path, line: int | None, *fragments: str):
    """Check a CriteoFormatError names the file, the line and the expected problem."""
    message = str(error.value)
    assert "\n" not in message
    prefix = str(path) if line is None else f"{path!s}:{line}:"
    assert message.startswith(prefix), message
    assert error.value.path == str(path)
    assert error.value.line == line
    # Every message carries a fix after the problem.
    assert "; " in message
    for fragment in fragments:
        assert fragment in message, message


def test_round_trip_with_missing_values(tmp_path):
    path = write_criteo_tsv(
        tmp_path / "train.txt",
        labels=[1, 0, 1],
        dense_rows=[dense_row(5, 2), dense_row(None, None), dense_row(0, 100)],
        cat_rows=[cat_row("68fd1e64", "80e26c9b"), cat_row(None, None), cat_row("68fd1e64", None)],
    )
    data = read_criteo(path)

    assert isinstance(data, CriteoData)
    assert data.path == str(path)
    assert data.hashed is False
    assert data.labels.dtype == np.float32 and data.labels.tolist() == [1.0, 0.0, 1.0]
    assert data.dense.dtype == np.float32 and data.dense.shape == (3, NUM_DENSE)
    assert data.sparse.dtype == np.int64 and data.sparse.shape == (3, NUM_SPARSE)

    np.testing.assert_allclose(data.dense[0], [math.log(6)] + [math.log(3)] * 12, rtol=1e-6)
    # Missing dense values become 0, so log(0 + 1) = 0.
    assert data.dense[1].tolist() == [0.0] * NUM_DENSE
    np.testing.assert_allclose(data.dense[2], [0.0] + [math.log(101)] * 12, rtol=1e-6)

    # Table 0 sees 68fd1e64, missing, 68fd1e64: two distinct values.
    assert data.sparse[:, 0].tolist() == [0, 1, 0]
    # Other tables see 80e26c9b, missing, missing.
    assert data.sparse[:, 1].tolist() == [0, 1, 1]
    assert data.table_rows == (2,) * NUM_SPARSE
    assert np.all(data.sparse < np.array(data.table_rows))


def test_negative_dense_values_clip_to_zero(tmp_path):
    path = write_criteo_tsv(
        tmp_path / "neg.txt", [0, 1], [dense_row(-1, -2), dense_row(-1000, 3)],
        [cat_row(), cat_row()],
    )
    data = read_criteo(path)
    assert data.dense[0].tolist() == [0.0] * NUM_DENSE
    assert data.dense[1, 0] == 0.0
    np.testing.assert_allclose(data.dense[1, 1:], math.log(4), rtol=1e-6)


def test_huge_dense_value_does_not_overflow(tmp_path):
    path = write_text(tmp_path / "huge.txt", [valid_line().replace("3", "9" * 30, 1)])
    data = read_criteo(path)
    np.testing.assert_allclose(data.dense[0, 0], math.log1p(1e30), rtol=1e-6)


def test_uppercase_and_lowercase_hex_share_an_id(tmp_path):
    path = write_criteo_tsv(
        tmp_path / "case.txt", [1, 1, 0, 1],
        [dense_row()] * 4,
        # Ids follow the parsed integer, so spelling differences and leading zeros do not matter.
        [cat_row("68FD1E64", "0000000A"), cat_row("68fd1e64", "a"),
         cat_row("68Fd1E64", "0000000b"), cat_row("68fd1e64", "0000000a")],
    )
    data = read_criteo(path)
    assert data.sparse[:, 0].tolist() == [0, 0, 0, 0]
    assert data.sparse[:, 1].tolist() == [0, 0, 1, 0]
    assert data.table_rows[:2] == (1, 2)


def test_contiguous_ids_follow_first_appearance(tmp_path):
    values = ["0000000c", None, "0000000a", "0000000c", "0000000b", None, "0000000a"]
    path = write_criteo_tsv(
        tmp_path / "order.txt", [0] * len(values), [dense_row()] * len(values),
        [cat_row(value) for value in values],
    )
    data = read_criteo(path)
    # c -> 0, missing -> 1, a -> 2, b -> 3: order of first appearance, not sorted order.
    assert data.sparse[:, 0].tolist() == [0, 1, 2, 0, 3, 1, 2]
    assert data.table_rows[0] == 4
    # Tables with one repeated value collapse to a single row.
    assert data.table_rows[1:] == (1,) * (NUM_SPARSE - 1)
    assert data.sparse[:, 1:].max() == 0


def test_table_of_only_missing_values_has_one_row(tmp_path):
    path = write_criteo_tsv(
        tmp_path / "empty_table.txt", [1, 0], [dense_row(), dense_row()],
        [cat_row(None), cat_row(None)],
    )
    data = read_criteo(path)
    assert data.table_rows[0] == 1
    assert data.sparse[:, 0].tolist() == [0, 0]


def test_hashed_mode_uses_value_modulo_rows(tmp_path):
    values = ["68fd1e64", "80E26C9B", None, "00000007"]
    path = write_criteo_tsv(
        tmp_path / "hashed.txt", [1, 0, 0, 1], [dense_row()] * 4,
        [cat_row(value, "ffffffff") for value in values],
    )
    rows = 1000
    data = read_criteo(path, max_rows_per_table=rows)
    assert data.hashed is True
    assert data.table_rows == (rows,) * NUM_SPARSE
    expected = [int("68fd1e64", 16) % rows, int("80e26c9b", 16) % rows, 0, 7]
    assert data.sparse[:, 0].tolist() == expected
    assert data.sparse[:, 1].tolist() == [int("ffffffff", 16) % rows] * 4
    assert data.sparse.min() >= 0 and data.sparse.max() < rows


def test_max_samples_stops_early_and_ignores_later_lines(tmp_path):
    # Line 3 is malformed: with max_samples=2 it must never be examined.
    path = write_text(tmp_path / "limit.txt", [valid_line("1"), valid_line("0"), "garbage"])
    data = read_criteo(path, max_samples=2)
    assert data.labels.tolist() == [1.0, 0.0]
    assert data.dense.shape == (2, NUM_DENSE) and data.sparse.shape == (2, NUM_SPARSE)

    one = read_criteo(path, max_samples=1)
    assert one.labels.tolist() == [1.0]
    # A limit above the file length just reads the whole file, which here hits the bad line.
    with pytest.raises(CriteoFormatError) as error:
        read_criteo(path, max_samples=10)
    assert_error(error, path, 3, "found 1 tab-separated fields", "40 expected")


def test_gzip_matches_plain_text(tmp_path):
    arguments = {
        "labels": [1, 0], "dense_rows": [dense_row(7, None), dense_row(-3, 2)],
        "cat_rows": [cat_row("68fd1e64", None), cat_row("0000abcd", "80e26c9b")],
    }
    plain = read_criteo(write_criteo_tsv(tmp_path / "day_0", **arguments))
    packed_path = write_criteo_tsv(tmp_path / "day_0.gz", **arguments)
    assert packed_path.read_bytes()[:2] == b"\x1f\x8b"
    packed = read_criteo(packed_path)
    np.testing.assert_array_equal(packed.labels, plain.labels)
    np.testing.assert_array_equal(packed.dense, plain.dense)
    np.testing.assert_array_equal(packed.sparse, plain.sparse)
    assert packed.table_rows == plain.table_rows

    # Compression is detected from the content, so a renamed archive still reads.
    renamed = tmp_path / "day_0_renamed"
    renamed.write_bytes(packed_path.read_bytes())
    np.testing.assert_array_equal(read_criteo(renamed).sparse, plain.sparse)


def test_crlf_line_endings_match_lf(tmp_path):
    arguments = {
        "labels": [0, 1], "dense_rows": [dense_row(4, None), dense_row(None, 9)],
        # Missing last categorical value: the line ends in a tab right before \r\n.
        "cat_rows": [cat_row("68fd1e64", None), cat_row(None, "80e26c9b")],
    }
    unix = read_criteo(write_criteo_tsv(tmp_path / "lf.txt", **arguments))
    crlf_path = write_criteo_tsv(tmp_path / "crlf.txt", **arguments, line_ending="\r\n")
    assert b"\t\r\n" in crlf_path.read_bytes()
    windows = read_criteo(crlf_path)
    np.testing.assert_array_equal(windows.labels, unix.labels)
    np.testing.assert_array_equal(windows.dense, unix.dense)
    np.testing.assert_array_equal(windows.sparse, unix.sparse)
    assert windows.table_rows == unix.table_rows == (2,) * NUM_SPARSE


def test_trailing_blank_lines_are_fine(tmp_path):
    path = tmp_path / "trailing.txt"
    path.write_text(valid_line("1") + "\n" + valid_line("0") + "\n\n\r\n")
    assert read_criteo(path).labels.tolist() == [1.0, 0.0]


def test_blank_line_between_samples_is_an_error(tmp_path):
    path = write_text(tmp_path / "gap.txt", [valid_line(), "", valid_line()])
    with pytest.raises(CriteoFormatError) as error:
        read_criteo(path)
    assert_error(error, path, 2, "blank line")


def test_missing_file(tmp_path):
    path = tmp_path / "absent.txt"
    with pytest.raises(CriteoFormatError) as error:
        read_criteo(path)
    assert_error(error, path, None, "does not exist")


def test_directory_instead_of_file(tmp_path):
    with pytest.raises(CriteoFormatError) as error:
        read_criteo(tmp_path)
    assert_error(error, tmp_path, None, "directory")


@pytest.mark.parametrize("content", [b"", b"\n", b"\r\n\n"])
def test_file_without_samples(tmp_path, content):
    path = tmp_path / "empty.txt"
    path.write_bytes(content)
    with pytest.raises(CriteoFormatError) as error:
        read_criteo(path)
    assert_error(error, path, 1, "no samples")


def test_empty_gzip_file(tmp_path):
    path = tmp_path / "empty.gz"
    with gzip.open(path, "wb"):
        pass
    with pytest.raises(CriteoFormatError) as error:
        read_criteo(path)
    assert_error(error, path, 1, "no samples")


@pytest.mark.parametrize(
    ("line", "found"),
    [
        ("\t".join(["1"] + ["3"] * NUM_DENSE + ["68fd1e64"] * (NUM_SPARSE - 1)), 39),
        (valid_line() + "\t68fd1e64", 41),
        (valid_line().replace("\t", " "), 1),
    ],
)
def test_wrong_field_count(tmp_path, line, found):
    path = write_text(tmp_path / "fields.txt", [valid_line(), valid_line(), line])
    with pytest.raises(CriteoFormatError) as error:
        read_criteo(path)
    assert_error(error, path, 3, f"found {found} tab-separated fields", "40 expected")


@pytest.mark.parametrize("label", ["2", "-1", "", "1.0", "yes"])
def test_bad_label(tmp_path, label):
    path = write_text(tmp_path / "label.txt", [valid_line(), valid_line(label)])
    with pytest.raises(CriteoFormatError) as error:
        read_criteo(path)
    assert_error(error, path, 2, "label", "not 0 or 1")


@pytest.mark.parametrize("value", ["1.5", "abc", "1e3", "+4", " 4", "1_000", "--2", "-"])
def test_bad_dense_value(tmp_path, value):
    fields = valid_line().split("\t")
    fields[5] = value  # dense feature I5
    path = write_text(tmp_path / "dense.txt", [valid_line(), "\t".join(fields)])
    with pytest.raises(CriteoFormatError) as error:
        read_criteo(path)
    assert_error(error, path, 2, "I5", repr(value), "not an integer")


@pytest.mark.parametrize("value", ["xyz12345", "0x68fd1e", "68fd 1e6", "-68fd1e6", "68fd1e6g"])
def test_bad_categorical_value(tmp_path, value):
    fields = valid_line().split("\t")
    fields[1 + NUM_DENSE + 2] = value  # categorical feature C3
    path = write_text(tmp_path / "cat.txt", [valid_line(), valid_line(), "\t".join(fields)])
    with pytest.raises(CriteoFormatError) as error:
        read_criteo(path)
    assert_error(error, path, 3, "C3", repr(value), "not hexadecimal")


def test_non_ascii_bytes_are_reported_on_their_line(tmp_path):
    path = tmp_path / "binary.txt"
    bad = valid_line().replace("68fd1e64", "68fd\xe9e64", 1).encode("latin-1")
    path.write_bytes(valid_line().encode() + b"\n" + bad + b"\n")
    with pytest.raises(CriteoFormatError) as error:
        read_criteo(path)
    assert_error(error, path, 2, "C1", "not hexadecimal")


def test_truncated_gzip(tmp_path):
    path = write_criteo_tsv(
        tmp_path / "cut.gz", [1] * 50, [dense_row()] * 50, [cat_row()] * 50,
    )
    path.write_bytes(path.read_bytes()[:-12])
    with pytest.raises(CriteoFormatError) as error:
        read_criteo(path)
    assert_error(error, path, error.value.line, "cannot read file", "truncated or corrupt")
    assert error.value.line is not None and error.value.line >= 1


def test_gz_suffix_on_plain_text(tmp_path):
    path = write_text(tmp_path / "fake.gz", [valid_line()])
    with pytest.raises(CriteoFormatError) as error:
        read_criteo(path)
    assert_error(error, path, 1, "cannot read file")


@pytest.mark.parametrize("name", ["max_samples", "max_rows_per_table"])
@pytest.mark.parametrize("value", [0, -5])
def test_limit_below_one(tmp_path, name, value):
    path = write_text(tmp_path / "ok.txt", [valid_line()])
    with pytest.raises(CriteoFormatError) as error:
        read_criteo(path, **{name: value})
    assert_error(error, path, None, name, "at least 1", str(value))


@pytest.mark.parametrize("value", [1.5, "10", True])
def test_limit_of_wrong_type(tmp_path, value):
    path = write_text(tmp_path / "ok.txt", [valid_line()])
    with pytest.raises(CriteoFormatError) as error:
        read_criteo(path, max_samples=value)
    assert_error(error, path, None, "max_samples", "must be an int")


def test_bad_limit_reported_before_missing_file(tmp_path):
    path = tmp_path / "absent.txt"
    with pytest.raises(CriteoFormatError) as error:
        read_criteo(path, max_rows_per_table=0)
    assert_error(error, path, None, "max_rows_per_table")


def test_error_is_a_value_error(tmp_path):
    path = write_text(tmp_path / "bad.txt", [valid_line("7")])
    with pytest.raises(ValueError, match="bad.txt:1: label '7'"):
        read_criteo(path)


def test_writer_rejects_wrong_row_lengths(tmp_path):
    with pytest.raises(ValueError, match="12 dense"):
        write_criteo_tsv(tmp_path / "x.txt", [1], [[0] * 12], [cat_row()])
    with pytest.raises(ValueError, match="differ in length"):
        write_criteo_tsv(tmp_path / "x.txt", [1, 0], [dense_row()], [cat_row()])
    assert not (tmp_path / "x.txt").exists()


def test_module_does_not_import_torch():
    code = "import sys, workloads.criteo; print('torch' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True,
        cwd=REPO_ROOT,
    )
    assert result.stdout.strip() == "False"
