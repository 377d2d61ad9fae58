"""Teacher-labelled data: a fixed, calibrated DLRM whose predicted CTRs draw the labels."""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
import torch

from bench.models.dlrm import DLRM, batch_tensors, build_dlrm
from workloads.generators import Batch, label_stream, make_batch
from workloads.specs import WorkloadSpec

# Calibrated teacher logits have this mean and spread: a CTR near 0.27 (Criteo's positive
# rate is about 0.26) and enough signal that AUC is informative (about 0.8 for the teacher).
TARGET_LOGIT_MEAN = -1.2
TARGET_LOGIT_STD = 2.0
CALIBRATION_BATCH = 10_000  # batch_index of the calibration batch (never timed or evaluated)
EVAL_FIRST_BATCH = 20_000  # batch_index of the first evaluation batch
EVAL_BATCH_SIZE = 2048
TEACHER_SEED_OFFSET = 0  # the teacher shares the benchmark seed; students use seed + 1


def calibrate(model: DLRM, workload: WorkloadSpec, seed: int) -> DLRM:
    """Rescale the last top-MLP layer so logits have the target mean and spread."""
    batch = make_batch(workload, seed, CALIBRATION_BATCH, batch_size=EVAL_BATCH_SIZE)
    with torch.no_grad():
        logits = model(*batch_tensors(batch, model.top[-1].weight.device)).double()
        scale = TARGET_LOGIT_STD / max(float(logits.std()), 1e-12)
        shift = TARGET_LOGIT_MEAN - scale * float(logits.mean())
        last = model.top[-1]
        last.weight.mul_(scale)
        last.bias.mul_(scale).add_(shift)
    return model


def teacher_model(workload: WorkloadSpec, seed: int, embeddings: str = "batched",
                  sparse: bool = False, device: torch.device = torch.device("cpu")) -> DLRM:
    """The calibrated teacher DLRM in fp32 on device (any embedding layout gives the same
    function; its tables are the device's, see bench.embeddings.fill_table_weight)."""
    model = build_dlrm(workload, seed + TEACHER_SEED_OFFSET, embeddings=embeddings, sparse=sparse,
                       device=device)
    return calibrate(model, workload, seed)


@dataclasses.dataclass
class LabelledBatch:
    """A batch with teacher probabilities and the labels drawn from them."""

    batch: Batch
    probabilities: np.ndarray  # float64 [B]
    labels: np.ndarray  # float32 [B], 0 or 1

    def head(self, samples: int) -> "LabelledBatch":
        """The first samples with their labels, as a labelled batch of their own."""
        return LabelledBatch(self.batch.head(samples), self.probabilities[:samples],
                             self.labels[:samples])


def label_batches(teacher: DLRM, workload: WorkloadSpec, seed: int, batch_indices,
                  batch_size: int) -> list[LabelledBatch]:
    """Batches labelled by Bernoulli draws from the teacher's predicted CTR."""
    labelled = []
    device = teacher.top[-1].weight.device
    for batch_index in batch_indices:
        batch = make_batch(workload, seed, batch_index, batch_size=batch_size)
        with torch.no_grad():
            logits = teacher(*batch_tensors(batch, device)).double()
        probabilities = torch.sigmoid(logits).cpu().numpy()
        draws = label_stream(seed, batch_index).random(len(probabilities))
        labelled.append(LabelledBatch(batch, probabilities,
                                      (draws < probabilities).astype(np.float32)))
    return labelled


def evaluation_batches(teacher: DLRM, workload: WorkloadSpec, seed: int,
                       num_batches: int) -> tuple:
    """The evaluation batches of a workload labelled by this teacher, on its device."""
    batches = range(EVAL_FIRST_BATCH, EVAL_FIRST_BATCH + num_batches)
    return tuple(label_batches(teacher, workload, seed, batches, EVAL_BATCH_SIZE))


@functools.lru_cache(maxsize=4)
def evaluation_set(workload: WorkloadSpec, seed: int, num_batches: int) -> tuple:
    """The evaluation batches labelled by a teacher built on the host (cached per worker)."""
    return evaluation_batches(teacher_model(workload, seed), workload, seed, num_batches)
