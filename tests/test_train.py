"""The training block: the three methods' losses, the sampler, and exact resume after a kill."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from deepercluster.checkpoints import load_checkpoint
from deepercluster.errors import CheckpointError, ClustersError
from deepercluster.formats.labels import Labels, read_labels, write_labels
from deepercluster.formats.manifest import read_manifest
from deepercluster.methods import METHODS
from deepercluster.nn.heads import Heads, targets_for
from deepercluster.nn.layers import GlobalBatchNorm2d
from deepercluster.seeds import derived_seed
from deepercluster.train.batches import Layout, RankBatches, group_images, group_sampler, layout_for
from deepercluster.train.sampler import UniformClusterSampler
from defaults import allocation_settings, block_settings, run_block, run_train, train_command


def cross_entropy_by_hand(logits: np.ndarray, target: np.ndarray) -> np.ndarray:
    """-log softmax(logits)[target], row by row, in float64."""
    shifted = logits - logits.max(1, keepdims=True)
    return np.log(np.exp(shifted).sum(1)) - shifted[np.arange(len(target)), target]


def head_logits(head: torch.nn.Sequential, feature: np.ndarray) -> np.ndarray:
    weight, bias = head[1].weight.detach().double().numpy(), head[1].bias.detach().double().numpy()
    return np.maximum(feature, 0) @ weight.T + bias  # ReLU then Linear


@pytest.fixture
def batch() -> tuple[np.ndarray, torch.Tensor, torch.Tensor, torch.Tensor]:
    """8 hand-made samples: features, super-cluster (of 2), sub-cluster (of 3), rotation."""
    rng = np.random.default_rng(0)
    feature = rng.normal(size=(8, 6))
    super_cluster = torch.tensor([0, 1, 1, 0, 1, 0, 0, 1])
    sub_cluster = torch.tensor([2, 0, 1, 1, 2, 0, 2, 1])
    rotation = torch.tensor([0, 3, 1, 2, 0, 1, 3, 3])
    return feature, super_cluster, sub_cluster, rotation


@pytest.mark.parametrize("method", ["deepercluster", "deepcluster", "rotnet"])
def test_each_method_loss_equals_cross_entropy_by_hand(batch, method: str) -> None:
    feature, super_cluster, sub_cluster, rotation = batch
    if method != "deepercluster":  # one super-cluster (RotNet: no clusters), DeepCluster no rotation
        super_cluster = torch.zeros_like(super_cluster)
    if method == "deepcluster":
        rotation = torch.zeros_like(rotation)
    targets = targets_for(METHODS[method], [3, 3] if method == "deepercluster" else [3])
    torch.manual_seed(0)
    heads = Heads(6, targets).double().requires_grad_(False)
    for p in heads.parameters():  # larger weights than the N(0, 0.01) init, so the losses are not all log(k)
        torch.nn.init.normal_(p, 0, 1)
    target = METHODS[method].super_class(super_cluster, rotation)
    out = heads(torch.from_numpy(feature), target, sub_cluster)

    expected_total = 0.0
    if method == "deepercluster":  # Eq. 5: V over 4m = 8 super-classes (cluster x rotation), W_s over 3
        assert target.tolist() == (super_cluster * 4 + rotation).tolist() and targets.super_classes == 8
    if method == "rotnet":
        assert target.tolist() == rotation.tolist() and targets.sub_classes == ()
    if method != "deepcluster":
        v = cross_entropy_by_hand(head_logits(heads.super_class, feature), target.numpy()).mean()
        assert out["loss_super"].item() == pytest.approx(v, rel=1e-10)
        expected_total += v
    else:
        assert heads.super_class is None and "loss_super" not in out
    if method != "rotnet":
        w = [
            cross_entropy_by_hand(
                head_logits(heads.sub_class[str(g)], feature[n : n + 1]), sub_cluster[n : n + 1].numpy()
            )
            for n, g in enumerate(target.tolist())
        ]
        assert out["loss_sub"].item() == pytest.approx(np.mean(w), rel=1e-10)
        expected_total += np.mean(w)
    assert out["loss"].item() == pytest.approx(expected_total, rel=1e-10)


def test_global_batchnorm_on_one_rank_is_batchnorm(single_process) -> None:
    """The block's BatchNorm on one rank: torch's BatchNorm2d outputs, gradients and running statistics."""
    torch.manual_seed(0)
    x = (3 + 2 * torch.randn(20, 4, 6, 6)).requires_grad_()  # a mean far from 0: E[x^2] - E[x]^2 cancels
    ours, theirs = GlobalBatchNorm2d(4), torch.nn.BatchNorm2d(4)
    for bn in (ours, theirs):
        torch.nn.init.normal_(bn.weight)
    theirs.load_state_dict(ours.state_dict())
    grads = []
    for bn in (ours, theirs):
        y = bn(x)
        (y * torch.arange(4.0).view(1, 4, 1, 1)).sin().sum().backward()
        grads.append((y.detach(), x.grad.clone(), bn.weight.grad, bn.bias.grad))
        x.grad = None
    # torch's kernels sum the batch in float32, in an order set by the CPU's vector width and the threads: the
    # weight gradient (sums of 720 products, up to 19) differed by 6.9e-6 relative on this Intel Xeon (2 threads),
    # 0.61 of the former rtol = atol = 1e-5. rtol 1e-4 is 15 x that drift; a wrong formula misses by > 1e-2.
    for got, want in zip(*grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours.running_mean, theirs.running_mean)
    torch.testing.assert_close(ours.running_var, theirs.running_var)


def batchnorm_inputs() -> tuple[torch.Tensor, GlobalBatchNorm2d]:
    """40 activations of 8 channels (a mean far from 0) and a block BatchNorm of random affine weights."""
    generator = torch.Generator().manual_seed(0)
    x = 3 + 2 * torch.randn(40, 8, 12, 12, generator=generator)
    bn = GlobalBatchNorm2d(8)
    with torch.no_grad():
        bn.weight.copy_(torch.randn(8, generator=generator))
        bn.bias.copy_(torch.randn(8, generator=generator))
    return x, bn


def batchnorm_half(rank: int, port: int, out: str) -> None:
    """One of 2 gloo ranks: the block's BatchNorm of its 20 of the 40 activations."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    x, bn = batchnorm_inputs()
    own = x[rank * 20 : (rank + 1) * 20].requires_grad_()
    y = bn(own)
    (y * y.detach()).sum().backward()
    torch.save({"y": y.detach(), "grad": own.grad, "mean": bn.running_mean, "var": bn.running_var}, f"{out}{rank}")
    dist.destroy_process_group()


