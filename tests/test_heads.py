"""Sub-class heads per rank: a rank builds only the heads it holds (or its part of one), each the one a rank
holding all builds, and at the paper's layout its heads fit in far less memory than every head (below 2 GiB
with its group's head split over the group's 4 ranks)."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from deepercluster.methods import METHODS
from deepercluster.nn.heads import Heads, class_part, targets_for

GiB = 2**30


@pytest.mark.parametrize(("feature_dim", "sub_clusters"), [(256, [10, 7]), (33, [5, 3]), (3, [2, 4])])
def test_a_head_held_alone_is_the_head_every_head_holds(feature_dim: int, sub_clusters: list[int]) -> None:
    """Bit for bit, and the RNG is left where building every head leaves it; sizes of 16 elements and not."""
    targets = targets_for(METHODS["deepercluster"], sub_clusters)
    torch.manual_seed(3)
    every = Heads(feature_dim, targets).state_dict()
    after_every = torch.get_rng_state()
    for g in (0, 5, len(targets.sub_classes) - 1):
        torch.manual_seed(3)
        held = Heads(feature_dim, targets, holds=[g]).state_dict()
        assert torch.equal(torch.get_rng_state(), after_every)
        assert sorted(held) == sorted(k for k in every if not k.startswith("sub_class.") or k.split(".")[1] == str(g))
        for key, tensor in held.items():
            assert torch.equal(tensor, every[key]), key


@pytest.mark.parametrize(("feature_dim", "classes", "parts"), [(33, 1000, 3), (256, 10, 4), (3, 5, 2), (4, 3, 4)])
def test_the_parts_of_a_head_split_by_classes_are_its_rows(feature_dim: int, classes: int, parts: int) -> None:
    """Each rank of a group builds its part of W_g (chunked draws, part boundaries anywhere in a chunk of 16,
    a part with no class when the classes are fewer than the ranks): the parts stack to the whole, bit for bit,
    and the RNG is left where building the whole leaves it."""
    targets = targets_for(METHODS["deepercluster"], [classes, 2])
    torch.manual_seed(3)
    whole = Heads(feature_dim, targets, holds=[1]).state_dict()
    after_whole = torch.get_rng_state()
    shards = []
    for part in range(parts):
        torch.manual_seed(3)
        shards.append(Heads(feature_dim, targets, holds=[1], part=(part, parts)).state_dict())
        assert torch.equal(torch.get_rng_state(), after_whole)
        assert torch.equal(shards[-1]["super_class.1.weight"], whole["super_class.1.weight"])
    for key in ("sub_class.1.1.weight", "sub_class.1.1.bias"):
        assert torch.equal(torch.cat([shard[key] for shard in shards]), whole[key]), key
    assert [len(shard["sub_class.1.1.bias"]) for shard in shards] == [
        len(class_part(classes, q, parts)) for q in range(parts)
    ]


def split_head_step(rank: int, ranks: int, port: int) -> None:
    """One rank of a group of ``ranks``: W_5 (super-cluster 1 at rotation 1: 5 classes) split over the group against
    W_5 whole on the group's rows: loss, accuracy and gradients."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=ranks)
    targets, rows = targets_for(METHODS["deepercluster"], [11, 5]), 6
    generator = torch.Generator().manual_seed(0)
    feature = torch.randn(ranks * rows, 33, generator=generator)
    super_target, sub_target = torch.full((ranks * rows,), 5), torch.randint(0, 5, (ranks * rows,), generator=generator)
    torch.manual_seed(3)
    whole = Heads(33, targets, holds=[5])
    torch.manual_seed(3)
    split = Heads(33, targets, holds=[5], part=(rank, ranks), group=dist.group.WORLD)
    classes, own = class_part(5, rank, ranks), slice(rank * rows, (rank + 1) * rows)
    whole_feature, own_feature = feature.clone().requires_grad_(), feature[own].clone().requires_grad_()
    expected = whole(whole_feature, super_target, sub_target)
    out = split(own_feature, super_target[own], sub_target[own])
    (expected["loss_sub"] + expected["loss_super"]).backward()
    out["loss"].backward()
    mean = torch.stack([out["loss_sub"], out["acc_sub"]]).detach()
    dist.all_reduce(mean)
    # torch's float32 defaults, rtol 1.3e-6 and atol 1e-5: on an Intel Xeon (issue 29) every comparison below used
    # at most 0.3% of them (the largest, the weight's gradient, 2.9e-3 of its tolerance); passed on an AMD EPYC.
    torch.testing.assert_close(mean / ranks, torch.stack([expected["loss_sub"], expected["acc_sub"]]))
    for name in ("weight", "bias"):  # the sum over the group's losses, averaged as the training step does
        gradient = getattr(split.sub_class["5"][1], name).grad / ranks
        torch.testing.assert_close(gradient, getattr(whole.sub_class["5"][1], name).grad[classes.start : classes.stop])
    torch.testing.assert_close(own_feature.grad, whole_feature.grad[own] * ranks)  # whole: the mean of all rows
    dist.destroy_process_group()


