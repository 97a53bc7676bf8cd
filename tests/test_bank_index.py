"""Pruned exact 1-NN (BankIndex) against torch.cdist on structured, unstructured and degenerate banks."""
from __future__ import annotations

from functools import partial

import numpy as np
import pytest
import torch

from patchcore.core import bank_index
from patchcore.core.bank_index import BankIndex
from patchcore.core.knn import nearest

# These tiny banks would go to the plain search by the cost rule (PRUNE_OVERHEAD): test the bound on them.
_pruned = partial(BankIndex, min_bank_rows=0)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _low_rank(num: int, dim: int, rank: int, gen: torch.Generator, noise: float = 0.01) -> torch.Tensor:
    """Rows of a rank-`rank` model plus small isotropic noise: the spectrum PatchCore banks have."""
    factors = torch.randn(num, rank, generator=gen) * torch.linspace(3.0, 0.5, rank)
    return factors @ torch.randn(rank, dim, generator=gen) + noise * torch.randn(num, dim, generator=gen)


def _assert_exact_nearest(queries, bank, dist, idx):
    ref = torch.cdist(queries.double(), bank.double(), compute_mode="donot_use_mm_for_euclid_dist")
    assert dist.shape == idx.shape == (queries.shape[0],)
    assert dist.dtype == torch.float32 and idx.dtype == torch.long
    best = ref.min(1).values
    chosen = ref.gather(1, idx[:, None])[:, 0]
    assert bool((chosen - best <= 1e-5 * best + 1e-6).all())  # a nearest row, up to float near-ties
    if bank.shape[0] > 1:  # where the runner-up is clearly farther, exactly cdist's answer
        top2 = ref.topk(2, dim=1, largest=False).values
        clear = top2[:, 1] - top2[:, 0] > 1e-5 * top2[:, 0] + 1e-6
        assert torch.equal(idx[clear], ref.argmin(1)[clear])
    direct = (queries.double() - bank.double()[idx]).norm(dim=1)
    torch.testing.assert_close(dist.double(), direct, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("prefix_dims", [8, 16])  # 8: with the finer second bound (4 * 8 <= 64 / 2); 16: without
def test_structured_bank_near_and_far_queries(prefix_dims):
    gen = _gen(0)
    bank = _low_rank(2000, 64, 8, gen)
    near = bank[torch.randint(0, 2000, (300,), generator=gen)] + 0.05 * torch.randn(300, 64, generator=gen)
    far = 5.0 * _low_rank(100, 64, 8, gen) + torch.randn(100, 64, generator=gen)  # anomalous: far off the bank
    queries = torch.cat([near, far])
    index = _pruned(bank, prefix_dims=prefix_dims)
    assert index.pruning_ and index.refine_dims_ == (32 if prefix_dims == 8 else 0)
    _assert_exact_nearest(queries, bank, *index.search(queries))


def test_queries_that_all_fall_back_to_the_plain_search():
    gen = _gen(1)
    bank = _low_rank(1500, 48, 6, gen)
    queries = 3.0 * torch.randn(600, 48, generator=gen)  # isotropic: the prefix bound prunes nothing
    index = _pruned(bank, prefix_dims=8, chunk_elements=4 * 1504 * 64)  # 64 queries a block: switches to plain
    assert index.pruning_
    _, fell_back = index._search_rows(queries[:64])
    assert bool(fell_back.all())  # the per-query fallback path is the one under test
    _assert_exact_nearest(queries, bank, *index.search(queries))


def test_gaussian_bank_is_calibrated_to_the_plain_search():
    gen = _gen(2)
    bank = torch.randn(1000, 40, generator=gen)
    queries = torch.randn(200, 40, generator=gen)
    index = _pruned(bank, prefix_dims=8)
    assert not index.pruning_
    _assert_exact_nearest(queries, bank, *index.search(queries))


@pytest.mark.parametrize("chunk_elements", [64, 1000, 5000])  # tiny: many query, bank and pair chunks
def test_tiny_chunks_give_the_same_answer(chunk_elements):
    gen = _gen(3)
    bank = _low_rank(300, 24, 4, gen)
    queries = torch.cat([bank[:40] + 0.02 * torch.randn(40, 24, generator=gen), 4 * torch.randn(10, 24, generator=gen)])
    index = _pruned(bank, prefix_dims=4, chunk_elements=chunk_elements)
    dist, idx = index.search(queries)
    _assert_exact_nearest(queries, bank, dist, idx)
    ref_dist, ref_idx = _pruned(bank, prefix_dims=4).search(queries)
    assert torch.equal(idx, ref_idx) and torch.equal(dist, ref_dist)


def test_prefix_not_shorter_than_the_features_uses_the_plain_search():
    gen = _gen(4)
    bank, queries = torch.randn(200, 16, generator=gen), torch.randn(50, 16, generator=gen)
    index = _pruned(bank, prefix_dims=16)
    assert not index.pruning_
    _assert_exact_nearest(queries, bank, *index.search(queries))


def test_duplicate_bank_rows():
    gen = _gen(5)
    rows = _low_rank(150, 32, 4, gen)
    bank = torch.cat([rows, rows, rows[:50]])  # exact ties between bank rows
    queries = torch.cat([rows[:30], rows[:30] + 0.01 * torch.randn(30, 32, generator=gen)])
    index = _pruned(bank, prefix_dims=4)
    dist, idx = index.search(queries)
    _assert_exact_nearest(queries, bank, dist, idx)
    assert bool((dist[:30] == 0).all())  # a query equal to a bank row is at distance 0


def test_single_row_bank():
    gen = _gen(6)
    bank, queries = torch.randn(1, 20, generator=gen), torch.randn(7, 20, generator=gen)
    dist, idx = _pruned(bank, prefix_dims=4).search(queries)
    assert torch.equal(idx, torch.zeros(7, dtype=torch.long))
    torch.testing.assert_close(dist, (queries - bank).norm(dim=1), rtol=1e-6, atol=1e-7)


def test_no_cancellation_error_far_from_the_origin():
    # Centring removes the offset; the reported distances are direct norms whatever the offset.
    gen = _gen(7)
    bank = 1000.0 + 0.01 * _low_rank(400, 24, 4, gen)
    queries = 1000.0 + 0.01 * (bank[:60] - 1000.0 + 0.05 * torch.randn(60, 24, generator=gen))
    dist, idx = _pruned(bank, prefix_dims=4).search(queries)
    _assert_exact_nearest(queries, bank, dist, idx)
    assert bool((dist > 0).all())


def test_margins_cover_gemm_rounding_for_tight_clusters_far_from_the_mean():
    # Rows ~200 from the bank mean, neighbours ~0.02 apart: the bound GEMM's rounding (~1e-7 * 200^2 per
    # term) dwarfs the squared distances, so without its margins the test drops true neighbours (26 of
    # 300 answers wrong when the margins are zeroed). The margins keep each cluster as candidates.
    gen = _gen(11)
    centres = 30.0 * torch.randn(40, 3, generator=gen) @ torch.randn(3, 24, generator=gen)
    bank = (centres[:, None, :] + 0.01 * torch.randn(40, 100, 24, generator=gen)).reshape(4000, 24)
    queries = centres[torch.randint(0, 40, (300,), generator=gen)] + 0.01 * torch.randn(300, 24, generator=gen)
    index = _pruned(bank, prefix_dims=4)
    _, fell_back = index._search_rows(queries)
    assert index.pruning_ and not bool(fell_back.any())  # the pruned path alone answers
    _assert_exact_nearest(queries, bank, *index.search(queries))


def test_deterministic_for_the_same_bank_and_empty_queries():
    gen = _gen(8)
    bank = _low_rank(500, 32, 5, gen)
    queries = bank[:50] + 0.1 * torch.randn(50, 32, generator=gen)
    a, b = _pruned(bank, prefix_dims=6), _pruned(bank.clone(), prefix_dims=6)
    assert torch.equal(a.basis_, b.basis_)
    assert all(torch.equal(x, y) for x, y in zip(a.search(queries), b.search(queries)))
    dist, idx = a.search(queries[:0])
    assert dist.shape == idx.shape == (0,)


def test_invalid_shapes_raise():
    index = _pruned(torch.randn(10, 8), prefix_dims=2)
    with pytest.raises(ValueError, match="queries must be"):
        index.search(torch.randn(3, 7))
    with pytest.raises(ValueError, match="bank must be"):
        _pruned(torch.randn(0, 8))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    gen = _gen(9)
    bank = _low_rank(3000, 64, 8, gen)
    near = bank[:500] + 0.05 * torch.randn(500, 64, generator=gen)
    queries = torch.cat([near, 3 * torch.randn(50, 64, generator=gen)])
    dist, idx = _pruned(bank.cuda(), prefix_dims=8).search(queries.cuda())
    assert dist.is_cuda and idx.is_cuda
    _assert_exact_nearest(queries, bank, dist.cpu(), idx.cpu())


def test_bank_of_outliers_queried_by_the_bulk_is_probed_and_pruned():
    # A coreset of "compact bulk + scattered outliers" data is mostly outliers plus a few bulk rows. The bank
    # rows (outliers) are isotropic to each other, so the calibration turns the bound off; bulk queries,
    # though, have one clear nearest row and the bound prunes nearly all the bank for them.
    gen = _gen(12)
    outliers = torch.randn(400, 32, generator=gen)
    bulk_rows = 0.2 * torch.randn(8, 32, generator=gen)
    bank = torch.cat([outliers, bulk_rows])[torch.randperm(408, generator=gen)]
    queries = 0.2 * torch.randn(500, 32, generator=gen)
    index = _pruned(bank, prefix_dims=8)
    assert not index.pruning_  # calibrated on bank rows
    dist, idx = index.search(queries)
    _assert_exact_nearest(queries, bank, dist, idx)
    stats = index.stats_
    assert stats["queries"] == 500 and stats["pairs"] == 500 * 408
    assert stats["plain"] + stats["candidates"] < 0.2 * stats["pairs"], stats  # the probe switched pruning on
    # Queries like the bank rows: the probe finds them heavy and the rest goes to the plain search.
    index.reset_stats()
    far = torch.randn(300, 32, generator=gen)
    _assert_exact_nearest(far, bank, *index.search(far))
    assert index.stats_["plain"] > 0.5 * index.stats_["pairs"]


def test_stats_count_the_pruned_share_on_a_structured_bank():
    gen = _gen(13)
    bank = _low_rank(2000, 64, 8, gen)
    queries = bank[:200] + 0.05 * torch.randn(200, 64, generator=gen)
    index = _pruned(bank, prefix_dims=8)
    _assert_exact_nearest(queries, bank, *index.search(queries))
    stats = index.stats_
    assert stats["pairs"] == 200 * 2000 and stats["plain"] == 0
    assert 0 < stats["exact"] <= stats["candidates"] < 0.2 * stats["pairs"]


def test_gemm_rounding_margin_takes_the_coarsest_mode():
    """TF32 on together with "medium" precision (bf16 allowed) must not claim TF32's finer rounding."""
    from patchcore.core.bank_index import _gemm_input_roundoff, _roundoff

    assert _roundoff("medium", tf32=True) == 2.0 ** -8
    assert _roundoff("highest", tf32=True) == _roundoff("high", tf32=False) == 2.0 ** -11
    assert _roundoff("highest", tf32=False) == 2.0 ** -24
    assert _gemm_input_roundoff(torch.device("cpu")) == _roundoff(torch.get_float32_matmul_precision(), False)


@pytest.mark.parametrize("prefix_dims, chunk_elements", [(8, None), (16, None), (8, 4 * 1504 * 64)])
def test_numpy_bank_index_gives_the_torch_answers(prefix_dims, chunk_elements):
    """One implementation for the library (torch) and the torch-free runtime (numpy): the same rows, the same
    distances, the same pruning decisions, on near, far and isotropic queries (the plain-search fallback)."""
    gen = _gen(7)
    bank = _low_rank(2000, 64, 8, gen)
    near = bank[torch.randint(0, 2000, (300,), generator=gen)] + 0.05 * torch.randn(300, 64, generator=gen)
    far = 5.0 * _low_rank(100, 64, 8, gen) + torch.randn(100, 64, generator=gen)
    isotropic = 3.0 * torch.randn(200, 64, generator=gen)
    queries = torch.cat([near, far, isotropic])
    kwargs = {} if chunk_elements is None else {"chunk_elements": chunk_elements}
    on_torch = _pruned(bank, prefix_dims=prefix_dims, **kwargs)
    on_numpy = _pruned(bank.numpy(), prefix_dims=prefix_dims, **kwargs)
    assert on_torch.pruning_ == on_numpy.pruning_
    dist, idx = on_numpy.search(queries.numpy())
    assert dist.dtype.name == "float32" and idx.dtype.name == "int64"
    _assert_exact_nearest(queries, bank, torch.from_numpy(dist), torch.from_numpy(idx))
    ref_dist, ref_idx = on_torch.search(queries)
    assert (idx == ref_idx.numpy()).mean() > 0.999
    torch.testing.assert_close(torch.from_numpy(dist), ref_dist, rtol=1e-5, atol=1e-6)
    assert on_numpy.stats_["candidates"] + on_numpy.stats_["plain"] < on_numpy.stats_["pairs"]  # it pruned


@pytest.mark.parametrize("library", ["torch", "numpy"])
@pytest.mark.parametrize("num_bank, dim, num_queries, chunk_elements",
                         [(333, 37, 101, None), (33, 19, 7, None), (1001, 29, 257, 4096), (65, 45, 1, 700)])
def test_odd_sizes_on_both_libraries(library, num_bank, dim, num_queries, chunk_elements):
    """Banks that are not whole groups of rows, odd feature and query counts, several bank and query blocks
    (small chunks): the (bank rows x queries) bound layout and its padding give the plain search's answers."""
    gen = _gen(num_bank + dim)
    bank = _low_rank(num_bank, dim, 3, gen)
    queries = torch.cat([bank[torch.randint(0, num_bank, (num_queries,), generator=gen)]
                         + 0.03 * torch.randn(num_queries, dim, generator=gen), 4 * torch.randn(3, dim, generator=gen)])
    kwargs = {} if chunk_elements is None else {"chunk_elements": chunk_elements}
    as_library = (lambda t: t.numpy()) if library == "numpy" else (lambda t: t)
    index = _pruned(as_library(bank), prefix_dims=4, **kwargs)
    assert index.pruning_ or num_bank < 64
    dist, idx = index.search(as_library(queries))
    _assert_exact_nearest(queries, bank, torch.as_tensor(dist), torch.as_tensor(idx))


@pytest.mark.parametrize("workers", [2, 3])
def test_workers_give_the_single_thread_answers(workers, monkeypatch):
    """Query blocks searched in parallel threads (the runtime's numpy search): the same rows, distances and
    work counts as one thread, on near queries, and on isotropic ones (the switch to the plain search)."""
    monkeypatch.setattr(bank_index, "MIN_WORKER_PAIRS", 1)  # split these few queries too
    gen = _gen(14)
    bank = _low_rank(1500, 48, 6, gen)
    near = bank[torch.randint(0, 1500, (301,), generator=gen)] + 0.05 * torch.randn(301, 48, generator=gen)
    isotropic = 3.0 * torch.randn(400, 48, generator=gen)
    for queries in (near, torch.cat([near, isotropic])):
        one = _pruned(bank.numpy(), prefix_dims=8, chunk_elements=4 * 1504 * 64)
        many = _pruned(bank.numpy(), prefix_dims=8, chunk_elements=4 * 1504 * 64, workers=workers)
        dist, idx = many.search(queries.numpy())
        ref_dist, ref_idx = one.search(queries.numpy())
        assert (idx == ref_idx).all() and (dist == ref_dist).all()
        _assert_exact_nearest(queries, bank, torch.from_numpy(dist), torch.from_numpy(idx))
        if queries is near:
            assert many.stats_ == one.stats_
    with pytest.raises(ValueError, match="workers"):
        _pruned(bank.numpy(), workers=0)


@pytest.mark.parametrize("library", ["torch", "numpy"])
@pytest.mark.parametrize("num_bank, dim, prefix_dims, num_queries",
                         [(333, 37, 4, 101), (523, 152, 64, 257), (5, 19, 4, 1), (200, 152, 64, 7)])
def test_small_banks_get_the_plain_search_and_its_answers(library, num_bank, dim, prefix_dims, num_queries,
                                                          monkeypatch):
    """Below PRUNE_OVERHEAD D / (D - r - 1) rows the bound does not pay: no bound is built, and the search,
    split over 1 to 3 workers (odd query counts, blocks of unequal size), gives knn.nearest's rows and
    distances exactly. From the rule's minimum (for D 152, r 64: 525 rows) the bound is built."""
    gen = _gen(num_bank + dim)
    bank = _low_rank(num_bank, dim, 3, gen)
    queries = torch.cat([bank[torch.randint(0, num_bank, (num_queries,), generator=gen)]
                         + 0.03 * torch.randn(num_queries, dim, generator=gen), 4 * torch.randn(3, dim, generator=gen)])
    as_library = (lambda t: t.numpy()) if library == "numpy" else (lambda t: t)
    ref_dist, ref_idx = nearest(as_library(queries), as_library(bank), 1)
    calls = []
    monkeypatch.setattr(bank_index, "nearest", lambda q, *a, **k: calls.append(q.shape[0]) or nearest(q, *a, **k))
    monkeypatch.setattr(bank_index, "MIN_WORKER_PAIRS", 1)
    for workers in (1, 2, 3):
        calls.clear()
        index = BankIndex(as_library(bank), prefix_dims=prefix_dims, workers=workers)
        assert not index.pruning_ and not index.bounds_ and not hasattr(index, "basis_")
        dist, idx = index.search(as_library(queries))
        assert sorted(calls, reverse=True) == calls and sum(calls) == queries.shape[0]
        step = -(-queries.shape[0] // workers)
        assert len(calls) == -(-queries.shape[0] // step)  # blocks of ceil(Q / workers)
        assert (np.asarray(idx) == np.asarray(ref_idx[:, 0])).all()
        assert (np.asarray(dist) == np.asarray(ref_dist[:, 0])).all()
        assert index.stats_["plain"] == index.stats_["pairs"] == queries.shape[0] * num_bank
        _assert_exact_nearest(queries, bank, torch.as_tensor(dist), torch.as_tensor(idx))
    if dim == 152:
        assert not BankIndex(as_library(_low_rank(524, dim, 3, gen)), prefix_dims=prefix_dims).bounds_
        assert BankIndex(as_library(_low_rank(525, dim, 3, gen)), prefix_dims=prefix_dims).bounds_


def test_workers_split_only_where_each_gets_enough_pairs():
    bank = np.zeros((1000, 8), dtype=np.float32)
    index = BankIndex(bank, prefix_dims=2, workers=4)
    per_worker = -(-bank_index.MIN_WORKER_PAIRS // 1000)  # queries that make one worker's share
    assert [index._workers_for(n) for n in (0, 1, per_worker - 1, 2 * per_worker, 10 * per_worker)] == [1, 1, 1, 2, 4]
