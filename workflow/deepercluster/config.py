"""The workflow's configuration: defaults filled in from the schema, errors named by their key."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jsonschema
import yaml

from deepercluster.errors import ConfigError

SCHEMA = Path(__file__).resolve().parents[1] / "schemas" / "config.schema.yaml"


def fill_defaults(config: dict[str, Any], schema: dict[str, Any], root: dict[str, Any] | None = None) -> None:
    """Give every key the schema documents its default, recursively, in place (``$ref``s of ``root`` followed)."""
    root = root or schema
    for key, child in schema.get("properties", {}).items():
        if "$ref" in child:
            child = {**root["$defs"][child["$ref"].removeprefix("#/$defs/")], **child}
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
        if error.validator == "additionalProperties":
            parent = error.schema["properties"]
            unknown = sorted(set(error.instance) - set(parent))
            problems.append(f"unknown key(s) {', '.join(unknown)} in {where}; valid keys: {', '.join(parent)}")
        else:
            problems.append(f"{where}: {error.message}")
    if problems:
        raise ConfigError(
            "invalid configuration (every key is documented in workflow/schemas/config.schema.yaml):\n  "
            + "\n  ".join(problems)
        )
    return config