def test_a_head_split_over_a_groups_ranks_gives_the_whole_heads_loss_and_gradients() -> None:
    """7 ranks, 5 classes: parts of 0 or 1 class (the uneven split, and ranks holding no class)."""
    ranks = 7
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    mp.spawn(split_head_step, args=(ranks, port), nprocs=ranks)


def step_bytes(heads: Heads, super_class: int, batch: int = 48) -> dict[str, int]:
    """Bytes of the weights, gradients and SGD momentum of ``heads`` after one step on ``batch`` samples of
    ``super_class`` (48 images per GPU in the paper), all on the meta device: real tensors, none allocated."""
    feature = torch.randn(batch, heads.sub_class[str(super_class)][1].in_features, device="meta")
    super_target = torch.full((batch,), super_class, device="meta")
    sub_target = torch.zeros(batch, dtype=torch.long, device="meta")
    loss = torch.nn.functional.cross_entropy(heads.super_class(feature), super_target)
    loss = loss + torch.nn.functional.cross_entropy(heads.sub_class[str(super_class)](feature), sub_target)
    loss.backward()
    optimizer = torch.optim.SGD(heads.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-5)
    optimizer.step()
    nbytes = [(p, p.numel() * p.element_size()) for p in heads.parameters()]
    return {
        "weights": sum(n for _, n in nbytes),
        "grads": sum(n for p, n in nbytes if p.grad is not None),
        "momentum": sum(n for p, n in nbytes if "momentum_buffer" in optimizer.state[p]),
    }


def test_a_rank_of_the_papers_layout_holds_its_groups_head_only() -> None:
    """m = 4 super-clusters of k = 80,000 sub-clusters, 4096-d features: 16 training groups. Before, every
    rank built all 16 sub-class heads (19.5 GiB of weights) and all-reduced gradients for all of them, so
    each had a gradient and a momentum buffer (3 x 19.5 GiB); a rank of group 5 now holds W_5 alone."""
    targets = targets_for(METHODS["deepercluster"], [80_000] * 4)
    every = Heads(4096, targets, device="meta")
    held = Heads(4096, targets, holds=[5], device="meta")
    assert len(every.sub_class) == 16 and list(held.sub_class) == ["5"]
    every_weights = sum(p.numel() * p.element_size() for p in every.parameters())
    assert 19.5 * GiB < every_weights < 19.6 * GiB
    after_step = step_bytes(held, super_class=5)
    print({k: f"{v / GiB:.3f} GiB" for k, v in after_step.items()}, f"every head: {every_weights / GiB:.3f} GiB")
    assert after_step["weights"] == after_step["grads"] == after_step["momentum"]
    assert after_step["weights"] < 1.23 * GiB  # W_5 (80,000 x 4097 floats, 1.221 GiB) and V (16 x 4097)
    assert sum(after_step.values()) < every_weights / 5


def test_a_rank_of_the_papers_layout_holds_a_quarter_of_its_groups_head_in_under_2_gib() -> None:
    """64 ranks: 16 groups of p = 4 ranks. Rank 1 of group 5 holds classes 20,000-39,999 of W_5 (20,000 x 4097
    floats, 0.305 GiB) and V: with gradients and momentum, 0.92 GiB, below the issue's 2 GiB (W_5 whole: 3.66)."""
    targets = targets_for(METHODS["deepercluster"], [80_000] * 4)
    part = Heads(4096, targets, holds=[5], part=(1, 4), device="meta")
    assert class_part(80_000, 1, 4) == range(20_000, 40_000)
    assert part.sub_class["5"][1].weight.shape == (20_000, 4096)
    after_step = step_bytes(part, super_class=5, batch=4 * 48)  # the group's rows, gathered
    print({k: f"{v / GiB:.3f} GiB" for k, v in after_step.items()}, f"total {sum(after_step.values()) / GiB:.3f} GiB")
    assert after_step["weights"] == after_step["grads"] == after_step["momentum"]
    assert 0.30 * GiB < after_step["weights"] < 0.31 * GiB
    assert sum(after_step.values()) < 0.93 * GiB < 2 * GiB