def test_global_batchnorm_on_two_ranks_is_the_one_rank_batchnorm_bit_for_bit(single_process, tmp_path: Path) -> None:
    """2 ranks of 20 images normalise them as 1 rank of the 40 does, to the bit, and update the same running
    statistics (the per-channel sums are float64); the input gradients agree to float32 rounding."""
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    mp.spawn(batchnorm_half, args=(port, str(tmp_path / "rank")), nprocs=2)
    x, bn = batchnorm_inputs()
    x.requires_grad_()
    y = bn(x)
    (y * y.detach()).sum().backward()
    halves = [torch.load(tmp_path / f"rank{rank}") for rank in (0, 1)]
    assert torch.equal(torch.cat([half["y"] for half in halves]), y.detach())
    for half in halves:
        assert torch.equal(half["mean"], bn.running_mean) and torch.equal(half["var"], bn.running_var)
    # Equal to the bit on this Intel Xeon (the sums are float64); the gradients are at most 3e-5, so the former
    # atol 1e-5 let through a third of them: atol 1e-10 is 1e-5 of the largest, rtol 1e-5 about 100 float32 ulps.
    torch.testing.assert_close(torch.cat([half["grad"] for half in halves]), x.grad, rtol=1e-5, atol=1e-10)


def test_sampler_is_uniform_over_clusters_and_reseeded_each_epoch() -> None:
    clusters = np.array([0] * 90 + [1] * 8 + [2] * 2)  # one large, two small clusters
    sampler = UniformClusterSampler(clusters, rotations=[0, 1, 2, 3], seed=3)
    indices, rotations = sampler.epoch(0)
    assert len(indices) == 100 and set(rotations.tolist()) == {0, 1, 2, 3}
    drawn = np.bincount(clusters[indices], minlength=3)
    assert drawn.max() - drawn.min() <= 1  # 34/33/33 draws: uniform over clusters, not over images
    assert len(set(indices[clusters[indices] == 0].tolist())) == drawn[0]  # large cluster: no replacement
    again, _ = UniformClusterSampler(clusters, rotations=[0, 1, 2, 3], seed=3).epoch(0)
    assert np.array_equal(indices, again)
    assert not np.array_equal(indices, sampler.epoch(1)[0])
    assert (UniformClusterSampler(clusters, rotations=[2], seed=3).epoch(0)[1] == 2).all()


def test_a_group_sampler_draws_only_its_images() -> None:
    clusters = np.array([5] * 6 + [7] * 4)
    group = np.arange(6, 10)  # the images of one super-cluster
    indices, _ = UniformClusterSampler(clusters, rotations=[1], seed=0, images=group, draws=25).epoch(0)
    assert len(indices) == 25 and set(indices.tolist()) <= set(group.tolist())


@pytest.fixture
def block_inputs(real_data, class_labels: str) -> dict[str, object]:
    """The real 600-image manifest and random-init checkpoint, with labels made from the true classes."""
    return {
        "manifest": real_data.manifest,
        "previous_checkpoint": real_data.checkpoint,
        "labels": class_labels,
        "method": "deepercluster",
        "round": 1,
        **block_settings(epochs=2, batch_size=50, checkpoint_every=2, seed=7, lr=0.05),  # the recorded losses' lr
    }


def local(tasks: int) -> dict[str, object]:
    """The allocation of a block of ``tasks`` local ranks of one CPU each."""
    return allocation_settings(launcher="local", tasks=tasks, cpus_per_task=1)


