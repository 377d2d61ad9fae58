"""Tests of the TT-Rec trade-off study, its report rendering and its subcommand."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pandas as pd
import pytest

from bench.run import timing
from bench.commands import main as cli_main
from bench.commands.tt_study import paper_embedding_compression, paper_reported, run_study
from reports.tt_study import render_tt_study
from workloads import presets

FIXTURE = Path(__file__).parent / "fixtures" / "tt_study" / "tt_study.csv"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TT_TABLES = [1, 2]
RANKS = [2, 4]


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> tuple[pd.DataFrame, Path]:
    """One small study on the smoke workload, shared by the tests below."""
    out = tmp_path_factory.mktemp("tt_study")
    frame = run_study(presets.smoke(), TT_TABLES, RANKS, steps=3, batch_size=16, seed=0,
                      out_dir=out, progress=False, eval_batches=1)
    return frame, out


def test_one_row_per_configuration_plus_dense(study):
    frame, _ = study
    assert list(frame.config) == ["dense", "tt K=1 R=2", "tt K=1 R=4", "tt K=2 R=2",
                                  "tt K=2 R=4"]
    assert list(frame.tt_tables) == [0, 1, 1, 2, 2]
    assert pd.isna(frame["rank"].iloc[0]) and list(frame["rank"].iloc[1:]) == [2, 4, 2, 4]
    assert (frame.steps == 3).all() and (frame.batch_size == 16).all()


def test_sizes_and_compressions_are_consistent(study):
    frame, _ = study
    dense, compressed = frame.iloc[0], frame.iloc[1:]
    assert dense.embedding_compression == 1.0 and dense.model_compression == 1.0
    assert (compressed.embedding_bytes < dense.embedding_bytes).all()
    assert (compressed.model_bytes < dense.model_bytes).all()
    assert (compressed.embedding_compression > 1).all() and (compressed.model_compression > 1).all()
    assert compressed.embedding_compression.tolist() == pytest.approx(
        (dense.embedding_bytes / compressed.embedding_bytes).tolist())
    # The MLPs are the same in every model, so model bytes differ by embedding bytes alone.
    mlp_bytes = frame.model_bytes - frame.embedding_bytes
    assert (mlp_bytes == mlp_bytes.iloc[0]).all() and mlp_bytes.iloc[0] > 0
    assert (compressed.tt_core_bytes > 0).all()
    assert (compressed.tt_core_bytes + compressed.cache_bytes <= compressed.embedding_bytes).all()
    # More tables compressed at the same rank means a smaller model.
    by_config = frame.set_index("config")
    assert by_config.embedding_bytes["tt K=2 R=2"] < by_config.embedding_bytes["tt K=1 R=2"]


def test_accuracy_and_times_are_finite(study):
    frame, _ = study
    for column in ["logloss", "auc", "teacher_logloss", "teacher_auc", "step_median_s",
                   "step_iqr_s"]:
        assert frame[column].map(math.isfinite).all(), column
    assert (frame.logloss > 0).all() and frame.auc.between(0, 1).all()
    assert (frame.step_median_s > 0).all()
    assert frame.tt_hit_rate.iloc[1:].between(0, 1).all() and pd.isna(frame.tt_hit_rate.iloc[0])


def test_paper_columns_come_from_the_full_size_kaggle_formula(study):
    frame, _ = study
    assert frame.paper_embedding_compression.iloc[0] == 1.0
    assert frame.paper_embedding_compression.iloc[1] == pytest.approx(
        paper_embedding_compression(1, 2))
    assert frame.paper_reported.isna().all()  # the paper has no K=1 or K=2 figures
    assert paper_embedding_compression(7, 32) == pytest.approx(117, rel=0.01)
    assert paper_embedding_compression(7, 8) == pytest.approx(221, rel=0.01)
    assert paper_reported(7, 32) == 117 and paper_reported(3, 16) == 4
    assert math.isnan(paper_reported(5, 16))


def test_outputs_are_written(study):
    frame, out = study
    written = pd.read_csv(out / "tt_study.csv")
    assert list(written.columns) == list(frame.columns) and len(written) == len(frame)
    markdown = (out / "tt_study.md").read_text()
    assert "| tt K=2 R=4 |" in markdown and "not measured" in markdown
    assert (out / "tt_study.png").read_bytes().startswith(PNG_SIGNATURE)
    assert not list(out.glob(".*tmp"))


def test_render_from_fixture(tmp_path):
    csv_path = tmp_path / "tt_study.csv"
    shutil.copy(FIXTURE, csv_path)
    paths = render_tt_study(csv_path, tmp_path / "out")
    assert [path.name for path in paths] == ["tt_study.md", "tt_study.png"]
    markdown = paths[0].read_text()
    assert "| tt K=7 R=32 | 8.58 | 9.54 | 4.4x | 4.1x | 117.4x | 117.0x | 0.5680 |" in markdown
    assert "~4.0x" in markdown and "teacher-labelled" in markdown
    assert paths[1].read_bytes().startswith(PNG_SIGNATURE)


def test_time_each_call_returns_one_positive_time_per_call():
    calls = []
    seconds = timing.time_each_call(lambda: calls.append(sum(range(100))), 4)
    assert len(seconds) == 4 and len(calls) == 4
    assert all(isinstance(value, float) and value > 0 for value in seconds)


def _exit_code(argv: list[str]) -> int:
    """The CLI's exit status, whether it returns it or argparse raises SystemExit."""
    try:
        return cli_main(argv)
    except SystemExit as exit_:
        return exit_.code


@pytest.mark.parametrize("argv", [["--tt-rank", "x"], ["--tt-tables", "0"],
                                  ["--workload", "smoke", "--tt-tables", "4"],
                                  ["--steps", "0"], ["--steps", "many"]])
def test_cli_rejects_bad_input(argv, capsys, tmp_path):
    assert _exit_code(["tt-study", *argv, "--out", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "error" in error
    assert not (tmp_path / "out").exists()
