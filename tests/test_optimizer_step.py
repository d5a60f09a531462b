"""One optimizer step under the settings no other test runs: bf16 (LoRA and full fine-tune), gradient accumulation."""
import math
import sys

import pytest
import torch

import dpo_tutorial.train  # noqa: F401  (the module; the package's name `train` is the function)
from conftest import tiny_config
from dpo_tutorial.train import optimizer_step, setup_run

pytestmark = pytest.mark.slow


def _dtype_checks(modules: dict) -> tuple[list, list]:
    """Forward pre-hooks that record, per module, (floating input dtype, the module's first parameter's dtype)."""
    seen, hooks = [], []
    for name, module in modules.items():
        def record(mod, args, kwargs, name=name):
            first = next(a for a in (*args, *kwargs.values()) if torch.is_tensor(a))
            if first.is_floating_point():
                seen.append((name, first.dtype, next(mod.parameters()).dtype))
        hooks.append(module.register_forward_pre_hook(record, with_kwargs=True))
    return seen, hooks


def _one_step(sd_dir, pairs_parquet, out, **kw):
    run = setup_run(tiny_config(sd_dir, pairs_parquet, out, batch_size=4, max_steps=3, **kw))
    modules = {"vae": run.parts.vae.encoder, "unet": run.accelerator.unwrap_model(run.unet)}
    if run.ref_unet is not None:
        modules["reference"] = run.ref_unet
    seen, hooks = _dtype_checks(modules)
    batches = iter(run.stream)
    outs, updated, finite = optimizer_step(run, batches)
    for h in hooks:
        h.remove()
    run.accelerator.end_training()
    return outs[0], updated and finite, seen


@pytest.mark.parametrize("full_finetune", [False, True], ids=["lora", "full"])
def test_bf16_step_matches_fp32_and_every_forward_gets_its_modules_dtype(full_finetune, sd_dir, pairs_parquet,
                                                                         tmp_path):
    """bf16 keeps the frozen weights (and a full fine-tune's reference copy) in bf16 and trains fp32 weights under
    autocast. Measured on the tiny stand-in: a LoRA step's loss is log 2 in both (policy and reference round alike),
    a full fine-tune's is 5.1e-3 away (its fp32 policy under autocast against the bf16 copy), the policy's error
    3e-4 (relative) away; the tolerances are 2e-2 and 5e-3."""
    fp32, ok32, _ = _one_step(sd_dir, pairs_parquet, tmp_path / "fp32", full_finetune=full_finetune)
    bf16, ok16, seen = _one_step(sd_dir, pairs_parquet, tmp_path / "bf16", full_finetune=full_finetune,
                                 mixed_precision="bf16")
    assert ok32 and ok16 and math.isfinite(bf16.loss.item())
    assert abs(bf16.loss.item() - fp32.loss.item()) <= 2e-2
    torch.testing.assert_close(bf16.raw_model_loss.float(), fp32.raw_model_loss.float(), rtol=5e-3, atol=0)
    names = {name for name, _, _ in seen}
    assert names == ({"vae", "unet", "reference"} if full_finetune else {"vae", "unet"})
    mismatched = [(name, got, want) for name, got, want in seen if got != want]
    assert mismatched == []
    frozen = {name: want for name, _, want in seen}
    assert frozen["vae"] == torch.bfloat16 and frozen.get("reference", torch.bfloat16) == torch.bfloat16
    assert frozen["unet"] == (torch.float32 if full_finetune else torch.bfloat16)  # LoRA: frozen base weights


def _fixed_batch(run, pairs: list[int], seed: int = 0) -> dict:
    """A latent-cache-format batch of the given pair indices with zero posterior std and fixed per-pair noise and
    timesteps, so a pair's contribution is the same whichever batch it sits in."""
    g = torch.Generator().manual_seed(seed)
    n = 8
    size = run.parts.unet.config.sample_size
    mean = torch.randn(2 * n, 4, size, size, generator=g)  # (2n, C, h, w): winners 0..n-1, then losers
    noise = torch.randn(n, 4, size, size, generator=g)  # (n, C, h, w): one per pair
    timesteps = torch.randint(0, 1000, (n,), generator=g)
    embeds = torch.randn(n, 16, 16, generator=g)
    idx = torch.tensor(pairs)
    rows = torch.cat([idx, idx + n])  # winners then losers of the chosen pairs
    return {"latent_mean": mean[rows], "latent_std": torch.zeros_like(mean[rows]),
            "time_ids": torch.zeros(2 * len(pairs), 6), "prompt_embeds": embeds[idx], "captions": [""] * len(pairs),
            "noise": noise[idx].repeat(2, 1, 1, 1), "timesteps": timesteps[idx].repeat(2)}


def _fix_the_draws(monkeypatch) -> None:
    """Make every step use the noise and timesteps its batch carries (see :func:`_fixed_batch`)."""
    train_module = sys.modules["dpo_tutorial.train"]
    real = train_module.dpo_step

    def fixed(parts, unet, batch, *args, **kwargs):
        return real(parts, unet, batch, *args, noise=batch["noise"], timesteps=batch["timesteps"], **kwargs)

    monkeypatch.setattr(train_module, "dpo_step", fixed)


def _gradients_of_one_update(run, batches) -> list[torch.Tensor]:
    """The gradients ``optimizer.step`` sees in one :func:`optimizer_step` over ``batches``."""
    grads = []
    inner = run.optimizer.optimizer
    hook = inner.register_step_pre_hook(lambda opt, args, kwargs: grads.extend(p.grad.clone() for p in run.params))
    optimizer_step(run, iter(batches))
    hook.remove()
    return grads


def test_k_micro_batches_give_the_update_of_one_batch_of_k_times_the_pairs(sd_dir, pairs_parquet, tmp_path,
                                                                            monkeypatch):
    """Gradient accumulation must average over micro-batches: 2 micro-batches of 2 pairs = 1 batch of 4 pairs (the
    loss is a mean over pairs). Measured: the two gradients (all LoRA tensors as one vector) differ by 3.2e-6 of
    their norm (float32 sums in another order); the tolerance is 1e-4, while a missing or doubled 1/k would make
    that ratio 0.5 or 1."""
    settings = dict(max_grad_norm=0, lr=1e-2)
    _fix_the_draws(monkeypatch)
    grads = {}
    # one run at a time: accelerate keeps one gradient-accumulation state per process
    for name, batch_size, grad_accum, batches in (("accum", 2, 2, [[0, 1], [2, 3]]), ("whole", 4, 1, [[0, 1, 2, 3]])):
        run = setup_run(tiny_config(sd_dir, pairs_parquet, tmp_path / name, batch_size=batch_size,
                                    grad_accum=grad_accum, **settings))
        torch.manual_seed(1)  # a LoRA that already moves the prediction, the same in both runs
        with torch.no_grad():
            for p in run.params:
                p.add_(0.05 * torch.randn_like(p))
        grads[name] = _gradients_of_one_update(run, [_fixed_batch(run, pairs) for pairs in batches])
        run.accelerator.end_training()
    g_accum, g_whole = grads["accum"], grads["whole"]
    assert len(g_accum) == len(g_whole) > 0 and max(g.abs().max() for g in g_whole) > 1e-6
    a, b = torch.cat([g.flatten() for g in g_accum]), torch.cat([g.flatten() for g in g_whole])
    assert ((a - b).norm() / b.norm()).item() < 1e-4
