"""The vote-sized passes the fused routings share (capsnets.nn.routing.vote_passes)."""

import pytest
import torch

from capsnets.nn.routing import kernels, vote_passes
from capsnets.nn.routing.vote_passes import (
    ParentVotes,
    VoteDot,
    VoteSum,
    flat_position_chunks,
    parent_chunks,
    position_chunks,
)


@pytest.mark.parametrize("device", ["cpu", "cuda"])  # only the device's type is read: no GPU needed
@pytest.mark.parametrize("chunk", [1, 7, 60, 100, 500, 10_000])
@pytest.mark.parametrize("b,p,per_position", [(5, 1, 20), (3, 4, 15), (2, 9, 7), (1, 3, 200)])
def test_blocks_cover_every_image_position_pair_once_in_the_parents_order(
    b, p, per_position, chunk, device, monkeypatch
):
    monkeypatch.setattr(kernels, "CHUNK_ELEMENTS" if device == "cpu" else "ACCELERATOR_CHUNK_ELEMENTS", chunk)
    blocks = position_chunks(b, p, per_position, device)
    pairs = [
        (i, q) for images, ps in blocks for i in range(images.start, images.stop) for q in range(ps.start, ps.stop)
    ]
    assert pairs == [(i, q) for i in range(b) for q in range(p)]
    for images, ps in blocks:
        n_images, n_positions = images.stop - images.start, ps.stop - ps.start
        assert n_images == 1 or ps == slice(0, p)  # several images only when whole
        assert n_images * n_positions * per_position <= max(chunk, per_position)  # at most a chunk, or one position
    for factor in (1, 3):
        flat = flat_position_chunks(b * p, per_position, factor, device)
        assert [q for s in flat for q in range(s.start, s.stop)] == list(range(b * p))
    rows = parent_chunks(b * p, per_position, device)
    assert [g for s in rows for g in range(s.start, s.stop)] == list(range(b * p))


def test_a_gpu_runs_the_votes_in_a_few_large_blocks_a_cpu_in_cache_sized_ones():
    # em_caps' ConvCaps1 at batch 64: G = 64 x 36 positions x 32 types parents of N = 9 x 32 votes of 16 elements
    parents, per_parent = 64 * 36 * 32, 9 * 32 * 16
    assert vote_passes.chunk_elements(torch.device("cpu")) == vote_passes.CHUNK_ELEMENTS == 1 << 21  # 8 MB float32
    assert vote_passes.chunk_elements("cuda") == vote_passes.chunk_elements(torch.device("cuda", 0)) == 1 << 27
    assert len(parent_chunks(parents, per_parent, "cpu")) == 163
    assert len(parent_chunks(parents, per_parent, "cuda")) == 3  # a few kernel launches a pass, not ~500
    assert len(position_chunks(64, 36, 32 * per_parent, "cuda")) == 3
    assert len(flat_position_chunks(64 * 36, 32 * per_parent, 8, "cuda")) == 1


def test_parent_votes_lays_out_and_optionally_centres_the_votes():
    torch.manual_seed(0)
    V = torch.randn(2, 3, 2, 4, 5, 6, dtype=torch.float64)  # (B, P, K, T_in, T_out, D)
    parents = V.permute(0, 1, 4, 2, 3, 5).reshape(2 * 3 * 5, 2 * 4, 6)  # (G, N, D)
    U, c0 = ParentVotes.apply(V, 0, 0, V.dtype, False)
    assert torch.equal(U, parents) and torch.equal(c0, torch.zeros(30, 6, dtype=V.dtype))
    U, c0 = ParentVotes.apply(V, 0, 0, V.dtype, True)
    torch.testing.assert_close(c0, parents.mean(dim=1))
    torch.testing.assert_close(U, parents - c0[:, None])


@pytest.mark.parametrize("use", ["sum", "dot"])
def test_each_use_passes_gradcheck_through_the_votes_and_its_operand(use):
    torch.manual_seed(1)
    V = torch.randn(2, 1, 3, 2, 4, 5, dtype=torch.float64, requires_grad=True)  # G = 8 parents of N = 6 votes
    x = torch.randn(8, 6 if use == "sum" else 5, dtype=torch.float64, requires_grad=True)

    def f(V, x):
        U, _, *tokens = ParentVotes.apply(V, 1, 0, V.dtype, False)
        return (VoteSum if use == "sum" else VoteDot).apply(U, *tokens, x)

    assert torch.autograd.gradcheck(f, (V, x))
