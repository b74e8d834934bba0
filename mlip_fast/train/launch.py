"""``mlip-train``: the training app through the DeepSpeed launcher, for a pip install (no source checkout).

``mlip-train [launcher options] [training options]`` runs
``deepspeed [launcher options] --module mlip_fast.train [training options]``: the launcher options
(``--num_gpus``, ``--num_nodes``, ``--hostfile``, ``--master_port``, ... :func:`launcher_options` reads them from
DeepSpeed's own argument parser, so a DeepSpeed release that adds one needs no change here) go to the launcher,
everything else to :mod:`mlip_fast.train.main`. The training options are checked here first
(:func:`mlip_fast.train.setup.preflight`: arguments, DeepSpeed config, monitors, model config), so a usage error
is one line on stderr and exit code 2 before any training process starts. The exit code is the training's.
``--help`` and ``--version`` print without importing the launcher's accelerator detection.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import sys
from typing import Optional, Sequence
from unittest import mock

from mlip_fast.train.args import build_parser, parse_args
from mlip_fast.train.main import EXIT_USAGE, usage_errors
from mlip_fast.train.process import LaunchError, device_type_name, require_deepspeed
from mlip_fast.train.setup import preflight

__all__ = ["main", "split_argv", "launcher_options"]

MODULE = "mlip_fast.train"
PROG = "mlip-train"
# what the launcher takes from DeepSpeed's parser but mlip-train sets itself (or that name the script)
_NOT_PASSED = {"--module", "--no_python", "--no_local_rank", "-h", "--help"}


class _Captured(Exception):
    def __init__(self, parser: argparse.ArgumentParser):
        super().__init__()
        self.parser = parser


def _launcher_parser() -> argparse.ArgumentParser:
    """DeepSpeed's launcher parser (``deepspeed.launcher.runner.parse_args`` builds it and parses at once: the
    parse is intercepted)."""
    from deepspeed.launcher import runner  # imported when a launch (or --help) needs it: it guesses the accelerator

    def capture(parser, *_, **__):
        raise _Captured(parser)

    with mock.patch.object(argparse.ArgumentParser, "parse_args", capture):
        try:
            runner.parse_args([])
        except _Captured as found:
            return found.parser
    raise RuntimeError("deepspeed.launcher.runner.parse_args built no parser")


def launcher_options() -> tuple[dict, list]:
    """({launcher option: its help} of the options that take a value, [the switches]) from DeepSpeed's parser."""
    with_value, switches = {}, []
    for action in _launcher_parser()._actions:
        names = [o for o in action.option_strings if o not in _NOT_PASSED]
        if not names:
            continue
        if action.nargs == 0:
            switches += names
        else:
            with_value.update({name: action.help or "" for name in names})
    return with_value, switches


def split_argv(argv: Sequence[str]) -> tuple[list, list]:
    """(launcher arguments, training arguments) of an ``mlip-train`` command line; ``--opt value`` and
    ``--opt=value`` forms of the launcher options are recognised wherever they stand."""
    with_value, switches = launcher_options()
    launcher, training = [], []
    items = list(argv)
    i = 0
    while i < len(items):
        item = items[i]
        name = item.split("=", 1)[0]
        if name in switches or (name in with_value and "=" in item):
            launcher.append(item)
        elif name in with_value:
            launcher += items[i:i + 2]
            i += 1
        else:
            training.append(item)
        i += 1
    return launcher, training


def _print_help() -> None:
    build_parser(prog=PROG, argv=sys.argv[1:]).print_help()
    # DeepSpeed logs its accelerator guess on import, through a handler bound to the stdout of that moment: the
    # help discards it (the process ends here; a launch imports DeepSpeed with the real streams)
    quiet = io.StringIO()
    with contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
        with_value, switches = launcher_options()
    shown = sorted(o for o in with_value if o.startswith("--")) + sorted(o for o in switches if o.startswith("--"))
    print(f"\nlauncher options (DeepSpeed's, passed to `deepspeed`): {' '.join(shown)}; e.g. mlip-train --num_gpus 8 "
          f"--deepspeed_config zero3 --data /data/master.csv")


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Entry point of the ``mlip-train`` console script (exits the process)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        _print_help()
        sys.exit(0)
    if "--version" in argv:
        build_parser(prog=PROG).parse_args(["--version"])
    try:
        require_deepspeed()
    except LaunchError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        sys.exit(EXIT_USAGE)
    launcher, training = split_argv(argv)
    args = parse_args(training, prog=PROG)  # argparse: one line and exit 2 on a usage error
    try:
        preflight(args, device_type_name())
    except usage_errors() as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        sys.exit(EXIT_USAGE)
    from deepspeed.launcher import runner  # imported by split_argv already

    runner.main([*launcher, "--module", MODULE, *training])
    sys.exit(0)


if __name__ == "__main__":
    main()
