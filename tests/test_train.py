"""End-to-end training on the tiny SD / SDXL fixtures: train(), the CLI, LoRA export, resume, overfitting."""
import json
import math

import numpy as np
import pytest
import torch

from dpo_tutorial.config import ConfigError, TrainConfig, get_preset
from dpo_tutorial.data import PairStream, PairTransform, load_pickapic
from dpo_tutorial.models import add_lora, export_lora, load_parts
from dpo_tutorial.step import dpo_step
from dpo_tutorial.run_dir import History
from dpo_tutorial.train import train

pytestmark = pytest.mark.slow  # every test here trains


def config(pipe, data, out, **kw):
    base = dict(pretrained=str(pipe), dataset=str(data), output_dir=str(out), resolution=32, batch_size=4,
                max_steps=4, lr=1e-3, beta=500.0, rank=4, sample_steps=2, seed=0)
    return TrainConfig(**{**base, **kw})


@pytest.mark.parametrize("fixture", ["sd_dir", "sdxl_dir"])
def test_train_few_steps_logs_everything(fixture, request, pairs_parquet, tmp_path):
    history = train(config(request.getfixturevalue(fixture), pairs_parquet, tmp_path, grad_accum=2))
    assert len(history) == 4 and [r["step"] for r in history.records] == [1, 2, 3, 4]
    assert history["loss"][0] == pytest.approx(math.log(2), abs=1e-6)  # LoRA starts as the reference
    assert history["implicit_acc"][0] == 0.5
    for key in ("loss", "implicit_acc", "raw_model_loss", "raw_ref_loss", "reward_margin", "lr"):
        assert all(math.isfinite(v) for v in history[key]), key
    assert len(set(history["loss"])) > 1  # the LoRA moved
    logged = History.load(tmp_path)
    assert logged.records == history.records
    assert history.data_summary == {"ties_dropped": 1, "invalid_labels": 0, "undecodable_skipped": 1}
    assert (tmp_path / "samples.png").exists() and (tmp_path / "checkpoint-4" / "state.json").exists()


