"""The distinct batches the whole-model ops cycle through, teacher-labelled for training."""

from __future__ import annotations

import functools

import numpy as np
import torch

from bench.models.dlrm import batch_tensors
from bench.models.teacher import LabelledBatch, teacher_model
from bench.ops import common
from bench.ops.common import INDEX_BYTES, rotation_plan
from bench.precisions import stored_row_bytes
from workloads.generators import Batch, TableBatch, label_stream, make_batch

TRAIN_BATCH_INDEX = 0
# The other rotating batches are drawn from batch_index 1000 on: clear of the TT warm-up
# batches (1-4), the calibration batch (10,000) and the evaluation set (20,000 on).
ROTATION_FIRST_BATCH = 1000
LABEL_CHUNK_SAMPLES = 16384  # samples per teacher forward when labelling rotating batches


def model_rotation_plan(workload, precision: str) -> dict:
    """How many distinct whole-model batches to cycle through (see common.rotation_plan)."""
    lookups = workload.batch_size * sum(table.pooling.mean for table in workload.tables)
    row_bytes = stored_row_bytes(workload.dim, precision)
    # A rotating batch holds int64 indices and offsets, fp32 per-sample weights and dense
    # features, and fp32 labels with float64 probabilities.
    batch = workload.batch_size
    memory = (lookups * (INDEX_BYTES + 4) + batch * len(workload.tables) * INDEX_BYTES
              + batch * (workload.num_dense * 4 + 12))
    maximum = common.MAX_ROTATION_MODEL_BATCHES
    if workload.data_path:
        # A data file wraps around: batches beyond its length repeat earlier samples.
        from workloads.criteo_workload import load

        maximum = min(maximum, max(1, len(load(workload.data_path).labels) // batch))
    return rotation_plan(lookups * row_bytes, memory, maximum)


def checked_samples(workload) -> int:
    """Samples of the checked batch the whole-model float64 check runs: all of them while the
    check's float64 arrays (the batch's distinct rows and every table's pooled bags) fit
    common.CHECK_FLOAT64_BYTES, else the first ones that fit (at least two). A GPU batch of
    MLPerf DLRMv2 (55,296 samples x 214 lookups of 128 values) would widen 11.8M rows, ~12 GB
    of float64 before its gradients, on the host."""
    batch = workload.batch_size
    lookups = batch * sum(table.pooling.mean for table in workload.tables)
    needed = common.check_float64_bytes(lookups, workload.total_rows,
                                        batch * len(workload.tables), workload.dim)
    if needed <= common.CHECK_FLOAT64_BYTES:
        return batch
    return max(2, int(batch * common.CHECK_FLOAT64_BYTES / needed))


def checked_part(batch, workload):
    """What of a rotation's first batch (a Batch or a LabelledBatch) the float64 check runs:
    the whole batch, or its first checked_samples samples as a batch of their own."""
    samples = checked_samples(workload)
    return batch.head(samples) if samples < workload.batch_size else batch


def check_metrics(workload) -> dict:
    """What a whole-model row records of its check: nothing for a whole batch, else the part."""
    samples = checked_samples(workload)
    if samples >= workload.batch_size:
        return {}
    return {"checked_samples": samples, "check_sample": (
        f"float64 check above {common.CHECK_FLOAT64_BYTES / 2**30:g} GiB: the first {samples} "
        f"of the batch's {workload.batch_size} samples, as a batch of their own")}


def rotation_batch_indices(parts: int, workload=None) -> list[int]:
    """batch_index of each rotating batch: the checked batch first. A data file's batch k is
    its samples from k x batch_size on, wrapping: consecutive ones are the distinct ones."""
    if workload is not None and workload.data_path:
        return list(range(TRAIN_BATCH_INDEX, TRAIN_BATCH_INDEX + parts))
    return [TRAIN_BATCH_INDEX] + list(range(ROTATION_FIRST_BATCH, ROTATION_FIRST_BATCH + parts - 1))


class _Rotation:
    """The longest rotation built so far for one (workload, seed): precisions plan rotations
    of different lengths, and a shorter rotation is a prefix of a longer one."""

    key = None
    batches: tuple = ()


def rotating_batches(workload, seed: int, parts: int) -> tuple:
    """The distinct batches whole-model inference cycles through (cached per worker, one
    workload at a time; each batch is generated once, whatever rotation length asks for it)."""
    if _Rotation.key != (workload, seed):
        _Rotation.key, _Rotation.batches = (workload, seed), ()
    built = _Rotation.batches
    if len(built) < parts:
        missing = rotation_batch_indices(parts, workload)[len(built):]
        built = built + tuple(make_batch(workload, seed, index) for index in missing)
        _Rotation.batches = built
    return built[:parts]


def concatenate_batches(batches) -> Batch:
    """Batches side by side as one (offsets shifted), so one forward serves them all."""
    tables = []
    for position in range(len(batches[0].tables)):
        parts = [batch.tables[position] for batch in batches]
        starts = np.cumsum([0] + [len(part.indices) for part in parts[:-1]])
        tables.append(TableBatch(
            indices=np.concatenate([part.indices for part in parts]),
            offsets=np.concatenate([part.offsets + start for part, start in zip(parts, starts)]),
            weights=np.concatenate([part.weights for part in parts])))
    return Batch(dense=np.concatenate([batch.dense for batch in batches]), tables=tables)


@functools.lru_cache(maxsize=1)
def rotating_labelled_batches(workload, seed: int, parts: int,
                              device: torch.device = torch.device("cpu")
                              ) -> tuple[LabelledBatch, ...]:
    """The distinct teacher-labelled batches training cycles through (cached per worker).

    The teacher runs on the device the training runs on (a GPU run's tables never pass
    through the host) and is freed before this returns, so that the student's tables can
    take its place. Labels are drawn as teacher.label_batches draws them, but the teacher's
    forward runs over several batches at once: one forward per batch made building a
    rotation slow."""
    teacher = teacher_model(workload, seed, device=device)
    batches = rotating_batches(workload, seed, parts)
    per_forward = max(1, LABEL_CHUNK_SAMPLES // workload.batch_size)
    probabilities = []
    for start in range(0, len(batches), per_forward):
        chunk = batches[start:start + per_forward]
        with torch.no_grad():
            logits = teacher(*batch_tensors(concatenate_batches(chunk), device)).double()
        probabilities.extend(np.split(torch.sigmoid(logits).cpu().numpy(), len(chunk)))
    del teacher
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the teacher's tables: the student's need the room
    labelled = []
    indices = rotation_batch_indices(parts, workload)
    for batch_index, batch, batch_probabilities in zip(indices, batches, probabilities):
        draws = label_stream(seed, batch_index).random(len(batch_probabilities))
        labelled.append(LabelledBatch(batch, batch_probabilities,
                                      (draws < batch_probabilities).astype(np.float32)))
    return tuple(labelled)
