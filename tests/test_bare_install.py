"""``pip install mlip_fast`` without extras is the library and inference: the wheel, in a fresh virtual environment
that has torch, transformers and the other base requirements but no DeepSpeed, WebDataset, matplotlib or Triton,
runs the README's Python quick start; the training app then says in one line which extra it needs, and plots are
skipped with a notice."""
import subprocess
import textwrap

import pytest

from tests.test_quickstart import quickstart_blocks
from tests.train.conftest import clean_env
from tests.train.test_pip_install import build_wheel, fresh_venv

pytestmark = pytest.mark.slow

EXTRAS = ("deepspeed", "webdataset", "matplotlib", "triton")


def test_bare_wheel_runs_the_quick_start(tmp_path):
    wheel = build_wheel(tmp_path)
    python = fresh_venv(tmp_path, without=EXTRAS)
    env = clean_env()
    env.pop("PYTHONPATH", None)
    install = subprocess.run([str(python), "-m", "pip", "install", "--no-deps", "--no-index", "-q", str(wheel)],
                             capture_output=True, text=True, env=env, timeout=300)
    assert install.returncode == 0, install.stderr[-3000:]
    work = tmp_path / "elsewhere"
    work.mkdir()

    def run(code: str):
        return subprocess.run([str(python), "-c", textwrap.dedent(code)], cwd=work, capture_output=True, text=True,
                              env=env, timeout=300)

    absent = run("import importlib.util as u; print([m for m in %r if u.find_spec(m)])" % (EXTRAS,))
    assert absent.returncode == 0 and absent.stdout.strip() == "[]", absent.stdout + absent.stderr
    quick = quickstart_blocks()[0]
    proc = run("from PIL import Image\nImage.new('L', (96, 80), 128).save('chest_xray.jpg')\n" + quick)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "tensor(" in proc.stdout  # the zero-shot probabilities were printed

    plots = run("""
        import numpy as np
        from mlip_fast.eval.plots import plot_roc_curves
        print(plot_roc_curves({"global": np.random.rand(4, 2)}, np.array([[0, 1], [1, 0], [1, 1], [0, 0]]),
                              ["a", "b"], "roc.png"))
    """)
    assert plots.returncode == 0 and plots.stdout.strip() == "None", plots.stderr[-2000:]
    assert "pip install 'mlip_fast[plots]'" in plots.stderr

    train = subprocess.run([str(python.parent / "mlip-train"), "--deepspeed_config", "zero2_fp32"], cwd=work, env=env,
                           capture_output=True, text=True, timeout=120)
    lines = train.stderr.strip().splitlines()
    assert train.returncode == 2 and len(lines) == 1 and "mlip_fast[train]" in lines[0], train.stderr