def test_exported_lora_loads_into_pipeline_and_changes_output(sd_dir, pairs_parquet, tmp_path):
    from diffusers import StableDiffusionPipeline

    train(config(sd_dir, pairs_parquet, tmp_path, max_steps=3, lr=5e-2, sample_grid=False))
    pipe = StableDiffusionPipeline.from_pretrained(str(sd_dir), safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    kw = dict(num_inference_steps=3, output_type="np", generator=torch.Generator().manual_seed(0))
    base = pipe(["a red square"], **kw).images
    again = pipe(["a red square"], **{**kw, "generator": torch.Generator().manual_seed(0)}).images
    np.testing.assert_array_equal(base, again)
    pipe.load_lora_weights(str(tmp_path))
    tuned = pipe(["a red square"], **{**kw, "generator": torch.Generator().manual_seed(0)}).images
    assert np.abs(tuned - base).max() > 1e-3


@pytest.mark.parametrize("alpha", [4, 8])
def test_an_exported_lora_reproduces_the_trained_unet_whatever_its_alpha(alpha, sd_dir, tmp_path):
    """The adapter scales B·A by α/r; a loaded file (which stores no α) must predict what the trained UNet did
    (an α of twice the rank once loaded at half its strength)."""
    from diffusers import StableDiffusionPipeline


    parts = load_parts(str(sd_dir))
    torch.manual_seed(0)
    for p in add_lora(parts.unet, rank=4, alpha=alpha, init_seed=0):
        p.data.add_(0.1 * torch.randn_like(p))                       # B off zero: a trained-looking adapter
    export_lora(parts.unet, tmp_path, is_sdxl=False)
    pipe = StableDiffusionPipeline.from_pretrained(str(sd_dir), safety_checker=None)
    pipe.load_lora_weights(str(tmp_path))
    g = torch.Generator().manual_seed(1)
    x_t = torch.randn(2, parts.unet.config.in_channels, 8, 8, generator=g)
    text = torch.randn(2, 77, parts.unet.config.cross_attention_dim, generator=g)
    timesteps = torch.tensor([10, 500])
    with torch.no_grad():
        trained = parts.unet(x_t, timesteps, text).sample
        loaded = pipe.unet(x_t, timesteps, text).sample
        base = pipe.unet(x_t, timesteps, text, cross_attention_kwargs={"scale": 0.0}).sample
    assert (trained - base).abs().max() > 1e-3                          # the adapter does something
    torch.testing.assert_close(loaded, trained, rtol=1e-4, atol=1e-5)


def test_exported_sdxl_lora_loads(sdxl_dir, pairs_parquet, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    train(config(sdxl_dir, pairs_parquet, tmp_path, max_steps=2, lr=5e-2, sample_grid=False))
    from safetensors.torch import load_file

    exported = load_file(str(tmp_path / "pytorch_lora_weights.safetensors"))
    pipe = StableDiffusionXLPipeline.from_pretrained(str(sdxl_dir))
    pipe.set_progress_bar_config(disable=True)
    kw = dict(num_inference_steps=2, output_type="np", height=32, width=32)
    base = pipe(["a red square"], generator=torch.Generator().manual_seed(0), **kw).images
    pipe.load_lora_weights(str(tmp_path))
    loaded = {n: p for n, p in pipe.unet.named_parameters() if ".lora_" in n}
    # every exported tensor became a LoRA parameter of the SDXL UNet, with the trained values
    assert len(loaded) == len(exported) > 0
    assert sorted(v.abs().sum().item() for v in loaded.values()) == pytest.approx(
        sorted(v.abs().sum().item() for v in exported.values()), rel=1e-5)
    tuned = pipe(["a red square"], generator=torch.Generator().manual_seed(0), **kw).images
    assert np.abs(tuned - base).max() > 1e-4


def test_resume_matches_an_uninterrupted_run(sd_dir, pairs_parquet, tmp_path):
    full = train(config(sd_dir, pairs_parquet, tmp_path / "full", max_steps=6, sample_grid=False))
    train(config(sd_dir, pairs_parquet, tmp_path / "cut", max_steps=3, checkpoint_every=3, sample_grid=False))
    resumed = train(config(sd_dir, pairs_parquet, tmp_path / "cut", max_steps=6, resume="latest",
                           sample_grid=False))
    assert [r["step"] for r in resumed.records] == [1, 2, 3, 4, 5, 6]  # step count continued
    np.testing.assert_allclose(resumed["loss"], full["loss"], rtol=1e-5, atol=1e-7)
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "full" / "pytorch_lora_weights.safetensors"))
    b = load_file(str(tmp_path / "cut" / "pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


def test_fixed_noise_and_timesteps_overfit(sd_dir, pairs_parquet):
    """Noise and timesteps held fixed: a few pairs are learnt perfectly (loss -> 0, accuracy -> 1)."""
    parts = load_parts(str(sd_dir))
    params = add_lora(parts.unet, rank=8, init_seed=0)
    batch = next(iter(PairStream(load_pickapic(str(pairs_parquet)), PairTransform(32), batch_size=4, seed=0)))
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(4, 4, 16, 16, generator=g).repeat(2, 1, 1, 1)
    timesteps = torch.tensor([100, 300, 500, 700]).repeat(2)
    opt = torch.optim.AdamW(params, lr=3e-3)
    for step in range(100):
        out = dpo_step(parts, parts.unet, batch, beta=2000.0, generator=torch.Generator().manual_seed(1),
                       noise=noise, timesteps=timesteps)
        if step == 0:
            assert out.loss.item() == pytest.approx(math.log(2), abs=1e-6)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    assert out.loss.item() < 0.05 and out.implicit_acc.item() == 1.0


def test_output_dir_with_other_runs_checkpoints_is_refused(sd_dir, pairs_parquet, tmp_path):
    train(config(sd_dir, pairs_parquet, tmp_path, max_steps=1, sample_grid=False))
    with pytest.raises(ConfigError, match="already holds checkpoints.*--resume latest"):
        train(config(sd_dir, pairs_parquet, tmp_path, max_steps=2, sample_grid=False))


def test_cli_train_runs_and_reports(sd_dir, pairs_parquet, tmp_path, capsys):
    from dpo_tutorial.cli import main

    rc = main(["train", "--pretrained", str(sd_dir), "--dataset", str(pairs_parquet), "--output-dir", str(tmp_path),
               "--max-steps", "2", "--batch-size", "2", "--resolution", "32", "--beta", "1000", "--lr", "1e-3",
               "--rank", "4", "--seed", "3", "--checkpoint-every", "1", "--no-sample-grid", "--lr-scheduler", "constant"])
    assert rc == 0
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["beta"] == 1000.0 and saved["rank"] == 4 and saved["seed"] == 3 and saved["sample_grid"] is False
    toy = get_preset("toy")  # flags override the preset, the rest comes from it
    assert saved["max_train_pairs"] == toy.max_train_pairs and saved["lr_warmup_steps"] == toy.lr_warmup_steps
    assert saved["guidance_scale"] == toy.guidance_scale and saved["sample_steps"] == toy.sample_steps
    assert "done: 2 steps" in capsys.readouterr().out
    assert (tmp_path / "pytorch_lora_weights.safetensors").exists()
    resume = ["train", "--pretrained", str(sd_dir), "--dataset", str(pairs_parquet), "--output-dir", str(tmp_path),
              "--max-steps", "3", "--batch-size", "2", "--resolution", "32", "--resume", "latest", "--no-sample-grid"]
    assert main(resume) == 2  # the preset's rank 8, beta, lr and seed differ from the checkpoint's
    err = capsys.readouterr().err
    assert "cannot resume" in err and "rank: checkpoint 4 vs now 8" in err and "seed: checkpoint 3 vs now 0" in err
    same = ["--rank", "4", "--beta", "1000", "--lr", "1e-3", "--seed", "3", "--lr-scheduler", "constant"]
    assert main(resume + same) == 0 and History.load(tmp_path).records[-1]["step"] == 3


def test_full_finetune_sft_keeps_no_reference_copy(sd_dir, pairs_parquet, tmp_path):
    """SFT never runs a reference, so a full fine-tune with it holds one UNet, not two; DPO holds the copy."""
    from dpo_tutorial.train import setup_run

    sft = setup_run(config(sd_dir, pairs_parquet, tmp_path / "sft", max_steps=1, full_finetune=True, loss_type="sft",
                           sample_grid=False))
    dpo = setup_run(config(sd_dir, pairs_parquet, tmp_path / "dpo", max_steps=1, full_finetune=True, sample_grid=False))
    assert sft.ref_unet is None and dpo.ref_unet is not None


def test_full_finetune_with_frozen_reference_and_gradient_checkpointing(sd_dir, pairs_parquet, tmp_path):
    """The paper's setting: the whole UNet trains against a frozen copy; the export is a UNet folder."""
    from diffusers import UNet2DConditionModel

    history = train(config(sd_dir, pairs_parquet, tmp_path, max_steps=3, full_finetune=True, lr=1e-3,
                           gradient_checkpointing=True, sample_grid=False, lr_scheduler="cosine", lr_warmup_steps=1))
    assert history["loss"][0] == pytest.approx(math.log(2), abs=1e-6)  # the copy starts equal to the policy
    assert len(set(history["loss"])) > 1 and history["lr"][0] > history["lr"][-1]  # it moved; cosine decays
    tuned = UNet2DConditionModel.from_pretrained(str(tmp_path / "unet"))
    base = UNet2DConditionModel.from_pretrained(str(sd_dir / "unet"))
    assert any(not torch.equal(a, b) for a, b in zip(tuned.parameters(), base.parameters()))
