"""TT-Rec trade-off study: embedding size against accuracy and training-step time per (K, rank)."""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch

from bench.records import write_atomic
from bench.models import quality
from bench.run import timing
from bench.models.dlrm import DLRM, batch_tensors, build_dlrm
from bench.ops.dlrm import EVAL_BATCHES, LEARNING_RATE, train_step, warm_up_tt
from bench.models.teacher import EVAL_FIRST_BATCH, evaluation_set, label_batches, teacher_model
from bench.models.ttrec.factorize import embedding_compression_ratio
from workloads import presets
from workloads.specs import IndexDistribution, SpecError, WorkloadSpec

TRAIN_FIRST_BATCH = 100  # training batches are 100, 101, ...: clear of the TT warm-up batches
# The TT-Rec paper's Kaggle dim and its published embedding compressions.
PAPER_DIM = 16
PAPER_REPORTED = {(7, 32): 117.0, (7, 8): 221.0}
PAPER_REPORTED_ANY_RANK = {3: 4.0}  # 3 tables give about 4x at every rank (rank barely matters)
DEFAULT_TT_TABLES = "3,5,7"
DEFAULT_TT_RANKS = "8,16,32"
DEFAULT_MAX_ROWS = 100_000
DEFAULT_STEPS = 200
DEFAULT_BATCH_SIZE = 512
CSV_NAME = "tt_study.csv"
PROGRAM = "run_bench.py tt-study"


def paper_embedding_compression(tt_tables: int, rank: int) -> float:
    """Embedding compression of the full-size Kaggle tables by formula (fp32, dim 16, no cache)."""
    if tt_tables == 0:
        return 1.0
    return embedding_compression_ratio(presets.KAGGLE_ROWS, PAPER_DIM, tt_tables, rank)


def paper_reported(tt_tables: int, rank: int) -> float:
    """The paper's published Kaggle compression for K tables at rank R, NaN where it has none."""
    if (tt_tables, rank) in PAPER_REPORTED:
        return PAPER_REPORTED[(tt_tables, rank)]
    return PAPER_REPORTED_ANY_RANK.get(tt_tables, float("nan"))


def validate(workload: WorkloadSpec, tt_tables_list: Sequence[int], ranks: Sequence[int],
             steps: int, batch_size: int) -> None:
    """Raise ValueError with a one-line reason for settings the study cannot run."""
    tables = len(workload.tables)
    for count in tt_tables_list:
        if not 1 <= count <= tables:
            raise ValueError(f"--tt-tables {count}: workload {workload.name} has {tables} "
                             f"tables; give 1..{tables}")
    for rank in ranks:
        if rank < 1:
            raise ValueError(f"--tt-rank {rank}: ranks must be >= 1")
    if tt_tables_list and not ranks:
        raise ValueError("--tt-rank: give at least one rank")
    # Training batches must stay below the evaluation batches so no evaluated sample is trained on.
    most_steps = EVAL_FIRST_BATCH - TRAIN_FIRST_BATCH
    if not 1 <= steps <= most_steps:
        raise ValueError(f"--steps {steps}: give 1..{most_steps}")
    if batch_size < 1:
        raise ValueError(f"--batch-size {batch_size}: must be >= 1")


def training_data(workload: WorkloadSpec, seed: int, steps: int, batch_size: int) -> list[tuple]:
    """Teacher-labelled (dense, indices, offsets, labels) tensors, one batch per step."""
    teacher = teacher_model(workload, seed)
    labelled = label_batches(teacher, workload, seed,
                             range(TRAIN_FIRST_BATCH, TRAIN_FIRST_BATCH + steps), batch_size)
    cpu = torch.device("cpu")
    return [(*batch_tensors(item.batch, cpu), torch.from_numpy(item.labels)) for item in labelled]


def predict(model: DLRM, labelled) -> np.ndarray:
    """Predicted CTRs (float64 sigmoid of the logits) over labelled batches."""
    outputs = []
    with torch.inference_mode():
        for item in labelled:
            logits = model(*batch_tensors(item.batch, torch.device("cpu")))
            outputs.append(torch.sigmoid(logits.double()).numpy())
    return np.concatenate(outputs)


