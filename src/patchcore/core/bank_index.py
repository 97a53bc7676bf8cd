"""Exact 1-NN over a fixed memory bank, pruned by a PCA-ordered lower bound (the predict-time hot path).

Rotating the centred bank by its PCA basis changes no distance, and the distance over the first r
principal dims is a lower bound of the full one. For a block of queries one thin GEMM (r of D dims)
gives that bound for every (query, bank row) pair; the row with the smallest bound gives an upper bound
(its exact distance), and only rows whose lower bound is not above it can hold the nearest neighbour.
Those few candidates are compared with exact distances ||q - b|| (for large D after a second, finer
bound over more principal dims). Every test carries a margin that covers float rounding, so the answer
is the one a full search gives (up to near-ties). A bank too small for the bound to repay its cost per query
(PRUNE_OVERHEAD below) gets the plain GEMM search instead.

Array-API agnostic (array-api-compat): the library builds it on torch tensors (CPU or GPU), the torch-free
runtime on numpy arrays; the few primitives the standard lacks (scatter-min, counting by index, the float
bits of a distance) are `_scatter_min`, `_count` and `_key`/`_unkey` below, one line per array library.
"""
from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from array_api_compat import array_namespace, device, is_torch_array

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
# The bound pays only where the bank is large enough: per query it saves M (D - r - 1) multiply-adds of the
# GEMM and costs about PRUNE_OVERHEAD * D more (the rotation, r D, and the rows gathered at a fraction of the
# GEMM's speed: the first guess, the candidates, ~2 a query on MVTec). Measured on the bottle bank cut to M
# rows (D 152, r 64, 1 thread): pruned / plain time 1.40 at 300 rows, 1.03 at 520, 0.97 at 600, 0.69 at 1639
# on numpy (torch 0.8-1.1 from 300 to 750 rows, 0.38 at 1639); 300 D puts the switch at 525 rows there.
PRUNE_OVERHEAD = 300
# A worker thread takes a block only where it holds at least this many (query, bank row) pairs (a few ms of
# search): below that, starting and joining the threads costs about what the split saves.
MIN_WORKER_PAIRS = 1 << 20


def _gemm_input_roundoff(array) -> float:
    """Unit roundoff of the operands inside a float32 matmul: TF32/bf16 modes round them first (torch)."""
    if not is_torch_array(array):
        return _UNIT_ROUNDOFF  # numpy's BLAS: plain float32
    import torch

    tf32 = array.device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32
    return _roundoff(torch.get_float32_matmul_precision(), tf32)


def _roundoff(precision: str, tf32: bool) -> float:
    """The coarser of the two modes that may apply: TF32 (10 explicit mantissa bits) and the float32 matmul
    precision setting ("high": TF32-like, "medium": bf16 with 7)."""
    by_precision = {"highest": _UNIT_ROUNDOFF, "high": 2.0 ** -11}.get(precision, 2.0 ** -8)
    return max(2.0 ** -11, by_precision) if tf32 else by_precision


def _row_dist(a, b):
    """Direct ||a_i - b_i|| (no GEMM expansion, so no cancellation): relative error <= (D + 4) u."""
    xp = array_namespace(a, b)
    return xp.linalg.vector_norm(a - b, axis=1)


def _key(dist, idx):
    """(distance >= 0, index) -> one int64 that orders by distance, then index (float bits are monotone)."""
    xp = array_namespace(dist, idx)
    return (xp.astype(dist.view(xp.int32), xp.int64) << 32) | idx


def _unkey(key):
    xp = array_namespace(key)
    return xp.astype(key >> 32, xp.int32).view(xp.float32), key & 0xFFFFFFFF


def _scatter_min(target, index, values) -> None:
    """target[index[i]] = min(target[index[i]], values[i]), in place, repeated indices included."""
    if is_torch_array(target):
        target.scatter_reduce_(0, index, values, "amin")
    else:
        np.minimum.at(target, index, values)


def _count(index, weights, length: int):
    """sum of weights[i] over i with index[i] == j, for j < length (int64)."""
    if is_torch_array(index):
        import torch

        return torch.zeros(length, dtype=torch.long, device=index.device).index_add_(0, index, weights)
    return np.bincount(index, weights=weights, minlength=length).astype(np.int64)


