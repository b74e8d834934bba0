"""``mlip-train``: the training app through the DeepSpeed launcher, for a pip install (no source checkout).

``mlip-train [launcher options] [training options]`` runs
``deepspeed [launcher options] --module mlip_fast.train [training options]``: the launcher options
(``--num_gpus``, ``--num_nodes``, ``--hostfile``, ``--master_port``, ... see :data:`LAUNCHER_OPTIONS`) go to
the launcher, everything else to :mod:`mlip_fast.train.main`. The training options are checked here first
(:func:`mlip_fast.train.setup.preflight`: arguments, DeepSpeed config, model config), so a usage error is one
line on stderr and exit code 2 before any training process starts. The exit code is the training's.
"""
from __future__ import annotations

import sys
from typing import Optional, Sequence

from deepspeed.launcher import runner

from mlip_fast.train.args import build_parser, parse_args
from mlip_fast.train.main import EXIT_USAGE, usage_errors
from mlip_fast.train.process import device_type_name
from mlip_fast.train.setup import preflight

__all__ = ["main", "split_argv", "LAUNCHER_OPTIONS", "LAUNCHER_SWITCHES"]

# DeepSpeed launcher (deepspeed.launcher.runner) options that take a value, and those that do not
LAUNCHER_OPTIONS = ("-H", "--hostfile", "-i", "--include", "-e", "--exclude", "--num_nodes", "--num_gpus",
                    "--num_accelerators", "--master_port", "--master_addr", "--node_rank", "--launcher",
                    "--launcher_args", "--enable_each_rank_log", "--autotuning", "--bind_core_list", "--ssh_port",
                    "--venv_script", "--log_level")
LAUNCHER_SWITCHES = ("--no_ssh", "--no_ssh_check", "--force_multi", "--save_pid", "--bind_cores_to_rank", "-q",
                     "--quiet")
MODULE = "mlip_fast.train"
PROG = "mlip-train"


def split_argv(argv: Sequence[str]) -> tuple[list, list]:
    """(launcher arguments, training arguments) of an ``mlip-train`` command line; ``--opt value`` and
    ``--opt=value`` forms of the launcher options are recognised wherever they stand."""
    launcher, training = [], []
    items = list(argv)
    i = 0
    while i < len(items):
        item = items[i]
        name = item.split("=", 1)[0]
        if name in LAUNCHER_SWITCHES or (name in LAUNCHER_OPTIONS and "=" in item):
            launcher.append(item)
        elif name in LAUNCHER_OPTIONS:
            launcher += items[i:i + 2]
            i += 1
        else:
            training.append(item)
        i += 1
    return launcher, training


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Entry point of the ``mlip-train`` console script (exits the process)."""
    launcher, training = split_argv(sys.argv[1:] if argv is None else argv)
    if "-h" in training or "--help" in training:
        build_parser(prog=PROG).print_help()
        print(f"\nlauncher options (passed to `deepspeed`): {' '.join(o for o in LAUNCHER_OPTIONS if o.startswith('--'))}, "
              f"{' '.join(o for o in LAUNCHER_SWITCHES if o.startswith('--'))}; e.g. mlip-train --num_gpus 8 "
              f"--deepspeed_config zero3 --data /data/master.csv")
        sys.exit(0)
    args = parse_args(training, prog=PROG)  # argparse: one line and exit 2 on a usage error
    try:
        preflight(args, device_type_name())
    except usage_errors() as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        sys.exit(EXIT_USAGE)
    runner.main([*launcher, "--module", MODULE, *training])
    sys.exit(0)


if __name__ == "__main__":
    main()
