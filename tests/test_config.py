"""The schema is the documentation: every key documented, defaults filled, typos named."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from deepercluster.config import SCHEMA, ConfigError, validate_config

REPO = Path(__file__).resolve().parents[1]


def schema_nodes(schema: dict, node: dict | None = None, prefix: str = "") -> dict[str, dict]:
    """Every key of the schema (objects and leaves) -> its node, ``$ref`` resolved, in document order."""
    nodes = {}
    for name, child in (node or schema)["properties"].items():
        if "$ref" in child:  # resources.<stage>: "#/$defs/stage_resources", keys as in resources.default
            child = {**schema["$defs"][child["$ref"].removeprefix("#/$defs/")], **child}
        nodes[prefix + name] = child
        if not is_leaf(child):
            nodes |= schema_nodes(schema, child, f"{prefix}{name}.")
    return nodes


def is_leaf(node: dict) -> bool:
    """A key the README's table lists: not an object whose own keys the schema lists."""
    return not node.get("properties") or "$ref" in node


def readme_defaults() -> dict[str, str]:
    """key -> the default cell of the README's configuration table."""
    readme = (REPO / "README.md").read_text()
    table = readme[readme.index("## Configuration") :].split("\n## ")[0]
    rows = [line.split(" | ") for line in table.splitlines() if line.startswith("| `")]
    return {cells[0].removeprefix("| ").strip("`"): cells[2] for cells in rows}


def as_written(value: object) -> str:
    """A default as the README writes it: strings bare, JSON for null, booleans and objects, repr for numbers."""
    if isinstance(value, str):
        return f"`{value}`"
    return f"`{json.dumps(value) if value is None or isinstance(value, (bool, dict)) else repr(value)}`"


def key_value(config: dict, key: str) -> object:
    for part in key.split("."):
        config = config[part]
    return config


def test_every_key_has_a_description_and_its_default_in_the_schema_the_config_and_the_readme() -> None:
    schema = yaml.safe_load(SCHEMA.read_text())
    nodes = schema_nodes(schema)
    leaves = [key for key, node in nodes.items() if is_leaf(node)]
    assert {"kmeans.super_clusters", "resources.train", "checkpoints", "evaluation.compare.random"} <= set(leaves)
    filled, readme = validate_config({}), readme_defaults()
    assert set(readme) == set(leaves), "the README's configuration table and the schema list other keys"
    for key, node in nodes.items():
        assert isinstance(node.get("description"), str) and node["description"].strip(), f"{key}: no description"
        assert "default" in node, f"{key}: no default"
        if is_leaf(node):
            assert key_value(filled, key) == node["default"], f"{key}: validate_config({{}}) fills another default"
            assert readme[key] == as_written(node["default"]), f"{key}: the README says {readme[key]}"


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
