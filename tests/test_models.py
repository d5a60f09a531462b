"""Model parts: LoRA at init equals the reference, reference mode, SDXL conditioning, v-prediction."""
import pytest
import torch

from dpo_tutorial.data import PairStream, PairTransform, load_pickapic
from dpo_tutorial.models import (ModelError, add_lora, diffusion_target, encode_prompts, load_parts,
                                 reference_mode, sdxl_time_ids)
from dpo_tutorial.step import dpo_step, unet_forward


def inputs(parts, n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    size = parts.unet.config.sample_size
    latents = torch.randn(n, 4, size, size, generator=g)
    t = torch.randint(0, 1000, (n,), generator=g)
    embeds, pooled = encode_prompts(parts, ["a red circle"] * n)
    added = None
    if parts.is_sdxl:
        ids = sdxl_time_ids(torch.tensor([[32, 32]] * n), torch.zeros(n, 2, dtype=torch.long), 32)
        added = {"text_embeds": pooled, "time_ids": ids.float()}
    return latents, t, embeds, added


@pytest.mark.parametrize("fixture", ["sd_dir", "sdxl_dir"])
def test_lora_at_init_equals_reference_and_reference_mode_turns_it_off(fixture, request):
    parts = load_parts(str(request.getfixturevalue(fixture)))
    latents, t, embeds, added = inputs(parts)
    before = unet_forward(parts.unet, latents, t, embeds, added)
    params = add_lora(parts.unet, rank=4, init_seed=0)
    assert params and all(p.requires_grad for p in params)
    assert sum(p.requires_grad for p in parts.unet.parameters()) == len(params)  # base weights frozen
    torch.testing.assert_close(unet_forward(parts.unet, latents, t, embeds, added), before, rtol=0, atol=0)
    with torch.no_grad():
        for p in params:
            p.add_(0.1)
    assert not torch.allclose(unet_forward(parts.unet, latents, t, embeds, added), before)
    with reference_mode(parts.unet):
        torch.testing.assert_close(unet_forward(parts.unet, latents, t, embeds, added), before)
    assert not torch.allclose(unet_forward(parts.unet, latents, t, embeds, added), before)  # back on


def test_sdxl_parts_and_time_ids(sdxl_dir):
    parts = load_parts(str(sdxl_dir))
    assert parts.is_sdxl and len(parts.text_encoders) == 2
    embeds, pooled = encode_prompts(parts, ["a red circle", "a blue square"])
    assert embeds.shape == (2, 16, 32) and pooled.shape == (2, 16)
    ids = sdxl_time_ids(torch.tensor([[480, 640], [512, 512]]), torch.tensor([[0, 64], [3, 0]]), 256)
    assert ids.tolist() == [[480, 640, 0, 64, 256, 256], [512, 512, 3, 0, 256, 256]]


def test_sdxl_step_uses_each_images_real_size_and_crop(sdxl_dir, pairs_parquet):
    parts = load_parts(str(sdxl_dir))
    add_lora(parts.unet, rank=4)
    batch = next(iter(PairStream(load_pickapic(str(pairs_parquet)), PairTransform(32), batch_size=16, seed=0)))
    sizes = {tuple(s) for s in batch["original_sizes"].tolist()}
    assert (48, 64) in sizes and (40, 32) in sizes  # the odd-sized pair kept its real sizes
    seen = {}

    def record(module, args, output):
        seen.setdefault("ids", args[0].clone())  # the first (policy) pass's flattened time ids

    hook = parts.unet.add_time_proj.register_forward_hook(record)
    out = dpo_step(parts, parts.unet, batch, beta=100.0, generator=torch.Generator().manual_seed(0))
    hook.remove()
    assert torch.isfinite(out.loss)
    flat = seen["ids"].reshape(-1, 6)[:32]
    torch.testing.assert_close(flat[:, :2], batch["original_sizes"].float())


def test_v_prediction_target_matches_formula(tmp_path):
    from dpo_tutorial.testing.fixtures import build_tiny_pipeline

    parts = load_parts(str(build_tiny_pipeline(tmp_path / "v", prediction_type="v_prediction")))
    assert parts.prediction_type == "v_prediction"
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g)
    t = torch.tensor([0, 10, 500, 999])
    abar = parts.noise_scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(diffusion_target(parts.noise_scheduler, x0, eps, t),
                               abar.sqrt() * eps - (1 - abar).sqrt() * x0)
    eps_parts = load_parts(str(tmp_path / "v"), prediction_type="epsilon")
    assert diffusion_target(eps_parts.noise_scheduler, x0, eps, t) is eps


def test_missing_folder_and_offline_hub_id_errors(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        load_parts(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="not a diffusers pipeline folder"):
        load_parts(str(tmp_path / "empty"))
    with pytest.raises(ModelError, match="Offline"):
        load_parts("stable-diffusion-v1-5/stable-diffusion-v1-5")


def test_a_512_px_stand_in_has_sds_8x_latents(tmp_path):
    from dpo_tutorial.testing.fixtures import build_tiny_pipeline
    from dpo_tutorial.models import encode_images, load_parts

    parts = load_parts(str(build_tiny_pipeline(tmp_path / "p", resolution=64, latent_factor=8)))
    assert parts.unet.config.sample_size == 8
    assert encode_images(parts.vae, torch.zeros(2, 3, 64, 64)).shape == (2, 4, 8, 8)


@pytest.mark.parametrize("fixture", ["sd_dir", "sdxl_dir"])
def test_sft_step_runs_the_policy_on_the_winners_only(fixture, request, pairs_parquet):
    """The SFT baseline predicts the B winners once (no losers, no reference) and its loss is the
    winners' MSE of a full 2B policy pass with the same noise and timesteps."""
    from dpo_tutorial.loss import diffusion_dpo_loss
    from dpo_tutorial.step import encode_batch, noisy_prediction

    parts = load_parts(str(request.getfixturevalue(fixture)))
    params = add_lora(parts.unet, rank=4, init_seed=0)
    with torch.no_grad():
        for p in params:
            p.add_(0.05)  # a LoRA that changes the prediction, so a reference pass would differ
    batch = next(iter(PairStream(load_pickapic(str(pairs_parquet)), PairTransform(32), batch_size=4, seed=0)))
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(4, 4, 16, 16, generator=g).repeat(2, 1, 1, 1)  # (2B, ...) shared per pair
    timesteps = torch.tensor([100, 300, 500, 700]).repeat(2)
    rows = []
    hook = parts.unet.register_forward_hook(lambda module, args, output: rows.append(args[0].shape[0]))
    out = dpo_step(parts, parts.unet, batch, beta=100.0, loss_type="sft", noise=noise, timesteps=timesteps,
                   generator=torch.Generator().manual_seed(1))
    hook.remove()
    assert rows == [4]  # one pass over the 4 winners
    encoded = encode_batch(parts, batch, torch.Generator().manual_seed(1), dtype=torch.float32)
    with torch.no_grad():
        full_pred, target = noisy_prediction(parts, parts.unet, encoded, noise, timesteps)  # (2B, ...)
    expected = diffusion_dpo_loss(full_pred, None, target, loss_type="sft")
    torch.testing.assert_close(out.loss.detach(), expected.loss, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(out.model_mse_w, expected.model_mse_w, rtol=1e-5, atol=1e-7)
    assert torch.isnan(out.model_mse_l).all() and torch.isnan(out.implicit_acc)  # never computed
    out.loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in params)  # it trains the LoRA
