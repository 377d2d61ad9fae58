"""Output checks: each row of an output against its float64 reference under an error bound."""

from __future__ import annotations

import dataclasses
import math
from typing import Optional, Sequence

import torch

# Unit roundoff u of each floating format (half an ulp at 1): a rounded value is x(1 + e), |e| <= u.
UNIT_ROUNDOFF = {"fp32": 2.0 ** -24, "fp16": 2.0 ** -11, "bf16": 2.0 ** -8}
# Below the smallest normal the spacing is fixed: rounding adds up to half the smallest
# subnormal, absolutely (fp16's 2^-24 matters: tables of 100k rows hold values near 1e-5).
UNDERFLOW = {"fp32": 2.0 ** -150, "fp16": 2.0 ** -25, "bf16": 2.0 ** -134}
# Row-wise quantized tables: bits per value, and the roundoff of the stored scale and bias
# (fp32 for int8, fp16 for int4).
QUANTIZED_BITS = {"int8": 8, "int4": 4}
PARAMETER_ROUNDOFF = {"int8": 2.0 ** -24, "int4": 2.0 ** -11}
# Every kernel checked here (FBGEMM, oneDNN, MKL, CUDA) accumulates low-precision products in
# fp32. A kernel that summed in bf16 would add about sqrt(L) u of the row per L terms (20% at
# L = 100) and is meant to fail.
ACCUMULATION_ROUNDOFF = UNIT_ROUNDOFF["fp32"]
# Rounding errors are treated as independent, mean-zero and bounded (|e_i| <= c_i), so by
# Hoeffding their sum exceeds CONFIDENCE * sqrt(sum c_i^2) with probability below
# 2 exp(-CONFIDENCE^2 / 2) = 3e-8 per element, for any such distribution (uniform rounding
# errors put it near 1e-25). A sqrt(L) growth, not L: the worst case L u sum|x| would let a
# zeroed bag pass once L exceeds a few dozen lookups at int4.
CONFIDENCE = 6.0
# The tolerance-based bound (ops without their own bound) never drops below this fraction of
# the output's RMS times the tolerance: a row whose correct value is near zero is judged on
# the output's scale, not on its own.
ROW_FLOOR_FRACTION = 0.1


@dataclasses.dataclass(frozen=True)
class Comparison:
    """Result of comparing an output with its reference: the worst row against its bound."""

    rel_error: float  # relative L2 over the whole output (worst part for tuples)
    ratio: float  # worst |actual - expected| / bound over all elements of all rows
    part: int  # which output part (tuple index) holds the worst row
    row: int  # index along the leading (batch / bag) dimension
    error: float  # |actual - expected| at the worst element of that row
    bound: float  # its bound
    element: tuple = ()  # full index of that element within its part

    @property
    def passed(self) -> bool:
        """True when every element is within its bound."""
        return self.ratio <= 1.0

    def describe(self) -> str:
        """One line naming the worst row, its error and its bound."""
        where = f"row {self.row}" + (f" of part {self.part}" if self.part else "")
        if len(self.element) > 1:
            where += f" (element {list(self.element)})"
        return (f"{where}: |error| {self.error:.3g} exceeds its bound {self.bound:.3g} "
                f"(ratio {self.ratio:.3g}; relative L2 {self.rel_error:.3g})")


