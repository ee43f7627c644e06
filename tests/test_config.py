"""The schema is the documentation: every key documented, defaults filled, typos named."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from deepercluster.config import SCHEMA, ConfigError, validate_config

REPO = Path(__file__).resolve().parents[1]


def schema_keys(schema: dict, prefix: str = "") -> list[str]:
    keys = []
    for name, child in schema["properties"].items():
        if child.get("type") == "object" and "properties" in child:
            keys += schema_keys(child, f"{prefix}{name}.")
        else:
            keys.append(prefix + name)
    return keys


def test_every_key_has_a_description_a_default_and_a_row_in_the_readme() -> None:
    schema = yaml.safe_load(SCHEMA.read_text())
    readme = (REPO / "README.md").read_text()
    keys = schema_keys(schema)
    assert "kmeans.super_clusters" in keys
    for key in keys:
        assert f"| `{key}` |" in readme, key


def test_defaults_fill_an_empty_config_and_the_demo_config_is_valid() -> None:
    config = validate_config({})
    assert config["kmeans"]["super_clusters"] == 4 and config["data"]["source"] == "fashion-mnist"
    demo = validate_config(yaml.safe_load((REPO / "config.yaml").read_text()))
    assert demo["model"]["arch"] == "small_convnet"


def test_a_typo_is_named_with_the_valid_keys() -> None:
    with pytest.raises(ConfigError, match=r"unknown key\(s\) superclusters in kmeans; valid keys: super_clusters"):
        validate_config({"kmeans": {"superclusters": 4}})
    with pytest.raises(ConfigError, match=r"data\.source: 'imagenet' is not one of"):
        validate_config({"data": {"source": "imagenet"}})
