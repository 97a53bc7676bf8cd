"""Coreset subsampling of the memory bank (PATCHCORE.md section 2, paper section 3.2, Algorithm 1).

Greedy k-center (minimax facility location): repeatedly add the element farthest from everything
selected so far. We run it on a seeded Johnson-Lindenstrauss projection to d* dimensions.

`greedy_coreset` is the exact greedy selection, lazily evaluated. Nearest-centre distances only fall as
centres are added, so a stale distance is an upper bound of the current one. Only a hot set (the elements
with the largest stale values, above a threshold tau) is kept exact step by step; every other element is
known to be below tau, so it cannot be the farthest while the hot set's maximum is >= tau. When that
maximum falls below tau, the hot set is rebuilt from the largest values, and the stale elements joining it
are brought up to date against all the centres they missed at once (one GEMM lower bound per block, direct
distances only for the pairs it cannot exclude). Inside the hot set a triangle-inequality test skips the
elements the new centre cannot reach, where that pays. Data with a compact bulk and scattered outliers
(where the test alone prunes nothing) costs the outliers' work, not N per step.

Where the hot set is large and that test prunes well (real features: values bunched, the hot set holds most
of N), the numpy backend groups the hot set by nearest centre: a group is skipped whole when the new centre
cannot reach its farthest member, centre gaps and member distances are first bounded in 32 principal
directions, and the argmax runs over the group maxima; each step then costs O(k) plus the reached groups.
A reached group's members are read from slots laid out contiguously by group (position, bound, q-d copy and
threshold of each member), not gathered from scattered rows.

On texture-like data (a compact bulk of near-duplicates, scattered outliers) the triangle test leaves ~100x
more candidates than elements that move: large hot sets keep copies of their rows in the 32 principal
directions, whose distance bounds the full one from below, so direct distances follow the moves; the refresh
takes its GEMM lower bound in those directions too.

Every distance that decides anything is the direct float32 ||x - c||^2, computed the same way as in the
plain algorithm, and every pruning test has a rounding margin; so the selection, ties included (first
index), is the one `greedy_coreset_reference` (the plain O(N^2) algorithm, kept as the oracle) makes.
"""
from __future__ import annotations

import time

import numpy as np
import torch

# Conservative slack on the triangle test, so that float rounding can never skip an element whose
# distance the plain algorithm would have lowered (relative error of a 128-d squared distance ~1e-5).
_PRUNE_SLACK = 1.001
_UNIT_ROUNDOFF = 2.0 ** -24  # float32
_SAFETY = 4.0  # multiplies the rounding bound of the refresh
DEFAULT_HOT_SIZE = 4096
_BLOCK = 1 << 16  # rows of direct distances at once: temporaries stay O(block * d)
_BOUND_ELEMENTS = 1 << 22  # entries of one GEMM lower-bound block (16 MiB)
_REFRESH_ROWS = 1024
_LOW_DIM = 32  # dimensions of the first gap bound of the grouped update
_BASIS_ROWS = 8192  # rows sampled for its principal directions
_HOT_COPY_BYTES = 256 << 20  # a copy of the hot rows up to this size (or a quarter of N)
_MAX_GROWN_HOT = 1 << 18  # the rebuild rule doubles the hot set up to this size (see _rebuild) ...
_GROWN_HOT_PER_CENTRE = 16  # ... or 16 per centre to select, if less (at least 2^17): a run of few steps does
# not repay a large hot set's refreshes (synthetic texture 1%, 4,155 steps: 16.3 -> 12.3 s at 2^17; at 2^16
# 9.2 s, but bottle 1% 8% slower; runs of 10% unchanged)
_GROUP_SHARE = 0.05  # group the hot set once the per-element test leaves fewer candidates than this share
_GROUP_MIN_HOT = 1 << 16  # ... and it is this large (below, the per-step Python cost of groups does not pay)
_LOW_MIN_HOT = 1 << 14  # hot sets from this size on keep low-dimensional copies for a per-element distance bound
_LOW_MIN_STEPS = 1024  # ... where this many steps are left to repay the copies (mixture-50k x 500: they did not)
_DENSE_PAIRS = 8  # a refresh block whose q-dimensional bound leaves more pairs per row takes the d-dimensional one
_MATVEC_ROWS = 4096  # rows per numpy matrix-vector product (see _matvec)
_SLOT_SPARE = 1 << 12  # group slots beyond the hot set (at least; or this share of it, if more) before
_SLOT_SPARE_SHARE = 0.5  # ... the stale slots are dropped


def coreset_count(n_total: int, ratio: float, size: int | None = None) -> int:
    """Coreset size from a ratio or an explicit count, clipped to [1, n_total]."""
    wanted = size if size is not None else int(round(ratio * n_total))
    return max(1, min(n_total, wanted))


def random_projection(in_dim: int, out_dim: int, generator: torch.Generator) -> torch.Tensor:
    """(in_dim, out_dim) Gaussian JL map, entries N(0, 1/out_dim): distances kept in expectation."""
    return torch.randn(in_dim, out_dim, generator=generator) / out_dim**0.5


def greedy_coreset(features: torch.Tensor, n: int, *, generator: torch.Generator, backend: str = "auto",
                   hot_size: int = DEFAULT_HOT_SIZE, stats: dict | None = None) -> torch.Tensor:
    """(N, d) features -> (n,) indices in selection order; exact greedy k-center.

    Memory O(N): one distance, one centre index and one counter per element; never an N x N matrix.
    backend: "numpy" runs the O(N) scans (argmax, order statistic, masks) in numpy (CPU tensors only),
    "torch" runs everything in torch (any device), "auto" picks numpy on the CPU. The results are identical.
    hot_size: how many elements the hot set starts from (a speed knob only; the selection never depends on it).
    stats: if a dict is given, it receives counters of the work done (see `_Greedy.stats`).
    """
    total, dim = features.shape
    if not 1 <= n <= total:
        raise ValueError(f"coreset size must be in [1, {total}], got {n}")
    if backend not in ("auto", "numpy", "torch"):
        raise ValueError(f"backend must be 'auto', 'numpy' or 'torch', got {backend!r}")
    features = features.float().contiguous()
    if backend == "numpy" and features.device.type != "cpu":
        raise ValueError("backend='numpy' needs CPU features")
    use_numpy = backend == "numpy" or (backend == "auto" and features.device.type == "cpu")
    first = int(torch.randint(total, (1,), generator=generator).item())
    run = _Greedy(features, n, max(1, int(hot_size)), use_numpy)
    selected = run.select(first)
    if stats is not None:
        stats.update(run.stats)
    return selected


