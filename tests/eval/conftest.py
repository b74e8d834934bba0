"""Shared fixtures: a small synthetic benchmark and a tiny randomly initialised checkpoint."""
import pytest
import torch


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory):
    from mlip_fast.data.synth import generate

    root = tmp_path_factory.mktemp("synth40")
    generate(root, n=40, seed=3, size=64, workers=1, splits=(0.6, 0.1, 0.3))
    return root


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    from mlip_fast.models import create_model_and_transforms

    torch.manual_seed(0)
    model, _, _ = create_model_and_transforms("mlip-tiny")
    path = tmp_path_factory.mktemp("ckpt") / "mlip-tiny"
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model(tiny_checkpoint):
    from mlip_fast.eval.common import load_checkpoint

    return load_checkpoint(tiny_checkpoint)


@pytest.fixture(scope="session")
def eval_tf(tiny_model):
    from mlip_fast.eval.common import eval_transform

    return eval_transform(tiny_model)
