"""TT-Rec accuracy study: dense and TT students, early stopping, over seeds; size and accuracy."""

from __future__ import annotations

import argparse
import copy
import dataclasses
import sys
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd
import torch

from bench.records import write_atomic
from bench.models import quality
from bench.run import timing
from bench.models.dlrm import DLRM, TTMixedEmbeddings, batch_tensors, build_dlrm
from bench.ops.dlrm import EVAL_BATCHES, LEARNING_RATE, train_step, warm_up_tt
from bench.models.teacher import (EVAL_BATCH_SIZE, EVAL_FIRST_BATCH, evaluation_set,
                                  label_batches, teacher_model)
from bench.models.ttrec import CACHE_POLICIES
from bench.models.ttrec.factorize import embedding_compression_ratio
from bench.commands.common import (OneLineParser, UsageError, choice_list, new_run_directory,
                                   non_negative_ints, positive_int, whole_numbers)
from workloads import presets
from workloads.specs import IndexDistribution, WorkloadSpec

TRAIN_FIRST_BATCH = 100  # training batches are 100, 101, ...: clear of the TT warm-up batches
# Validation (early stopping) batches: clear of training (< 20,000), of the test set (20,000 on,
# teacher.EVAL_FIRST_BATCH) and of the calibration batch (10,000).
VALIDATION_FIRST_BATCH = 30_000
# The TT-Rec paper's Kaggle dim and its published embedding compressions.
PAPER_DIM = 16
PAPER_REPORTED = {(7, 32): 117.0, (7, 8): 221.0}
PAPER_REPORTED_ANY_RANK = {3: 4.0}  # 3 tables give about 4x at every rank (rank barely matters)
# The paper's accuracy cost on Kaggle: 0.03% to 0.3% (relative), quoted beside the differences.
PAPER_ACCURACY_LOSS_PERCENT = (0.03, 0.3)
DEFAULT_TT_TABLES = "3,7"
DEFAULT_TT_RANKS = "8,16,32"
DEFAULT_CACHES = "lfu,none"
DEFAULT_SEEDS = "0,1,2"
# Students learn the rows they see often: a Zipf stream over capped tables gives the hot rows
# thousands of samples within a budget a CPU can train in minutes (see the README's TT-Rec notes).
DEFAULT_MAX_ROWS = 20_000
DEFAULT_DIST = "zipf:1.05"
DEFAULT_BUDGET = 768_000
DEFAULT_BATCH_SIZE = 512
DEFAULT_EVAL_EVERY = 25_600  # samples between validation passes (50 steps of 512)
DEFAULT_PATIENCE = 4  # validation passes without a better log-loss before stopping
DEFAULT_VALIDATION_BATCHES = 4  # x 2048 samples
CSV_NAME = "tt_study.csv"
DEFAULT_OUT = Path("results", "tt_study")  # a new timestamped folder here unless --out


@dataclasses.dataclass(frozen=True)
class StudySettings:
    """What a study trains: the students (a K x rank x cache grid, or configs), the seeds, the
    sample budget and the early stopping."""

    tt_tables: tuple[int, ...] = ()  # K: how many of the largest tables are TT-compressed
    ranks: tuple[int, ...] = ()
    caches: tuple[str, ...] = ("lfu",)
    seeds: tuple[int, ...] = (0,)  # teacher, data and student initialisation
    budget: int = DEFAULT_BUDGET  # most training samples per model
    batch_size: int = DEFAULT_BATCH_SIZE
    eval_batches: int = EVAL_BATCHES  # test batches of EVAL_BATCH_SIZE samples
    validation_batches: int = DEFAULT_VALIDATION_BATCHES  # early-stopping batches
    eval_every: Optional[int] = None  # samples between validations (None: default or budget)
    patience: int = DEFAULT_PATIENCE  # validations without a better log-loss before stopping
    configs: Optional[tuple[tuple[int, int, str], ...]] = None  # (K, rank, cache): no grid

    def students(self) -> list[tuple[int, int, str]]:
        """(K, rank, cache) of every TT student, in order, without repeats."""
        if self.configs is not None:
            return list(dict.fromkeys(self.configs))
        return list(dict.fromkeys((count, rank, cache) for count in self.tt_tables
                                  for rank in self.ranks for cache in self.caches))

    def eval_every_samples(self) -> int:
        """Training samples between validation passes."""
        return self.eval_every or min(DEFAULT_EVAL_EVERY, self.budget)


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