class BankIndex:
    """Exact 1-NN over a fixed bank: PCA-ordered lower bound prunes, exact distances verify."""

    def __init__(self, bank, *, prefix_dims: int = 64, chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
                 max_candidate_fraction: float = 0.05, workers: int = 1, min_bank_rows: int | None = None):
        if bank.ndim != 2 or bank.shape[0] < 1:
            raise ValueError(f"bank must be (M >= 1, D), got {tuple(bank.shape)}")
        if prefix_dims < 1 or chunk_elements < 1 or workers < 1:
            raise ValueError("prefix_dims, chunk_elements and workers must be >= 1")
        self.prefix_dims = prefix_dims
        # Banks with fewer rows are searched by the plain GEMM; None: the PRUNE_OVERHEAD rule (0: always bound).
        self.min_bank_rows = min_bank_rows
        # Query blocks searched at once, each in its own thread (numpy releases the GIL in its array work). For
        # numpy, whose elementwise passes are single-threaded: workers = cores, with BLAS at one thread, used
        # both cores where BLAS threads alone (the GEMM only, spinning on a loaded machine) did not. torch
        # parallelises inside each op: leave it at 1 there.
        self.workers = workers
        self.chunk_elements = chunk_elements
        # A query with more candidates than this share of the bank is searched by the plain GEMM instead:
        # past it, gathering candidate rows one by one costs more than the GEMM it saves.
        self.max_candidate_fraction = max_candidate_fraction
        xp = self._xp = array_namespace(bank)
        self.bank_ = xp.astype(bank, xp.float32)
        if is_torch_array(self.bank_):
            self.bank_ = self.bank_.contiguous()
        else:
            self.bank_ = np.ascontiguousarray(self.bank_)
        self.reset_stats()
        self.bank_sq_norms_ = squared_norms(self.bank_)
        num_bank, dim = self.bank_.shape
        r = prefix_dims
        self.refine_dims_ = REFINE_FACTOR * r if 2 * REFINE_FACTOR * r <= dim else 0
        min_rows = self.min_bank_rows
        if min_rows is None:
            min_rows = math.ceil(PRUNE_OVERHEAD * dim / (dim - r - 1)) if dim > r + 1 else num_bank + 1
        self.pruning_ = self.bounds_ = dim > r and num_bank >= min_rows
        if not self.pruning_:
            return
        f64, f32 = xp.float64, xp.float32
        self.mean_ = xp.astype(xp.mean(xp.astype(self.bank_, f64), axis=0), f32)
        centred = xp.astype(self.bank_, f64) - xp.astype(self.mean_, f64)  # the float32 mean, as queries will use
        _, eigvecs = xp.linalg.eigh(xp.matrix_transpose(centred) @ centred)  # ascending; float64: stable order
        eigvecs = xp.flip(eigvecs, axis=1)
        self.basis_ = xp.astype(eigvecs[:, :max(r, self.refine_dims_)], f32)  # (D, r or r2) principal axes
        rotated = centred @ xp.astype(self.basis_, f64)  # float64: the bank side carries only the final rounding
        self.bank_refine_ = xp.astype(rotated, f32) if self.refine_dims_ else None  # (M, r2)
        prefix_sq = xp.sum(rotated[:, :r] ** 2, axis=1)
        # One GEMM gives ||b'||^2 - 2 q'.b' = [q', 1] . [-2 b', ||b'||^2] (b' = the first r rotated dims);
        # rows padded to whole groups with +inf, so that padding never passes a test.
        padded = -(-num_bank // GROUP) * GROUP
        aug = xp.zeros((padded, r + 1), dtype=f64, device=device(self.bank_))
        aug[:num_bank, :r] = -2 * rotated[:, :r]
        aug[:, r] = float("inf")
        aug[:num_bank, r] = prefix_sq
        self.bank_aug_ = xp.astype(aug, f32)
        # Largest centred and prefix norms over the bank: per-query margins then need no (Q, M) work.
        self._max_centred_norm = float(xp.max(xp.linalg.vector_norm(centred, axis=1)))
        self._max_prefix_sq = float(xp.max(prefix_sq))
        # Calibrate on bank rows (each against the rest): where most of them would fall back to the plain
        # GEMM (unstructured data, e.g. Gaussian), so would queries, and the bound pass would be wasted.
        sample = xp.astype(xp.linspace(0, num_bank - 1, min(num_bank, _CALIBRATION_ROWS), dtype=f32,
                                       device=device(self.bank_)), xp.int64)
        _, heavy = self._search_rows(self.bank_[sample], exclude=sample)
        self.pruning_ = bool(xp.mean(xp.astype(heavy, f32)) <= 0.5)
        self.reset_stats()

    def reset_stats(self) -> None:
        """Work counters of `search` (in (query, bank row) pairs), for measuring how much the bound prunes.

        pairs: queries x bank rows searched; candidates: pairs that passed the prefix bound (light queries);
        exact: pairs whose full distance was computed; plain: pairs searched by the plain GEMM instead.
        The pruned share is 1 - (candidates + plain) / pairs.
        """
        self.stats_ = dict(queries=0, pairs=0, candidates=0, exact=0, plain=0)

    def search(self, queries):
        """(Q, D) -> distances (Q,), indices (Q,) of the nearest bank row (exact Euclidean, not squared)."""
        xp = self._xp
        dim = self.bank_.shape[1]
        if queries.ndim != 2 or queries.shape[1] != dim:
            raise ValueError(f"queries must be (Q, {dim}), got {tuple(queries.shape)}")
        queries = xp.astype(xp.asarray(queries, device=device(self.bank_)), xp.float32, copy=False)
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
            if float(xp.mean(xp.astype(heavy, xp.float32))) <= 0.5:
                keys.append(self._search_rows(rest, switch_to_plain=True)[0])
                return _unkey(xp.concat(keys))
        if not self.pruning_ or rest.shape[0] == 0:
            self.stats_["plain"] += rest.shape[0] * num_bank
            dist, idx = self._plain(rest)
            if not keys:
                return dist, idx
            keys.append(_key(dist, idx))
            return _unkey(xp.concat(keys))
        keys, _ = self._search_rows(queries, switch_to_plain=True)
        return _unkey(keys)

    def _workers_for(self, num_queries: int) -> int:
        """Worker threads for num_queries queries: at most one per MIN_WORKER_PAIRS pairs."""
        return max(1, min(self.workers, num_queries * self.bank_.shape[0] // MIN_WORKER_PAIRS))

    def _plain(self, queries):
        """(Q, D) -> distances (Q,), indices (Q,) by the plain GEMM search, query blocks in the workers."""
        workers = self._workers_for(queries.shape[0])
        step = -(-queries.shape[0] // workers)

        def one(a):
            dist, idx = nearest(queries[a:a + step], self.bank_, 1, bank_sq_norms=self.bank_sq_norms_,
                                chunk_elements=self.chunk_elements)
            return dist[:, 0], idx[:, 0]
        if workers == 1:
            return one(0)
        with ThreadPoolExecutor(workers) as pool:
            parts = list(pool.map(one, range(0, queries.shape[0], step)))
        return self._xp.concat([d for d, _ in parts]), self._xp.concat([i for _, i in parts])

    def _search_rows(self, queries, exclude=None, switch_to_plain: bool = False):
        """(Q, D) -> (Q,) keys of the nearest rows, (Q,) bool: fell back to the plain GEMM.

        exclude (Q,): one bank row per query to leave out (calibration queries are bank rows).
        switch_to_plain: once most queries so far fell back, search the rest with the plain GEMM directly.
        """
        padded = self.bank_aug_.shape[0]
        # The bound matrix is the largest tensor; the rows gathered from it can reach as many elements again.
        block = max(1, self.chunk_elements // 4)
        if not is_torch_array(queries) or queries.device.type == "cpu":
            block = min(block, CPU_BLOCK_ELEMENTS)
        bank_chunk = min(padded, max(GROUP, block // GROUP * GROUP))
        query_chunk = max(1, block // bank_chunk)
        num_queries = queries.shape[0]
        workers = self._workers_for(num_queries)
        if workers > 1:  # whole waves of equal blocks, one per worker (a last wave of one block leaves the rest idle)
            waves = -(-num_queries // (query_chunk * workers))
            query_chunk = -(-num_queries // (waves * workers))
        starts = list(range(0, num_queries, query_chunk))
        keys, heavy, num_heavy = [], [], 0
        pool = ThreadPoolExecutor(workers) if workers > 1 and len(starts) > 1 else None
        run = pool.map if pool is not None else map

        def plain(a):
            return nearest(queries[a:a + query_chunk], self.bank_, 1, bank_sq_norms=self.bank_sq_norms_,
                           chunk_elements=self.chunk_elements)

        def pruned(a):
            return self._search_block(queries[a:a + query_chunk], bank_chunk,
                                      None if exclude is None else exclude[a:a + query_chunk])
        try:
            for w0 in range(0, len(starts), workers):  # a wave of one block per worker
                q0 = starts[w0]
                if switch_to_plain and num_heavy > q0 / 2:  # e.g. a batch of anomalous images: skip the bounds
                    self.stats_["plain"] += (num_queries - q0) * self.bank_.shape[0]
                    for dist, idx in run(plain, starts[w0:]):
                        keys.append(_key(dist[:, 0], idx[:, 0]))
                        heavy.append(self._xp.ones(idx.shape[0], dtype=self._xp.bool, device=device(idx)))
                    break
                for k, h, stats in run(pruned, starts[w0:w0 + workers]):
                    keys.append(k)
                    heavy.append(h)
                    for name, value in stats.items():
                        self.stats_[name] += value
                    if switch_to_plain:
                        num_heavy += int(self._xp.sum(self._xp.astype(h, self._xp.int64)))
        finally:
            if pool is not None:
                pool.shutdown()
        return self._xp.concat(keys), self._xp.concat(heavy)

    def _shift(self, centred_norm, dims: int, like):
        """(n,) bound on how far rounding moves the computed distance over the first `dims` rotated dims.

        Query side: x @ basis (x = q - mean) in float32, each of the `dims` outputs a length-D dot product
        with a unit column, errs by <= (2 u_in + D u) ||x||; over `dims` outputs, times sqrt(dims); the
        centring adds u ||x||. Bank side (computed in float64): the final rounding, u ||x_b||.
        """
        u, dim = _UNIT_ROUNDOFF, self.bank_.shape[1]
        query_side = (2 * _gemm_input_roundoff(like) + dim * u) * math.sqrt(dims) + u
        return _SAFETY * (query_side * centred_norm + u * self._max_centred_norm)

    @staticmethod
    def _stretch(dims: int, dim: int) -> float:
        """The float32 basis is orthonormal to ~u sqrt(dims) only: ||(q - b) basis|| <= (1 + eta) ||q - b||.
        Times the relative error of the direct distances that give the upper bound, (D + 4) u."""
        return (1 + _SAFETY * _UNIT_ROUNDOFF * math.sqrt(dims)) * (1 + _SAFETY * (dim + 4) * _UNIT_ROUNDOFF)

    def _search_block(self, q, bank_chunk: int, exclude):
        xp = self._xp
        num_bank, dim = self.bank_.shape
        r, r2 = self.prefix_dims, self.refine_dims_
        n, dev = q.shape[0], device(q)
        u = _UNIT_ROUNDOFF
        centred = q - self.mean_
        centred_norm = xp.linalg.vector_norm(centred, axis=1)
        rotated = centred @ self.basis_  # (n, r or r2)
        prefix_sq = xp.sum(rotated[:, :r] ** 2, axis=1)
        query_aug_t = xp.concat([xp.matrix_transpose(rotated[:, :r]),
                                 xp.ones((1, n), dtype=xp.float32, device=dev)], axis=0)  # (r + 1, n)
        shift, stretch = self._shift(centred_norm, r, q), self._stretch(r, dim)
        # GEMM expansion ||a||^2 + ||b||^2 - 2 a.b over r dims (a, b: prefixes), here the length-(r+1) dot
        # product [a, 1].[-2b, ||b||^2]: it errs by <= (2 u_in + (r+1) u) times the sum of |terms|, which is
        # <= ||a||^2 + 2||b||^2; the squared norms by r u each. In all <= (2 u_in + (2r+2) u)(||a||^2 + 2||b||^2).
        u_gemm = 2 * _gemm_input_roundoff(q) + (2 * r + 2) * u
        expansion = _SAFETY * u_gemm * (prefix_sq + 2 * self._max_prefix_sq)
        if r2:
            # Direct differences over r2 dims: the computed norm errs by <= (r2 + 4) u relatively.
            shift2, stretch2 = self._shift(centred_norm, r2, q), self._stretch(r2, dim)
            slack2 = 1 + _SAFETY * (r2 + 4) * u
        stats = dict(candidates=0, plain=0, exact=0)  # this block's counts (blocks may run in parallel)
        best = xp.full((n,), np.iinfo(np.int64).max, dtype=xp.int64, device=dev)
        heavy_any = xp.zeros(n, dtype=xp.bool, device=dev)
        rows = xp.arange(n, device=dev)
        budget = self.max_candidate_fraction * num_bank
        # Each pair chunk gathers two (pairs, D) tensors and their difference.
        on_cpu = not is_torch_array(q) or q.device.type == "cpu"
        pair_chunk = max(1, min(self.chunk_elements // (4 * dim), _VERIFY_PAIRS if on_cpu else num_bank))
        for b0 in range(0, self.bank_aug_.shape[0], bank_chunk):
            # bound[j, i] = (prefix distance of q_i and row j)^2 - ||prefix_i||^2: the lower bound, shifted.
            # Bank rows x queries, so that a group of GROUP rows is GROUP contiguous query-length rows: its
            # min is an elementwise minimum of whole rows (vectorised in numpy and torch alike; a min over a
            # short last axis goes element by element in numpy).
            bound = self.bank_aug_[b0:b0 + bank_chunk] @ query_aug_t
            if exclude is not None:
                inside = (exclude >= b0) & (exclude < b0 + bank_chunk)
                bound[exclude[inside] - b0, rows[inside]] = float("inf")
            groups = xp.reshape(bound, (-1, GROUP, n))
            group_min = xp.min(groups, axis=1)  # (G, n)
            # Upper bound: exact distance to the row with the smallest lower bound.
            g = xp.argmin(group_min, axis=0)
            guess = g * GROUP + xp.argmin(groups[g, :, rows], axis=1)
            guess = xp.clip(guess, max=num_bank - 1 - b0) + b0  # (only all-padding rows could point past the end)
            best = xp.minimum(best, _key(_row_dist(q, self.bank_[guess]), guess))
            upper = _unkey(best)[0]
            # Row j can be nearest only if its true prefix distance <= (1 + eta) d(q, j) <= (1 + eta) * the
            # true upper bound; the computed prefix distance may lie up to `shift` (projection) and
            # `expansion` (GEMM) lower. The final factor covers rounding of this line itself.
            threshold = (upper * stretch + shift) ** 2 * (1 + 8 * u) + expansion - prefix_sq
            # Open only the groups whose min passes the test, and count the rows in them that pass too.
            hits = xp.nonzero(xp.reshape(group_min <= threshold, (-1,)))[0]  # flat (group, query) ids
            del group_min
            hit_group, hit_query = hits // n, hits % n
            passed = groups[hit_group, :, hit_query] <= xp.take(threshold, hit_query, axis=0)[:, None]  # (H, GROUP)
            del bound, groups, hits
            count = _count(hit_query, xp.sum(xp.astype(passed, xp.int64), axis=1), n)
            heavy = count > budget
            stats["candidates"] += int(xp.sum(count[~heavy]))
            stats["plain"] += int(xp.sum(xp.astype(heavy, xp.int64))) * (min(num_bank, b0 + bank_chunk) - b0)
            if bool(xp.any(heavy)):  # too many candidates: the plain GEMM is cheaper for these queries
                heavy_any |= heavy
                light = ~xp.take(heavy, hit_query, axis=0)
                hit_group, hit_query, passed = hit_group[light], hit_query[light], passed[light]
                if exclude is None:  # (calibration only needs to know which queries fall back)
                    h, b1 = rows[heavy], min(num_bank, b0 + bank_chunk)
                    dist, idx = nearest(q[h], self.bank_[b0:b1], 1, bank_sq_norms=self.bank_sq_norms_[b0:b1],
                                        chunk_elements=self.chunk_elements)
                    best[h] = xp.minimum(best[h], _key(dist[:, 0], idx[:, 0] + b0))
            inner = xp.nonzero(xp.reshape(passed, (-1,)))[0]
            inner_hit = inner // GROUP
            cand_query = xp.take(hit_query, inner_hit, axis=0)
            cand_row = xp.take(hit_group, inner_hit, axis=0) * GROUP + inner % GROUP + b0
            del hit_group, hit_query, passed, inner, inner_hit
            for p0 in range(0, cand_query.shape[0], pair_chunk):
                qi, bj = cand_query[p0:p0 + pair_chunk], cand_row[p0:p0 + pair_chunk]
                if r2:  # finer bound over r2 dims from direct differences (no expansion error), same argument
                    fine = _row_dist(xp.take(rotated, qi, axis=0), xp.take(self.bank_refine_, bj, axis=0))
                    limit = (xp.take(_unkey(best)[0], qi, axis=0) * stretch2 + xp.take(shift2, qi, axis=0)) * slack2
                    keep = xp.nonzero(fine <= limit)[0]
                    qi, bj = xp.take(qi, keep, axis=0), xp.take(bj, keep, axis=0)
                stats["exact"] += int(qi.shape[0])
                dist = _row_dist(xp.take(q, qi, axis=0), xp.take(self.bank_, bj, axis=0))
                _scatter_min(best, qi, _key(dist, bj))
        return best, heavy_any, stats
