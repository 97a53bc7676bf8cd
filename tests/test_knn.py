"""Exact chunked k-NN against torch.cdist + topk."""
from __future__ import annotations

import pytest
import torch

from patchcore.core.knn import nearest, squared_norms


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _oracle(queries, bank, k):
    dist = torch.cdist(queries.double(), bank.double(), compute_mode="donot_use_mm_for_euclid_dist")
    return dist.topk(k, dim=1, largest=False)


@pytest.mark.parametrize("k", [1, 5])
@pytest.mark.parametrize("chunk_elements", [7, 64, 1000, None])  # tiny chunks: many query and bank chunks
@pytest.mark.parametrize("shape", [(50, 300, 8), (3, 97, 5), (130, 40, 16)])
def test_nearest_matches_cdist_topk(k, chunk_elements, shape):
    num_q, num_b, d = shape
    gen = _gen(num_q + num_b + d + k)
    queries = torch.randn(num_q, d, generator=gen)
    bank = torch.randn(num_b, d, generator=gen)
    kwargs = {} if chunk_elements is None else {"chunk_elements": chunk_elements}
    dist, idx = nearest(queries, bank, k, **kwargs)
    ref_dist, ref_idx = _oracle(queries, bank, k)
    assert dist.shape == idx.shape == (num_q, k)
    assert idx.dtype == torch.long and dist.dtype == torch.float32
    assert torch.equal(idx, ref_idx)
    torch.testing.assert_close(dist.double(), ref_dist, rtol=1e-5, atol=1e-5)
    assert bool((dist[:, 1:] >= dist[:, :-1]).all())  # ascending


def test_reported_distances_are_direct_norms():
    queries = torch.randn(40, 12, generator=_gen(1))
    bank = torch.randn(200, 12, generator=_gen(2))
    dist, idx = nearest(queries, bank, 4, chunk_elements=100)
    direct = (queries[:, None, :] - bank[idx]).norm(dim=-1)
    torch.testing.assert_close(dist, direct, rtol=1e-6, atol=1e-7)


def test_no_cancellation_error_far_from_the_origin():
    # ||q||^2 - 2 q.b + ||b||^2 loses everything at |x| ~ 1e3 with float32; the reported distances must not.
    gen = _gen(3)
    offset = torch.full((1, 6), 1000.0)
    bank = offset + torch.randn(50, 6, generator=gen) * 1e-2
    queries = offset + torch.randn(10, 6, generator=gen) * 1e-2
    dist, idx = nearest(queries, bank, 1)
    direct = (queries.double() - bank.double()[idx[:, 0]]).norm(dim=-1)
    torch.testing.assert_close(dist[:, 0].double(), direct, rtol=1e-3, atol=1e-5)
    assert bool((dist > 0).all())


def test_self_query_distance_is_zero_and_first():
    bank = torch.randn(64, 10, generator=_gen(4))
    dist, idx = nearest(bank, bank, 3, chunk_elements=50)
    assert torch.equal(idx[:, 0], torch.arange(64))
    assert bool((dist[:, 0] == 0).all())


def test_precomputed_bank_norms_give_the_same_answer():
    queries = torch.randn(20, 8, generator=_gen(5))
    bank = torch.randn(90, 8, generator=_gen(6))
    a = nearest(queries, bank, 3, chunk_elements=40)
    b = nearest(queries, bank, 3, bank_sq_norms=squared_norms(bank), chunk_elements=40)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    torch.testing.assert_close(squared_norms(bank), (bank * bank).sum(1))


def test_k_equal_to_bank_size_returns_every_element():
    queries = torch.randn(5, 3, generator=_gen(7))
    bank = torch.randn(9, 3, generator=_gen(8))
    dist, idx = nearest(queries, bank, 9, chunk_elements=10)
    assert all(sorted(row) == list(range(9)) for row in idx.tolist())
    ref_dist, ref_idx = _oracle(queries, bank, 9)
    assert torch.equal(idx, ref_idx)


@pytest.mark.parametrize("k", [0, -1, 11])
def test_invalid_k_raises(k):
    with pytest.raises(ValueError, match="k must be"):
        nearest(torch.zeros(2, 3), torch.zeros(10, 3), k)
