"""Exact 1-NN over a fixed memory bank, pruned by a PCA-ordered lower bound (the predict-time hot path).

Rotating the centred bank by its PCA basis changes no distance, and the distance over the first r
principal dims is a lower bound of the full one. For a block of queries one thin GEMM (r of D dims)
gives that bound for every (query, bank row) pair; the row with the smallest bound gives an upper bound
(its exact distance), and only rows whose lower bound is not above it can hold the nearest neighbour.
Those few candidates are compared with exact distances ||q - b|| (for large D after a second, finer
bound over more principal dims). Every test carries a margin that covers float rounding, so the answer
is the one a full search gives (up to near-ties).
"""
from __future__ import annotations

import math

import torch

from .coreset import _key, _unkey  # (distance, index) packed into one int64, as the coreset's refresh
from .knn import DEFAULT_CHUNK_ELEMENTS, nearest, squared_norms

_UNIT_ROUNDOFF = 2.0 ** -24  # float32
_SAFETY = 2.0  # multiplies every rounding bound below
# Bank rows are scanned in groups this size: a min per group is the only pass over the bound matrix
# besides the GEMM; only the groups whose min passes the test are opened.
GROUP = 32
# On CPU the (queries x bank) bound matrix is built in blocks this size (16 MiB of float32), so that the
# passes over it run from cache; accelerators take whole chunks.
CPU_BLOCK_ELEMENTS = 1 << 22
_VERIFY_PAIRS = 1 << 11  # candidate pairs gathered at once on CPU, for the same reason
# Candidates go through a second bound over REFINE_FACTOR * r dims before the exact distance, where that
# is at most half of D (it only pays where a full row is much longer than the finer bound).
REFINE_FACTOR = 4
_CALIBRATION_ROWS = 256
# Where the calibration turned the bound off, each search call of at least twice this many queries tries it on
# this many first (their answers are kept: both paths are exact).
PROBE_QUERIES = 64


def _gemm_input_roundoff(device: torch.device) -> float:
    """Unit roundoff of the operands inside a float32 matmul: TF32/bf16 modes round them first."""
    tf32 = device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32
    return _roundoff(torch.get_float32_matmul_precision(), tf32)


def _roundoff(precision: str, tf32: bool) -> float:
    """The coarser of the two modes that may apply: TF32 (10 explicit mantissa bits) and the float32 matmul
    precision setting ("high": TF32-like, "medium": bf16 with 7)."""
    by_precision = {"highest": _UNIT_ROUNDOFF, "high": 2.0 ** -11}.get(precision, 2.0 ** -8)
    return max(2.0 ** -11, by_precision) if tf32 else by_precision


