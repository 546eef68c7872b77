"""The reward model's CUDA path (bf16 backbone, fp32 adapters): runs where a GPU is present, skips elsewhere."""
import pytest
import torch

from reward_service.mole import MoLEConfig
from reward_service.reward_model import RewardModel, RewardModelConfig
from reward_service.training import train_reward_model
from tests.test_reward_model import D_USER, PROMPTS, RESPONSES, randomize, toy_data
from trainer.profiles import profile

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def cuda_model():
    cfg = RewardModelConfig(max_length=48, mole=MoLEConfig(user_dim=D_USER, num_experts=4, rank=4))  # auto: cuda, bf16
    return randomize(RewardModel(cfg))


def test_auto_picks_cuda_bf16(cuda_model):
    assert cuda_model.device.type == "cuda"
    assert next(cuda_model.backbone.parameters()).dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in cuda_model.trainable_parameters().values())


def test_mixed_batch_matches_per_user_within_bf16_precision(cuda_model):
    users = torch.randn(len(PROMPTS), D_USER)
    with torch.no_grad():
        mixed = cuda_model(**cuda_model.tokenize(PROMPTS, RESPONSES), user_emb=users).float().cpu()
        single = torch.stack([cuda_model(**cuda_model.tokenize([p], [r]), user_emb=u[None])[0]
                              for p, r, u in zip(PROMPTS, RESPONSES, users)]).float().cpu()
    # bf16 keeps 8 bits of mantissa: padded and unpadded batches differ in the last bits only
    torch.testing.assert_close(mixed, single, atol=2e-2 * max(1.0, float(single.abs().max())), rtol=2e-2)


def test_save_load_on_cuda_gives_the_same_scores(cuda_model, tmp_path):
    users = torch.randn(len(PROMPTS), D_USER)
    enc = cuda_model.tokenize(PROMPTS, RESPONSES)
    with torch.no_grad():
        before = cuda_model(**enc, user_emb=users)
    cuda_model.save(tmp_path / "rm")
    loaded = RewardModel.load(tmp_path / "rm").eval()
    with torch.no_grad():
        after = loaded(**loaded.tokenize(PROMPTS, RESPONSES), user_emb=users)
    torch.testing.assert_close(before, after)


def test_training_on_cuda_learns_opposite_tastes():
    prof = profile("tiny")
    model = RewardModel(prof.reward_model)  # device auto -> cuda
    metrics = train_reward_model(model, toy_data(8, 8, seed=1), toy_data(4, 8, seed=2), prof.reward_training,
                                 progress=False)
    assert metrics["selection_accuracy"] >= 0.9


def test_frozen_prefix_path_on_cuda_matches_the_full_forward():
    model = randomize(RewardModel(RewardModelConfig(max_length=48, mole=MoLEConfig(
        user_dim=D_USER, num_experts=4, rank=4, target_modules=("query", "value", "output.dense"), last_n_layers=2))))
    assert model.frozen_blocks == 4 and model.dtype == torch.bfloat16
    users = torch.randn(len(PROMPTS), D_USER)
    with torch.no_grad():
        full = model(**model.tokenize(PROMPTS, RESPONSES), user_emb=users).cpu()
        cached = model.forward_frozen(model.encode_frozen(PROMPTS, RESPONSES), users).cpu()
    torch.testing.assert_close(cached, full, atol=2e-2 * max(1.0, float(full.abs().max())), rtol=2e-2)
