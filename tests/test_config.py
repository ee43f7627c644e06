"""The schema is the documentation: every key documented, defaults filled, typos named."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from deepercluster.config import SCHEMA, ConfigError, as_written, is_leaf, reference, schema_nodes, validate_config

REPO = Path(__file__).resolve().parents[1]


def key_value(config: dict, key: str) -> object:
    for part in key.split("."):
        config = config[part]
    return config


def test_every_key_has_a_description_and_its_default_in_the_schema_the_config_and_the_reference() -> None:
    schema = yaml.safe_load(SCHEMA.read_text())
    nodes = schema_nodes(schema)
    leaves = [key for key, node in nodes.items() if is_leaf(node)]
    assert {"methods.deepercluster.super_clusters", "resources.train", "checkpoints", "evaluation.compare.random",
            "evaluation.train_data.source"} <= set(leaves)  # fmt: skip
    filled = validate_config({})
    null_blocks = [key for key, node in nodes.items() if node.get("default", 0) is None and "properties" in node]
    for key, node in nodes.items():
        assert isinstance(node.get("description"), str) and node["description"].strip(), f"{key}: no description"
        assert "default" in node, f"{key}: no default"
        in_null_block = any(key.startswith(f"{block}.") for block in null_blocks)  # e.g. data.uncurated
        if is_leaf(node) and not in_null_block:
            assert key_value(filled, key) == node["default"], f"{key}: validate_config({{}}) fills another default"
    documented = (REPO / "docs" / "configuration.md").read_text()
    assert documented == reference(), "docs/configuration.md is not the schema's: python -m deepercluster.config"
    for key in leaves:
        assert f"| `{key}` | {as_written(nodes[key]['default'])} |" in documented, key


def test_defaults_fill_an_empty_config_and_the_demo_config_is_valid() -> None:
    config = validate_config({})
    assert config["methods"]["deepercluster"]["super_clusters"] == 4 and config["data"]["source"] == "fashion-mnist"
    demo = validate_config(yaml.safe_load((REPO / "config.yaml").read_text()))
    assert demo["model"]["arch"] == "small_convnet"


def test_a_typo_is_named_with_the_valid_keys() -> None:
    with pytest.raises(ConfigError, match=r"unknown key\(s\) superclusters in kmeans; valid keys: iterations"):
        validate_config({"kmeans": {"superclusters": 4}})
    with pytest.raises(ConfigError, match=r"unknown key\(s\) lr in train \(lr is now methods.<method>.lr\)"):
        validate_config({"train": {"lr": 0.1}})
    with pytest.raises(ConfigError, match=r"data\.source: 'imagenet' is not one of"):
        validate_config({"data": {"source": "imagenet"}})