def model_sizes(model: DLRM) -> dict:
    """Bytes of the embeddings (TT cores, caches and dense tables) and of the MLPs."""
    mlp_bytes = sum(parameter.numel() * parameter.element_size()
                    for name, parameter in model.named_parameters()
                    if not name.startswith("embeddings"))
    embeddings = model.embeddings
    if hasattr(embeddings, "memory"):
        memory = embeddings.memory()
        embedding_bytes = memory["embedding_bytes"]
        tt_core_bytes, cache_bytes = memory["tt_bytes"], memory["cache_bytes"]
    else:
        embedding_bytes = sum(weight.numel() * weight.element_size()
                              for weight in embeddings.table_weights())
        tt_core_bytes, cache_bytes = 0, 0
    return {"embedding_bytes": embedding_bytes, "model_bytes": embedding_bytes + mlp_bytes,
            "tt_core_bytes": tt_core_bytes, "cache_bytes": cache_bytes}


def config_name(tt_tables: int, rank: int) -> str:
    """'dense' or 'tt K=.. R=..'."""
    return "dense" if tt_tables == 0 else f"tt K={tt_tables} R={rank}"


def run_config(workload: WorkloadSpec, seed: int, tt_tables: int, rank: int,
               training: list[tuple], evaluation) -> dict:
    """Train one student on the shared batches and measure its size, accuracy and step times."""
    settings = {"tt_tables": tt_tables, "tt_rank": rank} if tt_tables else {}
    model = build_dlrm(workload, seed + 1, sparse=True, **settings)
    warm_up_tt(model, workload, seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE)
    batches = iter(training)

    def step() -> None:
        dense, indices, offsets, labels = next(batches)
        train_step(model, optimizer, dense, indices, offsets, labels)

    model.train()
    seconds = timing.time_each_call(step, len(training))
    # Read before evaluation, whose lookups would also count.
    hit_rate = model.embeddings.hit_rate() if tt_tables else float("nan")
    model.eval()
    labels = np.concatenate([item.labels for item in evaluation])
    predicted = predict(model, evaluation)
    summary = timing.summarize(seconds)
    return {"config": config_name(tt_tables, rank), "tt_tables": tt_tables,
            "rank": rank if tt_tables else float("nan"), **model_sizes(model),
            "paper_embedding_compression": paper_embedding_compression(tt_tables, rank),
            "paper_reported": paper_reported(tt_tables, rank) if tt_tables else float("nan"),
            "logloss": quality.logloss(labels, predicted), "auc": quality.auc(labels, predicted),
            "step_median_s": summary.median_s, "step_iqr_s": summary.iqr_s,
            "step_total_s": float(sum(seconds)), "tt_hit_rate": hit_rate}


COLUMNS = ["config", "tt_tables", "rank", "steps", "batch_size", "embedding_bytes", "model_bytes",
           "embedding_compression", "model_compression", "paper_embedding_compression",
           "paper_reported", "logloss", "auc", "teacher_logloss", "teacher_auc", "step_median_s",
           "step_iqr_s", "tt_hit_rate", "tt_core_bytes", "cache_bytes", "step_total_s",
           "learning_rate", "eval_samples", "workload", "largest_table_rows", "seed"]


def write_csv_atomic(frame: pd.DataFrame, path: Path) -> None:
    """Write the CSV so readers see the old or the new file, never a partial one."""
    write_atomic(path, frame.to_csv(index=False))


