"""The evaluations on real Fashion-MNIST images, checked against independent computations
(scikit-learn's k-NN, NMI and average precision), and run by Snakemake on a tiny real run."""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image
from sklearn.metrics import average_precision_score, normalized_mutual_info_score
from sklearn.neighbors import KNeighborsClassifier

from deepercluster.checkpoints import load_model
from deepercluster.cluster.levels import cluster_flat
from deepercluster.cluster.pca import fit_pca, fit_whitening
from deepercluster.data.images import feature_transform, network_input
from deepercluster.data.manifest import join_evaluation
from deepercluster.errors import CheckpointError, EvaluationError
from deepercluster.evaluate.backbone import conv_activations, frozen_backbone, labelled_roles
from deepercluster.evaluate.clusters import cluster_grid, dominant_values
from deepercluster.evaluate.common import average_precision, bootstrap_interval
from deepercluster.evaluate.compare import compare
from deepercluster.evaluate.external import import_checkpoint
from deepercluster.evaluate.knn import knn, knn_predict
from deepercluster.evaluate.linear import (
    CHECK_EVERY,
    activation_shapes,
    fit_logistic,
    linear_probe,
    probe_features,
    probe_pools,
    standardise,
)
from deepercluster.evaluate.nmi import cluster_nmi, seeded_clusterings
from deepercluster.evaluate.paired import class_groups, gain_changes, paired_table
from deepercluster.evaluate.paired import main as paired_main
from deepercluster.evaluate.retrieval import (
    image_regions,
    region_vectors,
    retrieval,
    rmac,
    rmac_regions,
)
from deepercluster.evaluate.voc07 import class_average_precisions, crop_scores, fine_tune, image_paths, read_voc, voc07
from deepercluster.features import extract_all
from deepercluster.files import sha256
from deepercluster.formats import features as features_format
from deepercluster.formats.evals import ids_fingerprint, pack_correct, unpack_correct, write_json
from deepercluster.formats.manifest import read_manifest, write_manifest
from deepercluster.nn.models import build_model
from defaults import eval_settings, feature_settings, kmeans_settings, pca_settings

pytestmark = pytest.mark.usefixtures("single_process")


def linear_settings(**changes: object) -> dict[str, object]:
    """eval-linear's settings as the rule passes them, from the schema's defaults."""
    evaluation = eval_settings()
    return {
        "label_column": evaluation["label_column"],
        "weight_decays": evaluation["probe_weight_decays"],
        "max_iterations": evaluation["probe_iterations"],
        "seed": 0,
        **changes,
    }


REPO = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
VOC_CLASSES = {"Trouser": "trouser", "Bag": "bag", "Sneaker": "sneaker", "Dress": "dress"}


