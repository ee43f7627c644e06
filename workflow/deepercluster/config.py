"""The workflow's configuration: defaults filled in from the schema, errors named by their key, and the schema as
the reference docs/configuration.md (``python -m deepercluster.config > docs/configuration.md``)."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from deepercluster.errors import ConfigError

SCHEMA = Path(__file__).resolve().parents[1] / "schemas" / "config.schema.yaml"
# Keys that moved, and where to: each method's own settings are under methods.<method>.
MOVED = {
    "rounds": "methods.<method>.rounds",
    "init_checkpoint": "methods.<method>.init (the name of the checkpoint under checkpoints)",
    "train.epochs_per_round": "methods.<method>.epochs_per_round",
    "train.lr": "methods.<method>.lr",
    "kmeans.super_clusters": "methods.deepercluster.super_clusters",
    "kmeans.sub_clusters": "methods.deepercluster.sub_clusters (methods.deepcluster.clusters for DeepCluster)",
    "pca.dim": "methods.<method>.pca_fraction",
    "evaluation.val_fraction": "evaluation.train_data (the probes train on training images, scored on the test images)",
}


def resolved(root: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    """``node`` over the ``$defs`` entry it names (``$ref``). A node listing keys of its own (an image source:
    data, evaluation.data) gets the entry's keys, then its own, each the entry's with the node's fields over it
    (its own default); one listing none (``resources.<stage>``) stays a ``$ref``: one value, keys as the entry's."""
    if "$ref" not in node:
        return node
    base = root["$defs"][node["$ref"].removeprefix("#/$defs/")]
    if not node.get("properties"):
        return {**base, **node}
    ours, theirs = base["properties"], node["properties"]
    keys = {**ours, **theirs}  # the entry's keys first, in its order
    merged = {key: {**ours.get(key, {}), **theirs.get(key, {})} for key in keys}
    return {key: value for key, value in {**base, **node}.items() if key != "$ref"} | {"properties": merged}


def fill_defaults(config: dict[str, Any], schema: dict[str, Any], root: dict[str, Any] | None = None) -> None:
    """Give every key the schema documents its default, recursively, in place (``$ref``s of ``root`` followed)."""
    root = root or schema
    for key, child in schema.get("properties", {}).items():
        child = resolved(root, child)
        if key not in config and "default" in child:
            config[key] = child["default"].copy() if isinstance(child["default"], dict) else child["default"]
        if isinstance(config.get(key), dict):
            fill_defaults(config[key], child, root)


def validate_config(config: dict[str, Any], schema_path: str | Path = SCHEMA) -> dict[str, Any]:
    """Fill defaults and validate ``config`` in place; one message per problem, naming the key.

    An unknown key (a typo) is an error listing the valid keys at that level.
    """
    schema = yaml.safe_load(Path(schema_path).read_text())
    fill_defaults(config, schema)
    problems = []
    for error in jsonschema.Draft202012Validator(schema).iter_errors(config):
        where = ".".join(map(str, error.absolute_path)) or "the top level"
        if error.validator in ("additionalProperties", "unevaluatedProperties"):
            parent = resolved(schema, error.schema)["properties"]
            unknown = sorted(set(error.instance) - set(parent))
            prefix = "" if where == "the top level" else f"{where}."
            moved = [f"{key} is now {MOVED[prefix + key]}" for key in unknown if prefix + key in MOVED]
            hint = f" ({'; '.join(moved)})" if moved else ""
            problems.append(f"unknown key(s) {', '.join(unknown)} in {where}{hint}; valid keys: {', '.join(parent)}")
        else:
            problems.append(f"{where}: {error.message}")
    if problems:
        raise ConfigError(
            "invalid configuration (every key is documented in workflow/schemas/config.schema.yaml):\n  "
            + "\n  ".join(problems)
        )
    return config


def schema_nodes(schema: dict[str, Any], node: dict[str, Any] | None = None, prefix: str = "") -> dict[str, dict]:
    """Every key of the schema (objects and leaves) -> its node, ``$ref`` resolved, in document order."""
    nodes = {}
    for name, child in (node or schema)["properties"].items():
        child = resolved(schema, child)  # resources.<stage>: a leaf, keys as in resources.default
        nodes[prefix + name] = child
        if not is_leaf(child):
            nodes |= schema_nodes(schema, child, f"{prefix}{name}.")
    return nodes


def is_leaf(node: dict[str, Any]) -> bool:
    """A key the reference lists with a value: not an object whose own keys the schema lists."""
    return not node.get("properties") or "$ref" in node


def as_written(value: object) -> str:
    """A default as the reference writes it: strings bare, JSON for null, booleans and objects, repr for numbers."""
    if isinstance(value, str):
        return f"`{value}`"
    return f"`{json.dumps(value) if value is None or isinstance(value, bool | dict) else repr(value)}`"


def reference(schema_path: str | Path = SCHEMA) -> str:
    """docs/configuration.md: every key of the schema with its default and description, a table per section."""
    schema = yaml.safe_load(Path(schema_path).read_text())
    lines = [
        "# Configuration",
        "",
        "Every key of `config.yaml`, its default and its meaning, generated from",
        "`workflow/schemas/config.schema.yaml` (`python -m deepercluster.config > docs/configuration.md`; a test",
        "keeps the two equal). An unknown key is an error naming the valid ones.",
        "",
    ]
    for section, rows in itertools.groupby(schema_nodes(schema).items(), key=lambda item: item[0].split(".")[0]):
        lines += [f"## `{section}`", "", "| key | default | meaning |", "|---|---|---|"]
        for key, node in rows:
            default = as_written(node["default"]) if is_leaf(node) or node.get("default") is None else ""
            text = " ".join(str(node.get("description", "")).split()).replace("|", "\\|").replace("<", "&lt;")
            lines.append(f"| `{key}` | {default} | {text} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    print(reference(), end="")