class _Greedy:
    """State of one greedy run. Invariants between steps (m centres chosen so far):

    - every element x has value[x] >= its true nearest-centre squared distance, exact (the minimum of the
      direct distances) over the centres [0, applied[x]); owner[x] is a centre at that distance;
    - hot elements (`hot`, ascending) are exact over all m centres (hot_value / hot_owner);
    - every other element has value < tau. So once max(hot_value) >= tau the argmax lies in the hot set,
      and the first hot index of the maximum is the first index overall.
    """

    def __init__(self, features: torch.Tensor, n: int, hot_size: int, use_numpy: bool):
        self.x = features
        self.total, self.dim = features.shape
        self.device = features.device
        self.use_numpy = use_numpy
        self.hot_size = min(hot_size, self.total)
        self.max_grown_hot = min(_MAX_GROWN_HOT, max(1 << 17, _GROWN_HOT_PER_CENTRE * n))
        self.selected = torch.empty(n, dtype=torch.long)
        self.centres = torch.empty(n, self.dim, device=self.device)
        # Centred copies for the GEMM lower bound of the refresh (any centre point is valid for the bound;
        # the mean keeps the norms, and with them the rounding margin, small).
        self.mean = _column_mean(features)
        self.centred_centres = torch.empty(n, self.dim, device=self.device)
        self.centred_sq = torch.empty(n, device=self.device)
        self.margin = _refresh_margin(self.dim, self.device)
        self.basis = None  # principal directions of the low-dimensional bounds, made when first needed
        self.hot_low = None  # (hot, q) float32 low-dimensional copies of the hot rows, or None
        self.low_share, self.low_probe = 0.0, 0  # share of the elements the per-element q-d bound kept, last step
        self.refresh_dense, self.refresh_probe = False, 0  # whether the refresh's q-d bound left many pairs
        self.value = torch.empty(self.total, device=self.device)
        self.owner = torch.zeros(self.total, dtype=torch.long, device=self.device)
        self.applied = torch.ones(self.total, dtype=torch.long, device=self.device)
        self.m = 0
        self.grouped, self.group_wait, self.drop_streak = False, 0, -1
        if use_numpy:  # numpy views of the same memory, for the per-step bookkeeping
            self.views = dict(x=features.numpy(), selected=self.selected.numpy(), centres=self.centres.numpy(),
                              mean=self.mean.numpy(), centred_centres=self.centred_centres.numpy(),
                              centred_sq=self.centred_sq.numpy())
        self.share = 0.0  # candidate share of the last triangle test on the hot set
        self.last_probe = -(1 << 30)
        self.last_rebuild = 0
        # distances: direct ||x - c||^2 evaluations; bound_pairs / low_pairs: entries of the refresh's GEMM
        # lower-bound matrices in all d dimensions / in the q principal directions (once they exist);
        # centre_gaps: centre-to-centre distances of the triangle test; rebuilds: hot set rebuilds;
        # refreshed: elements brought up to date on joining the hot set; hot_total: sum of hot sizes per step.
        # Grouped update (numpy backend): low_gaps: centre gaps bounded in the principal directions;
        # group_candidates: groups the new centre may reach; members: elements of those groups; slots: group slots
        # read (the prefixes that may pass the per-element triangle test, stale slots included); slot_fills:
        # layouts of the slots (a group build, or dropping the stale slots when they run out).
        # Per step, in the hot set: low_bounds: elements past the triangle test whose q-dimensional distance was
        # bounded; candidates: elements whose direct distance was computed; moved: elements whose distance fell
        # (the floor: any exact algorithm must lower those).
        self.stats = dict(distances=0, bound_pairs=0, centre_gaps=0, rebuilds=0, refreshed=0, hot_total=0,
                          steps=0, low_gaps=0, group_candidates=0, members=0, group_builds=0, group_drops=0,
                          candidates=0, low_bounds=0, moved=0, low_pairs=0, slots=0,
                          slot_fills=0)

    # --- the greedy loop -------------------------------------------------------------------------------
    def select(self, first: int) -> torch.Tensor:
        self._add_centre(first)
        centre = self.centres[0]
        for i in range(0, self.total, _BLOCK):  # every element against the first centre
            self.value[i:i + _BLOCK] = (self.x[i:i + _BLOCK] - centre).pow_(2).sum(1)
        self.stats["distances"] += self.total
        pos, vmax = self._rebuild()
        for _ in range(1, self.selected.shape[0]):
            if vmax < self.tau:  # the hot set may no longer hold the maximum
                pos, vmax = self._rebuild()
            self._add_centre(int(self.hot_np[pos]) if self.use_numpy else int(self.hot[pos]))
            if self.grouped and self._update_groups():
                pos, vmax = self._group_argmax()
                continue
            probed = self._update_hot()
            if (probed and self.use_numpy and self.share < _GROUP_SHARE and self.m >= self.group_wait
                    and self.hot.shape[0] >= _GROUP_MIN_HOT):
                self._build_groups()  # the per-element test prunes well: groups will too, at k instead of N
                pos, vmax = self._group_argmax()
            else:
                pos, vmax = self._hot_argmax()
        return self.selected

    def _add_centre(self, index: int) -> None:
        if self.use_numpy:
            return self._add_centre_numpy(index)
        k = self.m
        centre = self.x[index]
        self.selected[k] = index
        self.centres[k] = centre
        centred64 = centre.double() - self.mean
        centred = centred64.float()
        self.centred_centres[k] = centred
        self.centred_sq[k] = centred.pow(2).sum()
        if self.basis is not None:
            low = (centred64 @ self.basis).float()
            self.low_centres[k] = low
            self.low_sq[k] = low.pow(2).sum()
        self.m = k + 1

    def _add_centre_numpy(self, index: int) -> None:
        """_add_centre through numpy views (the same arithmetic: float64 centring, float32 rounding; the norms
        only feed bounds with margins): ~10 us a step instead of ~50 us of small torch calls."""
        k, views = self.m, self.views
        centre = views["x"][index]
        views["selected"][k] = index
        views["centres"][k] = centre
        centred64 = centre.astype(np.float64) - views["mean"]
        centred = centred64.astype(np.float32)
        views["centred_centres"][k] = centred
        views["centred_sq"][k] = np.dot(centred, centred)
        if self.basis is not None:
            low = (centred64 @ views["basis"]).astype(np.float32)
            views["low_centres"][k] = low
            views["low_sq"][k] = np.dot(low, low)
        self.m = k + 1

    def _hot_argmax(self) -> tuple[int, float]:
        if self.use_numpy:
            values = self.hot_value.numpy()
            pos = int(values.argmax())  # first index on ties, as the plain algorithm
            return pos, float(values[pos])
        pos = int(torch.argmax(self.hot_value))
        return pos, float(self.hot_value[pos])

    # --- the hot set -----------------------------------------------------------------------------------
    def _update_hot(self) -> bool:
        """Apply the newest centre to the hot set (exact), pruned by the triangle inequality where it pays, then
        (large hot sets) by the distance in the principal directions; direct distances only for the rest.

        Returns whether the triangle test ran (and measured `share`)."""
        k = self.m - 1
        centre = self.centres[k]
        size = self.hot.shape[0]
        self.stats["hot_total"] += size
        self.stats["steps"] += 1
        # The test costs k centre gaps plus its candidates; use it while that is below the whole hot set,
        # and probe it every 64 steps otherwise (its pruning share changes as the coreset grows).
        probed = k < size and (self.share * size + k < 0.8 * size or k - self.last_probe >= 64)
        if probed:
            # ||x - c|| >= ||c - a(x)|| - ||x - a(x)||: x can only move to c if ||c - a(x)||^2 < 4 ||x - a(x)||^2.
            # ||c - c_j||^2 for the earlier centres by one GEMV on the centred copies, less the refresh margin,
            # which bounds its rounding (and the centring's): a lower bound of the exact gap, so the test stays
            # conservative (a direct difference costs three passes over the centres instead of one).
            norm_sum = self.centred_sq[:k] + self.centred_sq[k]
            gaps = torch.addmv(norm_sum, self.centred_centres[:k], self.centred_centres[k], alpha=-2.0)
            gaps.sub_(norm_sum, alpha=self.margin)
            self.stats["centre_gaps"] += k
            rows = _below(gaps, self.hot_owner, self.hot_bound, self.use_numpy)
            self.share, self.last_probe = rows.numel() / size, k
            if rows.numel() == 0:
                return True
            rows = rows.to(self.device)
        else:
            rows = None
        if self.hot_low is not None and (self.low_share < 0.5 or k - self.low_probe >= 64):
            # Texture-like data (a compact bulk, scattered outliers): the triangle test leaves ~100x more
            # candidates than elements that move; the 32-d bound leaves ~1.4x (see _low_threshold). Where it
            # keeps most of them (distances spread over many directions) it pauses for 64 steps.
            tested = size if rows is None else rows.numel()
            rows = self._low_candidates(rows, k)
            self.low_share, self.low_probe = rows.numel() / max(1, tested), k
            if rows.numel() == 0:
                return probed
        self.stats["candidates"] += size if rows is None else rows.numel()
        dist = self._hot_distances(rows, centre)
        if rows is None:
            moved = torch.nonzero(dist < self.hot_value).squeeze(1)
            moved_sq = dist[moved]
        else:
            closer = dist < self.hot_value[rows]
            moved, moved_sq = rows[closer], dist[closer]
        self.stats["distances"] += dist.numel()
        self.stats["moved"] += moved.numel()
        self.hot_value[moved] = moved_sq
        self.hot_bound[moved] = moved_sq * (4.0 * _PRUNE_SLACK)
        self.hot_owner[moved] = k
        if self.hot_low is not None:
            self.low_thr[moved] = self._low_threshold(moved_sq)
        return probed

    def _low_candidates(self, rows: torch.Tensor | None, k: int) -> torch.Tensor:
        """Hot positions `rows` (None: all) whose low-dimensional distance to centre k does not rule out a move."""
        self.stats["low_bounds"] += self.hot.shape[0] if rows is None else rows.numel()
        if self.use_numpy:
            low, thr, centre = self.hot_low.numpy(), self.low_thr.numpy(), self.views["low_centres"][k]
            if rows is None:
                diff = low - centre
                return torch.from_numpy(np.flatnonzero(np.einsum("ij,ij->i", diff, diff) < thr))
            picked = rows.numpy()
            diff = low.take(picked, axis=0)
            diff -= centre
            return torch.from_numpy(picked[np.einsum("ij,ij->i", diff, diff) < thr[picked]])
        if rows is None:
            return torch.nonzero((self.hot_low - self.low_centres[k]).pow_(2).sum(1) < self.low_thr).squeeze(1)
        diff = self.hot_low.index_select(0, rows).sub_(self.low_centres[k])
        return rows[diff.pow_(2).sum(1) < self.low_thr[rows]]

    def _hot_distances(self, rows: torch.Tensor | None, centre: torch.Tensor) -> torch.Tensor:
        """Direct distances of hot positions `rows` (None: all) to `centre`."""
        if self.hot_feat is not None:
            return self._hot_feat_distances(rows, centre)
        positions = self.hot_np if rows is None else self.hot_np[rows.numpy()]
        return _gathered_distances(self.x, positions, centre)

    def _hot_feat_distances(self, rows: torch.Tensor | None, centre: torch.Tensor) -> torch.Tensor:
        if rows is None:
            return _all_distances(self.hot_feat, centre)
        if self.use_numpy:
            return _gathered_distances(self.hot_feat, rows.numpy(), centre)
        return _rows_distances(self.hot_feat, rows, centre)

    def _rebuild(self) -> tuple[int, float]:
        """_new_hot_set, timed: the hot set's size only changes speed (never the selection), so it adapts to
        measured time. Rebuilt again soon (< 16 steps), and the last rebuild took longer than the steps since:
        the next one starts twice as large. (A rule by rebuild interval alone grew the hot set to 1M of the 2.7M
        native bottle patches early on, where each step then cost 1M direct distances: 142 s for the first
        1000 centres, against 24 s with it kept at 16k, and the plain algorithm's 245 s.)"""
        started = time.perf_counter()
        soon = hasattr(self, "hot") and self.m - self.last_rebuild < 16
        if soon and self.rebuild_seconds > started - self.rebuilt_at:
            self.hot_size = min(self.total, max(self.hot_size, self.max_grown_hot), 2 * self.hot_size)
        result = self._new_hot_set()
        self.rebuilt_at = time.perf_counter()
        self.rebuild_seconds = self.rebuilt_at - started
        return result

    def _new_hot_set(self) -> tuple[int, float]:
        """New hot set: the `size` largest values (stale ones refreshed first), until its max is >= tau."""
        m = self.m
        self.stats["rebuilds"] += 1
        previous = (self.hot, self.hot_low) if self.hot_low is not None else None
        if hasattr(self, "hot"):  # write the hot set back: exact over all m centres
            self.value[self.hot] = self.hot_value
            self.owner[self.hot] = self.hot_owner
            self.applied[self.hot] = m
        self.last_rebuild = m
        if self.grouped and 2 * self.hot_size > self.total:
            # Grouped, and the hot set holds most of N: all of N. The elements left out were refreshed against
            # every centre they missed at each rebuild (synthetic texture 10%: 5.1e9 bound pairs, a third of the time);
            # with all of N hot there are no more rebuilds, and a grouped step costs the groups it reaches, not
            # the hot set. (Ungrouped, a step scans the hot set: all of N cost texture 1% 35% more.)
            self.hot_size = self.total
        size = self.hot_size
        while True:
            if size >= self.total:
                tau, hot = float("-inf"), torch.arange(self.total, device=self.device)
            else:
                tau = _kth_largest(self.value, size, self.use_numpy)
                hot = _at_least(self.value, tau, self.use_numpy).to(self.device)
            stale = hot[self.applied[hot] < m]
            if stale.numel():
                self._refresh(stale)
            hot_value = self.value[hot]
            pos = int(hot_value.numpy().argmax()) if self.use_numpy else int(torch.argmax(hot_value))
            vmax = float(hot_value[pos])
            if vmax >= tau:
                break
            size = min(self.total, 2 * size)
        self.tau, self.hot, self.hot_value = tau, hot, hot_value
        self.hot_owner = self.owner[hot]
        self.hot_bound = hot_value * (4.0 * _PRUNE_SLACK)
        # A contiguous copy of the hot rows where it is small (or x itself); otherwise the numpy backend gathers
        # from x by global index, so that a hot set of most of a large N costs no second copy of the features.
        full = hot.shape[0] == self.total
        small = 4 * hot.shape[0] <= self.total or hot.shape[0] * self.dim * 4 <= _HOT_COPY_BYTES
        self.hot_feat = self.x if full else self.x[hot] if small or not self.use_numpy else None
        if self.use_numpy:
            self.hot_np = hot.numpy()
        self.share, self.last_probe = 0.0, -(1 << 30)
        # Groups are built once the triangle test prunes well (and not within 64 steps of being dropped).
        self.grouped, self.hot_low = False, None
        if hot.shape[0] >= _LOW_MIN_HOT and self.selected.shape[0] - m >= _LOW_MIN_STEPS:
            self._build_low(previous)
        return pos, vmax

    # --- groups of the hot set by nearest centre (numpy backend) ----------------------------------------
    # Elements only ever move to the newest centre, so the hot set splits into groups by owner: group g holds
    # the hot positions whose nearest centre is g, with its maximum value gmax[g] (first position of it in
    # garg[g]). A new centre c can lower no member of g when ||c - c_g||^2 >= 4 gmax[g] (the per-element triangle
    # test with the group's largest bound, which is the largest member bound: float rounding of the product is
    # monotone); so each step tests k groups instead of the hot set, and the argmax is the largest gmax (first
    # position over the groups holding it on ties). The members of a reached group are read from slots sorted by
    # bound (see _fill_slots): only the prefix that may pass the per-element test, contiguous in memory.
    def _build_basis(self) -> None:
        """Principal directions, and the low-dimensional copies of the centres (for the first gap bound)."""
        n, m = self.selected.shape[0], self.m
        self.basis = _principal_basis(self.x, self.mean, min(_LOW_DIM, max(1, self.dim // 4)))
        self.low_centres = torch.empty(n, self.basis.shape[1], device=self.device)
        low = ((self.centres[:m].double() - self.mean) @ self.basis).float()
        self.low_centres[:m] = low
        self.low_sq = torch.empty(n, device=self.device)
        self.low_sq[:m] = low.pow(2).sum(1)
        self.low_margin = _refresh_margin(self.basis.shape[1], self.device)
        # R of _low_threshold: no copy in the principal directions is longer than the longest centred row.
        radius = max(float((self.x[i:i + _BLOCK].double() - self.mean).norm(dim=1).max())
                     for i in range(0, self.total, _BLOCK))
        self.low_slack = 8.0 * _UNIT_ROUNDOFF * radius * (1.0 + 1e-6)
        if self.use_numpy:
            self.views.update(basis=self.basis.numpy(), low_centres=self.low_centres.numpy(),
                              low_sq=self.low_sq.numpy())

    def _build_low(self, previous: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        """Low-dimensional copies of the hot elements, and their per-element thresholds (see _low_threshold).

        previous: the last hot set and its copies; rows in both are copied over (most of a rebuilt hot set)."""
        if self.basis is None:
            self._build_basis()
        hot = self.hot
        if previous is None:
            self.hot_low = self._low_copies(hot)
        else:
            old_hot, old_low = previous  # both hot sets ascending
            at = torch.searchsorted(old_hot, hot).clamp_(max=old_hot.shape[0] - 1)
            kept = old_hot[at] == hot
            self.hot_low = torch.empty(hot.shape[0], self.basis.shape[1], device=self.device)
            self.hot_low[kept] = old_low[at[kept]]
            fresh = torch.nonzero(~kept).squeeze(1)
            self.hot_low[fresh] = self._low_copies(hot[fresh])
        self.low_thr = self._low_threshold(self.hot_value)

    def _build_groups(self) -> None:
        """Groups of the hot set by owner, in slots (see _fill_slots), and their maxima."""
        if self.hot_low is None:
            self._build_low()
        owner = self.hot_owner.numpy()
        value = self.hot_value.numpy()
        size, cap = owner.size, self.selected.shape[0]
        capacity = size + max(int(size * _SLOT_SPARE_SHARE), _SLOT_SPARE)
        self.slot_pos = np.empty(capacity, dtype=np.int64)
        self.slot_bound = np.empty(capacity, dtype=np.float32)
        self.slot_thr = np.empty(capacity, dtype=np.float64)
        self.slot_low = np.empty((capacity, self.hot_low.shape[1]), dtype=np.float32)
        self.slot_of = np.empty(size, dtype=np.int64)
        self.gstart = np.zeros(cap, dtype=np.int64)
        self.gend = np.zeros(cap, dtype=np.int64)
        order = np.argsort(owner, kind="stable")  # by group, ascending positions inside each
        self._fill_slots(order, owner[order])
        counts = np.bincount(owner, minlength=cap)
        self.gmax = np.full(cap, -np.inf, dtype=np.float32)
        self.garg = np.zeros(cap, dtype=np.int64)
        nonempty = np.flatnonzero(counts)
        starts = self.gstart[nonempty]
        sorted_value = value[order]
        gmax = np.maximum.reduceat(sorted_value, starts)
        hits = np.flatnonzero(sorted_value == np.repeat(gmax, counts[nonempty]))
        self.gmax[nonempty] = gmax
        self.garg[nonempty] = order[hits[np.searchsorted(hits, starts)]]
        self.gbound = self.gmax * np.float32(4.0 * _PRUNE_SLACK)  # -inf for empty groups: never a candidate
        self.gsize = counts
        self.grouped, self.grouped_since = True, self.m
        self.stats["group_builds"] += 1

    def _fill_slots(self, order: np.ndarray, groups: np.ndarray) -> None:
        """Slots [0, len(order)) := hot positions `order` (by group `groups`, ascending; positions ascending inside).

        Each slot keeps what a grouped step reads of its element, contiguous by group (gstart[g]:gend[g]):
        position, triangle bound, q-d copy and threshold; so a step reads whole ranges, not scattered rows. An
        element only ever moves to the newest centre, so a group never gains members: a move marks the old slot
        stale (bound -inf, which no gap test passes) and the newest group's slots go to the end, in position order.
        (Before, a step concatenated the reached groups' index lists and gathered the rows: synthetic texture 10%,
        ~12k members and ~6k q-d rows per step, scattered over the hot set.)"""
        size = order.size
        self.slot_pos[:size] = order
        self.slot_bound[:size] = self.hot_bound.numpy()[order]
        self.slot_thr[:size] = self.low_thr.numpy()[order]
        self.slot_low[:size] = self.hot_low.numpy().take(order, axis=0)
        self._index_slots(size, groups)

    def _index_slots(self, size: int, groups: np.ndarray) -> None:
        self.slot_of[self.slot_pos[:size]] = np.arange(size)
        self.used = size
        centres = np.arange(self.m)
        self.gstart[:self.m] = np.searchsorted(groups, centres, side="left")
        self.gend[:self.m] = np.searchsorted(groups, centres, side="right")
        self.stats["slot_fills"] += 1

    def _compact_slots(self) -> None:
        """Drop the stale slots (the others keep their order)."""
        live = np.flatnonzero(self.slot_bound[:self.used] != -np.inf)
        size = live.size
        for slots in (self.slot_pos, self.slot_bound, self.slot_thr, self.slot_low):
            slots[:size] = slots.take(live, axis=0)
        self._index_slots(size, self.hot_owner.numpy()[self.slot_pos[:size]])

    def _low_threshold(self, value: torch.Tensor) -> torch.Tensor:
        """Per element: a float32 low-dimensional squared distance d2 >= this proves fl32(||x - c||^2) >= value.

        With p the float64 projection onto the orthonormal basis: ||x - c|| >= ||p(x) - p(c)|| >= sqrt(d2)(1 - 1e-5)
        - 8 u R (the float32 rounding of the stored copies, each at most u |p|, R the longest centred row, plus the
        rounding of the difference and the sum of squares, (q + 3) u). At sqrt(1.001 value) the direct float32
        distance, within (d + 2) u of the exact one, cannot fall below value."""
        root = value.double().mul(_PRUNE_SLACK).sqrt_().add_(self.low_slack)
        return root.div_(1.0 - 1e-5).square_()

    def _low_threshold_numpy(self, value: np.ndarray) -> np.ndarray:
        """_low_threshold in numpy, for the grouped step's few moved elements (float64: its last-bit differences from
        torch's sqrt lie far inside the 1e-5 margin)."""
        root = np.sqrt(value.astype(np.float64) * _PRUNE_SLACK)
        root += self.low_slack
        root /= 1.0 - 1e-5
        return root * root

    def _update_groups(self) -> bool:
        """Apply the newest centre to the hot set (exact): groups it cannot reach are skipped whole.

        Returns False, having changed nothing, where the groups the centre may reach hold more than half of the
        hot set (the groups are dropped: `_update_hot` runs instead, until its test prunes well again)."""
        k = self.m - 1
        centre = self.centres[k]
        value, bound, owner = self.hot_value.numpy(), self.hot_bound.numpy(), self.hot_owner.numpy()
        # Gap lower bounds in two stages: the orthogonal projection onto a few principal directions never
        # lengthens a vector, so its (margin-corrected) squared gap bounds the full one from below at a
        # fraction of the cost; the full-dimensional bound runs only for the groups that pass it.
        # (The margins cover the rounding of any float32 dot product.)
        views = self.views
        low_sq, centred_sq = views["low_sq"], views["centred_sq"]
        dots = _matvec(views["low_centres"][:k], views["low_centres"][k])
        low = low_sq[:k] + low_sq[k]  # (||a||^2 + ||b||^2)(1 - margin) - 2 a.b, in place: O(k) every step
        low *= 1.0 - self.low_margin
        dots *= 2.0
        low -= dots
        maybe = np.flatnonzero(low < self.gbound[:k])
        self.stats["low_gaps"] += k
        if maybe.size == 0:
            return self._nothing_moved(k)
        centred_centres = views["centred_centres"]
        dots = _matvec(centred_centres.take(maybe, axis=0), centred_centres[k])
        gaps = (centred_sq[maybe] + centred_sq[k]) * (1.0 - self.margin) - 2.0 * dots
        self.stats["centre_gaps"] += maybe.size
        keep = gaps < self.gbound[maybe]
        groups, gaps = maybe[keep], gaps[keep]
        if groups.size == 0:
            return self._nothing_moved(k)
        members = int(self.gsize[groups].sum())
        if 2 * members > value.size:
            # Not again for 64 steps, twice that after each drop that came soon after its build.
            self.drop_streak = self.drop_streak + 1 if self.m - self.grouped_since < 256 else 0
            self.grouped = False
            self.slot_pos = self.slot_bound = self.slot_thr = self.slot_low = self.slot_of = None
            self.group_wait = self.m + (64 << min(self.drop_streak, 6))
            self.stats["group_drops"] += 1
            return False
        self.stats["group_candidates"] += groups.size
        self.stats["members"] += members
        # The reached groups' slots (see _fill_slots) as one index of slot ranges, then the per-element triangle
        # test on their bounds (stale slots fail it).
        starts = self.gstart[groups]
        lengths = self.gend[groups] - starts
        read = int(lengths.sum())
        self.stats["slots"] += read
        if read == 0:
            return self._nothing_moved(k)
        slots = np.arange(read)
        slots += np.repeat(starts - (np.cumsum(lengths) - lengths), lengths)
        slots = slots[np.repeat(gaps, lengths) < self.slot_bound.take(slots)]
        if slots.size == 0:
            return self._nothing_moved(k)
        # Second per-element test: the distance in the principal directions bounds the full one from below.
        self.stats["low_bounds"] += slots.size
        diff = self.slot_low.take(slots, axis=0)
        diff -= views["low_centres"][k]
        slots = slots[np.einsum("ij,ij->i", diff, diff) < self.slot_thr.take(slots)]
        if slots.size == 0:
            return self._nothing_moved(k)
        rows = self.slot_pos.take(slots)
        # Gathered by numpy (a plain copy), then the same float32 torch expression as the plain algorithm.
        dist = _gathered_distances(self.x, self.hot_np[rows], centre).numpy()
        self.stats["distances"] += rows.size
        self.stats["candidates"] += rows.size
        closer = dist < value[rows]
        moved, moved_sq = rows[closer], dist[closer]
        self.stats["moved"] += moved.size
        if moved.size == 0:
            return self._nothing_moved(k)
        left, count = np.unique(owner[moved], return_counts=True)
        self.slot_bound[self.slot_of[moved]] = -np.inf  # stale
        moved_bound = moved_sq * np.float32(4.0 * _PRUNE_SLACK)
        moved_thr = self._low_threshold_numpy(moved_sq)
        value[moved] = moved_sq
        bound[moved] = moved_bound
        owner[moved] = k
        self.low_thr.numpy()[moved] = moved_thr
        self.gsize[left] -= count
        # The newest group's slots at the end, in position order.
        if self.used + moved.size > self.slot_pos.shape[0]:
            self._compact_slots()
        order = np.argsort(moved)
        moved, moved_sq = moved[order], moved_sq[order]
        start, end = self.used, self.used + moved.size
        self.slot_pos[start:end] = moved
        self.slot_bound[start:end] = moved_bound[order]
        self.slot_thr[start:end] = moved_thr[order]
        self.slot_low[start:end] = self.hot_low.numpy().take(moved, axis=0)
        self.slot_of[moved] = np.arange(start, end)
        self.gstart[k], self.gend[k] = start, end
        self.used = end
        self.gsize[k] = moved.size
        p = int(moved_sq.argmax())  # first position on ties
        self._set_group_max(k, moved_sq[p], moved[p])
        # A group that lost members keeps its maximum unless the element holding it moved.
        for g in left[owner[self.garg[left]] == k].tolist():
            self._group_max(g, value)
        return self._counted()

    def _group_max(self, g: int, value: np.ndarray) -> None:
        """gmax / garg of group g from its live slots; its stale leading slots are skipped from now on."""
        start, end = int(self.gstart[g]), int(self.gend[g])
        live = np.flatnonzero(self.slot_bound[start:end] != -np.inf)
        if live.size == 0:
            self.gstart[g] = end
            self.gmax[g], self.gbound[g] = -np.inf, -np.inf
            return
        self.gstart[g] = start + live[0]
        rows = self.slot_pos[start + live]
        own = value[rows]
        p = int(own.argmax())  # first position on ties: slots in position order
        self._set_group_max(g, own[p], rows[p])

    def _set_group_max(self, g: int, top: np.float32, position: int) -> None:
        self.gmax[g], self.garg[g] = top, position
        self.gbound[g] = top * np.float32(4.0 * _PRUNE_SLACK)

    def _nothing_moved(self, k: int) -> bool:
        """End of a grouped step where no hot element moved to the new centre k: its group is empty."""
        self.gstart[k] = self.gend[k] = self.used
        self.gsize[k] = 0
        self.gmax[k], self.gbound[k] = -np.inf, -np.inf
        return self._counted()

    def _counted(self) -> bool:
        self.stats["hot_total"] += self.hot.shape[0]
        self.stats["steps"] += 1
        return True

    def _group_argmax(self) -> tuple[int, float]:
        gmax = self.gmax[:self.m]
        g = int(gmax.argmax())
        vmax = gmax[g]
        ties = np.flatnonzero(gmax == vmax)
        pos = int(self.garg[g]) if ties.size == 1 else int(self.garg[ties].min())
        return pos, float(vmax)

    def _refresh(self, rows: torch.Tensor) -> None:
        """Bring `rows` up to date over all m centres: each against the centres it has not seen yet."""
        applied = self.applied[rows]
        order = torch.argsort(applied, stable=True)
        rows, applied = rows[order], applied[order]
        self.stats["refreshed"] += rows.numel()
        for i in range(0, rows.numel(), _REFRESH_ROWS):
            # Rows sorted by how far they are behind; a block starts from its most stale row (re-applying
            # a centre is harmless: the minimum is idempotent).
            block = rows[i:i + _REFRESH_ROWS]
            if self.basis is None:
                self._refresh_block(block, int(applied[i]))
            elif self.refresh_dense and self.refresh_probe % 8:
                # The q-d bound left many pairs on the last probe: the d-dimensional one alone, probing every 8th.
                self.refresh_probe += 1
                self._refresh_block(block, int(applied[i]))
            else:
                self.refresh_dense, self.refresh_probe = self._refresh_block_low(block, int(applied[i])), 1
        self.applied[rows] = self.m

    def _refresh_block(self, rows: torch.Tensor, start: int) -> None:
        """Exact minimum over centres [start, m) of the direct distances, found through a GEMM lower bound.

        approx = ||x'||^2 + ||c'||^2 - 2 x'.c' on centred copies errs from the direct float32 distance by at
        most margin * (||x'||^2 + ||c'||^2) (GEMM and direct rounding, and the centring). Only pairs whose
        lower bound is below the current value and below the smallest upper bound can hold the new minimum;
        their direct distances decide, so the result is the one the plain algorithm computes.
        """
        feats = self.x[rows]
        centred = _centred_rows(feats, self.mean)
        best = _key(self.value[rows], self.owner[rows])
        step = max(1, _BOUND_ELEMENTS // rows.numel())
        for c0 in range(start, self.m, step):
            best = self._full_bound_block(feats, centred, best, c0, min(self.m, c0 + step))
        value, owner = _unkey(best)
        self.value[rows] = value
        self.owner[rows] = owner

    def _full_bound_block(self, feats: torch.Tensor, centred: tuple[torch.Tensor, torch.Tensor], best: torch.Tensor,
                          c0: int, c1: int) -> torch.Tensor:
        """best (keys of the rows' minima so far) lowered over centres [c0, c1), through the d-dimensional bound."""
        centred, centred_sq = centred
        best_value = _unkey(best)[0]
        norm_sum = centred_sq[:, None] + self.centred_sq[None, c0:c1]
        approx = torch.addmm(norm_sum, centred, self.centred_centres[c0:c1].T, alpha=-2.0)
        slack = norm_sum.mul_(self.margin)
        low = approx - slack
        limit = torch.minimum(best_value, approx.add_(slack).amin(1))
        r, c = torch.nonzero((low < best_value[:, None]) & (low <= limit[:, None]), as_tuple=True)
        self.stats["bound_pairs"] += feats.shape[0] * (c1 - c0)
        del norm_sum, approx, slack, low
        return self._direct_pairs(feats, best, r, c + c0)

    def _direct_pairs(self, feats: torch.Tensor, best: torch.Tensor, r: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """best lowered by the direct distances of the pairs (feats[r], centre c)."""
        for p in range(0, r.numel(), _BLOCK):
            rp, cp = r[p:p + _BLOCK], c[p:p + _BLOCK]
            dist = (feats.index_select(0, rp) - self.centres.index_select(0, cp)).pow_(2).sum(1)
            best.scatter_reduce_(0, rp, _key(dist, cp), "amin")
        self.stats["distances"] += r.numel()
        return best


    def _refresh_block_low(self, rows: torch.Tensor, start: int) -> bool:
        """_refresh_block with the lower bound taken in the principal directions (once they exist).

        On texture-like data the refresh dominated (bottle-sized texture at 10%: 6.6e9 bound pairs, 2/3 of the
        time); here each pair costs a q-dimensional product (q = 32 of 128) and one comparison, and the pairs it
        cannot exclude (a few per row) get direct distances. approx = ||a||^2 + ||b||^2 - 2 a.b on the stored
        float32 copies, as one product of [a, ||a||^2, 1] and [-2 b, 1, ||b||^2]: it errs from the exact
        ||a - b||^2 by at most low_margin * (||a||^2 + ||b||^2) (a (q + 2)-term dot product); a pair is
        excluded when even approx less that margin reaches the row's low threshold (see _low_threshold). That
        threshold follows the row's best value so far, and a stale value is a loose upper bound: so each block
        first takes the direct distance to each row's nearest centre by approx (almost always the nearest), which
        tightens it before the comparison. Returns whether a block left many pairs (see _DENSE_PAIRS).
        """
        feats = self.x[rows]
        low = self._low_copies(rows)
        low_sq = low.pow(2).sum(1)
        left = torch.cat([low, low_sq[:, None], torch.ones_like(low_sq)[:, None]], 1)
        best = _key(self.value[rows], self.owner[rows])
        best_value = self.value[rows].clone()
        centred, dense = None, False
        step = max(1, _BOUND_ELEMENTS // rows.numel())
        for c0 in range(start, self.m, step):
            c1 = min(self.m, c0 + step)
            centres_sq = self.low_sq[c0:c1]
            right = torch.cat([self.low_centres[c0:c1] * -2.0, torch.ones_like(centres_sq)[:, None],
                               centres_sq[:, None]], 1)
            approx = left @ right.T
            nearest = approx.argmin(1) + c0
            dist = (feats - self.centres.index_select(0, nearest)).pow_(2).sum(1)
            best = torch.minimum(best, _key(dist, nearest))
            best_value = _unkey(best)[0]
            self.stats["distances"] += rows.numel()
            limit = self._low_threshold(best_value) + self.low_margin * (low_sq.double() + float(centres_sq.max()))
            limit = limit.mul_(1.0 + 1e-6).float()  # rounded to float32 no lower than the float64 limit
            r, c = torch.nonzero(approx < limit[:, None], as_tuple=True)
            self.stats["low_pairs"] += rows.numel() * (c1 - c0)
            del approx
            if r.numel() > _DENSE_PAIRS * rows.numel():
                # The q-dimensional bound left many pairs (distances spread over many directions): the
                # d-dimensional bound, with its upper bounds, excludes most of them at a GEMM's price.
                dense = True
                if centred is None:
                    centred = _centred_rows(feats, self.mean)
                best = self._full_bound_block(feats, centred, best, c0, c1)
            else:
                best = self._direct_pairs(feats, best, r, c + c0)
            best_value = _unkey(best)[0]
        value, owner = _unkey(best)
        self.value[rows] = value
        self.owner[rows] = owner
        return dense

    def _low_copies(self, rows: torch.Tensor) -> torch.Tensor:
        """(len(rows), q) float32 copies of the rows in the principal directions: float64 centring and product."""
        out = torch.empty(rows.numel(), self.basis.shape[1], device=self.device)
        for i in range(0, rows.numel(), _BLOCK):
            block = self.x.index_select(0, rows[i:i + _BLOCK]).double().sub_(self.mean)
            out[i:i + _BLOCK] = (block @ self.basis).float()
        return out


def _centred_rows(feats: torch.Tensor, mean: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 rows less the float64 mean, and their squared norms (the d-dimensional bound's operands)."""
    centred = (feats.double() - mean).float()
    return centred, centred.pow(2).sum(1)


def _column_mean(features: torch.Tensor) -> torch.Tensor:
    """(d,) float64 mean of the rows, in blocks (no float64 copy of the whole matrix)."""
    total = torch.zeros(features.shape[1], dtype=torch.float64, device=features.device)
    for i in range(0, features.shape[0], _BLOCK):
        total += features[i:i + _BLOCK].double().sum(0)
    return total / features.shape[0]


def _refresh_margin(dim: int, device: torch.device) -> float:
    """Relative bound (times ||x'||^2 + ||c'||^2) on |GEMM form on centred copies - direct float32 distance|.

    GEMM form: a length-d dot product and two norms, (2d + 6) u (plus 4 u_in where a TF32 matmul rounds its
    inputs); the direct float32 distance errs from the exact one by (d + 2) u of ||x - c||^2 <= 2 (||x'||^2 +
    ||c'||^2); the float64-centred copies, rounded to float32, move the squared distance by <= 4 u (...).
    """
    u = _UNIT_ROUNDOFF
    u_in = 2.0 ** -11 if device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32 else u
    if torch.get_float32_matmul_precision() != "highest":
        u_in = max(u_in, 2.0 ** -8)
    return _SAFETY * ((4 * dim + 14) * u + 4 * u_in)


def _key(dist: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """(distance >= 0, index) -> one int64 that orders by distance, then index (float bits are monotone)."""
    return (dist.view(torch.int32).long() << 32) | idx


def _unkey(key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return (key >> 32).int().view(torch.float32), key & 0xFFFFFFFF


# The O(N) scans run in numpy on the CPU (backend "numpy"/"auto"): on a 164k vector numpy's argmax took
# 16 us against torch's 335 us, and the candidate test 0.3 ms against 1.4 ms. Same results: argmax takes the
# first maximum in both, order statistics and comparisons are exact.
def _below(per_centre: torch.Tensor, nearest_centre: torch.Tensor, bound: torch.Tensor,
           use_numpy: bool) -> torch.Tensor:
    """Indices x with per_centre[nearest_centre[x]] < bound[x], ascending."""
    if use_numpy:
        mask = per_centre.numpy().take(nearest_centre.numpy()) < bound.numpy()
        return torch.from_numpy(np.flatnonzero(mask))
    return torch.nonzero(per_centre.index_select(0, nearest_centre) < bound).squeeze(1)


def _kth_largest(values: torch.Tensor, k: int, use_numpy: bool) -> float:
    """The k-th largest entry (1 <= k < len)."""
    total = values.shape[0]
    if use_numpy:
        return float(np.partition(values.numpy(), total - k)[total - k])
    return float(torch.kthvalue(values, total - k + 1).values)


def _at_least(values: torch.Tensor, threshold: float, use_numpy: bool) -> torch.Tensor:
    """Indices with values >= threshold, ascending."""
    if use_numpy:
        return torch.from_numpy(np.flatnonzero(values.numpy() >= threshold))
    return torch.nonzero(values >= threshold).squeeze(1)


def _gathered_distances(features: torch.Tensor, rows: np.ndarray, centre: torch.Tensor) -> torch.Tensor:
    """_rows_distances with the rows gathered by numpy: the same values, without torch's threaded gather and
    elementwise passes on small blocks. The difference and the square are single IEEE float32 operations, so
    numpy's equal torch's bit for bit; the sum, where order matters, is the same torch reduction of the same
    contiguous (rows, d) block."""
    source, point = features.numpy(), centre.numpy()

    def block(chunk: np.ndarray) -> torch.Tensor:
        diff = source.take(chunk, axis=0)
        np.subtract(diff, point, out=diff)
        np.multiply(diff, diff, out=diff)
        return torch.from_numpy(diff).sum(1)

    if rows.size <= _BLOCK:
        return block(rows)
    return torch.cat([block(rows[i:i + _BLOCK]) for i in range(0, rows.size, _BLOCK)])


def _matvec(matrix: np.ndarray, vector: np.ndarray) -> np.ndarray:
    """matrix @ vector by numpy's BLAS in blocks of rows small enough to run on one thread: a threaded call
    leaves its idle BLAS thread spinning through the rest of the step (20k x 32: +1 ms CPU per 1 ms step), and
    torch.mv took ~3x the CPU time of a single-threaded numpy product of this size."""
    if matrix.shape[0] <= _MATVEC_ROWS:
        return np.dot(matrix, vector)
    return np.concatenate([np.dot(matrix[i:i + _MATVEC_ROWS], vector) for i in range(0, matrix.shape[0], _MATVEC_ROWS)])


def _principal_basis(features: torch.Tensor, mean: torch.Tensor, q: int) -> torch.Tensor:
    """(d, q) float64 orthonormal basis of the q leading principal directions of a strided row sample.

    Any orthonormal basis keeps the gap bounds valid; the leading directions make them tight. (torch's eigh:
    numpy's LAPACK took 2 ms to 0.2 s for the same 128 x 128 matrix on the loaded 2-core machine.)"""
    step = max(1, features.shape[0] // _BASIS_ROWS)
    sample = features[::step].double() - mean
    _, vectors = torch.linalg.eigh(sample.T @ sample)  # ascending eigenvalues
    return vectors.flip(1)[:, :q].contiguous()


def _rows_distances(features: torch.Tensor, rows: torch.Tensor, centre: torch.Tensor) -> torch.Tensor:
    """||features[rows] - centre||^2 in blocks of rows (the same per-row values as the plain algorithm)."""
    if rows.numel() <= _BLOCK:
        return (features.index_select(0, rows) - centre).pow_(2).sum(1)
    return torch.cat([(features.index_select(0, rows[i:i + _BLOCK]) - centre).pow_(2).sum(1)
                      for i in range(0, rows.numel(), _BLOCK)])


def _all_distances(features: torch.Tensor, centre: torch.Tensor) -> torch.Tensor:
    if features.shape[0] <= _BLOCK:
        return (features - centre).pow_(2).sum(1)
    return torch.cat([(features[i:i + _BLOCK] - centre).pow_(2).sum(1) for i in range(0, features.shape[0], _BLOCK)])


def greedy_coreset_reference(features: torch.Tensor, n: int, *, generator: torch.Generator) -> torch.Tensor:
    """The plain algorithm with a full distance matrix. O(N^2) memory: tests only."""
    features = features.float()
    total = features.shape[0]
    first = int(torch.randint(total, (1,), generator=generator).item())
    pairwise_sq = (features[:, None, :] - features[None, :, :]).pow(2).sum(-1)
    nearest_sq = pairwise_sq[first].clone()
    selected = [first]
    for _ in range(1, n):
        farthest = int(torch.argmax(nearest_sq))
        selected.append(farthest)
        nearest_sq = torch.minimum(nearest_sq, pairwise_sq[farthest])
    return torch.tensor(selected, dtype=torch.long)


def coverage_radius(features: torch.Tensor, selected: torch.Tensor, *, chunk: int = 4096) -> float:
    """max over all elements of the distance to the nearest selected one (the minimax objective)."""
    centres = features[selected]
    radius = 0.0
    for start in range(0, features.shape[0], chunk):
        block = features[start:start + chunk]
        radius = max(radius, float(torch.cdist(block, centres).min(1).values.max()))
    return radius