def _as_parts(actual, expected) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Output and reference as lists of float64 CPU tensors, shapes and finiteness checked."""
    if isinstance(expected, (tuple, list)):
        if not isinstance(actual, (tuple, list)) or len(actual) != len(expected):
            raise ValueError("output has a different number of parts than the reference")
        actual_parts, expected_parts = list(actual), list(expected)
    else:
        actual_parts, expected_parts = [actual], [expected]
    actual64, expected64 = [], []
    for output, reference in zip(actual_parts, expected_parts):
        output = torch.as_tensor(output).detach().to("cpu", torch.float64)
        reference = torch.as_tensor(reference).detach().to("cpu", torch.float64)
        if output.shape != reference.shape:
            raise ValueError(f"output shape {tuple(output.shape)}, expected "
                             f"{tuple(reference.shape)}")
        if not torch.isfinite(output).all():
            raise ValueError("output contains NaN or infinity")
        actual64.append(output)
        expected64.append(reference)
    return actual64, expected64


def _relative_l2(actual: torch.Tensor, expected: torch.Tensor) -> float:
    scale = torch.linalg.vector_norm(expected).item()
    difference = torch.linalg.vector_norm(actual - expected).item()
    return difference / scale if scale > 0 else difference


def relative_error(actual, expected) -> float:
    """Relative L2 error against a float64 expected value; the worst part for tuples."""
    actual64, expected64 = _as_parts(actual, expected)
    return max(_relative_l2(output, reference) for output, reference in zip(actual64, expected64))


def _rows(tensor: torch.Tensor) -> torch.Tensor:
    """[rows, elements]: a scalar is one row, a vector has one element a row."""
    if tensor.dim() == 0:
        return tensor.reshape(1, 1)
    return tensor.reshape(tensor.shape[0], -1)


def compare(actual, expected, bound) -> Comparison:
    """Compare element by element: |actual - expected| <= bound (tensor or parts, broadcast)."""
    actual64, expected64 = _as_parts(actual, expected)
    bounds = list(bound) if isinstance(bound, (tuple, list)) else [bound]
    if len(bounds) != len(expected64):
        raise ValueError("error bound has a different number of parts than the reference")
    worst = (-1.0, 0, 0, 0.0, 0.0, ())
    for part, (output, reference, limit) in enumerate(zip(actual64, expected64, bounds)):
        limit = torch.as_tensor(limit, dtype=torch.float64).detach().cpu()
        limit = limit.broadcast_to(reference.shape)
        error = _rows((output - reference).abs())
        limit = _rows(limit)
        if error.numel() == 0:
            continue
        # A zero bound (an empty bag, an exact format) admits only an exact result.
        ratios = torch.where(limit > 0, error / limit.clamp(min=1e-300),
                             torch.where(error > 0, math.inf, 0.0))
        flat = int(torch.argmax(ratios).item())
        row, column = divmod(flat, ratios.shape[1])
        ratio = float(ratios[row, column])
        if ratio > worst[0]:
            element = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat),
                                                                 reference.shape or (1,)))
            worst = (ratio, part, row, float(error[row, column]), float(limit[row, column]),
                     element)
    ratio, part, row, error_value, bound_value, element = worst
    rel_error = max(_relative_l2(output, reference)
                    for output, reference in zip(actual64, expected64))
    return Comparison(rel_error=rel_error, ratio=max(ratio, 0.0), part=part, row=row,
                      error=error_value, bound=bound_value, element=element)


def relative_row_bound(expected, tolerance: float,
                       floor_fraction: float = ROW_FLOOR_FRACTION):
    """A per-row bound from a relative tolerance: tolerance x the row's RMS, floored at
    floor_fraction of the whole output's (part's) RMS (for outputs without a forward bound)."""
    if isinstance(expected, (tuple, list)):
        return tuple(relative_row_bound(part, tolerance, floor_fraction) for part in expected)
    expected = torch.as_tensor(expected).detach().to("cpu", torch.float64)
    rows = _rows(expected)
    if rows.numel() == 0:
        return torch.zeros_like(expected)
    row_rms = rows.pow(2).mean(dim=1, keepdim=True).sqrt()
    floor = floor_fraction * rows.pow(2).mean().sqrt()
    return (tolerance * torch.maximum(row_rms, floor)).broadcast_to(rows.shape).reshape(
        expected.shape)


# Whole-model outputs (logits, a training step's losses and updated parameters) carry every
# layer's error, which does not shrink with a row's own value: each row may differ by this
# fraction of (its RMS + the part's RMS). Measured worst rows of correct kernels on the quick
# kaggle workload (2048 rows): fp16 0.0044, bf16 0.029, int8 0.28, int4 0.28 (int8 MLPs with
# 7-bit activations). The bound is wide enough for that noise; a zeroed or swapped row still
# fails whenever it moves the row by more than the noise (at int8, rows above the RMS).
WHOLE_MODEL_ROW_TOLERANCE = {"fp32": 1e-4, "fp16": 2e-2, "bf16": 0.1, "int8": 0.5, "int4": 0.5}


def whole_model_bound(expected, precision: str):
    """Per-row bound of a whole-model output: WHOLE_MODEL_ROW_TOLERANCE x (row RMS + RMS)."""
    if isinstance(expected, (tuple, list)):
        return tuple(whole_model_bound(part, precision) for part in expected)
    expected = torch.as_tensor(expected).detach().to("cpu", torch.float64)
    rows = _rows(expected)
    if rows.numel() == 0:
        return torch.zeros_like(expected)
    row_rms = rows.pow(2).mean(dim=1, keepdim=True).sqrt()
    scale = WHOLE_MODEL_ROW_TOLERANCE[precision] * (row_rms + rows.pow(2).mean().sqrt())
    return scale.broadcast_to(rows.shape).reshape(expected.shape)


# Row-wise Adagrad (row -= lr g / (sqrt(s + mean g^2) + eps)) normalises each row's summed
# gradient g by its own RMS, so its error is the gradient's error relative to g, not to the
# rows: a row whose gradient is near its own rounding error moves by O(lr) in any direction,
# which no bound relative to the rows' magnitude admits. The bound below follows from an
# elementwise bound delta on g's error (|d| <= delta), rigorously, not to first order: with
# a = sqrt(s + mean g^2) + eps, rms(g + d) is within rms(d) of rms(g) (a norm), so the perturbed
# denominator a' >= max(a - rms(delta), sqrt(s) + eps) and
# |f(g + d) - f(g)|_j <= lr (delta_j + |g_j| rms(delta) / a) / a';
# and never more than both updates' magnitudes, |f(g)_j| + lr min((|g_j| + delta_j) / a',
# sqrt(D)) (an element of g + d is at most sqrt(D) times its RMS).


def summed_gradient_error(bag_error64: torch.Tensor, upstream64: torch.Tensor,
                          owners: torch.Tensor, positions: torch.Tensor,
                          num_rows: int) -> torch.Tensor:
    """Bound [rows, dim] on the error of each row's gradient summed over its lookups (sum
    pooling): the lookups' bags' errors added, plus fp32 accumulation (L + 2) u sum |terms|."""
    owners, positions = owners.cpu().long(), positions.cpu().long()
    zeros = torch.zeros(num_rows, upstream64.shape[1], dtype=torch.float64)
    error = zeros.index_add(0, positions, bag_error64[owners])
    magnitude = zeros.index_add(0, positions, upstream64[owners].abs())
    lookups = torch.bincount(positions, minlength=num_rows).to(torch.float64).unsqueeze(1)
    return error + (lookups + 2) * ACCUMULATION_ROUNDOFF * magnitude


def rowwise_adagrad_bound(rows64: torch.Tensor, grad64: torch.Tensor, state64: torch.Tensor,
                          gradient_error: torch.Tensor, learning_rate: float,
                          eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Bounds on a row-wise Adagrad step's updated rows [rows, dim] and states [rows] from a
    bound on its gradient's error (see above), plus the step's own fp32 arithmetic."""
    dim = grad64.shape[1]
    magnitude = grad64.abs()
    new_state = state64 + grad64.pow(2).mean(dim=1)
    denominator = (new_state.sqrt() + eps).unsqueeze(1)
    spread = gradient_error.pow(2).mean(dim=1, keepdim=True).sqrt()
    perturbed = torch.maximum(denominator - spread, (state64.sqrt() + eps).unsqueeze(1))
    step = learning_rate * (gradient_error + magnitude * spread / denominator) / perturbed
    largest = learning_rate * torch.minimum((magnitude + gradient_error) / perturbed,
                                            torch.full_like(magnitude, math.sqrt(dim)))
    own = learning_rate * magnitude / denominator
    update = torch.minimum(step, largest + own)
    # fp32 arithmetic of the step: the mean over dim terms, sqrt, eps, divide, scale, subtract.
    arithmetic = (dim + 8) * ACCUMULATION_ROUNDOFF
    rows = update + arithmetic * ((rows64 - learning_rate * grad64 / denominator).abs()
                                  + largest)
    state = (2 * magnitude * gradient_error + gradient_error.pow(2)).mean(dim=1)
    state = state + arithmetic * (new_state + state)
    return rows, state


