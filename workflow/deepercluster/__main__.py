"""``python -m deepercluster <stage> --arg value ...``: the command line of every stage.

Each stage's options are read from its function's signature (keyword names, type hints,
defaults), so the CLI, the rules and the tests can never disagree about a stage's inputs.
"""

from __future__ import annotations

import argparse
import inspect
import logging
import os
import re
import subprocess
import sys
import typing
from collections.abc import Callable

from deepercluster.errors import InputError
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
        if typing.get_origin(kind) is not list and len(args) == 1 and typing.get_origin(args[0]) is list:
            kind = args[0]  # list[T] | None: a list option that may be left out
        required = parameter.default is inspect.Parameter.empty
        default = None if required else parameter.default
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, required=required)
        elif typing.get_origin(kind) is list:
            parser.add_argument(flag, nargs="+", type=typing.get_args(kind)[0], default=default, required=required)
        else:
            parser.add_argument(flag, type=args[0] if args else kind, default=default, required=required)


def parser(stage: str | None) -> argparse.ArgumentParser:
    """The main parser; only ``stage``'s options are built, so only its module is imported."""
    main = argparse.ArgumentParser(prog="python -m deepercluster", description=__doc__)
    main.add_argument("--threads", type=int, default=None, help="CPU threads for torch and faiss")
    main.add_argument("--tasks", type=int, default=1, help="ranks to run the stage on (srun in SLURM, else torchrun)")
    sub = main.add_subparsers(dest="stage", required=True)
    for name in STAGES:
        stage_parser = sub.add_parser(name)
        if name == stage:
            for function in stage_options(name):
                add_stage_options(stage_parser, function)
    return main


def main(argv: list[str] | None = None) -> int:
    # torch and faiss each bring an OpenMP runtime; busy-waiting threads of one starve the other.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    argv = sys.argv[1:] if argv is None else argv
    chosen = next((word for word in argv if word in STAGES), None)
    options = vars(parser(chosen).parse_args(argv))
    tasks = options.pop("tasks")
    if tasks > 1:  # start the ranks, unless this process is one of them
        from deepercluster.distributed import RANK_PROCESS, rank_command

        command = rank_command(tasks, argv)
        if command is not None:
            return subprocess.run(command, env={**os.environ, RANK_PROCESS: "1"}).returncode
    stage, threads = load_stage(options.pop("stage")), options.pop("threads")
    setup_logging()
    if threads:
        os.environ["OMP_NUM_THREADS"] = str(threads)  # faiss's OpenMP reads it when first used
        import torch

        torch.set_num_threads(threads)
    try:
        stage(**options)
    except INPUT_ERRORS as error:  # one line, even where it quotes a library's multi-line message
        logging.getLogger("deepercluster").error("%s", re.sub(r"\s*\n\s*", " ", str(error)))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