def block_command(inputs: dict[str, object], train_dir: Path) -> list[str]:
    """The stage's command line running the block in its own process (launcher debug)."""
    arguments = {
        **allocation_settings(launcher="debug"),
        **inputs,
        "train_dir": train_dir,
        "out": train_dir / "checkpoint.pt",
    }
    return train_command(arguments)


def tensorboard_curves(train_dir: Path) -> dict[str, pd.Series]:
    """The scalars of the TensorBoard events in ``train_dir``, read by TensorBoard's own reader: a series of float32
    values by step, per tag."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(train_dir)).Reload()
    scalars = {tag: events.Scalars(tag) for tag in events.Tags()["scalars"]}
    return {tag: pd.Series([e.value for e in got], index=[e.step for e in got]) for tag, got in scalars.items()}


def test_a_killed_block_resumes_to_the_same_weights(block_inputs, tmp_path: Path) -> None:
    whole = tmp_path / "whole"
    run_block(**block_inputs, train_dir=str(whole), out=str(whole / "checkpoint.pt"))

    interrupted = tmp_path / "interrupted"
    process = subprocess.Popen(block_command(block_inputs, interrupted), stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (interrupted / "last.pt").exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    state = load_checkpoint(interrupted / "last.pt")
    assert not (interrupted / "checkpoint.pt").exists(), "the block finished before it could be killed"
    assert (state["epoch"], state["batch"]) < (2, 0)
    # The declared metrics.tsv appears only with the block's end; the running log it resumes from is apart.
    assert not (interrupted / "metrics.tsv").exists() and (interrupted / "running-metrics.tsv").exists()

    run_block(**block_inputs, train_dir=str(interrupted), out=str(interrupted / "checkpoint.pt"))
    expected, resumed = (load_checkpoint(d / "checkpoint.pt") for d in (whole, interrupted))
    for part in ("model", "heads"):
        assert expected[part].keys() == resumed[part].keys()
        for key, tensor in expected[part].items():
            assert torch.equal(tensor, resumed[part][key]), f"{part}.{key} differs after resume"
    columns = ["iteration", "epoch", "loss", "loss_super", "loss_sub", "acc_super", "acc_sub"]
    metrics = [pd.read_csv(d / "metrics.tsv", sep="\t")[columns] for d in (whole, interrupted)]
    assert metrics[0]["iteration"].tolist() == list(range(2 * 600 // 50))
    pd.testing.assert_frame_equal(metrics[0], metrics[1])
    # TensorBoard's own reader finds the metrics' rows as curves, each row once, the killed run's too: the events
    # written past its last save were purged when it resumed.
    for train_dir in (whole, interrupted):
        written = pd.read_csv(train_dir / "metrics.tsv", sep="\t").set_index("iteration")
        curves = tensorboard_curves(train_dir)
        assert sorted(curves) == sorted(["lr", "images_per_s", *columns[2:]])
        for name, curve in curves.items():
            assert curve.index.tolist() == written.index.tolist(), name
            np.testing.assert_array_equal(curve.to_numpy(), written[name].to_numpy(np.float32), err_msg=name)


def test_a_trailing_empty_sub_cluster_keeps_its_class_in_the_head(block_inputs, tmp_path: Path) -> None:
    """k comes from the labels' own record of it: super-cluster 1's last sub-cluster is empty (k-means left it so),
    and its head still has the k = 6 classes the clustering made, not the 5 the images use."""
    labels = read_labels(block_inputs["labels"])
    write_labels(tmp_path / "trailing.parquet", Labels(labels.table, [5, 6]))
    out = tmp_path / "ck.pt"
    run_block(
        **{**block_inputs, "epochs": 1, "labels": str(tmp_path / "trailing.parquet")},
        train_dir=str(tmp_path / "train"),
        out=str(out),
    )
    heads = load_checkpoint(out)["heads"]
    assert [heads[f"sub_class.{g}.1.weight"].shape[0] for g in range(8)] == [5] * 4 + [6] * 4
    assert load_checkpoint(out)["targets"]["sub_classes"] == (5,) * 4 + (6,) * 4


def test_rotnet_keeps_its_head_and_every_method_its_backbone_optimizer_from_round_to_round(
    block_inputs, tmp_path: Path
) -> None:
    """A block of 0 epochs writes the state it starts from: RotNet's round 2 starts from round 1's head and
    momentum; DeeperCluster's from new heads but round 1's backbone momentum; DeeperCluster from a RotNet
    checkpoint (the paper's start) from a fresh backbone optimiser, as the paper's code loads weights only."""
    rotnet = {**block_inputs, "method": "rotnet", "labels": None, "epochs": 1}
    run_block(**rotnet, train_dir=str(tmp_path / "r1"), out=str(tmp_path / "r1.pt"))
    run_block(
        **{**rotnet, "previous_checkpoint": str(tmp_path / "r1.pt"), "round": 2, "epochs": 0},
        train_dir=str(tmp_path / "r2"),
        out=str(tmp_path / "r2.pt"),
    )
    first, second = load_checkpoint(tmp_path / "r1.pt"), load_checkpoint(tmp_path / "r2.pt")
    assert first["heads"].keys() == second["heads"].keys() == {"super_class.1.weight", "super_class.1.bias"}
    for key, tensor in first["heads"].items():
        assert torch.equal(tensor, second["heads"][key]), key
    for name in ("backbone", "super_class"):
        before, after = (c["optimizers"][name]["state"] for c in (first, second))
        assert before and all(torch.equal(before[i]["momentum_buffer"], after[i]["momentum_buffer"]) for i in before)

    deeper = {**block_inputs, "epochs": 1}
    run_block(**deeper, train_dir=str(tmp_path / "d1"), out=str(tmp_path / "d1.pt"))
    for previous, name in ((tmp_path / "d1.pt", "d2"), (tmp_path / "r1.pt", "from-rotnet")):
        run_block(
            **{**deeper, "previous_checkpoint": str(previous), "round": 2, "epochs": 0},
            train_dir=str(tmp_path / name),
            out=str(tmp_path / f"{name}.pt"),
        )
    first, second, started = (load_checkpoint(tmp_path / f"{n}.pt") for n in ("d1", "d2", "from-rotnet"))
    assert not torch.equal(first["heads"]["super_class.1.weight"], second["heads"]["super_class.1.weight"])
    assert not second["optimizers"]["super_class"]["state"]  # new heads, a new optimiser
    before, after = first["optimizers"]["backbone"]["state"], second["optimizers"]["backbone"]["state"]
    assert before and all(torch.equal(before[i]["momentum_buffer"], after[i]["momentum_buffer"]) for i in before)
    assert not started["optimizers"]["backbone"]["state"]


def test_a_method_continued_at_another_lr_trains_at_its_own_lr_with_the_momentum_carried(
    block_inputs, tmp_path: Path
) -> None:
    """The fair control's RotNet continued at DeeperCluster's lr: round 2 at lr 0.002 after round 1 at 0.05 carries
    round 1's momentum buffers but steps at 0.002 (torch's load_state_dict restored round 1's 0.05: the weights
    moved as far as at 0.05)."""
    rotnet = {**block_inputs, "method": "rotnet", "labels": None, "epochs": 1, "lr": 0.05}
    run_block(**rotnet, train_dir=str(tmp_path / "r1"), out=str(tmp_path / "r1.pt"))
    for lr in (0.002, 0.05):
        run_block(
            **{**rotnet, "previous_checkpoint": str(tmp_path / "r1.pt"), "round": 2, "lr": lr},
            train_dir=str(tmp_path / f"r2-{lr}"),
            out=str(tmp_path / f"r2-{lr}.pt"),
        )
    first, slow, fast = (load_checkpoint(tmp_path / f"{name}.pt") for name in ("r1", "r2-0.002", "r2-0.05"))
    for name in ("backbone", "super_class"):
        assert [group["lr"] for group in slow["optimizers"][name]["param_groups"]] == [0.002], name
    moved = {
        lr: float((c["model"]["features.0.weight"] - first["model"]["features.0.weight"]).norm())
        for lr, c in ((0.002, slow), (0.05, fast))
    }
    assert moved[0.002] < moved[0.05] / 5, moved  # an epoch's step sizes scale with the lr (25x here)


def test_deepclusters_top_layer_trains_without_momentum(block_inputs, tmp_path: Path) -> None:
    """head_momentum 0 (DeepCluster's top layer): its optimiser keeps no momentum buffer; the backbone's does."""
    deepcluster = {
        **block_inputs,
        "method": "deepcluster",
        "labels": one_super_cluster(block_inputs, tmp_path),
        "epochs": 1,
        "head_momentum": 0.0,
    }
    run_block(**deepcluster, train_dir=str(tmp_path / "train"), out=str(tmp_path / "ck.pt"))
    optimizers = load_checkpoint(tmp_path / "ck.pt")["optimizers"]
    assert optimizers["sub_class"]["param_groups"][0]["momentum"] == 0.0
    assert all(state.get("momentum_buffer") is None for state in optimizers["sub_class"]["state"].values())
    assert optimizers["backbone"]["param_groups"][0]["momentum"] == 0.9 and optimizers["backbone"]["state"]


def test_labels_outside_their_recorded_k_are_refused(block_inputs, tmp_path: Path) -> None:
    labels = read_labels(block_inputs["labels"])
    write_labels(tmp_path / "short.parquet", Labels(labels.table, [5, 4]))
    with pytest.raises(ClustersError, match=r"labels images outside its 2 super-clusters of k = \[5, 4\]"):
        run_block(
            **{**block_inputs, "labels": str(tmp_path / "short.parquet")},
            train_dir=str(tmp_path),
            out=str(tmp_path / "ck.pt"),
        )


def test_a_last_checkpoint_of_other_labels_is_not_resumed(block_inputs, tmp_path: Path) -> None:
    train_dir = tmp_path / "train"
    run_block(**{**block_inputs, "epochs": 1}, train_dir=str(train_dir), out=str(train_dir / "first.pt"))
    labels = read_labels(block_inputs["labels"])
    other = labels.table.assign(sub_cluster=lambda t: (t["sub_cluster"] + 1) % 5)
    write_labels(tmp_path / "other.parquet", Labels(other, labels.sub_clusters))
    run_block(
        **{**block_inputs, "epochs": 1, "labels": str(tmp_path / "other.parquet")},
        train_dir=str(train_dir),
        out=str(train_dir / "second.pt"),
    )
    metrics = pd.read_csv(train_dir / "metrics.tsv", sep="\t")
    assert metrics["iteration"].tolist() == list(range(600 // 50))  # trained afresh, not resumed past the end
    # Each checkpoint names the exact bytes it was trained from (hashed here independently of the package).
    for out, labels in (("first.pt", block_inputs["labels"]), ("second.pt", tmp_path / "other.parquet")):
        provenance = load_checkpoint(train_dir / out)["provenance"]
        assert provenance["labels_sha256"] == hashlib.sha256(Path(labels).read_bytes()).hexdigest(), out
        previous = Path(block_inputs["previous_checkpoint"]).read_bytes()
        assert provenance["previous_sha256"] == hashlib.sha256(previous).hexdigest(), out


def block_weights(path: Path) -> dict[str, torch.Tensor]:
    checkpoint = load_checkpoint(path)
    return {f"{part}.{key}": tensor for part in ("model", "heads") for key, tensor in checkpoint[part].items()}


def test_a_finished_block_rerun_with_another_lr_trains_afresh(block_inputs, tmp_path: Path, caplog) -> None:
    one_epoch = {**block_inputs, "epochs": 1, "checkpoint_every": 1000}
    train_dir = tmp_path / "train"
    run_block(**{**one_epoch, "lr": 0.05}, train_dir=str(train_dir), out=str(tmp_path / "first.pt"))
    run_block(**{**one_epoch, "lr": 0.5}, train_dir=str(train_dir), out=str(tmp_path / "rerun.pt"))
    run_block(**{**one_epoch, "lr": 0.5}, train_dir=str(tmp_path / "fresh"), out=str(tmp_path / "fresh.pt"))
    first, rerun, fresh = (block_weights(tmp_path / f"{name}.pt") for name in ("first", "rerun", "fresh"))
    assert not torch.equal(first["model.features.0.weight"], rerun["model.features.0.weight"])
    for key, tensor in fresh.items():
        assert torch.equal(tensor, rerun[key]), f"{key}: the rerun with lr 0.5 is not a fresh block with lr 0.5"
    assert "is not resumed: it was written for another block (lr 0.05 -> 0.5)" in caplog.text
    assert pd.read_csv(train_dir / "metrics.tsv", sep="\t")["lr"].eq(0.5).all()


class RunsCodeWhenUnpickled:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[Path]]:
        return Path.touch, (self.marker,)


def test_a_checkpoint_holding_a_python_object_is_refused_unopened(real_data, tmp_path: Path) -> None:
    marker = tmp_path / "code-ran"
    state = load_checkpoint(real_data.checkpoint) | {"extra": RunsCodeWhenUnpickled(marker)}
    torch.save(state, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match=r"holds Python objects other than tensors and plain data.*refused"):
        load_checkpoint(tmp_path / "foreign.pt")
    assert not marker.exists(), "loading the checkpoint ran the code pickled in it"


def test_ranks_form_one_training_group_per_super_class_when_they_divide_evenly() -> None:
    deeper = targets_for(METHODS["deepercluster"], [3, 3])  # 2 super-clusters x 4 rotations = 8 super-classes
    assert layout_for(deeper, rank=5, world_size=16) == Layout(groups=8, group=2, part=1, parts=2)
    assert layout_for(deeper, rank=1, world_size=2) == Layout(groups=1, group=0, part=1, parts=2)  # 2 < 8
    assert layout_for(targets_for(METHODS["deepcluster"], [5]), rank=3, world_size=4).groups == 1
    assert layout_for(targets_for(METHODS["rotnet"], [1]), rank=3, world_size=4) == Layout(4, 3, 0, 1)


def test_a_group_sees_only_its_super_cluster_at_its_rotation(block_inputs) -> None:
    """2 super-clusters x 4 rotations = 8 groups: group 6 (super-cluster 1 at rotation 2) reads the labels and
    manifest rows of super-cluster 1 alone, in the manifest's order, and draws 600 / 8 of them at rotation 2:
    the images a sampler over every image, restricted to the group's, draws."""
    manifest, labels = block_inputs["manifest"], block_inputs["labels"]
    layout = Layout(groups=8, group=6, part=0, parts=1)
    images, clusters = group_images(manifest, labels, METHODS["deepercluster"], layout)
    every = read_labels(labels).table
    own = np.flatnonzero(every["super_cluster"].to_numpy() == 1)
    assert images["id"].tolist() == every["id"].iloc[own].tolist() == clusters.table["id"].tolist()
    assert images["path"].tolist() == read_manifest(manifest)["path"].iloc[own].tolist()
    assert (clusters.table["super_cluster"] == 1).all() and clusters.sub_clusters == [5, 5]
    indices, rotations = group_sampler(METHODS["deepercluster"], layout, clusters, 600, seed=0).epoch(0)
    assert len(indices) == 600 // 8 and set(rotations) == {2}
    flat = every["super_cluster"].to_numpy() * 5 + every["sub_cluster"].to_numpy()
    whole = UniformClusterSampler(flat, rotations=[2], seed=derived_seed(0, 6), images=own, draws=600 // 8).epoch(0)
    assert images["id"].to_numpy()[indices].tolist() == every["id"].to_numpy()[whole[0]].tolist()
    group_batches = RankBatches(np.arange(8), np.zeros(8, int), 4, Layout(1, 0, 1, 2), 0, seed=0, epoch=0)
    assert [[key[0] for key in batch] for batch in group_batches] == [[2, 3], [6, 7]]  # rank 1's half of each


def test_sample_seeds_depend_on_the_position_only_not_on_the_rank_or_the_resume_point() -> None:
    """Two ranks' halves of each batch carry the seeds one rank gives them; resuming at batch 3 replays
    batches 3.. with the same seeds; another epoch or group draws other seeds."""
    rng = np.random.default_rng(0)
    indices, rotations = rng.permutation(1000), rng.integers(0, 4, 1000)
    whole = RankBatches(indices, rotations, 40, Layout(1, 0, 0, 1), 0, seed=7, epoch=2)
    halves = [RankBatches(indices, rotations, 40, Layout(1, 0, part, 2), 0, seed=7, epoch=2) for part in (0, 1)]
    assert len(whole) == 25 and [a + b for a, b in zip(*halves, strict=True)] == list(whole)
    resumed = RankBatches(indices, rotations, 40, Layout(1, 0, 0, 1), 3, seed=7, epoch=2)
    assert list(resumed) == list(whole)[3:]
    seeds = [key[2] for batch in whole for key in batch]
    assert len(set(seeds)) == 1000 and all(0 <= s < 2**64 for s in seeds)
    assert [key[:2] for key in whole[0]] == list(zip(indices[:40].tolist(), rotations[:40].tolist(), strict=True))
    for other in ({"seed": 7, "epoch": 3}, {"seed": 8, "epoch": 2}):
        assert not set(seeds) & {
            key[2] for key in RankBatches(indices, rotations, 40, Layout(1, 0, 0, 1), 0, **other)[0]
        }
    with pytest.raises(IndexError):
        whole[25]


def test_four_ranks_in_the_papers_layout_train_rotnet(block_inputs, tmp_path: Path) -> None:
    """RotNet on 4 local ranks: one group per rotation, the global batch split over the groups."""
    inputs = {**block_inputs, "method": "rotnet", "labels": None, "epochs": 1, "batch_size": 40}
    run_train(
        **allocation_settings(launcher="local", tasks=4, cpus_per_task=1),
        train_dir=str(tmp_path),
        out=str(tmp_path / "ck.pt"),
        **inputs,
    )
    logs = sorted((tmp_path / "submitit").glob("*_log.err"))
    assert len(logs) == 4
    assert "Layout(groups=4, group=3, part=0, parts=1)" in logs[3].read_text()
    metrics = pd.read_csv(tmp_path / "metrics.tsv", sep="\t")
    assert metrics["iteration"].tolist() == list(range(600 // 40)) and metrics["loss_super"].notna().all()


# Losses of the 15 iterations of test_four_ranks_in_the_papers_layout_train_deepercluster, recorded when every
# rank came to hold only its group's head (they then equalled, to rtol 2e-6, those of every rank holding all
# four), again when the seeds became seeds.derived_seed's, and again when GlobalBatchNorm2d came to add float32
# per-sample sums in float64 and to normalise as x * a + b (the earlier record's losses agree to 6.4e-6: float32
# rounding, from iteration 11 on). Another CPU's kernels round differently: CI's machine gave 5.0e-6 at
# iteration 13, an Intel Xeon 5.05e-6 (issue 29's check), an AMD EPYC passed (issue 29). The tolerance, rtol 5e-5
# (2e-4 in the loss), is 10 x the largest measured and 3 x the largest drift any float comparison of a block met
# (1.65e-5, AMD, 8 ranks against 4: below), and well below what any change in the method moves (the losses
# differ from iteration to iteration by 5e-4 to 2e-2).
LOSSES_RECORDED = [
    3.6888041,
    3.6915472,
    3.6839311,
    3.7016759,
    3.7011337,
    3.6995218,
    3.6875949,
    3.7020514,
    3.7054007,
    3.7124119,
    3.6985121,
    3.7062726,
    3.7035372,
    3.7203918,
    3.7097673,
]


def one_super_cluster(block_inputs: dict[str, object], tmp_path: Path) -> str:
    """Labels of m = 1 super-cluster whose 10 sub-clusters are the 2 x 5 of ``block_inputs``'s labels."""
    labels = read_labels(block_inputs["labels"]).table
    table = pd.DataFrame(
        {"id": labels["id"], "super_cluster": 0, "sub_cluster": labels["super_cluster"] + 2 * labels["sub_cluster"]}
    )
    write_labels(tmp_path / "labels.parquet", Labels(table, [10]))
    return str(tmp_path / "labels.parquet")


def test_four_ranks_in_the_papers_layout_train_deepercluster(block_inputs, tmp_path: Path) -> None:
    """DeeperCluster with m = 1 super-cluster on 4 local ranks: a training group per rotation, each rank holding
    its group's sub-class head only, saved by the group in its own file; the losses are the recorded ones."""
    inputs = {
        **block_inputs,
        "labels": one_super_cluster(block_inputs, tmp_path),
        "epochs": 1,
        "batch_size": 40,
        "checkpoint_every": 4,
    }
    run_train(
        **allocation_settings(launcher="local", tasks=4, cpus_per_task=1),
        train_dir=str(tmp_path),
        out=str(tmp_path / "ck.pt"),
        **inputs,
    )
    logs = [p.read_text() for p in sorted((tmp_path / "submitit").glob("*_log.err"))]
    for rank, log in enumerate(logs):
        assert f"Layout(groups=4, group={rank}, part=0, parts=1)" in log
        assert f"rank {rank} holds sub-class heads [{rank}] (part 0 of 1): {256 * 10 + 10} parameters" in log
    assert len(logs) == 4
    for g in range(4):  # the last save only: the earlier ones are removed
        (group,) = tmp_path.glob(f"last-group{g}-*.pt")
        assert group.name == f"last-group{g}-epoch1-batch0.pt"
        assert sorted(load_checkpoint(group)["sub_class"]) == [f"{g}.1.bias", f"{g}.1.weight"]
    assert sorted(load_checkpoint(tmp_path / "ck.pt")["heads"]) == [
        "sub_class.0.1.bias",
        "sub_class.0.1.weight",
        "super_class.1.bias",
        "super_class.1.weight",
    ]
    metrics = pd.read_csv(tmp_path / "metrics.tsv", sep="\t")
    np.testing.assert_allclose(metrics["loss"], LOSSES_RECORDED, rtol=5e-5)

    # Run again, every rank resumes from last.pt and its group's file at the block's end: the same weights.
    first = block_weights(tmp_path / "ck.pt")
    run_train(
        **allocation_settings(launcher="local", tasks=4, cpus_per_task=1),
        train_dir=str(tmp_path),
        out=str(tmp_path / "ck.pt"),
        **inputs,
    )
    logs = "".join(p.read_text() for p in (tmp_path / "submitit").glob("*_log.err"))
    assert logs.count("resuming round 1 at epoch 1, batch 0") == 4
    for key, tensor in block_weights(tmp_path / "ck.pt").items():
        assert torch.equal(tensor, first[key]), key


def test_a_rerun_ends_the_local_block_its_killed_predecessor_started(block_inputs, tmp_path: Path, caplog) -> None:
    settings = {
        **block_inputs,
        "epochs": 3,
        **allocation_settings(launcher="local", cpus_per_task=1),
        "train_dir": str(tmp_path),
        "out": str(tmp_path / "ck.pt"),
    }
    launched = subprocess.Popen(
        train_command(settings),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while "epoch 1/3 batch" not in "".join(p.read_text() for p in tmp_path.glob("submitit/*_log.err")):
        assert time.monotonic() < deadline, "the local block did not start"
        time.sleep(0.2)
    launched.kill()  # the rule's process dies; the local job it started goes on
    launched.wait()
    earlier = int(json.loads((tmp_path / "job.json").read_text())["job_id"])
    assert Path(f"/proc/{earlier}").exists()

    run_train(**settings)
    assert f"earlier local job {earlier} still runs: killing it" in caplog.text
    assert not Path(f"/proc/{earlier}").exists() or "Z" in Path(f"/proc/{earlier}/stat").read_text().split()[2]
    metrics = pd.read_csv(tmp_path / "metrics.tsv", sep="\t")
    assert metrics["iteration"].tolist() == list(range(3 * 600 // 50))


def test_eight_ranks_split_each_groups_sub_class_head_and_train_as_four_holding_it_whole(
    block_inputs, tmp_path: Path
) -> None:
    """DeeperCluster with m = 1 on 8 local ranks: 4 training groups of 2 ranks, each rank holding 5 of its group's
    10 sub-classes (the softmax taken over both) and saving them in its own file. The losses, accuracies and
    weights are those of 4 ranks each holding its group's head whole, to float32 rounding; dropout is off, the
    one draw that depends on the rank. 8 ranks sum the backbone's gradients in another order than 4: weights
    of up to 0.3 then differ by up to 6.5e-6 after the 15 steps, as much with 8 ranks holding W_g whole (the
    code before the split, measured), whose weights the split ones match to 1.2e-7.
    Run again, every rank resumes its part: the same weights.

    The drift depends on the CPU's kernels. Measured (issue 29): on an Intel Xeon the losses 2.1e-7 relative,
    the weights 2.4e-7; on an AMD EPYC loss_super 1.65e-5 at iteration 14, 96 x Intel's 1.7e-7 (the test stopped
    there, before the weights). So the losses get rtol 1e-4 (6 x AMD's), the weights rtol = atol = 1e-4 (4 x
    Intel's 2.4e-7 scaled by that 96; 15 x the 6.5e-6 above), and an accuracy one prediction of the global
    batch, 1/40 (a near-tie in the logits may flip where they drift; none flipped on the Intel Xeon). The losses
    move by 5e-4 to 2e-2 relative from one iteration to the next, so a change in the method still fails."""
    inputs = {
        **block_inputs,
        "labels": one_super_cluster(block_inputs, tmp_path),
        "epochs": 1,
        "batch_size": 40,
        "checkpoint_every": 8,
        "dropout": 0.0,
    }
    runs = {tasks: tmp_path / f"{tasks}-ranks" for tasks in (4, 8)}
    for tasks, train_dir in runs.items():
        run_train(**local(tasks), train_dir=str(train_dir), out=str(train_dir / "ck.pt"), **inputs)
    logs = [p.read_text() for p in sorted((runs[8] / "submitit").glob("*_log.err"))]
    assert len(logs) == 8
    for rank, log in enumerate(logs):
        g, part = divmod(rank, 2)
        assert f"Layout(groups=4, group={g}, part={part}, parts=2)" in log
        assert f"rank {rank} holds sub-class heads [{g}] (part {part} of 2): {256 * 5 + 5} parameters" in log
        (own,) = runs[8].glob(f"last-group{g}-part{part}-*.pt")
        assert own.name == f"last-group{g}-part{part}-epoch1-batch0.pt"
        assert load_checkpoint(own)["sub_class"][f"{g}.1.weight"].shape == (5, 256)
    metrics = [pd.read_csv(train_dir / "metrics.tsv", sep="\t") for train_dir in runs.values()]
    for column in ("loss", "loss_super", "loss_sub"):
        np.testing.assert_allclose(metrics[1][column], metrics[0][column], rtol=1e-4, err_msg=column)
    for column in ("acc_super", "acc_sub"):
        np.testing.assert_allclose(metrics[1][column], metrics[0][column], rtol=0, atol=1 / 40, err_msg=column)
    whole, split = (block_weights(train_dir / "ck.pt") for train_dir in runs.values())
    assert split["heads.sub_class.0.1.weight"].shape == (5, 256)  # rank 0's part of W_0
    whole["heads.sub_class.0.1.weight"] = whole["heads.sub_class.0.1.weight"][:5]
    whole["heads.sub_class.0.1.bias"] = whole["heads.sub_class.0.1.bias"][:5]
    assert whole.keys() == split.keys()
    for key, tensor in whole.items():
        torch.testing.assert_close(split[key], tensor, rtol=1e-4, atol=1e-4)

    run_train(
        **allocation_settings(launcher="local", tasks=8, cpus_per_task=1),
        train_dir=str(runs[8]),
        out=str(runs[8] / "ck.pt"),
        **inputs,
    )
    assert "".join(p.read_text() for p in (runs[8] / "submitit").glob("*_log.err")).count("resuming round 1") == 8
    for key, tensor in block_weights(runs[8] / "ck.pt").items():
        assert torch.equal(tensor, split[key]), key


def test_a_resumed_log_purges_the_curves_past_its_resume_point(single_process, tmp_path: Path) -> None:
    """A block killed after writing iterations 0-5 but saving at 3 resumes at 3 and writes 3-5 again (other values):
    the running log and TensorBoard's curves both hold 0-2 of the first run, then 3-5 of the second, whatever the
    order of the two runs' events files' names."""
    from deepercluster.train.metrics import MetricsLog

    def rows(log: MetricsLog, iterations: range, loss: float) -> None:
        for i in iterations:
            log.write(round=1, epoch=0, iteration=i, lr=0.1, images_per_s=100.0, loss=loss + i, loss_super=loss)
        log.flush()

    rows(MetricsLog(tmp_path / "running-metrics.tsv", resume_at=0), range(6), loss=1.0)  # then killed
    # The killed run's events file named as if its process had a higher pid in the same second as the resumption's
    # (as in a kill right after a save): TensorBoard reads the files in name order.
    (killed,) = tmp_path.glob("events.out.tfevents.*")
    killed.rename(tmp_path / f"events.out.tfevents.{int(time.time()) + 1}.host.4194304.0")
    resumed = MetricsLog(tmp_path / "running-metrics.tsv", resume_at=3)
    rows(resumed, range(3, 6), loss=2.0)
    resumed.publish(tmp_path / "metrics.tsv")
    expected = [1.0, 2.0, 3.0, 5.0, 6.0, 7.0]
    assert pd.read_csv(tmp_path / "metrics.tsv", sep="\t")["loss"].tolist() == expected
    curves = tensorboard_curves(tmp_path)
    assert curves["loss"].index.tolist() == list(range(6)) and curves["loss"].tolist() == expected
    assert curves["loss_super"].tolist() == [1.0] * 3 + [2.0] * 3 and "loss_sub" not in curves  # absent: no curve
