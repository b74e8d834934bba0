"""The GPU check under the path its users and older notes name: ``python benchmarks/gpu_check.py --out DIR
[--dry-run]`` runs ``python -m tools.gpu_check`` with the same arguments (the app lives in ``tools/gpu_check/``).
"""
import runpy
import sys
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository, for ``tools``
    runpy.run_module("tools.gpu_check", run_name="__main__", alter_sys=True)
