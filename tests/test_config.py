"""The schema is the documentation: every key documented, defaults filled, typos named."""

from __future__ import annotations

import io
import re
import tokenize
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from snakemake.utils import update_config

from deepercluster.config import (
    MOVED,
    SCHEMA,
    ConfigError,
    as_written,
    is_leaf,
    reference,
    resolved,
    schema_nodes,
    validate_config,
)
from deepercluster.plan import Plan

REPO = Path(__file__).resolve().parents[1]


def key_value(config: dict, key: str) -> object:
    for part in key.split("."):
        config = config[part]
    return config


def test_every_key_has_a_description_and_its_default_in_the_schema_the_config_and_the_reference() -> None:
    schema = yaml.safe_load(SCHEMA.read_text())
    nodes = schema_nodes(schema)
    leaves = [key for key, node in nodes.items() if is_leaf(node)]
    assert {
        "methods.deepercluster.super_clusters",
        "resources.train",
        "checkpoints",
        "evaluation.compare.random",
        "evaluation.train_data.source",
    } <= set(leaves)
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


def named_keys() -> Iterator[tuple[str, int, str]]:
    """(file, line, text) of every message, comment and doc that may name a config key: the package's strings and
    comments, the rules, the README and docs/."""
    for path in sorted((REPO / "workflow" / "deepercluster").rglob("*.py")):
        for token in tokenize.generate_tokens(io.StringIO(path.read_text()).readline):
            if token.type in (tokenize.STRING, tokenize.COMMENT):  # Python 3.11: an f-string is one STRING
                yield str(path.relative_to(REPO)), token.start[0], token.string
    texts = [
        *(REPO / "workflow" / "rules").glob("*.smk"),
        REPO / "Snakefile",
        REPO / "README.md",
        *(REPO / "docs").glob("*.md"),
    ]
    for path in texts:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            yield str(path.relative_to(REPO)), number, line


def in_schema(schema: dict, key: str) -> bool:
    """Whether the dotted ``key`` is one of the schema's; ``<name>`` or ``{name}`` stands for any key of its level
    (``methods.<method>.lr``), and a key under an object of free keys (``checkpoints``) is one."""
    node = schema
    for part in key.split("."):
        node = resolved(schema, node)
        node = schema["$defs"][node["$ref"].removeprefix("#/$defs/")] if "$ref" in node else node
        free = node.get("additionalProperties")
        if part in node.get("properties", {}):
            node = node["properties"][part]
        elif part[0] in "<{" and node.get("properties"):
            node = next(iter(node["properties"].values()))
        elif isinstance(free, dict):
            node = free
        else:
            return False
    return True


def test_every_config_key_a_message_or_doc_names_is_in_the_schema() -> None:
    """A dotted name rooted at a top-level key (``train.batch_size``, ``methods.<method>.lr``) is a config key
    unless it is a file (``pca.h5``), a module or class of the package (``train.block``, ``data.ImageDataset``),
    a call or a checkpoint's tensor; every one must be the schema's. The keys that moved (``config.MOVED``, which
    alone names them) appear nowhere else, dotted or not, unless the schema still has a key of that name."""
    schema = yaml.safe_load(SCHEMA.read_text())
    top = "|".join(schema["properties"])
    dotted = re.compile(rf"(?<![\w./{{-])((?:{top})(?:\.[\w<>-]+)+)(?![\w(])")
    files = ("h5", "pt", "py", "smk", "md", "tsv", "json", "parquet", "yaml", "png")
    names = {key.split(".")[-1] for key in schema_nodes(schema)}
    gone = [key for key in MOVED if "." not in key and key not in names]
    assert "init_checkpoint" in gone
    wrong = []
    for path, number, text in named_keys():
        if path.endswith("config.py") and text.strip("\"'") in MOVED:
            continue  # MOVED's own keys
        text = re.sub(r"\{[^{}]*\}", "<x>", text)  # an f-string's value: any key
        for key in dotted.findall(text):
            parts = key.split(".")
            if parts[-1] in files or any(p[0].isupper() or p.isdigit() for p in parts):
                continue
            if (REPO / "workflow" / "deepercluster" / Path(*parts)).with_suffix(".py").exists():
                continue
            if not in_schema(schema, key):
                wrong.append(f"{path}:{number}: {key}")
        wrong += [f"{path}:{number}: {key}" for key in gone if re.search(rf"\b{key}\b", text)]
    assert not wrong, "\n".join(wrong)


def test_the_schemas_choices_are_the_codes() -> None:
    """Each choice the schema offers is one the code knows, and the reverse: the methods (as ``method`` and as the
    keys of ``methods``), the launchers, the image sources (one ``$defs`` entry for data, evaluation.data and
    evaluation.train_data) and the architectures (of the model and of a registered checkpoint)."""
    from deepercluster.data.manifest import SOURCES
    from deepercluster.launch import LAUNCHERS
    from deepercluster.methods import METHODS
    from deepercluster.nn.models import ARCHITECTURES

    schema = yaml.safe_load(SCHEMA.read_text())
    nodes = schema_nodes(schema)
    assert set(nodes["method"]["enum"]) == set(nodes["methods"]["properties"]) == set(METHODS)
    assert set(nodes["launcher"]["enum"]) == set(LAUNCHERS)
    for source in ("data.source", "evaluation.data.source", "evaluation.train_data.source"):
        assert set(nodes[source]["enum"]) == set(SOURCES), source
    registered = nodes["checkpoints"]["additionalProperties"]["properties"]["arch"]
    assert set(nodes["model.arch"]["enum"]) == set(registered["enum"]) == set(ARCHITECTURES)


@pytest.mark.parametrize("experiment", sorted(path.name for path in (REPO / "docs").glob("*.yaml")))
def test_each_experiment_config_in_docs_is_valid_laid_over_the_default_and_plans_its_runs(experiment: str) -> None:
    """``snakemake --configfile docs/<experiment>.yaml``: the file laid over config.yaml as Snakemake does (nested
    keys merged), validated and planned; a key the schema dropped or a start no run has fails here, not hours in."""
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    update_config(config, yaml.safe_load((REPO / "docs" / experiment).read_text()))
    plan = Plan(validate_config(config))
    assert plan.rounds("results") >= 1