def validate(workload: WorkloadSpec, settings: StudySettings) -> None:
    """Raise UsageError with a one-line reason for settings the study cannot run."""
    tables = len(workload.tables)
    if settings.configs is None and settings.tt_tables and not settings.ranks:
        raise UsageError("--tt-rank: give at least one rank")
    for count, rank, cache in settings.students():
        if not 1 <= count <= tables:
            raise UsageError(f"--tt-tables {count}: workload {workload.name} has {tables} "
                             f"tables; give 1..{tables}")
        if rank < 1:
            raise UsageError(f"--tt-rank {rank}: ranks must be >= 1")
        if cache not in CACHE_POLICIES:
            raise UsageError(f"--cache {cache!r}: choose from {', '.join(CACHE_POLICIES)}")
    if not settings.seeds:
        raise UsageError("--seeds: give at least one seed")
    if any(seed < 0 for seed in settings.seeds):
        raise UsageError(f"--seeds {list(settings.seeds)}: seeds must be >= 0")
    batch_size, budget = settings.batch_size, settings.budget
    if batch_size < 1:
        raise UsageError(f"--batch-size {batch_size}: must be >= 1")
    # Training batches must stay below the test batches so no evaluated sample is trained on.
    most_samples = (EVAL_FIRST_BATCH - TRAIN_FIRST_BATCH) * batch_size
    if not batch_size <= budget <= most_samples:
        raise UsageError(f"--budget {budget}: give {batch_size}..{most_samples} samples "
                         f"(at least one batch of {batch_size})")
    if not batch_size <= settings.eval_every_samples() <= budget:
        raise UsageError(f"--eval-every {settings.eval_every_samples()}: give "
                         f"{batch_size}..{budget} samples (one batch up to the budget)")
    if settings.patience < 1:
        raise UsageError(f"--patience {settings.patience}: must be >= 1")
    for flag, value in (("--eval-batches", settings.eval_batches),
                        ("--validation-batches", settings.validation_batches)):
        if value < 1:
            raise UsageError(f"{flag} {value}: must be >= 1")


def training_data(workload: WorkloadSpec, seed: int, steps: int, batch_size: int) -> list[tuple]:
    """Teacher-labelled (dense, indices, offsets, labels) tensors, one batch per step."""
    teacher = teacher_model(workload, seed)
    labelled = label_batches(teacher, workload, seed,
                             range(TRAIN_FIRST_BATCH, TRAIN_FIRST_BATCH + steps), batch_size)
    cpu = torch.device("cpu")
    return [(*batch_tensors(item.batch, cpu), torch.from_numpy(item.labels)) for item in labelled]


def validation_set(workload: WorkloadSpec, seed: int, num_batches: int) -> list:
    """Teacher-labelled batches for early stopping, disjoint from training and test batches."""
    teacher = teacher_model(workload, seed)
    return label_batches(teacher, workload, seed,
                         range(VALIDATION_FIRST_BATCH, VALIDATION_FIRST_BATCH + num_batches),
                         EVAL_BATCH_SIZE)


def predict(model: DLRM, labelled) -> np.ndarray:
    """Predicted CTRs (float64 sigmoid of the logits) over labelled batches."""
    outputs = []
    with torch.inference_mode():
        for item in labelled:
            logits = model(*batch_tensors(item.batch, torch.device("cpu")))
            outputs.append(torch.sigmoid(logits.double()).numpy())
    return np.concatenate(outputs)


def scores(model: DLRM, labelled) -> dict:
    """Log-loss, AUC and accuracy of a model's predictions over labelled batches."""
    was_training = model.training
    model.eval()
    labels = np.concatenate([item.labels for item in labelled])
    predicted = predict(model, labelled)
    model.train(was_training)
    return {"logloss": quality.logloss(labels, predicted), "auc": quality.auc(labels, predicted),
            "accuracy": quality.accuracy(labels, predicted)}


def model_sizes(model: DLRM) -> dict:
    """Bytes of the embeddings (TT cores, caches and dense tables) and of the MLPs."""
    mlp_bytes = sum(parameter.numel() * parameter.element_size()
                    for name, parameter in model.named_parameters()
                    if not name.startswith("embeddings"))
    embeddings = model.embeddings
    if isinstance(embeddings, TTMixedEmbeddings):
        memory = embeddings.memory()
        embedding_bytes = memory["embedding_bytes"]
        tt_core_bytes, cache_bytes = memory["tt_bytes"], memory["cache_bytes"]
    else:
        embedding_bytes = sum(weight.numel() * weight.element_size()
                              for weight in embeddings.table_weights())
        tt_core_bytes, cache_bytes = 0, 0
    return {"embedding_bytes": embedding_bytes, "model_bytes": embedding_bytes + mlp_bytes,
            "tt_core_bytes": tt_core_bytes, "cache_bytes": cache_bytes}


