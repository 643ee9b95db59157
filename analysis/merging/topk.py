"""Exact per-task top-k magnitude thresholds over a whole model, streamed.

TIES' paper scope trims each task vector to its top-k fraction of entries by
magnitude over the *whole* model. Concatenating every parameter's |τ| needs
T × N floats at once (N: the model's entries), which an LLM-size set does not
fit. `streaming_thresholds` finds the same threshold, bit for bit, reading one
parameter at a time:

A non-negative IEEE float orders exactly like its bit pattern read as an
integer (|τ| clears the sign bit; -0.0 becomes +0.0), so the k-th largest
magnitude is found by a most-significant-digit radix selection over those
bits. Each pass histograms the next 16-bit digit of the entries whose higher
digits equal the prefix chosen so far (int64 counts, exact), then picks the
digit where the count from the top reaches the wanted rank. float32 has 31
value bits: two passes (15 + 16 bits); float64: four (15 + 16 + 16 + 16).
After the last pass the prefix *is* the threshold's bit pattern, so the
result equals `kthvalue` of the concatenation, and the kept set |τ| ≥ thr
(entries tied with the threshold are kept) is the same as before.

Peak memory: one parameter's (T, numel) deltas and magnitudes plus two
integer arrays of that size (the digits, a mask), up to FLUSH_ENTRIES
buffered bucket indices (small parameters share one count), and T × 65 536
int64 counts. Every parameter is read (via
`get`) once per pass, so the getter must be deterministic (seeded DARE masks,
memoised KnOTS bases are).
"""
from __future__ import annotations

import math
from typing import Callable, Iterable

import torch

from analysis.errors import ValidationError

DeltaGetter = Callable[[str], torch.Tensor]   # name -> (T, *shape) float tensor

_BITS = {torch.float32: (torch.int32, 31), torch.float64: (torch.int64, 63)}
DIGIT_BITS = 16
FLUSH_ENTRIES = 1 << 22   # bucket indices buffered before one bincount (small tensors share a call)


def keep_count(n: int, k: float) -> int:
    """Entries kept of `n` at density `k`: ⌈k·n⌉, at least 1, at most n (TIES' rule)."""
    return min(n, max(1, math.ceil(k * n - 1e-9)))


def _digits(value_bits: int) -> list[tuple[int, int]]:
    """(shift, width) of each digit, most significant first: 31 -> [(16, 15), (0, 16)]."""
    out, low = [], value_bits
    while low > 0:
        width = low % DIGIT_BITS or DIGIT_BITS
        low -= width
        out.append((low, width))
    return out


def streaming_thresholds(get: DeltaGetter, names: Iterable[str], n_tasks: int, k: float) -> torch.Tensor:
    """(T,) per task: the ⌈k·N⌉-th largest |entry| over every parameter in `names`
    (N = total entries per task), equal to `kthvalue` of the concatenated
    magnitudes. Reads each parameter once per radix pass (module doc)."""
    names = list(names)
    if not names:
        raise ValidationError("a whole-model top-k threshold needs at least one parameter; got none")
    first = get(names[0])
    dtype = first.dtype
    if dtype not in _BITS:
        raise ValidationError(f"streaming top-k thresholds take float32 or float64 deltas, got {dtype}")
    int_dtype, value_bits = _BITS[dtype]
    device = first.device
    prefix = torch.zeros(n_tasks, dtype=torch.int64, device=device)   # chosen high bits, per task
    need = None                                                        # rank wanted among the candidates
    for p, (shift, width) in enumerate(_digits(value_bits)):
        buckets = 1 << width
        counts = torch.zeros(n_tasks * buckets, dtype=torch.int64, device=device)
        pending: list[torch.Tensor] = []     # bucket indices not yet counted (one bincount per FLUSH_ENTRIES)
        entries = held = 0
        offsets = torch.arange(n_tasks, dtype=int_dtype, device=device)[:, None] * buckets
        for i, name in enumerate(names):
            tau = first if (p == 0 and i == 0) else get(name)
            if tau.dtype != dtype:
                raise ValidationError(f"parameter {name!r}: deltas are {tau.dtype}, the first parameter's {dtype}; "
                                      "a whole-model threshold needs one dtype")
            bits = tau.abs().reshape(n_tasks, -1).view(int_dtype)     # order-preserving for |x|
            del tau
            entries += bits.shape[1]
            # task t's digit d is bucket t·buckets + d; after the first pass only entries whose
            # higher digits equal the prefix chosen so far are candidates
            index = ((bits >> shift) & (buckets - 1)) + offsets
            index = index.reshape(-1) if p == 0 else index[(bits >> (shift + width)) == prefix[:, None]]
            del bits
            if index.numel() >= FLUSH_ENTRIES:          # a large parameter is counted on its own
                counts += torch.bincount(index, minlength=n_tasks * buckets)
                continue
            pending.append(index)
            held += index.numel()
            if held >= FLUSH_ENTRIES:
                counts += torch.bincount(torch.cat(pending), minlength=n_tasks * buckets)
                pending, held = [], 0
        if pending:
            counts += torch.bincount(torch.cat(pending), minlength=n_tasks * buckets)
        counts = counts.reshape(n_tasks, buckets)
        first = pending = None
        if need is None:
            if entries == 0:
                raise ValidationError(f"a whole-model top-k threshold over {len(names)} parameter(s) with no entries")
            need = torch.full((n_tasks,), keep_count(entries, k), dtype=torch.int64, device=device)
        # from the top: at_or_above[d] = candidates with digit >= d
        at_or_above = counts.flip(1).cumsum(1).flip(1)
        digit = (at_or_above >= need[:, None]).sum(1) - 1                 # the largest d with count >= need
        above = torch.where(digit + 1 < buckets,
                            at_or_above.gather(1, (digit + 1).clamp_max(buckets - 1)[:, None])[:, 0],
                            torch.zeros_like(digit))
        need = need - above
        prefix = (prefix << width) | digit
    return prefix.to(int_dtype).view(dtype)
