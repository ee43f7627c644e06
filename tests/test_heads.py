"""Sub-class heads per rank: a rank builds only the heads it holds, each the one a rank holding all builds,
and at the paper's layout its heads fit in far less memory than every head."""

from __future__ import annotations

import pytest
import torch

from deepercluster.objectives import Heads, targets_for

GiB = 2**30


@pytest.mark.parametrize(("feature_dim", "sub_clusters"), [(256, [10, 7]), (33, [5, 3]), (3, [2, 4])])
def test_a_head_held_alone_is_the_head_every_head_holds(feature_dim: int, sub_clusters: list[int]) -> None:
    """Bit for bit, and the RNG is left where building every head leaves it; sizes of 16 elements and not."""
    targets = targets_for("deepercluster", sub_clusters)
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
    targets = targets_for("deepercluster", [80_000] * 4)
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
