"""``python -m mlip_fast env``: the environment report a bug report needs (as torch's collect_env): versions from
package metadata (DeepSpeed is not imported, so it prints nothing), the devices, and for every op and the ViT
attention the backends that can run here and why the others cannot; ``--version``."""
import json
import subprocess
import sys

import pytest
import torch

from mlip_fast.__main__ import collect_env, format_env, main
from mlip_fast._records import package_version
from tests.train.conftest import REPO, clean_env


def test_env_report_names_versions_devices_and_why_backends_cannot_run(capsys):
    env = collect_env()
    assert env["packages"]["torch"] == package_version("torch") and env["packages"]["scikit-learn"]
    assert env["devices"]["cpu"]["logical_cores"] >= 1
    cuda = env["devices"]["cuda"]
    assert cuda["available"] == torch.cuda.is_available() and (cuda["available"] or cuda["why_not"])
    cpu = env["backends"]["cpu float32"]
    assert cpu["vit_attention"]["sdpa"] == "available"
    assert cpu["vit_attention"]["flash"].startswith("device cpu not supported")
    assert set(cpu) == {"vit_attention", "patch_sentence_scores", "patch_sentence_ot_scores", "integrity_mask"}
    assert cpu["patch_sentence_scores"]["reference"] == "available"
    text = format_env(env)
    assert "backends on cpu float32 (in auto's order; why the others cannot run)" in text
    assert main(["env", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["mlip_fast"]["license"] == "MIT"


def test_env_from_the_command_line_imports_no_deepspeed():
    code = ("import sys; from mlip_fast.__main__ import main; main(['env']); "
            "assert not [m for m in sys.modules if m.startswith('deepspeed')], 'deepspeed imported'")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=clean_env(), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "Setting accelerator" not in proc.stdout + proc.stderr and proc.stdout.startswith("mlip_fast\n")


def test_version_flag(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    out = capsys.readouterr().out
    assert info.value.code == 0 and out.startswith("mlip_fast 0.1.0 (python ") and "deepspeed 0." in out