def run_study(workload: WorkloadSpec, tt_tables_list: Sequence[int], ranks: Sequence[int],
              steps: int, batch_size: int, seed: int, out_dir: Path | str, progress: bool = True,
              eval_batches: int = EVAL_BATCHES) -> pd.DataFrame:
    """Train the dense model and every (K, rank) TT model alike; write tt_study.csv/.md/.png."""
    tt_tables_list, ranks = list(dict.fromkeys(tt_tables_list)), list(dict.fromkeys(ranks))
    validate(workload, tt_tables_list, ranks, steps, batch_size)
    configs = [(0, 0)] + [(count, rank) for count in tt_tables_list for rank in ranks]
    # Every model sees the same batches in the same order, labelled once.
    training = training_data(workload, seed, steps, batch_size)
    evaluation = evaluation_set(workload, seed, eval_batches)
    labels = np.concatenate([item.labels for item in evaluation])
    teacher_probabilities = np.concatenate([item.probabilities for item in evaluation])
    shared = {"steps": steps, "batch_size": batch_size,
              "teacher_logloss": quality.logloss(labels, teacher_probabilities),
              "teacher_auc": quality.auc(labels, teacher_probabilities),
              "learning_rate": LEARNING_RATE, "eval_samples": int(labels.size),
              "workload": workload.name,
              "largest_table_rows": max(table.rows for table in workload.tables), "seed": seed}
    records = []
    for number, (count, rank) in enumerate(configs, start=1):
        record = {**run_config(workload, seed, count, rank, training, evaluation), **shared}
        records.append(record)
        if progress:
            print(f"tt-study [{number}/{len(configs)}] {record['config']}: "
                  f"step {record['step_median_s'] * 1e3:.1f} ms, "
                  f"embedding {record['embedding_bytes'] / (1 << 20):.2f} MiB, "
                  f"logloss {record['logloss']:.4f}, auc {record['auc']:.4f}",
                  file=sys.stderr, flush=True)
    frame = pd.DataFrame.from_records(records)
    # Compressions are measured against the dense model's own bytes (the first row).
    frame["embedding_compression"] = frame.embedding_bytes.iloc[0] / frame.embedding_bytes
    frame["model_compression"] = frame.model_bytes.iloc[0] / frame.model_bytes
    # Nullable integers keep ranks whole in the CSV while the dense row's stays empty.
    frame["rank"] = frame["rank"].astype("Int64")
    frame = frame[COLUMNS]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_csv_atomic(frame, out / CSV_NAME)
    from reports.tt_study import render_tt_study

    render_tt_study(out / CSV_NAME, out)
    return frame


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports bad input as one line on stderr and exits 2."""

    def error(self, message: str):
        """Print '<prog>: error: message' and exit 2."""
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    """Arguments of the tt-study subcommand."""
    parser = OneLineParser(
        prog=PROGRAM,
        description="Train a dense DLRM and TT-Rec DLRMs (K largest tables at rank R) for the "
                    "same SGD steps on teacher labels; report size, log-loss, AUC and step time.")
    parser.add_argument("--workload", default="kaggle", help="preset name (default kaggle)")
    parser.add_argument("--max-rows", type=int, default=DEFAULT_MAX_ROWS,
                        help=f"cap every table at this many rows (default {DEFAULT_MAX_ROWS})")
    parser.add_argument("--tt-tables", default=DEFAULT_TT_TABLES,
                        help=f"comma-separated K values (default {DEFAULT_TT_TABLES})")
    parser.add_argument("--tt-rank", default=DEFAULT_TT_RANKS,
                        help=f"comma-separated TT ranks (default {DEFAULT_TT_RANKS})")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS,
                        help=f"SGD steps per model (default {DEFAULT_STEPS})")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE,
                        help=f"training batch size (default {DEFAULT_BATCH_SIZE})")
    parser.add_argument("--eval-batches", type=int, default=EVAL_BATCHES,
                        help=f"evaluation batches of 2048 samples (default {EVAL_BATCHES})")
    parser.add_argument("--dist", help="index distribution for every table: uniform or zipf:ALPHA")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="output directory (default results/tt_study/<timestamp>)")
    return parser


def parse_counts(flag: str, text: str) -> list[int]:
    """Comma-separated whole numbers; ValueError names the flag."""
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"{flag} {text!r}: give whole numbers, e.g. 8,16,32") from None
    if not values:
        raise ValueError(f"{flag} {text!r}: give at least one number")
    return values


def main(argv: list[str]) -> int:
    """Run the study from the command line; bad input is one stderr line and exit 2."""
    args = build_parser().parse_args(argv)
    try:
        tt_tables_list = parse_counts("--tt-tables", args.tt_tables)
        ranks = parse_counts("--tt-rank", args.tt_rank)
        if args.eval_batches < 1:
            raise ValueError(f"--eval-batches {args.eval_batches}: must be >= 1")
        workload = presets.preset(args.workload).capped(args.max_rows)
        if args.dist:
            workload = workload.with_distribution(IndexDistribution.parse(args.dist))
        validate(workload, tt_tables_list, ranks, args.steps, args.batch_size)
    except (ValueError, SpecError) as error:
        print(f"{PROGRAM}: error: {error}", file=sys.stderr)
        return 2
    # A timestamp names the directory only; no duration is measured here.
    out = Path(args.out or Path("results", "tt_study",
                                datetime.datetime.now().strftime("%Y%m%d-%H%M%S")))
    frame = run_study(workload, tt_tables_list, ranks, args.steps, args.batch_size, args.seed,
                      out, progress=True, eval_batches=args.eval_batches)
    print(f"wrote {out / CSV_NAME} ({len(frame)} configurations), tt_study.md and tt_study.png")
    return 0
