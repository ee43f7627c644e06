"""The exported model (Sobel folded into conv1) against its checkpoint, on real Fashion-MNIST images,
for the small convnet, VGG-16-BN and AlexNet-BN; and the export rule on a real one-round run."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from deepercluster.checkpoints import initial_checkpoint, load_model
from deepercluster.data.images import IMAGENET_MEAN, ImageDataset, feature_transform, network_input
from deepercluster.files import sha256
from deepercluster.nn.models import build_model, fold_sobel
from deepercluster.report.export import export_model
from test_workflow import TEST_CONFIG, snakemake


def real_images(manifest: str, count: int, image_size: int) -> torch.Tensor:
    """The first ``count`` images of the manifest as the features stage sees them (normalised RGB)."""
    table = pd.read_parquet(manifest).head(count)
    dataset = ImageDataset(table, feature_transform(image_size))
    return network_input(torch.stack([dataset[i][0] for i in range(count)]), torch.device("cpu"))


def grey_border(images: torch.Tensor) -> torch.Tensor:
    """The images with their outermost pixel ring set to 0 (grey 0 after normalisation)."""
    inner = torch.zeros_like(images)
    inner[..., 1:-1, 1:-1] = images[..., 1:-1, 1:-1]
    return inner


def exported(checkpoint: str, out: Path, image_size: int) -> tuple[dict, torch.nn.Module]:
    """The export of ``checkpoint``, read with weights_only, and loaded strictly into the README's builder."""
    export_model(checkpoint=checkpoint, out=str(out), image_size=image_size)
    export = torch.load(out, weights_only=True)
    model = build_model(export["arch"], sobel=False, folded_sobel=export["folded_sobel"])
    model.load_state_dict(export["state_dict"], strict=True)
    return export, model.eval()


def assert_conv1_differs_only_on_its_border(original: torch.nn.Module, folded: torch.nn.Module, x: torch.Tensor):
    with torch.no_grad():
        before, after = original.features[0](original.sobel(x)), folded.features[0](x)
    assert before.shape == after.shape
    difference = (before - after).abs()
    assert difference[..., 1:-1, 1:-1].max() < 1e-4 * before.abs().max()
    assert difference.max() > 1e-2 * before.abs().max()  # the outermost row/column: see fold_sobel


def test_export_of_a_sobel_checkpoint_computes_the_same_feature_on_real_images(real_data, tmp_path: Path) -> None:
    original, _ = load_model(real_data.checkpoint)
    original.eval()
    export, model = exported(real_data.checkpoint, tmp_path / "model.pth", image_size=32)
    assert (export["arch"], export["folded_sobel"], export["feature_dim"], export["image_size"]) == (
        "small_convnet",
        True,
        256,
        32,
    )
    assert export["mean"].tolist() == pytest.approx(IMAGENET_MEAN) and export["std"].shape == (3,)
    assert export["provenance"]["checkpoint_sha256"] == sha256(real_data.checkpoint)
    assert model.sobel is None and model.features[0].weight.shape == (32, 3, 5, 5)

    images = real_images(real_data.manifest, 64, 32)
    assert_conv1_differs_only_on_its_border(original, model, images)
    with torch.no_grad():
        inside = grey_border(images)
        torch.testing.assert_close(model(inside), original(inside), rtol=1e-5, atol=1e-5)
        # On the raw images, the border outputs of conv1 change the feature (Fashion-MNIST's black background
        # is far from grey 0 once normalised): close in direction, not equal.
        similarity = torch.nn.functional.cosine_similarity(model(images), original(images))
    assert 0.9 < similarity.min() < 0.9999


@pytest.mark.parametrize(("arch", "kernel"), [("vgg16_bn", 5), ("alexnet_bn", 13)])
def test_vgg16_and_alexnet_exports_load_strictly_and_agree_at_224_px(real_data, tmp_path: Path, arch, kernel) -> None:
    checkpoint = str(tmp_path / "checkpoint.pt")
    initial_checkpoint(arch=arch, sobel=True, seed=0, out=checkpoint)
    original, _ = load_model(checkpoint)
    original.eval()
    _, model = exported(checkpoint, tmp_path / "model.pth", image_size=224)
    assert model.features[0].weight.shape[1:] == (3, kernel, kernel)
    assert model.features[0].padding[0] == original.features[0].padding[0] + 1

    images = real_images(real_data.manifest, 2, 224)
    assert_conv1_differs_only_on_its_border(original, model, images)
    with torch.no_grad():
        inside = grey_border(images)
        torch.testing.assert_close(model(inside), original(inside), rtol=1e-4, atol=1e-5)


def test_a_model_without_sobel_has_nothing_to_fold() -> None:
    with pytest.raises(ValueError, match="no Sobel layer"):
        fold_sobel(build_model("small_convnet", sobel=False))
    with pytest.raises(ValueError, match="pass sobel=False"):
        build_model("small_convnet", sobel=True, folded_sobel=True)


def test_the_export_rule_builds_from_the_round_checkpoint(tmp_path: Path) -> None:
    # RotNet: round 1 is the init and one training block, no clustering stages (the fastest real round).
    methods = yaml.safe_load(TEST_CONFIG.read_text())["methods"]
    run = snakemake(
        tmp_path,
        "results/export/round-1.pth",
        method="rotnet",
        launcher="debug",
        methods={**methods, "rotnet": {"rounds": 1, "epochs_per_round": 1}},
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "rule export:" in run.stderr and "rule summary:" not in run.stderr
    round_1 = tmp_path / "results/rounds/1/checkpoint.pt"
    export = torch.load(tmp_path / "results/export/round-1.pth", weights_only=True)
    assert export["provenance"]["checkpoint_sha256"] == sha256(round_1) and export["image_size"] == 32
    folded = fold_sobel(load_model(round_1)[0]).state_dict()
    assert export["state_dict"].keys() == folded.keys()
    assert all(torch.equal(export["state_dict"][key], value) for key, value in folded.items())
    assert (tmp_path / "results/logs/export/round-1.log").is_file()
