"""``python -m deepercluster <stage> --arg value ...``: the command line of every stage.

Each stage's options are read from its function's signature (keyword names, type hints,
defaults), so the CLI, the rules and the tests can never disagree about a stage's inputs.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import logging
import os
import subprocess
import sys
import typing
from collections.abc import Callable

from deepercluster.errors import InputError, one_line
from deepercluster.logs import setup_logging
from deepercluster.stages import STAGES, load_stage, stage_options

# Errors of the user's inputs: one message, naming the file and the fix, and no traceback; any
# other exception is a bug and keeps its traceback.
INPUT_ERRORS = (InputError,)


def add_stage_options(parser: argparse.ArgumentParser, stage: Callable) -> None:
    """One ``--option`` per keyword argument of ``stage``, typed by its annotation."""
    hints = typing.get_type_hints(stage)
    for name, parameter in inspect.signature(stage).parameters.items():
        if parameter.kind is inspect.Parameter.VAR_KEYWORD:
            continue
        flag = "--" + name.replace("_", "-")
        kind = hints[name]
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        containers = (list, dict)
        if typing.get_origin(kind) not in containers and len(args) == 1 and typing.get_origin(args[0]) in containers:
            kind = args[0]  # list[T] | None, dict[K, V] | None: an option that may be left out
        # An optional value (``X | None``) without a default is None when its option is left out, as ``options``
        # leaves out None.
        required = parameter.default is inspect.Parameter.empty and type(None) not in typing.get_args(hints[name])
        default = None if parameter.default is inspect.Parameter.empty else parameter.default
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, required=required)
        elif typing.get_origin(kind) is dict:
            parser.add_argument(flag, type=json.loads, default=default, required=required)
        elif dataclasses.is_dataclass(kind):  # a record (train's BlockSettings, Allocation): its fields as JSON
            parser.add_argument(flag, type=lambda text, kind=kind: kind(**json.loads(text)), required=required)
        elif typing.get_origin(kind) is list:
            parser.add_argument(flag, nargs="+", type=typing.get_args(kind)[0], default=default, required=required)
        else:
            parser.add_argument(flag, type=args[0] if args else kind, default=default, required=required)


def parser(stage: str | None) -> argparse.ArgumentParser:
    """The main parser; only ``stage``'s options are built, so only its module is imported."""
    main = argparse.ArgumentParser(prog="python -m deepercluster", description=__doc__)
    main.add_argument("--threads", type=int, default=None, help="CPU threads for torch and faiss")
    main.add_argument("--ranks", type=int, default=1, help="ranks to run the stage on (srun in SLURM, else torchrun)")
    sub = main.add_subparsers(dest="stage", required=True)
    for name in STAGES:
        stage_parser = sub.add_parser(name)
        if name == stage:
            for function in stage_options(name):
                add_stage_options(stage_parser, function)
    return main


class Command(typing.NamedTuple):
    """A parsed command line: the stage, its function's keyword arguments, its ranks and threads."""

    stage: str
    arguments: dict[str, typing.Any]
    ranks: int
    threads: int | None


def parse_command(argv: list[str]) -> Command:
    """``argv`` (the words after ``python -m deepercluster``) as the call of its stage."""
    chosen = next((word for word in argv if word in STAGES), None)
    arguments = vars(parser(chosen).parse_args(argv))
    stage, ranks, threads = (arguments.pop(key) for key in ("stage", "ranks", "threads"))
    return Command(stage, arguments, ranks, threads)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = parse_command(argv)
    if command.ranks > 1:  # start the ranks, unless this process is one of them
        from deepercluster.launch import RANK_PROCESS, rank_command

        ranks = rank_command(command.ranks, argv)
        if ranks is not None:
            return subprocess.run(ranks, env={**os.environ, RANK_PROCESS: "1"}).returncode
    stage = load_stage(command.stage)
    setup_logging()
    if command.threads:
        os.environ["OMP_NUM_THREADS"] = str(command.threads)  # faiss's OpenMP reads it when first used
        import torch

        torch.set_num_threads(command.threads)
    try:
        stage(**command.arguments)
    except INPUT_ERRORS as error:  # one line, even where it quotes a library's multi-line message
        logging.getLogger("deepercluster").error("%s", one_line(error))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
