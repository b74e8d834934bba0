"""The model under DeepSpeed ZeRO-3 (one CPU process): a training step, and the encoders called outside
``forward`` (as evaluation code does) see gathered parameters because every parameter is read inside its
own module's forward."""
import socket

import pytest
import torch


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_zero3_train_step_and_encoders(monkeypatch):
    deepspeed = pytest.importorskip("deepspeed")
    import torch.distributed as dist

    from mlip_fast.losses import MLIPLoss
    from mlip_fast.models import create_model

    for key, value in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                           MASTER_PORT=str(free_port()), DS_ACCELERATOR="cpu").items():
        monkeypatch.setenv(key, value)
    owns_group = not dist.is_initialized()
    model = create_model("mlip-tiny")
    reference = create_model("mlip-tiny")
    reference.load_state_dict(model.state_dict())
    config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "zero_optimization": {"stage": 3},
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}}}
    try:
        engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
        texts = ["Heart size normal. Lungs clear.", "Small left effusion. No pneumothorax."]
        batch = {"images": torch.randn(2, 1, 64, 64), **model.tokenize(texts)}
        engine.eval()
        reference.eval()
        with torch.no_grad():
            torch.testing.assert_close(engine(batch)["patches"], reference(batch)["patches"])
            torch.testing.assert_close(engine.module.encode_text_local(texts)["sentences"], reference.encode_text_local(texts)["sentences"])
            torch.testing.assert_close(engine.module.visual.forward_features(batch["images"]),
                                       reference.visual.forward_features(batch["images"]))
        engine.train()
        loss, _ = MLIPLoss()(**engine(batch, seed=0))
        engine.backward(loss)
        engine.step()
        assert torch.isfinite(loss)
    finally:
        if owns_group and dist.is_initialized():
            # DeepSpeed's own teardown also drops the groups it cached; torch's alone would leave later
            # in-process engines (the training tests) holding a destroyed world group.
            deepspeed.comm.destroy_process_group()