# ------------------------------------------------------------------ bounds of common kernels

def representation_roundoff(precision: str) -> float:
    """Relative error of storing an fp32 value in a floating format (0 for fp32 itself)."""
    return 0.0 if precision == "fp32" else UNIT_ROUNDOFF[precision]


def stored_value_error(values64: torch.Tensor, precision: str) -> torch.Tensor:
    """Largest error of storing fp32 values at a floating precision: u|x| + underflow."""
    if precision == "fp32":
        return torch.zeros_like(values64)
    return UNIT_ROUNDOFF[precision] * values64.abs() + UNDERFLOW[precision]


def rounding_error(values64: torch.Tensor, precision: str) -> torch.Tensor:
    """Largest error of rounding a computed value to a floating precision: u|x| + underflow."""
    return UNIT_ROUNDOFF[precision] * values64.abs() + UNDERFLOW[precision]


def quantization_error(rows64: torch.Tensor, precision: str) -> torch.Tensor:
    """Largest dequantization error of each row of a row-wise int8/int4 table, [rows, 1]:
    half a step, step = (max - min) / (2^bits - 1), plus the rounding of the stored scale
    (at most 2^bits - 1 steps) and bias."""
    bits = QUANTIZED_BITS[precision]
    minimum = rows64.min(dim=1, keepdim=True).values
    maximum = rows64.max(dim=1, keepdim=True).values
    spread = maximum - minimum
    half_step = spread / (2 ** bits - 1) / 2
    return half_step + PARAMETER_ROUNDOFF[precision] * (minimum.abs() + spread)