@pytest.fixture(scope="module")
def eval_manifest(real_data, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The evaluation manifest of the 600 real images as the eval_manifest rule makes it: 480 train images (what
    the probes learn from, the k-NN remembers), 120 test images (what every evaluation scores)."""
    folder = tmp_path_factory.mktemp("eval-manifest")
    images = read_manifest(real_data.manifest)
    for role, rows in (("train", images.iloc[:480]), ("test", images.iloc[480:])):
        rows.to_parquet(folder / f"{role}.parquet")
    join_evaluation(
        train=str(folder / "train.parquet"), test=str(folder / "test.parquet"), out=str(folder / "manifest.parquet")
    )
    return str(folder / "manifest.parquet")


@pytest.fixture(scope="module")
def features_file(real_data, eval_manifest: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The features of every evaluation image, as the eval_features rule makes them."""
    out = str(tmp_path_factory.mktemp("eval") / "features.h5")
    extract_all(manifest=eval_manifest, checkpoint=real_data.checkpoint, out=out, **feature_settings())
    return out


@pytest.fixture(scope="module")
def probe_cache(real_data, eval_manifest: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The probe features of every evaluation image, as the eval_probe_features rule makes them."""
    out = str(tmp_path_factory.mktemp("probe") / "probe_features.h5")
    probe_features(checkpoint=real_data.checkpoint, manifest=eval_manifest, out=out, **feature_settings())
    return out


def test_the_evaluation_manifest_holds_the_train_images_then_the_test_images(real_data, eval_manifest) -> None:
    joined, images = read_manifest(eval_manifest), read_manifest(real_data.manifest)
    assert joined["id"].tolist() == list(range(600)) and joined["path"].tolist() == images["path"].tolist()
    assert joined["eval_split"].tolist() == ["train"] * 480 + ["test"] * 120
    assert joined["label"].tolist() == images["label"].tolist()


@pytest.fixture(scope="module")
def clusters_files(real_data, features_file: str, tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """Two k-means clusterings of those features (k=8 and k=5), as the eval_pca and eval_kmeans rules make them."""
    folder = tmp_path_factory.mktemp("eval-clusters")
    pca = str(folder / "pca.h5")
    fit_pca(shards=[features_file], checkpoint=real_data.checkpoint, out=pca, **pca_settings(dim=32))
    outputs = []
    with pytest.MonkeyPatch.context() as patch:  # a world of one (the function-scoped single_process comes later)
        for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_NTASKS", "SLURM_PROCID"):
            patch.delenv(name, raising=False)
        for k in (8, 5):
            outputs.append(str(folder / f"clusters-{k}.h5"))
            cluster_flat(features=features_file, pca=pca, out=outputs[-1], k=k, **kmeans_settings(iterations=5, seed=k))
    return outputs


def test_probe_dims_are_reference_tables() -> None:
    """REFERENCE.md's pooled dims for VGG-16 and AlexNet at 224 px (shapes only, on the meta device)."""
    expected = {
        "vgg16_bn": [9216, 9216, 8192, 8192, 9216, 9216, 9216, 8192, 8192, 8192, 8192, 8192, 8192],
        "alexnet_bn": [9600, 9216, 9600, 9600, 9216],
    }
    for arch, dims in expected.items():
        with torch.device("meta"):
            model = build_model(arch, sobel=True)
        assert [dim for _, dim in probe_pools(activation_shapes(model, 224))] == dims, arch
    small = probe_pools(activation_shapes(build_model("small_convnet", sobel=True), 32))
    assert [dim for _, dim in small] == [9248, 9216, 8192]


def test_probe_features_are_each_conv_layers_pooled_activations(real_data, eval_manifest, probe_cache) -> None:
    model, _ = frozen_backbone(real_data.checkpoint)
    manifest = read_manifest(eval_manifest)
    picked = [0, 137, 599]
    pixels = torch.stack([feature_transform(32)(Image.open(manifest["path"][i]).convert("RGB")) for i in picked])
    images = network_input(pixels, torch.device("cpu"))
    with torch.no_grad():
        activations = conv_activations(model, images)
    with h5py.File(probe_cache) as f:
        assert list(f.attrs["layers"]) == ["conv1", "conv2", "conv3"] and list(f.attrs["pools"]) == [17, 12, 8]
        assert np.array_equal(f["ids"][:], manifest["id"])
        pools = [(17, 9248), (12, 9216), (8, 8192)]
        for name, activation, (s, dim) in zip(f.attrs["layers"], activations, pools, strict=True):
            expected = torch.nn.functional.adaptive_avg_pool2d(activation, s).flatten(1).numpy()
            assert f[f"pooled/{name}"].shape == (600, dim) and f[f"pooled/{name}"].dtype == np.float16
            np.testing.assert_allclose(f[f"pooled/{name}"][picked], expected, rtol=2e-3, atol=2e-3)
            channels = activation.mean((2, 3)).numpy()  # the global average of each channel
            assert f[f"channels/{name}"].shape == (600, activation.shape[1])
            np.testing.assert_allclose(f[f"channels/{name}"][picked], channels, rtol=2e-3, atol=2e-3)


def test_probe_layers_are_read_and_standardised_a_block_at_a_time(probe_cache, monkeypatch) -> None:
    """Read in blocks of 7 rows into one array, any ids in any order come back as the file's rows; standardised in
    blocks and in place, the copies are what one float64 pass over the whole array gives."""
    monkeypatch.setattr(features_format, "BLOCK_BYTES", 7 * 4 * 9248)
    with h5py.File(probe_cache) as f:
        stored, ids = f["pooled/conv1"][:].astype(np.float32), f["ids"][:]
    wanted = np.random.default_rng(0).permutation(len(ids))[:450]
    x = features_format.read_probe_layer(probe_cache, "pooled/conv1", ids[wanted])
    assert x.dtype == np.float32 and np.array_equal(x, stored[wanted])

    train, test = np.arange(0, 450, 2), np.arange(1, 450, 2)[::-1]
    x[:, 5] = 3.0  # a constant dim: 0 after, not NaN
    mean, std = x[train].mean(0, dtype=np.float64), x[train].std(0, dtype=np.float64)
    scale = np.where(std > 1e-6, 1 / np.maximum(std, 1e-6), 0.0)
    for got, rows in zip(standardise(x, train, test), (train, test), strict=True):
        assert got.dtype == np.float32 and got.shape == (len(rows), 9248)
        np.testing.assert_allclose(got, (x[rows] - mean) * scale, rtol=1e-5, atol=1e-5)
        assert not got[:, 5].any()


@pytest.fixture(scope="module")
def linear_folder(eval_manifest, probe_cache, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The random init's linear.json and linear.png on the 600-image evaluation manifest."""
    folder = tmp_path_factory.mktemp("linear")
    linear_probe(
        features=probe_cache,
        manifest=eval_manifest,
        out=str(folder / "linear.json"),
        plot=str(folder / "linear.png"),
        **linear_settings(weight_decays=[1e-2, 1e-1]),
    )
    return folder


def test_linear_probe_converges_to_the_optimum_scikit_learn_finds(eval_manifest, probe_cache, linear_folder) -> None:
    from sklearn.linear_model import LogisticRegression

    plot = linear_folder / "linear.png"
    result = json.loads((linear_folder / "linear.json").read_text())
    assert [(layer["pooling"], layer["layer"]) for layer in result["layers"]] == [
        (pooling, f"conv{i}") for pooling in ("channels", "pooled") for i in (1, 2, 3)
    ]
    assert [layer["dim"] for layer in result["layers"]] == [32, 64, 128, 9248, 9216, 8192]
    assert (result["train_images"], result["test_images"], result["classes"]) == (480, 120, 10)
    for layer in result["layers"]:
        # Even a random-init backbone's conv features separate Fashion-MNIST far above chance (10%).
        assert 0.5 < layer["top1"] <= 1.0 and layer["converged"], layer
        assert set(layer["selection_top1"]) == {"0.01", "0.1"} and layer["weight_decay"] in (1e-2, 1e-1)
        low, high = layer["ci95"]
        assert low < layer["top1"] < high and high - low < 0.25
        assert unpack_correct(layer["test_correct"], 120).mean() == layer["top1"]
    assert plot.read_bytes().startswith(PNG_MAGIC)

    # The solver reaches scikit-learn's optimum of the same objective (C = 1 / (weight decay x images)), on
    # 256 of conv3's dims to keep scikit-learn fast.
    data = labelled_roles(eval_manifest, "label")
    assert result["test_ids_sha256"] == ids_fingerprint(data.ids[~data.train])
    with h5py.File(probe_cache) as f:
        x = f["pooled/conv3"][:, :256].astype(np.float32)
    train, val = map(torch.from_numpy, standardise(x, np.flatnonzero(data.train), np.flatnonzero(~data.train)))
    weight, bias, iterations = fit_logistic(train, torch.from_numpy(data.targets[data.train]), 10, 1e-2, 500)
    reference = LogisticRegression(C=1 / (1e-2 * len(train)), max_iter=2000, tol=1e-8)
    reference.fit(train.double().numpy(), data.targets[data.train])
    assert iterations < 500
    np.testing.assert_allclose(weight.numpy(), reference.coef_, atol=2e-3)
    ours = F.linear(val, weight, bias).argmax(1).numpy()
    assert np.mean(ours == reference.predict(val.double().numpy())) >= 119 / 120

    # Told to watch a held-out set, the probe stops once that set's top-1 stops moving: on a check,
    # before the optimum, with the top-1 it has at the optimum (to one image in 120).
    val_y = torch.from_numpy(data.targets[~data.train])
    early_weight, early_bias, early = fit_logistic(
        train, torch.from_numpy(data.targets[data.train]), 10, 1e-2, 500, held_out=(val, val_y)
    )
    assert early % CHECK_EVERY == 0 and early < iterations, (early, iterations)
    assert (
        abs(
            np.mean(F.linear(val, early_weight, early_bias).argmax(1).numpy() == data.targets[~data.train])
            - np.mean(ours == data.targets[~data.train])
        )
        <= 1 / 120
    )


def with_flipped(evaluation: dict, probe: tuple[str, str], wrong_to_right: int) -> dict:
    """A copy of ``evaluation`` whose probe got ``wrong_to_right`` more test images right, its top-1 to match."""
    changed = copy.deepcopy(evaluation)
    layer = next(p for p in changed["layers"] if (p["layer"], p["pooling"]) == probe)
    correct = unpack_correct(layer["test_correct"], changed["test_images"])
    correct[np.flatnonzero(~correct)[:wrong_to_right]] = True
    layer["test_correct"], layer["top1"] = pack_correct(correct), float(correct.mean())
    return changed


def test_a_paired_difference_resolves_a_gain_the_rows_own_intervals_cannot(linear_folder, tmp_path, capsys) -> None:
    """Six more of 120 test images right (+5 points) on conv3's channels: the rows' own 95% intervals overlap, the
    paired bootstrap's excludes 0; a row equal to the reference differs by exactly 0, unresolved."""
    real = json.loads((linear_folder / "linear.json").read_text())
    for name, evaluation in (("better", with_flipped(real, ("conv3", "channels"), 6)), ("same", real)):
        for seed in (0, 1):
            (tmp_path / f"{name}-{seed}").mkdir()
            write_json(tmp_path / f"{name}-{seed}" / "linear.json", evaluation)
    rows = {name: [str(tmp_path / f"{name}-{seed}") for seed in (0, 1)] for name in ("same", "better")}
    table = paired_table({"reference": [str(linear_folder)], **rows}, "reference").set_index(
        ["layer", "pooling", "row"]
    )
    better, reference = table.loc[("conv3", "channels", "better")], table.loc[("conv3", "channels", "reference")]
    assert better["difference"] == pytest.approx(6 / 120) and better["resolved"]
    own = {
        name: bootstrap_interval(unpack_correct(p["test_correct"], 120), 0)
        for name, e in (("better", with_flipped(real, ("conv3", "channels"), 6)), ("reference", real))
        for p in e["layers"]
        if (p["layer"], p["pooling"]) == ("conv3", "channels")
    }
    assert own["better"][0] < own["reference"][1], own  # unpaired: the intervals overlap
    assert 0 < better["low"] < 6 / 120 < better["high"] and reference["top1"] == real["layers"][2]["top1"]
    assert not table.loc[("conv1", "channels", "better")]["resolved"]  # the flipped probe is conv3's alone
    same = table.xs("same", level="row")
    assert (same[["difference", "low", "high"]] == 0).all().all() and not same["resolved"].any()

    paired_main(
        ["--row", f"reference={linear_folder}", "--row", f"better={','.join(rows['better'])}", "--against", "reference"]
    )
    printed = capsys.readouterr().out.splitlines()
    assert any(
        line.startswith("| conv3 (channels) | all | better | 2 | ") and line.endswith("| yes |") for line in printed
    )


def test_paired_splits_the_test_images_by_the_pools_head_and_tail_classes(
    eval_manifest, linear_folder, tmp_path
) -> None:
    """A pool long-tailed by hand (every train image of five classes, one of each other): those five are the head;
    the six flipped images' +5 points split between head and tail in proportion to where they fall."""
    frame = read_manifest(eval_manifest)
    frame = frame[frame["eval_split"] == "train"]
    head = sorted(frame["label"].unique())[:5]
    pool = pd.concat([frame[frame["label"].isin(head)], frame[~frame["label"].isin(head)].groupby("label").head(1)])
    write_manifest(tmp_path / "pool.parquet", pool.reset_index(drop=True))
    fingerprint, masks = class_groups(str(tmp_path / "pool.parquet"), eval_manifest, "label")
    data = labelled_roles(eval_manifest, "label")
    test_labels = np.array(data.classes)[data.targets[~data.train]]
    assert fingerprint == json.loads((linear_folder / "linear.json").read_text())["test_ids_sha256"]
    assert np.array_equal(masks["head"], np.isin(test_labels, head)) and np.array_equal(masks["tail"], ~masks["head"])

    real = json.loads((linear_folder / "linear.json").read_text())
    write_json(tmp_path / "linear.json", with_flipped(real, ("conv3", "channels"), 6))
    table = paired_table(
        {"reference": [str(linear_folder)], "better": [str(tmp_path)]}, "reference", 0, (fingerprint, masks)
    )
    better = table[(table["row"] == "better") & (table["layer"] == "conv3") & (table["pooling"] == "channels")]
    gained = {
        line.images: line.difference * (masks[line.images].sum())
        for line in better.itertuples()
        if line.images != "all"
    }
    assert gained["head"] + gained["tail"] == pytest.approx(6) and better.set_index("images")["difference"][
        "all"
    ] == pytest.approx(6 / 120)


def test_a_gain_change_is_one_gain_minus_another_on_the_same_test_images(linear_folder, tmp_path, capsys) -> None:
    """Row 'late' gains 6 of 120 test images over the reference on conv3's channels, row 'early' 2 (taken from the
    same 6): the change of gain is +4 of 120, resolved (the four rows drawn on the same images, only 4 images can
    move it); a row's gain against itself changes by exactly 0; a change naming no row is refused in one line."""
    real = json.loads((linear_folder / "linear.json").read_text())
    rows = {"reference": [str(linear_folder)]}
    for name, flipped in (("late", 6), ("early", 2)):
        (tmp_path / name).mkdir()
        write_json(tmp_path / name / "linear.json", with_flipped(real, ("conv3", "channels"), flipped))
        rows[name] = [str(tmp_path / name)]
    changes = {"grows": ("late", "reference", "early", "reference"), "none": ("late", "late", "early", "early")}
    table = gain_changes(rows, changes).set_index(["layer", "pooling", "change"])
    grows = table.loc[("conv3", "channels", "grows")]
    assert grows["difference"] == pytest.approx(4 / 120) and 0 < grows["low"] <= 4 / 120 <= grows["high"]
    assert grows["resolved"] and not table.loc[("conv2", "channels", "grows")]["resolved"]
    assert (table.xs("none", level="change")[["difference", "low", "high"]] == 0).all().all()
    with pytest.raises(EvaluationError, match=r"^--gain-change x names late40, not a row: give each with --row$"):
        gain_changes(rows, {"x": ("late40", "reference", "early", "reference")})

    arguments = [f"--row={name}={folders[0]}" for name, folders in rows.items()]
    paired_main([*arguments, "--against", "reference", "--gain-change", "grows=late-reference,early-reference"])
    printed = capsys.readouterr().out.splitlines()
    assert "| conv3 (channels) | all | grows: (late - reference) - (early - reference) | +3.3 [" in "".join(printed)
    with pytest.raises(SystemExit):
        paired_main([*arguments, "--against", "reference", "--gain-change", "grows=late-reference"])


def test_paired_refuses_probes_of_other_test_images_or_without_their_results(linear_folder, tmp_path) -> None:
    real = json.loads((linear_folder / "linear.json").read_text())
    for name, evaluation in (
        ("other", {**real, "test_ids_sha256": "0" * 64}),
        ("old", {key: value for key, value in real.items() if key != "test_ids_sha256"}),
    ):
        (tmp_path / name).mkdir()
        write_json(tmp_path / name / "linear.json", evaluation)
    with pytest.raises(EvaluationError, match="scored different test images"):
        paired_table({"a": [str(linear_folder)], "b": [str(tmp_path / "other")]}, "a")
    with pytest.raises(SystemExit, match=r"old/linear.json keeps no test image's result .* delete it and rerun"):
        paired_main(["--row", f"a={linear_folder}", "--row", f"b={tmp_path / 'old'}", "--against", "a"])


def test_frozen_backbone_keeps_batchnorm_statistics(real_data) -> None:
    model, _ = frozen_backbone(real_data.checkpoint)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    activations = conv_activations(model, torch.randn(8, 3, 32, 32))
    assert [tuple(a.shape[1:]) for a in activations] == [(32, 32, 32), (64, 16, 16), (128, 8, 8)]
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_knn_matches_scikit_learn_on_the_test_images(eval_manifest, features_file, probe_cache, tmp_path) -> None:
    out = tmp_path / "knn.json"
    knn(
        manifest=eval_manifest,
        features=features_file,
        probe_features=probe_cache,
        out=str(out),
        k=20,
        seed=0,
        label_column="label",
    )
    result = json.loads(out.read_text())
    assert (result["k"], result["train_images"], result["test_images"], result["classes"]) == (20, 480, 120, 10)
    assert [(layer["layer"], layer["pooling"]) for layer in result["layers"]] == [
        ("penultimate", "feature"),
        ("conv1", "channels"),
        ("conv2", "channels"),
        ("conv3", "channels"),
    ]

    manifest = read_manifest(eval_manifest)
    train, labels = (manifest["eval_split"] == "train").to_numpy(), manifest["label"].to_numpy()
    with h5py.File(features_file) as f:
        penultimate = f["features"][:][np.searchsorted(f["ids"][:], manifest["id"])]
    with h5py.File(probe_cache) as f:
        conv3 = f["channels/conv3"][:].astype(np.float32)
    for x, layer in ((penultimate, result["layers"][0]), (conv3, result["layers"][3])):
        x = (x - x[train].mean(0)) / np.where(x[train].std(0) > 1e-6, x[train].std(0), np.inf)
        reference = KNeighborsClassifier(n_neighbors=20, metric="cosine", algorithm="brute").fit(
            x[train], labels[train]
        )
        assert layer["top1"] == pytest.approx(np.mean(reference.predict(x[~train]) == labels[~train]), abs=2 / 120)
        assert layer["ci95"][0] < layer["top1"] < layer["ci95"][1]
    classes = sorted(set(labels))
    targets = np.searchsorted(classes, labels)
    assert np.array_equal(knn_predict(conv3, targets, conv3, 1, len(classes)), targets)  # each row's nearest: itself


def test_nmi_is_the_mean_over_seeds_per_column_and_across_rounds(
    real_data, eval_manifest, features_file: str, tmp_path
) -> None:
    pcas = [str(tmp_path / f"pca-{dim}.h5") for dim in (32, 16)]
    for pca, dim in zip(pcas, (32, 16), strict=True):
        fit_pca(shards=[features_file], checkpoint=real_data.checkpoint, out=pca, **pca_settings(dim=dim))
    out, plot = tmp_path / "nmi.json", tmp_path / "nmi.png"
    cluster_nmi(
        manifest=eval_manifest,
        features=[features_file] * 2,
        pcas=pcas,
        out=str(out),
        plot=str(plot),
        k=5,
        seeds=3,
        iterations=5,
        seed=0,
        first_round=3,
    )
    result = json.loads(out.read_text())
    manifest = read_manifest(eval_manifest).set_index("id")
    test = manifest.index[manifest["eval_split"] == "test"].to_numpy()
    assert (result["k"], result["images"], result["seeds"]) == (5, 120, 3)  # the test images only
    assert [r["round"] for r in result["rounds"]] == [3, 4]
    # Columns constant over the test images say nothing: eval_split, and split here, are left out.
    assert set(result["nmi"]) == {"label", "previous_round"} | (
        {"split"} if manifest.loc[test, "split"].nunique() > 1 else set()
    )
    clusterings = [seeded_clusterings(features_file, pca, 5, 3, 5, seed=0, ids=test) for pca in pcas]
    assert not clusterings[0][0].equals(clusterings[0][1])  # the seeds give different clusterings
    for row, seeded in zip(result["rounds"], clusterings, strict=True):
        for column in set(row["nmi"]) - {"previous_round"}:
            scores = [normalized_mutual_info_score(manifest.loc[a.index, column], a) for a in seeded]
            assert row["nmi"][column] == pytest.approx(np.mean(scores), abs=1e-12)
            assert row["nmi_sd"][column] == pytest.approx(np.std(scores), abs=1e-12)
    assert result["rounds"][0]["nmi"]["previous_round"] is None
    across = [normalized_mutual_info_score(a.sort_index(), b.sort_index()) for a, b in zip(*clusterings, strict=True)]
    assert result["nmi"]["previous_round"] == pytest.approx(np.mean(across), abs=1e-12)
    assert 0 < result["nmi"]["label"] < 1 and result["nmi_sd"]["label"] > 0 and plot.read_bytes().startswith(PNG_MAGIC)

    single = tmp_path / "single.json"
    cluster_nmi(
        manifest=eval_manifest,
        features=[features_file],
        pcas=pcas[:1],
        out=str(single),
        plot=str(plot),
        k=5,
        seeds=3,
        iterations=5,
        seed=0,
    )
    assert json.loads(single.read_text())["rounds"] is None


def test_cluster_grid_shows_random_clusters_with_their_dominant_value(real_data, clusters_files, tmp_path) -> None:
    out = tmp_path / "clusters.png"
    cluster_grid(manifest=real_data.manifest, clusters=clusters_files[0], out=str(out), shown=4, seed=0)
    with Image.open(out) as image:
        assert image.format == "PNG" and image.width > 400 and image.height > 200
    members = pd.DataFrame({"label": ["Bag", "Bag", "Dress", "Bag"], "split": ["test", "train", "train", "train"]})
    assert dominant_values(members, ["label", "split"]) == ["label: Bag (75%)", "split: train (75%)"]


def test_a_plain_state_dict_is_wrapped_into_our_format(real_data, tmp_path: Path) -> None:
    model, _ = load_model(real_data.checkpoint)
    state = model.state_dict()
    # DataParallel prefixes, DeepCluster's training head and no Sobel weights: all undone by name.
    plain = {f"module.{k}": v for k, v in state.items() if not k.startswith("sobel.")}
    plain["top_layer.weight"] = torch.zeros(3, 256)
    torch.save({"state_dict": plain, "epoch": 7}, tmp_path / "plain.pt")
    out = tmp_path / "wrapped.pt"
    import_checkpoint(source=str(tmp_path / "plain.pt"), out=str(out), arch="small_convnet", sobel=True)
    wrapped, checkpoint = load_model(out)
    assert (checkpoint["arch"], checkpoint["sobel"]) == ("small_convnet", True)
    assert all(torch.equal(wrapped.state_dict()[k], v) for k, v in state.items())

    with pytest.raises(CheckpointError, match="arch and sobel"):
        import_checkpoint(source=str(tmp_path / "plain.pt"), out=str(tmp_path / "x.pt"), arch=None, sobel=True)
    with pytest.raises(CheckpointError, match="alexnet_bn"):
        import_checkpoint(source=str(tmp_path / "plain.pt"), out=str(tmp_path / "x.pt"), arch="alexnet_bn", sobel=True)
    # One of ours is copied as it is; a contradicting arch in its entry is an error.
    import_checkpoint(source=real_data.checkpoint, out=str(tmp_path / "ours.pt"), arch=None, sobel=True)
    assert sha256(tmp_path / "ours.pt") == sha256(real_data.checkpoint)
    with pytest.raises(CheckpointError, match="vgg16_bn"):
        import_checkpoint(source=real_data.checkpoint, out=str(tmp_path / "x.pt"), arch="vgg16_bn", sobel=True)
    assert not (tmp_path / "x.pt").exists()


def test_average_precision_matches_scikit_learn() -> None:
    rng = np.random.default_rng(0)
    for trial in range(200):
        n = int(rng.integers(2, 60))
        scores = rng.normal(size=n).round(1 if trial % 2 else 6)  # every other trial with many ties
        relevant = rng.random(n) < rng.uniform(0.05, 0.9)
        if not relevant.any():
            assert np.isnan(average_precision(scores, relevant))
            continue
        assert average_precision(scores, relevant) == pytest.approx(
            average_precision_score(relevant, scores), abs=1e-12
        )


def test_voc_class_aps_leave_out_difficult_images() -> None:
    rng = np.random.default_rng(1)
    scores, targets = rng.random((50, 3)), rng.choice([-1, 1, 0], size=(50, 3), p=[0.6, 0.3, 0.1])
    targets[:, 2] = -1  # a class without any positive has no AP
    ap = class_average_precisions(scores, targets, ["a", "b", "c"])
    for c, name in enumerate("ab"):
        known = targets[:, c] != 0
        assert ap[name] == pytest.approx(average_precision_score(targets[known, c] > 0, scores[known, c]), abs=1e-12)
    assert ap["c"] is None


def make_voc(root: Path, manifest: pd.DataFrame, per_split: dict[str, int]) -> Path:
    """A VOC 2007-layout folder of JPEGs from Fashion-MNIST images of 4 classes: JPEGImages/,
    ImageSets/Main/{class}_{split}.txt with 1 / -1 per image (and a few 0 = difficult)."""
    rows = manifest[manifest["label"].isin(list(VOC_CLASSES))].reset_index(drop=True)
    (root / "JPEGImages").mkdir(parents=True)
    (root / "ImageSets" / "Main").mkdir(parents=True)
    start = 0
    for split, count in per_split.items():
        part = rows.iloc[start : start + count]
        start += count
        for _, row in part.iterrows():
            with Image.open(row["path"]) as image:
                image.convert("RGB").save(root / "JPEGImages" / f"{row['id']:06d}.jpg")
        difficult = np.arange(len(part)) % 5 == 0
        for label, name in VOC_CLASSES.items():
            flags = np.where(part["label"] == label, 1, -1)
            flags[difficult & (flags < 0)] = 0  # a few negatives marked difficult (0)
            lines = [f"{image_id:06d} {flag:2d}" for image_id, flag in zip(part["id"], flags, strict=True)]
            (root / "ImageSets" / "Main" / f"{name}_{split}.txt").write_text("\n".join(lines) + "\n")
    return root


def make_retrieval_list(folder: Path, manifest: pd.DataFrame) -> Path:
    """A retrieval CSV (path relative to its folder, role, group = the class) from Fashion-MNIST images."""
    roles = ["query"] * 12 + ["database"] * 120 + ["whitening"] * 100
    rows = manifest.iloc[: len(roles)]
    folder.mkdir(parents=True, exist_ok=True)
    table = pd.DataFrame(
        {"path": [os.path.relpath(p, folder) for p in rows["path"]], "role": roles, "group": rows["label"].tolist()}
    )
    table.to_csv(folder / "retrieval.csv", index=False)
    return folder / "retrieval.csv"


def test_voc07_trains_fc6_8_and_all_on_a_tiny_layout(real_data, tmp_path: Path) -> None:
    manifest = read_manifest(real_data.manifest)
    voc = make_voc(tmp_path / "voc", manifest, {"train": 40, "val": 20, "test": 40})
    trainval, test = read_voc(str(voc))
    assert list(trainval.columns) == sorted(VOC_CLASSES.values()) and (len(trainval), len(test)) == (60, 40)
    assert set(np.unique(trainval.to_numpy())) == {-1, 0, 1}

    out = tmp_path / "voc07.json"
    voc07(
        voc=str(voc),
        checkpoint=real_data.checkpoint,
        out=str(out),
        epochs=3,
        batch_size=16,
        seed=0,
        lr=0.01,
        weight_decay=1e-4,
        image_size=32,
        workers=0,
    )
    result = json.loads(out.read_text())
    assert result["crops"] == 10 and result["test_images"] == 40
    for setting in ("fc6_8", "all"):
        ap = result[setting]["ap"]
        assert set(ap) == set(VOC_CLASSES.values()) and all(0 < v <= 1 for v in ap.values())
        # The same classifier again (seeded), its test scores ranked by scikit-learn over each class's
        # non-difficult images: the APs and their mean.
        model, head = fine_tune(
            real_data.checkpoint,
            setting,
            image_paths(str(voc), trainval),
            trainval.to_numpy(np.float32),
            image_size=32,
            epochs=3,
            batch_size=16,
            lr=0.01,
            weight_decay=1e-4,
            seed=0,
            workers=0,
        )
        scores = crop_scores(model, head, image_paths(str(voc), test), 32, 16, 0, 0)
        expected = {}
        for c, name in enumerate(trainval.columns):
            known = test[name].to_numpy() != 0
            expected[name] = average_precision_score(test[name].to_numpy()[known] > 0, scores[known, c])
        assert ap == pytest.approx(expected, abs=1e-9)
        assert result[setting]["mAP"] == pytest.approx(np.mean(list(expected.values())), abs=1e-9)

    # FC6-8 trains the classifier only; ALL trains the convs too; the Sobel filter never trains.
    reference, _ = load_model(real_data.checkpoint)
    paths = [str(voc / "JPEGImages" / f"{i}.jpg") for i in trainval.index[:16]]
    options = {"image_size": 32, "epochs": 1, "batch_size": 8, "lr": 0.05, "weight_decay": 0.0, "seed": 0, "workers": 0}
    for setting, convs_move in (("fc6_8", False), ("all", True)):
        tuned, _ = fine_tune(real_data.checkpoint, setting, paths, trainval.to_numpy(np.float32)[:16], **options)
        new, old = tuned.state_dict(), reference.state_dict()
        assert torch.equal(new["features.0.weight"], old["features.0.weight"]) != convs_move, setting
        assert torch.equal(new["features.1.running_mean"], old["features.1.running_mean"]) != convs_move, setting
        assert not torch.equal(new["classifier.1.weight"], old["classifier.1.weight"]), setting
        assert torch.equal(new["sobel.sobel.weight"], old["sobel.sobel.weight"]), setting


def test_rmac_regions_of_known_maps() -> None:
    square = rmac_regions(8, 8)
    assert len(square) == 1 + 4 + 9
    assert square[:, 2].tolist() == [8] + [5] * 4 + [4] * 9
    assert sorted(map(tuple, square[1:5, :2].tolist())) == [(0, 0), (0, 3), (3, 0), (3, 3)]
    assert sorted({x for x, *_ in square[5:]}) == [0, 2, 4]
    assert len(rmac_regions(14, 14)) == 14  # VGG-16's conv5 at 224 px
    wide = rmac_regions(12, 8)  # one more region along the longer side at every level
    assert len(wide) == 2 + 6 + 12
    for x, y, w, h in [*square, *wide]:
        assert x >= 0 and y >= 0 and w == h > 0
    assert (wide[:, 0] + wide[:, 2]).max() == 12 and (wide[:, 1] + wide[:, 3]).max() == 8

    # One hot activation at (row 1, column 6) of channel 2: exactly the regions covering it see it.
    activations = torch.zeros(1, 4, 8, 8)
    activations[0, 2, 1, 6] = 5.0
    vectors = region_vectors(activations, square)[0]
    covers = [(x <= 6 < x + s) and (y <= 1 < y + s) for x, y, s, _ in square]
    assert torch.equal(vectors[:, 2], torch.tensor(covers, dtype=torch.float32))
    assert vectors[:, [0, 1, 3]].abs().sum() == 0


def test_retrieval_map_matches_scikit_learn(real_data, tmp_path: Path) -> None:
    manifest = read_manifest(real_data.manifest)
    images = make_retrieval_list(tmp_path / "lists", manifest)
    out = tmp_path / "retrieval.json"
    retrieval(
        images=str(images),
        checkpoint=real_data.checkpoint,
        out=str(out),
        dim=64,
        eigenvalue_floor=1e-5,
        **feature_settings(),
    )
    result = json.loads(out.read_text())
    assert (result["queries"], result["database_images"], result["whitening_images"]) == (12, 120, 100)
    assert result["regions_per_image"] == 14 and result["dim"] == 64 and result["whitening_learnt_on"] == "whitening"

    # The same descriptors, scored by scikit-learn.
    model, _ = frozen_backbone(real_data.checkpoint)
    paths = manifest["path"].iloc[:232].tolist()
    regions = image_regions(model, paths, 32, 256, 0)
    whitening, _ = fit_whitening([regions[132:].reshape(-1, 128)], 64, 1e-5)
    descriptors = rmac(regions, whitening)
    assert np.allclose(np.linalg.norm(descriptors, axis=1), 1, atol=1e-5)
    labels = manifest["label"].iloc[:232].to_numpy()
    queries, database = descriptors[:12], descriptors[12:132]
    aps = [average_precision_score(labels[12:132] == labels[q], database @ queries[q]) for q in range(12)]
    assert result["mAP"] == pytest.approx(np.mean(aps), abs=1e-6)
    positives = np.mean([np.mean(labels[12:132] == labels[q]) for q in range(12)])
    assert result["mAP"] > 1.5 * positives  # far better than a random ranking


def write_evals(folder: Path, channels: list[float], pooled: list[float], knn_top1: float, nmi_label: float) -> None:
    """An evaluation folder as the stages write it, with these top-1s (intervals -0.01, +0.02; k-NN -0.1, 0)."""
    folder.mkdir(parents=True)
    poolings = {"channels": channels, "pooled": pooled}
    layers = [
        {"layer": f"conv{i + 1}", "pooling": pooling, "top1": value, "ci95": [value - 0.01, value + 0.02]}
        for pooling, values in poolings.items()
        for i, value in enumerate(values)
    ]
    (folder / "linear.json").write_text(json.dumps({"layers": layers, "classes": 10}))
    knn = [{"layer": "penultimate", "pooling": "feature", "top1": knn_top1, "ci95": [knn_top1 - 0.1, knn_top1]}]
    (folder / "knn.json").write_text(json.dumps({"k": 20, "layers": knn}))
    nmi = {"nmi": {"label": nmi_label, "previous_round": None}, "nmi_sd": {"label": 0.01, "previous_round": None}}
    (folder / "nmi.json").write_text(json.dumps(nmi))


def test_compare_puts_checkpoints_side_by_side_and_finds_the_headline_probe(tmp_path: Path) -> None:
    rows = {
        "random": ([0.5, 0.6], [0.8, 0.8], 0.3, 0.05),
        "deepercluster": ([0.61, 0.7], [0.8, 0.81], 0.8, 0.456),
        "supervised": ([0.65, 0.75], [0.79, 0.82], 0.85, 0.6),
    }
    for name, values in rows.items():
        write_evals(tmp_path / "evals" / name, *values)
    (tmp_path / "evals" / "deepercluster" / "retrieval.json").write_text(json.dumps({"mAP": 0.25}))
    out, tsv, plot = tmp_path / "table.md", tmp_path / "table.tsv", tmp_path / "linear.png"
    compare(
        labels=list(rows),
        checkpoints=[f"{name}.pt" for name in rows],
        out=str(out),
        tsv=str(tsv),
        plot=str(plot),
        evals=[str(tmp_path / "evals" / name) for name in rows],
        label_column="label",
    )
    lines = out.read_text().splitlines()
    assert lines[:5] == [
        "| method | checkpoint | linear conv1 (channels) | linear conv2 (channels) | linear conv1 (pooled)"
        " | linear conv2 (pooled) |",
        "|---|---|---|---|---|---|",
        "| random | `random.pt` | 50.0 [49.0, 52.0] | 60.0 [59.0, 62.0] | 80.0 [79.0, 82.0] | 80.0 [79.0, 82.0] |",
        "| deepercluster | `deepercluster.pt` | 61.0 [60.0, 63.0] | 70.0 [69.0, 72.0] | 80.0 [79.0, 82.0]"
        " | 81.0 [80.0, 83.0] |",
        "| supervised | `supervised.pt` | 65.0 [64.0, 67.0] | 75.0 [74.0, 77.0] | 79.0 [78.0, 81.0]"
        " | 82.0 [81.0, 84.0] |",
    ]
    # The supervised row beats the random init by more than the intervals on the channels, not on the pooled:
    # the channels are the headline, and DeeperCluster closes (70 - 60) / (75 - 60) of the gain there.
    assert "| deepercluster | 80.0 [70.0, 80.0] | 0.456 ± 0.010 |  |  | 25.0 | 67% |" in lines
    assert any("headline probe is the linear probe on **channels** features" in line for line in lines)
    numbers = pd.read_csv(tsv, sep="\t", index_col="method")
    assert numbers.loc["deepercluster", ["linear_channels_conv2", "linear_channels_conv2_low"]].tolist() == [0.7, 0.69]
    assert numbers.loc["random", ["knn_feature_penultimate", "nmi_label", "nmi_label_sd"]].tolist() == [0.3, 0.05, 0.01]
    assert numbers["headline"].eq("channels").all() and numbers.loc["supervised", "supervised_gain_closed"] == 1
    assert numbers.loc["deepercluster", "retrieval"] == 0.25 and numbers["voc07_all"].isna().all()
    assert plot.read_bytes().startswith(PNG_MAGIC)


# --- Snakemake: the rules on a tiny real run -------------------------------------------------------------


def snakemake(workdir: Path, config: dict, *args: str) -> subprocess.CompletedProcess:
    """The repository's workflow in ``workdir`` with ``config`` (written to its config.yaml), on 2 cores."""
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    command = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--configfile", "config.yaml"]
    return subprocess.run(
        [*command, "--cores", "2", *args], cwd=workdir, env=env, capture_output=True, text=True, timeout=900
    )


@pytest.fixture(scope="module")
def tiny_run(real_data, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Round 1 of a real DeepCluster run on 120 images in 2 shards; round 0's weights also saved as a plain
    state dict, registered as 'plain'."""
    workdir = tmp_path_factory.mktemp("tiny-run")
    manifest = read_manifest(real_data.manifest)
    model, _ = load_model(real_data.checkpoint)  # round 0's weights too: the same seeded init
    torch.save(model.state_dict(), workdir / "plain.pt")
    test = yaml.safe_load((REPO / ".test" / "config.yaml").read_text())
    config = {
        **test,
        "method": "deepcluster",
        "launcher": "debug",
        "data": {"max_images": 120, "image_size": 32, "workers": 0},
        "features": {"shard_size": 60, "batch_size": 60},
        "kmeans": {"iterations": 3},
        "methods": {**test["methods"], "deepcluster": {"rounds": 1, "clusters": 3}},
        "checkpoints": {"plain": {"path": "plain.pt", "arch": "small_convnet", "sobel": True}},
        "evaluation": {
            "data": {"max_images": 200},
            "clusters": 4,
            "clusters_shown": 2,
            "voc07": str(make_voc(workdir / "voc", manifest, {"train": 12, "val": 8, "test": 12})),
            "voc07_epochs": 1,
            "retrieval": str(make_retrieval_list(workdir / "lists", manifest)),
            # Every row named: the table trains and evaluates nothing more.
            "compare": {
                method: "plain" for method in ("random", "rotnet", "deepcluster", "deepercluster", "supervised")
            },
        },
    }
    run = snakemake(workdir, config, "--max-threads", "1", "results/rounds/1/checkpoint.pt")
    assert run.returncode == 0, run.stderr[-3000:]
    return workdir


ROUND_1 = [
    "results/rounds/1/checkpoint.pt",
    "results/rounds/1/features/shard-0.h5",
    "results/rounds/1/features/shard-1.h5",
]
EVALS = ["linear.json", "linear.png", "knn.json", "nmi.json", "nmi.png", "clusters.png", "voc07.json", "retrieval.json"]


def test_evaluations_run_alone_on_round_1_and_on_a_registered_state_dict(tiny_run: Path) -> None:
    before = {path: (tiny_run / path).stat().st_mtime_ns for path in ROUND_1}
    config = yaml.safe_load((tiny_run / "config.yaml").read_text())
    targets = ["results/evals/round-1/knn.json", *(f"results/evals/plain/{file}" for file in EVALS)]
    run = snakemake(tiny_run, config, "--max-threads", "1", *targets, "results/compare/table.md")
    assert run.returncode == 0, run.stderr[-3000:]
    # Round 1's training and feature extraction did not rerun: only evaluation rules ran.
    assert {path: (tiny_run / path).stat().st_mtime_ns for path in ROUND_1} == before
    assert "rule train:" not in run.stderr and "rule features:" not in run.stderr

    nearest = {
        name: json.loads((tiny_run / f"results/evals/{name}/knn.json").read_text()) for name in ("round-1", "plain")
    }
    for result in nearest.values():  # the 200 test images, the 120 the method trained on as their neighbours
        assert (result["k"], result["train_images"], result["test_images"]) == (20, 120, 200)
        assert all(0 < layer["top1"] <= 1 for layer in result["layers"])
    with h5py.File(tiny_run / "results/evals/round-1/features.h5") as f:
        assert f.attrs["checkpoint_sha256"] == sha256(tiny_run / ROUND_1[0]) and f["features"].shape == (320, 256)

    folder = tiny_run / "results/evals/plain"
    linear = json.loads((folder / "linear.json").read_text())
    assert [layer["layer"] for layer in linear["layers"]] == ["conv1", "conv2", "conv3"] * 2
    assert all(0 <= layer["top1"] <= 1 for layer in linear["layers"])
    nmi = json.loads((folder / "nmi.json").read_text())
    assert nmi["k"] == 4 and nmi["rounds"] is None and 0 <= nmi["nmi"]["label"] <= 1
    voc, found = json.loads((folder / "voc07.json").read_text()), json.loads((folder / "retrieval.json").read_text())
    assert 0 < voc["fc6_8"]["mAP"] <= 1 and 0 < voc["all"]["mAP"] <= 1 and 0 < found["mAP"] <= 1
    for picture in ("linear.png", "nmi.png", "clusters.png"):
        assert (folder / picture).read_bytes().startswith(PNG_MAGIC)
    # The plain state dict was wrapped with round 0's weights (the same seeded init).
    wrapped, _ = load_model(tiny_run / "results/checkpoints/plain.pt")
    round_0, _ = load_model(tiny_run / "results/rounds/0/checkpoint.pt")
    assert all(torch.equal(v, round_0.state_dict()[k]) for k, v in wrapped.state_dict().items())

    table = (tiny_run / "results/compare/table.md").read_text().splitlines()
    assert table[0].startswith("| method | checkpoint | linear conv1 (channels) |")
    assert [row.split(" | ")[:2] for row in table[2:7]] == [
        [f"| {method}", "`results/checkpoints/plain.pt`"]
        for method in ("random", "rotnet", "deepcluster", "deepercluster", "supervised")
    ]
    assert f"| {100 * nearest['plain']['layers'][0]['top1']:.1f} [" in table[10]  # the second table's first row


def test_nmi_of_round_r_plans_the_clusters_of_every_earlier_round_and_no_training(tiny_run: Path) -> None:
    config = yaml.safe_load((tiny_run / "config.yaml").read_text())
    run = snakemake(tiny_run, config, "-n", "results/evals/round-1/nmi.json")
    assert run.returncode == 0, run.stderr[-3000:]
    planned = run.stdout + run.stderr
    for r in (0, 1):
        assert f"results/evals/round-{r}/features.h5" in planned and f"results/evals/round-{r}/pca.h5" in planned
    assert "rule train:" not in planned and "rule features:" not in planned and "rule labels:" not in planned


def test_an_unconfigured_evaluation_says_which_key_to_set(tiny_run: Path, tmp_path: Path) -> None:
    config = yaml.safe_load((tiny_run / "config.yaml").read_text())
    config["evaluation"]["voc07"] = None
    shutil.copy(tiny_run / "plain.pt", tmp_path / "plain.pt")
    run = snakemake(tmp_path, config, "-n", "results/evals/plain/voc07.json")
    assert run.returncode != 0 and "evaluation.voc07 is null" in run.stdout + run.stderr
