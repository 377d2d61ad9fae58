"""Tests of the TT-Rec trade-off study, its report rendering and its subcommand."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pandas as pd
import pytest

from bench.run import timing
from bench.commands import main as cli_main
from bench.commands.tt_study import (StudySettings, paper_embedding_compression, paper_reported,
                                     run_study)
from reports.tt_study import difference_summary, render_tt_study
from workloads import presets
from conftest import FIXTURES_DIR

FIXTURE = FIXTURES_DIR / "tt_study" / "tt_study.csv"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TT_TABLES = (1, 2)
RANKS = (2, 4)


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> tuple[pd.DataFrame, Path]:
    """One small study on the smoke workload, shared by the tests below."""
    out = tmp_path_factory.mktemp("tt_study")
    settings = StudySettings(tt_tables=TT_TABLES, ranks=RANKS, seeds=(0,), budget=48,
                             batch_size=16, eval_batches=1, validation_batches=1, eval_every=16,
                             patience=1)
    frame = run_study(presets.smoke(), settings, out, progress=False)
    return frame, out


def test_one_row_per_configuration_plus_dense(study):
    frame, _ = study
    assert list(frame.config) == ["dense", "tt K=1 R=2", "tt K=1 R=4", "tt K=2 R=2",
                                  "tt K=2 R=4"]
    assert list(frame.tt_tables) == [0, 1, 1, 2, 2]
    assert pd.isna(frame["rank"].iloc[0]) and list(frame["rank"].iloc[1:]) == [2, 4, 2, 4]
    assert (frame.budget_samples == 48).all() and (frame.batch_size == 16).all()
    # Early stopping: at most the budget's 3 steps, the kept state is a validated one.
    assert frame.steps_trained.between(1, 3).all()
    assert (frame.best_step <= frame.steps_trained).all() and (frame.best_step >= 1).all()


def test_seeds_and_caches_pair_each_student_with_its_seeds_dense(tmp_path):
    settings = StudySettings(tt_tables=(1,), ranks=(2,), caches=("lfu", "none"), seeds=(0, 1),
                             budget=32, batch_size=16, eval_batches=1, validation_batches=1,
                             eval_every=16, patience=1)
    frame = run_study(presets.smoke(), settings, tmp_path, progress=False)
    assert list(frame.config) == ["dense", "tt K=1 R=2", "tt K=1 R=2 no cache"] * 2
    assert list(frame.seed) == [0, 0, 0, 1, 1, 1]
    assert list(frame.cache) == ["n/a", "lfu", "none"] * 2
    summary = pd.read_csv(tmp_path / "tt_study_summary.csv")
    assert list(summary.config) == ["tt K=1 R=2", "tt K=1 R=2 no cache"]
    assert (summary.seeds == 2).all()
    for seed in (0, 1):
        rows = frame[frame.seed == seed].set_index("config")
        difference = rows.auc["tt K=1 R=2"] - rows.auc["dense"]
        assert frame[frame.seed == seed].embedding_compression.iloc[0] == 1.0
        assert math.isfinite(difference)
    markdown = (tmp_path / "tt_study.md").read_text()
    assert "t-interval" in markdown and "0.03% to 0.3%" in markdown


def test_difference_summary_is_a_paired_t_interval_over_seeds():
    rows = []
    for seed, (dense_auc, tt_auc) in enumerate([(0.70, 0.69), (0.72, 0.70), (0.71, 0.71)]):
        for config, tables, auc in (("dense", 0, dense_auc), ("tt K=7 R=16", 7, tt_auc)):
            rows.append({"config": config, "seed": seed, "tt_tables": tables, "rank": 16,
                         "cache": "lfu", "auc": auc, "logloss": 0.5, "accuracy": 0.75,
                         "embedding_compression": 1.0, "steps_trained": 10,
                         "stopped_early": True, "tt_hit_rate": 0.5})
    summary = difference_summary(pd.DataFrame(rows)).iloc[0]
    differences = [-0.01, -0.02, 0.0]
    mean = sum(differences) / 3
    # t(0.975, 2) = 4.3027; the standard error of [-0.01, -0.02, 0] is 0.01 / sqrt(3).
    half_width = 4.302652729911275 * 0.01 / math.sqrt(3)
    assert summary.auc_diff == pytest.approx(mean)
    assert summary.auc_diff_low == pytest.approx(mean - half_width)
    assert summary.auc_diff_high == pytest.approx(mean + half_width)
    assert summary.logloss_diff == 0 and summary.logloss_diff_low == 0
    assert summary.seeds == 3 and summary.stopped_early == 3


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
    assert [path.name for path in paths] == ["tt_study_summary.csv", "tt_study.md",
                                             "tt_study.png"]
    markdown = paths[1].read_text()
    assert "| tt K=7 R=32 | 0 | 8.58 | 9.54 | 4.4x | 4.1x | 117.4x | 117.0x |" in markdown
    assert "~4.0x" in markdown and "teacher-labelled" in markdown
    assert paths[2].read_bytes().startswith(PNG_SIGNATURE)


def test_time_each_call_returns_one_positive_time_per_call():
    calls = []
    seconds = timing.time_each_call(lambda: calls.append(sum(range(100))), 4)
    assert len(seconds) == 4 and len(calls) == 4
    assert all(isinstance(value, float) and value > 0 for value in seconds)


@pytest.mark.parametrize("argv, words", [
    (["--tt-rank", "x"], ["--tt-rank", "'x'"]), (["--tt-tables", "0"], ["--tt-tables", "'0'"]),
    (["--workload", "smoke", "--tt-tables", "4"], ["--tt-tables 4", "give 1..3"]),
    (["--budget", "0"], ["--budget", "'0'"]), (["--budget", "many"], ["--budget", "'many'"]),
    (["--seeds", "-1"], ["--seeds", "'-1'"]), (["--cache", "fifo"], ["'fifo'", "lfu"]),
    (["--configs", "7:x"], ["--configs", "'7:x'", "K:RANK:CACHE"]),
    (["--patience", "0"], ["--patience"]), (["--workload", "nope"], ["'nope'"]),
    (["--out", "{a_file}/study"], ["--out", "a_file is not a directory"]),
])
def test_cli_rejects_bad_input(argv, words, capsys, tmp_path):
    (tmp_path / "a_file").write_text("not a directory\n")
    argv = [value.format(a_file=tmp_path / "a_file") for value in argv]
    out = [] if "--out" in argv else ["--out", str(tmp_path / "out")]
    # The one path of every command: a UsageError, printed by the entry point, exit 2.
    assert cli_main(["tt-study", *argv, *out]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and error.startswith("run_bench.py tt-study: error: ")
    assert "Traceback" not in error
    for word in words:
        assert word in error, (word, error)
    assert not (tmp_path / "out").exists()