def pooled_lookup_bound(rows64: torch.Tensor, positions: torch.Tensor, offsets: torch.Tensor,
                        mode: str, weights64: Optional[torch.Tensor], precision: str,
                        stored_error: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per-element bound [bags, dim] on a pooled lookup of `rows64` (the float64 rows the batch
    touches; positions index them) against its float64 result.

    Each distinct row of a bag enters with its summed coefficient a (weights, 1, or 1/length)
    and a stored-value error up to delta (u|x| for fp16/bf16, the quantization error for
    int8/int4, or `stored_error` [rows, dim] when the rows are computed, as TT rows are); these
    are independent across rows, so CONFIDENCE * sqrt(sum a^2 delta^2).
    Added to that, deterministically: the output's own rounding (and the mean's division),
    2 u_out |expected|, and fp32 accumulation, (L + 2) 2^-24 sum |a x|.
    """
    bags = offsets.numel()
    lookups = positions.numel()
    lengths = torch.diff(offsets.cpu(), append=offsets.new_tensor([lookups]).cpu())
    bag_of_lookup = torch.repeat_interleave(torch.arange(bags), lengths)
    if weights64 is not None:
        coefficients = weights64.to(torch.float64).abs()
    elif mode == "mean":
        coefficients = 1.0 / lengths.clamp(min=1).to(torch.float64)[bag_of_lookup]
    else:
        coefficients = torch.ones(lookups, dtype=torch.float64)
    # Coalescing sums the coefficients of a row repeated within a bag: its error repeats too.
    matrix = torch.sparse_coo_tensor(torch.stack([bag_of_lookup, positions.cpu().long()]),
                                     coefficients, (bags, rows64.shape[0]),
                                     check_invariants=True).coalesce()
    squared = torch.sparse_coo_tensor(matrix.indices(), matrix.values() ** 2, matrix.shape,
                                      check_invariants=True)
    if precision in QUANTIZED_BITS:
        stored_error = quantization_error(rows64, precision).expand_as(rows64)
        output_roundoff = UNIT_ROUNDOFF["fp32"]  # quantized bags dequantize into fp32
    elif stored_error is not None:
        output_roundoff = UNIT_ROUNDOFF[precision]
    else:
        # Weighted float bags round the weight as well as the value: two roundings a term.
        roundings = 2 if weights64 is not None else 1
        stored_error = roundings * stored_value_error(rows64, precision)
        output_roundoff = UNIT_ROUNDOFF[precision]
    independent = torch.sparse.mm(squared, stored_error ** 2).sqrt()
    magnitude = torch.sparse.mm(matrix, rows64.abs())
    expected = torch.sparse.mm(_signed(matrix, positions, bag_of_lookup, weights64, mode,
                                       lengths, rows64.shape[0]), rows64).abs()
    accumulation = ((lengths.to(torch.float64) + 2) * ACCUMULATION_ROUNDOFF).unsqueeze(1)
    underflow = UNDERFLOW.get(precision, UNDERFLOW["fp32"])
    return (CONFIDENCE * independent + 2 * (output_roundoff * expected + underflow)
            + accumulation * magnitude)


def _signed(matrix, positions, bag_of_lookup, weights64, mode, lengths, num_rows):
    """The pooling matrix with signed coefficients (only weights can be negative)."""
    if weights64 is None:
        return matrix
    values = weights64.to(torch.float64)
    return torch.sparse_coo_tensor(torch.stack([bag_of_lookup, positions.cpu().long()]), values,
                                   (lengths.numel(), num_rows), check_invariants=True).coalesce()


def linear_layers_bound(inputs64: torch.Tensor, layers: Sequence[tuple], precision: str,
                        input_rounded: bool = True) -> torch.Tensor:
    """Per-element bound on the output of Linear (+ReLU) layers run at a precision.

    layers: (weight64 [out, in], bias64 or None, relu) in order. Errors are carried as
    root-sum-square magnitudes (Hoeffding scale): a layer y = W x + b passes the incoming
    error on as sqrt(W^2 @ e^2) and adds its own: the weights' and input's stored-value
    errors (u|.| for fp16/bf16; for int8 dynamic, half the per-tensor step of the weights,
    max|W|/127.5, and of the activations, range/127 with FBGEMM's reduced range), the bias'
    and output's rounding, and fp32 accumulation. ReLU is 1-Lipschitz and keeps the error.
    """
    values = inputs64
    error = torch.zeros_like(values)
    first = True
    for weight, bias, relu in layers:
        width = weight.shape[1]
        terms = [(weight ** 2) @ (error ** 2).T]
        if precision in FLOAT_LIKE:
            if first and input_rounded:
                terms.append((weight ** 2) @ (stored_value_error(values, precision) ** 2).T)
            terms.append((stored_value_error(weight, precision) ** 2) @ (values ** 2).T)
            output_precision = precision
        elif precision == "int8":
            activation_step = (values.max().clamp(min=0) - values.min().clamp(max=0)) / 127
            weight_step = weight.abs().max() / 127.5
            terms.append((weight ** 2) @ torch.full_like(values, (activation_step / 2) ** 2).T)
            terms.append(torch.full_like(weight, (weight_step / 2) ** 2) @ (values ** 2).T)
            terms.append(torch.full_like(weight, (weight_step / 2) ** 2)
                         @ torch.full_like(values, (activation_step / 2) ** 2).T)
            output_precision = "fp32"
        else:
            raise ValueError(f"no Linear error model for {precision}")
        output = values @ weight.T
        if bias is not None:
            output = output + bias
            bias_precision = precision if precision in FLOAT_LIKE else "fp32"
            terms.append((stored_value_error(bias, bias_precision) ** 2).unsqueeze(1).expand(
                -1, values.shape[0]))
        magnitude = values.abs() @ weight.abs().T
        terms.append((rounding_error(output, output_precision) ** 2).T)
        terms.append((((width + 2) * ACCUMULATION_ROUNDOFF * magnitude) ** 2).T)
        error = torch.stack(terms).sum(dim=0).sqrt().T
        values = output.clamp(min=0) if relu else output
        first = False
    return CONFIDENCE * error


FLOAT_LIKE = ("fp32", "fp16", "bf16")