def config_name(tt_tables: int, rank: int, cache: str = "lfu") -> str:
    """'dense' or 'tt K=.. R=..' (plus ' no cache' / ' lru' for other cache policies)."""
    if tt_tables == 0:
        return "dense"
    suffix = {"lfu": "", "none": " no cache"}.get(cache, f" {cache}")
    return f"tt K={tt_tables} R={rank}{suffix}"


def train_early_stopping(model: DLRM, training: list[tuple], validation, eval_every_steps: int,
                         patience: int) -> dict:
    """SGD over the training batches, validating every eval_every_steps steps; stops after
    `patience` validations without a lower log-loss and restores the best validated state."""
    optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE)
    model.train()
    step_seconds: list[float] = []
    best = {"logloss": float("inf"), "step": 0, "state": copy.deepcopy(model.state_dict())}
    since_best, steps_done, stopped_early = 0, 0, False
    for start in range(0, len(training), eval_every_steps):
        chunk = iter(training[start:start + eval_every_steps])

        def step(chunk=chunk) -> None:
            dense, indices, offsets, labels = next(chunk)
            train_step(model, optimizer, dense, indices, offsets, labels)

        count = min(eval_every_steps, len(training) - start)
        step_seconds += timing.time_each_call(step, count)
        steps_done += count
        validation_logloss = scores(model, validation)["logloss"]
        if validation_logloss < best["logloss"]:
            best = {"logloss": validation_logloss, "step": steps_done,
                    "state": copy.deepcopy(model.state_dict())}
            since_best = 0
        else:
            since_best += 1
            if since_best >= patience:
                stopped_early = True
                break
    model.load_state_dict(best["state"])
    return {"steps_trained": steps_done, "best_step": best["step"],
            "stopped_early": stopped_early, "validation_logloss": best["logloss"],
            "step_seconds": step_seconds}


def run_config(workload: WorkloadSpec, seed: int, tt_tables: int, rank: int, cache: str,
               training: list[tuple], validation, test, eval_every_steps: int,
               patience: int) -> dict:
    """Train one student with early stopping on the shared batches; measure size and accuracy."""
    settings = ({"tt_tables": tt_tables, "tt_rank": rank, "tt_cache": cache} if tt_tables
                else {})
    model = build_dlrm(workload, seed + 1, sparse=True, **settings)
    warm_up_tt(model, workload, seed)
    trained = train_early_stopping(model, training, validation, eval_every_steps, patience)
    # Read before the test pass, whose lookups would also count.
    hit_rate = model.embeddings.hit_rate() if tt_tables else float("nan")
    summary = timing.summarize(trained.pop("step_seconds"))
    return {"config": config_name(tt_tables, rank, cache), "tt_tables": tt_tables,
            "rank": rank if tt_tables else float("nan"),
            "cache": cache if tt_tables else "n/a", **model_sizes(model),
            "paper_embedding_compression": paper_embedding_compression(tt_tables, rank),
            "paper_reported": paper_reported(tt_tables, rank) if tt_tables else float("nan"),
            **scores(model, test), **trained,
            "step_median_s": summary.median_s, "step_iqr_s": summary.iqr_s,
            "tt_hit_rate": hit_rate}


COLUMNS = ["config", "seed", "tt_tables", "rank", "cache", "budget_samples", "batch_size",
           "steps_trained", "best_step", "stopped_early", "validation_logloss",
           "embedding_bytes", "model_bytes", "embedding_compression", "model_compression",
           "paper_embedding_compression", "paper_reported", "logloss", "auc", "accuracy",
           "teacher_logloss", "teacher_auc", "teacher_accuracy", "step_median_s", "step_iqr_s",
           "tt_hit_rate", "tt_core_bytes", "cache_bytes", "learning_rate", "eval_samples",
           "validation_samples", "workload", "distribution", "largest_table_rows"]


def write_csv_atomic(frame: pd.DataFrame, path: Path) -> None:
    """Write the CSV so readers see the old or the new file, never a partial one."""
    write_atomic(path, frame.to_csv(index=False))