def _row_dist(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Direct ||a_i - b_i|| (no GEMM expansion, so no cancellation): relative error <= (D + 4) u."""
    return torch.linalg.vector_norm(a - b, dim=1)


class BankIndex:
    """Exact 1-NN over a fixed bank: PCA-ordered lower bound prunes, exact distances verify."""

    def __init__(self, bank: torch.Tensor, *, prefix_dims: int = 64, chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
                 max_candidate_fraction: float = 0.05):
        if bank.ndim != 2 or bank.shape[0] < 1:
            raise ValueError(f"bank must be (M >= 1, D), got {tuple(bank.shape)}")
        if prefix_dims < 1 or chunk_elements < 1:
            raise ValueError("prefix_dims and chunk_elements must be >= 1")
        self.prefix_dims = prefix_dims
        self.chunk_elements = chunk_elements
        # A query with more candidates than this share of the bank is searched by the plain GEMM instead:
        # past it, gathering candidate rows one by one costs more than the GEMM it saves.
        self.max_candidate_fraction = max_candidate_fraction
        self.bank_ = bank.float().contiguous()
        self.reset_stats()
        self.bank_sq_norms_ = squared_norms(self.bank_)
        num_bank, dim = self.bank_.shape
        r = prefix_dims
        self.refine_dims_ = REFINE_FACTOR * r if 2 * REFINE_FACTOR * r <= dim else 0
        self.pruning_ = self.bounds_ = dim > r
        if not self.pruning_:
            return
        self.mean_ = self.bank_.double().mean(0).float()
        centred = self.bank_.double() - self.mean_.double()  # the float32 mean, as queries will use
        _, eigvecs = torch.linalg.eigh(centred.T @ centred)  # ascending; float64 keeps the order stable
        eigvecs = eigvecs.flip(1)
        self.basis_ = eigvecs[:, :max(r, self.refine_dims_)].float().contiguous()  # (D, r or r2) principal axes
        rotated = centred @ self.basis_.double()  # float64: the bank side carries only the final rounding
        self.bank_refine_ = rotated.float().contiguous() if self.refine_dims_ else None  # (M, r2)
        prefix_sq = rotated[:, :r].pow(2).sum(1)
        # One GEMM gives ||b'||^2 - 2 q'.b' = [q', 1] . [-2 b', ||b'||^2] (b' = the first r rotated dims);
        # rows padded to whole groups with +inf, so that padding never passes a test.
        padded = -(-num_bank // GROUP) * GROUP
        aug = torch.zeros(padded, r + 1, dtype=torch.float64, device=self.bank_.device)
        aug[:num_bank, :r] = -2 * rotated[:, :r]
        aug[:, r] = float("inf")
        aug[:num_bank, r] = prefix_sq
        self.bank_aug_ = aug.float()
        # Largest centred and prefix norms over the bank: per-query margins then need no (Q, M) work.
        self._max_centred_norm = float(centred.norm(dim=1).max())
        self._max_prefix_sq = float(prefix_sq.max())
        # Calibrate on bank rows (each against the rest): where most of them would fall back to the plain
        # GEMM (unstructured data, e.g. Gaussian), so would queries, and the bound pass would be wasted.
        sample = torch.linspace(0, num_bank - 1, min(num_bank, _CALIBRATION_ROWS), device=self.bank_.device).long()
        _, heavy = self._search_rows(self.bank_[sample], exclude=sample)
        self.pruning_ = bool(heavy.float().mean() <= 0.5)
        self.reset_stats()

    def reset_stats(self) -> None:
        """Work counters of `search` (in (query, bank row) pairs), for measuring how much the bound prunes.

        pairs: queries x bank rows searched; candidates: pairs that passed the prefix bound (light queries);
        exact: pairs whose full distance was computed; plain: pairs searched by the plain GEMM instead.
        The pruned share is 1 - (candidates + plain) / pairs.
        """
        self.stats_ = dict(queries=0, pairs=0, candidates=0, exact=0, plain=0)

    def search(self, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(Q, D) -> distances (Q,), indices (Q,) of the nearest bank row (exact Euclidean, not squared)."""
        dim = self.bank_.shape[1]
        if queries.ndim != 2 or queries.shape[1] != dim:
            raise ValueError(f"queries must be (Q, {dim}), got {tuple(queries.shape)}")
        queries = queries.to(device=self.bank_.device, dtype=torch.float32)
        num_queries, num_bank = queries.shape[0], self.bank_.shape[0]
        self.stats_["queries"] += num_queries
        self.stats_["pairs"] += num_queries * num_bank
        keys, rest = [], queries
        if not self.pruning_ and self.bounds_ and num_queries >= 2 * PROBE_QUERIES:
            # The calibration judged from bank rows; queries can lie elsewhere (e.g. a bank of scattered
            # outliers, queried by the compact bulk they were picked from: the bound prunes ~99% there, against
            # nothing for bank rows). Probe a few queries; if most are light, search this call pruned.
            probe, heavy = self._search_rows(queries[:PROBE_QUERIES])
            keys.append(probe)
            rest = queries[PROBE_QUERIES:]
            if float(heavy.float().mean()) <= 0.5:
                keys.append(self._search_rows(rest, switch_to_plain=True)[0])
                return _unkey(torch.cat(keys))
        if not self.pruning_ or rest.shape[0] == 0:
            self.stats_["plain"] += rest.shape[0] * num_bank
            dist, idx = nearest(rest, self.bank_, 1, bank_sq_norms=self.bank_sq_norms_,
                                chunk_elements=self.chunk_elements)
            if not keys:
                return dist[:, 0], idx[:, 0]
            keys.append(_key(dist[:, 0], idx[:, 0]))
            return _unkey(torch.cat(keys))
        keys, _ = self._search_rows(queries, switch_to_plain=True)
        return _unkey(keys)

    def _search_rows(self, queries: torch.Tensor, exclude: torch.Tensor | None = None, switch_to_plain: bool = False):
        """(Q, D) -> (Q,) keys of the nearest rows, (Q,) bool: fell back to the plain GEMM.

        exclude (Q,): one bank row per query to leave out (calibration queries are bank rows).
        switch_to_plain: once most queries so far fell back, search the rest with the plain GEMM directly.
        """
        padded = self.bank_aug_.shape[0]
        # The bound matrix is the largest tensor; the rows gathered from it can reach as many elements again.
        block = max(1, self.chunk_elements // 4)
        if queries.device.type == "cpu":
            block = min(block, CPU_BLOCK_ELEMENTS)
        bank_chunk = min(padded, max(GROUP, block // GROUP * GROUP))
        query_chunk = max(1, block // bank_chunk)
        keys, heavy, num_heavy = [], [], 0
        for q0 in range(0, queries.shape[0], query_chunk):
            if switch_to_plain and num_heavy > q0 / 2:  # e.g. a batch of anomalous images: skip the bounds
                self.stats_["plain"] += (queries.shape[0] - q0) * self.bank_.shape[0]
                dist, idx = nearest(queries[q0:], self.bank_, 1, bank_sq_norms=self.bank_sq_norms_,
                                    chunk_elements=self.chunk_elements)
                keys.append(_key(dist[:, 0], idx[:, 0]))
                heavy.append(torch.ones(idx.shape[0], dtype=torch.bool, device=idx.device))
                break
            k, h = self._search_block(queries[q0:q0 + query_chunk], bank_chunk,
                                      None if exclude is None else exclude[q0:q0 + query_chunk])
            keys.append(k)
            heavy.append(h)
            if switch_to_plain:
                num_heavy += int(h.sum())
        return torch.cat(keys), torch.cat(heavy)

    def _shift(self, centred_norm: torch.Tensor, dims: int, device: torch.device) -> torch.Tensor:
        """(n,) bound on how far rounding moves the computed distance over the first `dims` rotated dims.

        Query side: x @ basis (x = q - mean) in float32, each of the `dims` outputs a length-D dot product
        with a unit column, errs by <= (2 u_in + D u) ||x||; over `dims` outputs, times sqrt(dims); the
        centring adds u ||x||. Bank side (computed in float64): the final rounding, u ||x_b||.
        """
        u, dim = _UNIT_ROUNDOFF, self.bank_.shape[1]
        query_side = (2 * _gemm_input_roundoff(device) + dim * u) * math.sqrt(dims) + u
        return _SAFETY * (query_side * centred_norm + u * self._max_centred_norm)

    @staticmethod
    def _stretch(dims: int, dim: int) -> float:
        """The float32 basis is orthonormal to ~u sqrt(dims) only: ||(q - b) basis|| <= (1 + eta) ||q - b||.
        Times the relative error of the direct distances that give the upper bound, (D + 4) u."""
        return (1 + _SAFETY * _UNIT_ROUNDOFF * math.sqrt(dims)) * (1 + _SAFETY * (dim + 4) * _UNIT_ROUNDOFF)

    def _search_block(self, q: torch.Tensor, bank_chunk: int, exclude: torch.Tensor | None):
        num_bank, dim = self.bank_.shape
        r, r2 = self.prefix_dims, self.refine_dims_
        n, device = q.shape[0], q.device
        u = _UNIT_ROUNDOFF
        centred = q - self.mean_
        centred_norm = centred.norm(dim=1)
        rotated = centred @ self.basis_  # (n, r or r2)
        prefix_sq = rotated[:, :r].pow(2).sum(1)
        query_aug = torch.cat([rotated[:, :r], torch.ones(n, 1, device=device)], 1)
        shift, stretch = self._shift(centred_norm, r, device), self._stretch(r, dim)
        # GEMM expansion ||a||^2 + ||b||^2 - 2 a.b over r dims (a, b: prefixes), here the length-(r+1) dot
        # product [a, 1].[-2b, ||b||^2]: it errs by <= (2 u_in + (r+1) u) times the sum of |terms|, which is
        # <= ||a||^2 + 2||b||^2; the squared norms by r u each. In all <= (2 u_in + (2r+2) u)(||a||^2 + 2||b||^2).
        u_gemm = 2 * _gemm_input_roundoff(device) + (2 * r + 2) * u
        expansion = _SAFETY * u_gemm * (prefix_sq + 2 * self._max_prefix_sq)
        if r2:
            # Direct differences over r2 dims: the computed norm errs by <= (r2 + 4) u relatively.
            shift2, stretch2 = self._shift(centred_norm, r2, device), self._stretch(r2, dim)
            slack2 = 1 + _SAFETY * (r2 + 4) * u
        best = torch.full((n,), torch.iinfo(torch.int64).max, dtype=torch.long, device=device)
        heavy_any = torch.zeros(n, dtype=torch.bool, device=device)
        rows = torch.arange(n, device=device)
        budget = self.max_candidate_fraction * num_bank
        # Each pair chunk gathers two (pairs, D) tensors and their difference.
        pair_chunk = max(1, min(self.chunk_elements // (4 * dim), _VERIFY_PAIRS if device.type == "cpu" else num_bank))
        for b0 in range(0, self.bank_aug_.shape[0], bank_chunk):
            # bound[i, j] = (prefix distance of q_i and row j)^2 - ||prefix_i||^2: the lower bound, shifted.
            bound = query_aug @ self.bank_aug_[b0:b0 + bank_chunk].T
            if exclude is not None:
                inside = (exclude >= b0) & (exclude < b0 + bank_chunk)
                bound[rows[inside], exclude[inside] - b0] = float("inf")
            groups = bound.view(n, -1, GROUP)
            group_min = groups.amin(2)  # (n, G)
            # Upper bound: exact distance to the row with the smallest lower bound.
            g = group_min.argmin(1)
            guess = g * GROUP + groups[rows, g].argmin(1)
            guess = guess.clamp_max(num_bank - 1 - b0) + b0  # (only all-padding rows could point past the end)
            best = torch.minimum(best, _key(_row_dist(q, self.bank_[guess]), guess))
            upper = _unkey(best)[0]
            # Row j can be nearest only if its true prefix distance <= (1 + eta) d(q, j) <= (1 + eta) * the
            # true upper bound; the computed prefix distance may lie up to `shift` (projection) and
            # `expansion` (GEMM) lower. The final factor covers rounding of this line itself.
            threshold = (upper * stretch + shift).square_().mul_(1 + 8 * u) + expansion - prefix_sq
            # Open only the groups whose min passes the test, and count the rows in them that pass too.
            num_groups = group_min.shape[1]
            hits = (group_min <= threshold[:, None]).view(-1).nonzero()[:, 0]  # flat (query, group) ids
            del group_min
            hit_query = hits.div(num_groups, rounding_mode="floor")
            passed = groups.view(-1, GROUP).index_select(0, hits) <= threshold.index_select(0, hit_query)[:, None]
            del bound, groups
            count = torch.zeros(n, dtype=torch.long, device=device).index_add_(0, hit_query, passed.sum(1))
            heavy = count > budget
            stats = self.stats_
            stats["candidates"] += int(count[~heavy].sum())
            stats["plain"] += int(heavy.sum()) * (min(num_bank, b0 + bank_chunk) - b0)
            if bool(heavy.any()):  # too many candidates: the plain GEMM is cheaper for these queries
                heavy_any |= heavy
                light = ~heavy.index_select(0, hit_query)
                hits, hit_query, passed = hits[light], hit_query[light], passed[light]
                if exclude is None:  # (calibration only needs to know which queries fall back)
                    h, b1 = rows[heavy], min(num_bank, b0 + bank_chunk)
                    dist, idx = nearest(q[h], self.bank_[b0:b1], 1, bank_sq_norms=self.bank_sq_norms_[b0:b1],
                                        chunk_elements=self.chunk_elements)
                    best[h] = torch.minimum(best[h], _key(dist[:, 0], idx[:, 0] + b0))
            inner = passed.view(-1).nonzero()[:, 0]
            inner_hit = inner.div(GROUP, rounding_mode="floor")
            cand_query = hit_query.index_select(0, inner_hit)
            cand_row = (hits.index_select(0, inner_hit) - cand_query * num_groups) * GROUP + inner % GROUP + b0
            del hits, hit_query, passed, inner, inner_hit
            for p0 in range(0, cand_query.shape[0], pair_chunk):
                qi, bj = cand_query[p0:p0 + pair_chunk], cand_row[p0:p0 + pair_chunk]
                if r2:  # finer bound over r2 dims from direct differences (no expansion error), same argument
                    fine = _row_dist(rotated.index_select(0, qi), self.bank_refine_.index_select(0, bj))
                    limit = (_unkey(best)[0].index_select(0, qi) * stretch2 + shift2.index_select(0, qi)) * slack2
                    keep = (fine <= limit).nonzero()[:, 0]
                    qi, bj = qi.index_select(0, keep), bj.index_select(0, keep)
                stats["exact"] += qi.numel()
                dist = _row_dist(q.index_select(0, qi), self.bank_.index_select(0, bj))
                best.scatter_reduce_(0, qi, _key(dist, bj), "amin")
        return best, heavy_any
