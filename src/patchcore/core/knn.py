"""Exact Euclidean k-nearest-neighbour search, in bounded-memory chunks (matrix products).

Candidates are ranked with ||q||^2 - 2 q.b + ||b||^2 (one GEMM per chunk), and the distances of the
winners are then recomputed directly as ||q - b||, so reported distances carry no cancellation error.
"""
from __future__ import annotations

import torch

DEFAULT_CHUNK_ELEMENTS = 1 << 24  # at most ~64 MiB of float32 distances alive at once


def squared_norms(bank: torch.Tensor) -> torch.Tensor:
    """(M, D) -> (M,), computed once per bank and reused by every query."""
    return bank.float().pow(2).sum(1)


def nearest(queries: torch.Tensor, bank: torch.Tensor, k: int = 1, *, bank_sq_norms: torch.Tensor | None = None,
            chunk_elements: int = DEFAULT_CHUNK_ELEMENTS) -> tuple[torch.Tensor, torch.Tensor]:
    """(Q, D) queries, (M, D) bank -> distances (Q, k) ascending, indices (Q, k) into the bank.

    Memory stays O(chunk_elements) whatever Q and M are.
    """
    num_queries, num_bank = queries.shape[0], bank.shape[0]
    if not 1 <= k <= num_bank:
        raise ValueError(f"k must be in [1, {num_bank}], got {k}")
    if bank_sq_norms is None:
        bank_sq_norms = squared_norms(bank)
    bank_chunk = max(k, min(num_bank, chunk_elements // max(1, min(num_queries, 1024))))
    query_chunk = max(1, chunk_elements // bank_chunk)
    out_dist = torch.empty(num_queries, k, device=queries.device)
    out_idx = torch.empty(num_queries, k, dtype=torch.long, device=queries.device)
    for q0 in range(0, num_queries, query_chunk):
        q = queries[q0:q0 + query_chunk].float()
        q_sq = q.pow(2).sum(1, keepdim=True)
        best_sq = best_idx = None
        for b0 in range(0, num_bank, bank_chunk):
            b = bank[b0:b0 + bank_chunk].float()
            dist_sq = torch.addmm(bank_sq_norms[b0:b0 + bank_chunk][None], q, b.T, alpha=-2.0).add_(q_sq)
            kk = min(k, dist_sq.shape[1])
            if kk == 1:
                chunk_sq, chunk_idx = dist_sq.min(1, keepdim=True)
            else:
                chunk_sq, chunk_idx = dist_sq.topk(kk, dim=1, largest=False)
            chunk_idx += b0
            if best_sq is None:
                best_sq, best_idx = chunk_sq, chunk_idx
            else:  # merge with the running best k; stable so earlier (lower) indices win ties
                merged_sq = torch.cat([best_sq, chunk_sq], 1)
                merged_idx = torch.cat([best_idx, chunk_idx], 1)
                order = merged_sq.argsort(dim=1, stable=True)[:, :k]
                best_sq, best_idx = merged_sq.gather(1, order), merged_idx.gather(1, order)
        # Exact distances of the chosen neighbours: (Q, k, D) differences, chunked through q's size.
        diff = q[:, None, :] - bank[best_idx].float()
        out_dist[q0:q0 + query_chunk] = diff.pow_(2).sum(-1).sqrt_()
        out_idx[q0:q0 + query_chunk] = best_idx
    # Re-sort by the exact distances (the GEMM ranking can swap near-ties by rounding).
    out_dist, order = out_dist.sort(dim=1, stable=True)
    return out_dist, out_idx.gather(1, order)