def finish_frame(records: list[dict]) -> pd.DataFrame:
    """The study's rows with compressions against the same seed's dense model."""
    frame = pd.DataFrame.from_records(records)
    dense_bytes = frame[frame.tt_tables == 0].set_index("seed")
    frame["embedding_compression"] = (frame.seed.map(dense_bytes.embedding_bytes)
                                      / frame.embedding_bytes)
    frame["model_compression"] = frame.seed.map(dense_bytes.model_bytes) / frame.model_bytes
    # Nullable integers keep ranks whole in the CSV while the dense row's stays empty.
    frame["rank"] = frame["rank"].astype("Int64")
    return frame[COLUMNS]


def run_study(workload: WorkloadSpec, settings: StudySettings, out_dir: Path | str,
              progress: bool = True) -> pd.DataFrame:
    """Per seed, train the dense model and every (K, rank, cache) TT student on the same
    teacher-labelled stream with early stopping; write tt_study.csv (after every model),
    then tt_study.md / tt_study_summary.csv / tt_study.png."""
    validate(workload, settings)
    seeds = list(dict.fromkeys(settings.seeds))
    batch_size, validation_batches = settings.batch_size, settings.validation_batches
    steps = settings.budget // batch_size
    eval_every_steps = max(1, settings.eval_every_samples() // batch_size)
    configs = [(0, 0, "n/a")] + settings.students()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    records: list[dict] = []
    total = len(configs) * len(seeds)
    for seed in seeds:
        # Every model of a seed sees the same batches in the same order, labelled once.
        training = training_data(workload, seed, steps, batch_size)
        validation = validation_set(workload, seed, validation_batches)
        test = evaluation_set(workload, seed, settings.eval_batches)
        labels = np.concatenate([item.labels for item in test])
        teacher_probabilities = np.concatenate([item.probabilities for item in test])
        shared = {"seed": seed, "budget_samples": steps * batch_size, "batch_size": batch_size,
                  "teacher_logloss": quality.logloss(labels, teacher_probabilities),
                  "teacher_auc": quality.auc(labels, teacher_probabilities),
                  "teacher_accuracy": quality.accuracy(labels, teacher_probabilities),
                  "learning_rate": LEARNING_RATE, "eval_samples": int(labels.size),
                  "validation_samples": validation_batches * EVAL_BATCH_SIZE,
                  "workload": workload.name,
                  "distribution": workload.tables[0].distribution.label(),
                  "largest_table_rows": max(table.rows for table in workload.tables)}
        for count, rank, cache in configs:
            record = {**run_config(workload, seed, count, rank, cache, training, validation,
                                   test, eval_every_steps, settings.patience), **shared}
            records.append(record)
            # Rewritten after every model: a crash later loses nothing finished.
            write_csv_atomic(finish_frame(records), out / CSV_NAME)
            if progress:
                print(f"tt-study [{len(records)}/{total}] seed {seed} {record['config']}: "
                      f"{record['steps_trained']} steps (best {record['best_step']}, "
                      f"{'stopped early' if record['stopped_early'] else 'budget spent'}), "
                      f"logloss {record['logloss']:.4f}, auc {record['auc']:.4f}",
                      file=sys.stderr, flush=True)
        del training
    frame = finish_frame(records)
    from reports.tt_study import render_tt_study

    render_tt_study(out / CSV_NAME, out)
    return frame


def parse_configs(text: str) -> tuple[tuple[int, int, str], ...]:
    """K:RANK:CACHE items (an argparse type=); the error names the bad item."""
    configs = []
    for item in (part.strip() for part in text.split(",") if part.strip()):
        pieces = item.split(":")
        try:
            if len(pieces) != 3:
                raise ValueError
            configs.append((int(pieces[0]), int(pieces[1]), pieces[2]))
        except ValueError:
            raise argparse.ArgumentTypeError(f"{item!r}: write K:RANK:CACHE, e.g. 7:16:lfu") \
                from None
    if not configs:
        raise argparse.ArgumentTypeError("give at least one K:RANK:CACHE")
    return tuple(configs)


def build_parser() -> OneLineParser:
    """Arguments of the tt-study subcommand."""
    parser = OneLineParser(
        prog="run_bench.py tt-study",
        description="Train a dense DLRM and TT-Rec DLRMs (K largest tables at rank R, with and "
                    "without the hot-row cache) on the same teacher-labelled stream with early "
                    "stopping, over several seeds; report size, log-loss, AUC, accuracy and "
                    "their differences to dense with 95% t-intervals over seeds.")
    parser.add_argument("--workload", default="kaggle", help="preset name (default kaggle)")
    parser.add_argument("--max-rows", type=positive_int, default=DEFAULT_MAX_ROWS,
                        help=f"cap every table at this many rows (default {DEFAULT_MAX_ROWS})")
    parser.add_argument("--dist", default=DEFAULT_DIST,
                        help="index distribution for every table: uniform or zipf:ALPHA "
                             f"(default {DEFAULT_DIST})")
    parser.add_argument("--tt-tables", type=whole_numbers, default=DEFAULT_TT_TABLES,
                        help=f"comma-separated K values (default {DEFAULT_TT_TABLES})")
    parser.add_argument("--tt-rank", type=whole_numbers, default=DEFAULT_TT_RANKS,
                        help=f"comma-separated TT ranks (default {DEFAULT_TT_RANKS})")
    parser.add_argument("--cache", type=choice_list(*CACHE_POLICIES), default=DEFAULT_CACHES,
                        help=f"comma-separated TT cache policies, lfu/lru/none (default "
                             f"{DEFAULT_CACHES}; lfu and lru hold 10%% of the rows)")
    parser.add_argument("--configs", type=parse_configs,
                        help="comma-separated K:RANK:CACHE students instead of the --tt-tables x "
                             "--tt-rank x --cache grid, e.g. 7:16:lfu,7:16:none,3:16:lfu")
    parser.add_argument("--seeds", type=non_negative_ints, default=DEFAULT_SEEDS,
                        help=f"comma-separated seeds: teacher, data and student init "
                             f"(default {DEFAULT_SEEDS})")
    parser.add_argument("--budget", type=positive_int, default=DEFAULT_BUDGET,
                        help=f"most training samples per model (default {DEFAULT_BUDGET}); "
                             "early stopping may use fewer")
    parser.add_argument("--batch-size", type=positive_int, default=DEFAULT_BATCH_SIZE,
                        help=f"training batch size (default {DEFAULT_BATCH_SIZE})")
    parser.add_argument("--eval-every", type=positive_int, default=DEFAULT_EVAL_EVERY,
                        help=f"training samples between validation passes (default "
                             f"{DEFAULT_EVAL_EVERY}, or the budget if smaller)")
    parser.add_argument("--patience", type=positive_int, default=DEFAULT_PATIENCE,
                        help=f"validation passes without improvement before stopping "
                             f"(default {DEFAULT_PATIENCE})")
    parser.add_argument("--validation-batches", type=positive_int,
                        default=DEFAULT_VALIDATION_BATCHES,
                        help="early-stopping batches of 2048 samples "
                             f"(default {DEFAULT_VALIDATION_BATCHES})")
    parser.add_argument("--eval-batches", type=positive_int, default=EVAL_BATCHES,
                        help=f"test batches of 2048 samples (default {EVAL_BATCHES})")
    parser.add_argument("--out", help=f"output directory (default {DEFAULT_OUT}/<timestamp>)")
    return parser


def main(argv: list[str]) -> int:
    """Run the study from the command line; bad input is a UsageError (one line, exit 2)."""
    args = build_parser().parse_args(argv)
    settings = StudySettings(
        tt_tables=tuple(args.tt_tables), ranks=tuple(args.tt_rank), caches=tuple(args.cache),
        seeds=tuple(args.seeds), budget=args.budget, batch_size=args.batch_size,
        eval_batches=args.eval_batches, validation_batches=args.validation_batches,
        eval_every=min(args.eval_every, args.budget), patience=args.patience,
        configs=args.configs)
    workload = presets.preset(args.workload).capped(args.max_rows)
    if args.dist:
        workload = workload.with_distribution(IndexDistribution.parse(args.dist))
    validate(workload, settings)
    # --out is the study's folder itself; a study run again into it replaces the old one.
    given = Path(args.out).resolve() if args.out else None
    out, _ = new_run_directory(given.parent if given else DEFAULT_OUT,
                               given.name if given else None, occupied=())
    frame = run_study(workload, settings, out, progress=True)
    print(f"wrote {out / CSV_NAME} ({len(frame)} trained models), tt_study_summary.csv, "
          "tt_study.md and tt_study.png")
    return 0
