"""The model under DeepSpeed ZeRO-3 (one CPU process): a training step, and the encoders called outside
``forward`` (as evaluation code does) see gathered parameters because every parameter is read inside its
own module's forward."""
import pytest
import torch


@pytest.mark.slow
def test_zero3_train_step_and_encoders(one_process_world):
    deepspeed = pytest.importorskip("deepspeed")

    from mlip_fast.losses import MLIPLoss
    from mlip_fast.models import create_model

    # with register tokens: every parameter of the image tower's embeddings is read inside their module's forward
    model = create_model("mlip-tiny", vision={"registers": 2})
    reference = create_model("mlip-tiny", vision={"registers": 2})
    reference.load_state_dict(model.state_dict())
    config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "zero_optimization": {"stage": 3},
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}}}
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
