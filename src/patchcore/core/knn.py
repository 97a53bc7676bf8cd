"""Exact Euclidean k-nearest-neighbour search, in bounded-memory chunks (matrix products).

Candidates are ranked with ||q||^2 - 2 q.b + ||b||^2 (one GEMM per chunk), and the distances of the
winners are then recomputed directly as ||q - b||, so reported distances carry no cancellation error.

Array-API agnostic (array-api-compat): the library calls it with torch tensors (CPU or GPU), the torch-free
runtime (patchcore.runtime) with numpy arrays; one implementation for both, and no torch import here.
"""
from __future__ import annotations

from array_api_compat import array_namespace, device, is_torch_array

DEFAULT_CHUNK_ELEMENTS = 1 << 24  # at most ~64 MiB of float32 distances alive at once


def squared_norms(bank):
    """(M, D) -> (M,) float32, computed once per bank and reused by every query."""
    xp = array_namespace(bank)
    bank = xp.astype(bank, xp.float32)
    return xp.sum(bank * bank, axis=1)


def smallest_k(values, k: int):
    """(Q, N) -> (Q, k) indices of each row's k smallest values, ascending. One primitive, two kernels:
    torch's topk, numpy's argpartition (a full sort of every row costs several times more)."""
    xp = array_namespace(values)
    if k == 1:
        return xp.argmin(values, axis=1, keepdims=True)
    if is_torch_array(values):
        return values.topk(k, dim=1, largest=False).indices
    import numpy as np

    part = np.argpartition(values, k - 1, axis=1)[:, :k]
    order = np.argsort(np.take_along_axis(values, part, axis=1), axis=1, kind="stable")
    return np.take_along_axis(part, order, axis=1)


def nearest(queries, bank, k: int = 1, *, bank_sq_norms=None, chunk_elements: int = DEFAULT_CHUNK_ELEMENTS):
    """(Q, D) queries, (M, D) bank -> distances (Q, k) float32 ascending, indices (Q, k) int64 into the bank.

    Memory stays O(chunk_elements) whatever Q and M are.
    """
    xp = array_namespace(queries, bank)
    num_queries, num_bank = queries.shape[0], bank.shape[0]
    if not 1 <= k <= num_bank:
        raise ValueError(f"k must be in [1, {num_bank}], got {k}")
    if bank_sq_norms is None:
        bank_sq_norms = squared_norms(bank)
    if num_queries == 0:
        return xp.zeros((0, k), dtype=xp.float32, device=device(queries)), \
            xp.zeros((0, k), dtype=xp.int64, device=device(queries))
    bank_chunk = max(k, min(num_bank, chunk_elements // max(1, min(num_queries, 1024))))
    query_chunk = max(1, chunk_elements // bank_chunk)
    dists, idxs = [], []
    for q0 in range(0, num_queries, query_chunk):
        q = xp.astype(queries[q0:q0 + query_chunk], xp.float32)
        q_sq = xp.sum(q * q, axis=1)[:, None]
        best_sq = best_idx = None
        for b0 in range(0, num_bank, bank_chunk):
            b = xp.astype(bank[b0:b0 + bank_chunk], xp.float32)
            dist_sq = q @ xp.matrix_transpose(b)
            dist_sq *= -2.0
            dist_sq += bank_sq_norms[None, b0:b0 + bank_chunk]
            dist_sq += q_sq
            chunk_idx = smallest_k(dist_sq, min(k, dist_sq.shape[1]))
            chunk_sq = xp.take_along_axis(dist_sq, chunk_idx, axis=1)
            chunk_idx = xp.astype(chunk_idx, xp.int64) + b0
            if best_sq is None:
                best_sq, best_idx = chunk_sq, chunk_idx
            else:  # merge with the running best k; stable so earlier (lower) indices win ties
                merged_sq = xp.concat([best_sq, chunk_sq], axis=1)
                merged_idx = xp.concat([best_idx, chunk_idx], axis=1)
                order = xp.argsort(merged_sq, axis=1, stable=True)[:, :k]
                best_sq = xp.take_along_axis(merged_sq, order, axis=1)
                best_idx = xp.take_along_axis(merged_idx, order, axis=1)
        # Exact distances of the chosen neighbours: (Q, k, D) differences, chunked through q's size.
        diff = q[:, None, :] - xp.astype(bank[best_idx], xp.float32)
        dists.append(xp.sqrt(xp.sum(diff * diff, axis=-1)))
        idxs.append(best_idx)
    out_dist = xp.concat(dists, axis=0) if len(dists) > 1 else dists[0]
    out_idx = xp.concat(idxs, axis=0) if len(idxs) > 1 else idxs[0]
    # Re-sort by the exact distances (the GEMM ranking can swap near-ties by rounding).
    order = xp.argsort(out_dist, axis=1, stable=True)
    return xp.take_along_axis(out_dist, order, axis=1), xp.take_along_axis(out_idx, order, axis=1)
