"""``train(config) -> History``: Diffusion-DPO fine-tuning of a LoRA (or the whole UNet) on accelerate.

One optimizer step (per micro-batch of ``B`` pairs, see :func:`dpo_step`):

1. encode the ``2B`` images (winners then losers) to latents with the frozen VAE,
2. encode the ``B`` captions once and repeat them for the ``2B`` images,
3. draw one noise and one timestep per pair (:mod:`dpo_tutorial.noise`) and noise the latents,
4. policy pass (LoRA on) and reference pass (LoRA off, no grad),
5. :func:`dpo_tutorial.loss.diffusion_dpo_loss`, backward, clip, step.

Every optimizer step appends one JSON line to ``<output_dir>/history.jsonl`` (flushed at once, so a
crash loses nothing logged); checkpoints are atomic (:mod:`dpo_tutorial.checkpoint`); the final LoRA is
``<output_dir>/pytorch_lora_weights.safetensors`` in the diffusers format.
"""
from __future__ import annotations

import json
import os
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import checkpoint as ckpt
from .cache import auto_cache
from .config import ConfigError, TrainConfig
from .data import PairStream, PairTransform, check_dataset_source, load_pickapic
from .loss import DPOLossOutput
from .models import DiffusionParts, add_lora, check_source, frozen_copy, load_parts
from .prefetch import Prefetcher
from .run_dir import (append_record, check_output_dir, config_differences, lock_output_dir,
                      read_history, release_output_dir, truncate_history, write_atomic)
from .step import dpo_step
from .summary import heldout_accuracy, tail_means

METRICS = ("loss", "implicit_acc", "raw_model_loss", "raw_ref_loss", "reward_margin",
           "model_mse_w", "model_mse_l")


@dataclass
class History:
    """What a run logged: one dict per optimizer step, plus where its artefacts are."""

    records: list[dict] = field(default_factory=list)
    output_dir: str = ""
    lora_path: str | None = None
    data_summary: dict = field(default_factory=dict)
    summary: dict = field(default_factory=dict)  # the closing report (dpo_tutorial.summary), also summary.json

    def __getitem__(self, key: str) -> list:
        """All logged values of ``key``, in step order (e.g. ``history["loss"]``)."""
        return [r[key] for r in self.records if key in r]

    def __len__(self) -> int:
        return len(self.records)

    @classmethod
    def load(cls, output_dir: str | Path) -> "History":
        """Read a finished or interrupted run: ``history.jsonl`` (a torn last line is dropped, with a
        warning), ``summary.json`` (else the last-10% means of the records) and the LoRA's path."""
        out = Path(output_dir)
        records = read_history(out / "history.jsonl")
        summary = out / "summary.json"
        lora = out / "pytorch_lora_weights.safetensors"
        return cls(records=records, output_dir=str(output_dir), lora_path=str(lora) if lora.exists() else None,
                   summary=json.loads(summary.read_text()) if summary.exists() else tail_means(records))


# ------------------------------------------------------------------------------------ set-up
def _accelerator(config: TrainConfig):
    from accelerate import Accelerator

    # Several processes without a GPU (torchrun / accelerate launch on CPU): accelerate only forms a gloo
    # process group when told cpu=True; otherwise each process would silently train alone.
    multi_cpu = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    return Accelerator(gradient_accumulation_steps=config.grad_accum, mixed_precision=config.mixed_precision,
                       log_with=config.report_to, project_dir=config.output_dir, cpu=multi_cpu)


def _set_threads(config: TrainConfig, world_size: int) -> None:
    """Avoid CPU oversubscription: each of ``world_size`` processes gets its share of the cores.

    Order of precedence: ``config.num_threads``, then ``OMP_NUM_THREADS``, then cores / processes.
    Several torch processes each using every core made a CPU step 10-50x slower in our measurements.
    The call is skipped when torch already has that many threads: ``torch.set_num_threads`` also
    turns MKL's dynamic threading off, which made CPU attention ~3x slower (issue 17's profile).
    """
    threads = (config.num_threads or int(os.environ.get("OMP_NUM_THREADS", "0") or 0)
               or max(1, (os.cpu_count() or 1) // world_size))
    set_threads(threads)


def set_threads(threads: int) -> None:
    """``torch.set_num_threads(threads)`` only when the count changes (see :func:`_set_threads`)."""
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


def _prepare_model(parts: DiffusionParts, config: TrainConfig, weight_dtype: torch.dtype):
    """Freeze what is not trained, add the LoRA (or unfreeze for full FT); return (params, ref_unet)."""
    unet = parts.unet
    frozen = [parts.vae, *parts.text_encoders] + ([] if config.full_finetune else [unet])
    if weight_dtype != torch.float32:  # frozen weights in half precision; trained ones stay fp32
        for module in frozen:
            module.to(dtype=weight_dtype)
    ref_unet = None
    if config.full_finetune:
        if config.loss_type != "sft":  # SFT never runs a reference: no second UNet in memory
            ref_unet = frozen_copy(unet).to(dtype=weight_dtype)
        unet.requires_grad_(True)
        params = list(unet.parameters())
    else:
        params = add_lora(unet, config.rank, config.lora_alpha, init_seed=config.seed)
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    apply_speed_options(config, [u for u in (unet, ref_unet) if u is not None])
    unet.train()
    return params, ref_unet


def apply_speed_options(config: TrainConfig, unets: list) -> None:
    """Opt-in GPU speed settings (each benchmarked in ``benchmarks/``, none assumed to help)."""
    if config.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    for unet in unets:
        if config.channels_last:
            unet.to(memory_format=torch.channels_last)
        if config.compile_unet:
            unet.compile()  # in place: parameter names (LoRA export, checkpoints) stay unchanged


def _check_resume_compatible(path: Path, config: TrainConfig, world_size: int) -> None:
    """Refuse to resume a checkpoint made with other settings or another process count.

    Which fields may differ: :data:`dpo_tutorial.run_dir.RESUME_MAY_CHANGE`.

    The allowed fields that changed are applied (the new config drives the run) and logged as a warning.
    """
    try:
        state = json.loads((path / "state.json").read_text())
    except (OSError, ValueError) as err:
        raise ckpt.CheckpointError(f"checkpoint {path} has an unreadable state.json ({err})") from err
    saved = state.get("config", {})
    diffs = config_differences(saved, config)
    if state.get("world_size", world_size) != world_size:
        diffs.append(f"processes: checkpoint {state['world_size']} vs now {world_size}")
    if diffs:
        raise ConfigError(f"cannot resume from {path}: it was made with other settings ({'; '.join(diffs)}); "
                          "pass the same values or start a new --output-dir")
    changed = config_differences(saved, config, allowed=("resume", "output_dir"))
    if changed:
        warnings.warn(f"resuming from {path} with changed settings, applied: {'; '.join(changed)}")


def make_optimizer(params, config: TrainConfig):
    """AdamW over the trainable parameters: bitsandbytes' 8-bit one when asked, else torch's fused kernel.

    The fused kernel updates every tensor in one call; with ~100 small LoRA tensors it is 3.5x faster
    than the per-tensor loop on CPU (``benchmarks/bench_step.py``) and gives the same update.
    """
    if config.use_8bit_adam:
        try:
            import bitsandbytes as bnb
        except ImportError as err:
            raise ConfigError("use_8bit_adam needs bitsandbytes: pip install bitsandbytes") from err
        return bnb.optim.AdamW8bit(params, lr=config.lr, weight_decay=config.weight_decay)
    params = list(params)
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay, fused=fused)


def _trainable_state(unet) -> dict[str, torch.Tensor]:
    return {n: p for n, p in unet.named_parameters() if p.requires_grad}


def export_lora(unet, output_dir: str | Path, is_sdxl: bool) -> Path:
    """Write ``pytorch_lora_weights.safetensors`` in the diffusers format (``load_lora_weights`` reads it).

    It is written in a temporary folder and renamed into place, so a cut export never looks finished.
    """
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    state = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    state = {k: v.detach().float().cpu().contiguous() for k, v in state.items()}
    cls = StableDiffusionXLPipeline if is_sdxl else StableDiffusionPipeline
    name, tmp = "pytorch_lora_weights.safetensors", Path(output_dir) / ".tmp-lora"
    shutil.rmtree(tmp, ignore_errors=True)
    cls.save_lora_weights(save_directory=str(tmp), unet_lora_layers=state, safe_serialization=True)
    os.replace(tmp / name, Path(output_dir) / name)
    shutil.rmtree(tmp, ignore_errors=True)
    return Path(output_dir) / name


# ------------------------------------------------------------------------------------ the loop
def _mean_metrics(outs: list[DPOLossOutput], accelerator) -> dict:
    """Average each metric over micro-batches and processes."""
    values = torch.stack([torch.stack([getattr(o, m).float().mean() if m != "reward_margin"
                                       else o.reward_margin.float() for m in METRICS]) for o in outs]).mean(0)
    values = accelerator.reduce(values.to(accelerator.device), reduction="mean")
    return {m: float(v) for m, v in zip(METRICS, values.tolist())}


@dataclass
class TrainingRun:
    """Everything one training run holds (built by :func:`setup_run`)."""

    config: TrainConfig
    accelerator: object
    parts: DiffusionParts
    unet: torch.nn.Module  # the policy, as prepared by accelerate (may be DDP-wrapped)
    ref_unet: torch.nn.Module | None
    params: list
    optimizer: object
    lr_scheduler: object
    stream: PairStream
    generator: torch.Generator
    out: Path
    history: History
    batches: Prefetcher | None = None  # set by train(): the stream, read ahead in a background thread
    cached: bool = False  # the stream reads a latent cache (lookups, nothing to decode)


def prefetch_depth(config: TrainConfig, device: torch.device, cached: bool) -> int:
    """Batches to read ahead in a background thread: ``config.prefetch`` when set, else 2 on an accelerator reading
    images and 0 otherwise. On a CPU-only run the compute already uses every core, and a reader thread beside it
    only slows the step (toy, 2 threads, from the latent cache: 0.19 s a step in the loop, 0.32 s with the thread)."""
    if config.prefetch is not None:
        return config.prefetch
    return 0 if cached or device.type == "cpu" else 2


def setup_run(config: TrainConfig) -> TrainingRun:
    """Validate ``config``, start accelerate, load data and models, add the LoRA, build optimizer and schedule."""
    from accelerate.utils import set_seed
    from diffusers.optimization import get_scheduler

    config.validate()
    check_source(config.pretrained)  # cheap checks first: a typo or an unreachable Hub fails in one line,
    if not config.cache:              # before accelerate or anything heavy starts
        check_dataset_source(config.dataset, config.split)
    accelerator = _accelerator(config)
    if config.num_processes and accelerator.num_processes != config.num_processes:
        raise ConfigError(f"expected {config.num_processes} processes but this run has {accelerator.num_processes}: "
                          "the launcher started a different number (on CPU, `accelerate launch --cpu "
                          "--num_processes 2` silently starts one); see README 'When one machine is not enough'")
    _set_threads(config, accelerator.num_processes)
    check_output_dir(config)
    if accelerator.is_main_process:
        lock_output_dir(config.output_dir)
    set_seed(config.seed)
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    stream = make_stream(config, accelerator.process_index, accelerator.num_processes)  # bad data fails here,
    parts = load_parts(config.pretrained, config.vae, config.prediction_type)       # before any model loads
    parts.vae_encode_batch_size = config.vae_encode_batch_size
    params, ref_unet = _prepare_model(parts, config, weight_dtype)
    for module in (parts.vae, *parts.text_encoders, *([ref_unet] if ref_unet is not None else [])):
        module.to(accelerator.device)
    with accelerator.main_process_first():  # the main process builds the run's latent cache, the others read it
        cache_dir = auto_cache(config, parts, accelerator.num_processes)
    if cache_dir:
        stream = make_stream(config, accelerator.process_index, accelerator.num_processes, cache_dir)
    optimizer = make_optimizer(params, config)
    lr_scheduler = get_scheduler(config.lr_scheduler, optimizer,
                                 num_warmup_steps=config.lr_warmup_steps * accelerator.num_processes,
                                 num_training_steps=config.max_steps * accelerator.num_processes)
    unet, optimizer, lr_scheduler = accelerator.prepare(parts.unet, optimizer, lr_scheduler)
    generator = torch.Generator(device=accelerator.device).manual_seed(config.seed + accelerator.process_index)
    out = Path(config.output_dir)
    return TrainingRun(config=config, accelerator=accelerator, parts=parts, unet=unet, ref_unet=ref_unet,
                       params=params, optimizer=optimizer, lr_scheduler=lr_scheduler, stream=stream,
                       generator=generator, out=out, history=History(output_dir=str(out)),
                       cached=bool(cache_dir or config.cache))


def make_stream(config: TrainConfig, rank: int, world_size: int, cache_dir: str | Path | None = None) -> PairStream:
    """This process's share of the pairs: streamed data split by node, map-style data sharded by rank; from the
    latent cache ``cache_dir`` (default ``config.cache``) when there is one."""
    cache_dir = cache_dir or config.cache
    if cache_dir:
        from .cache import LatentCache

        cache = LatentCache(cache_dir, config)
        return PairStream(cache, cache.transform, config.batch_size, seed=config.seed, max_pairs=config.max_train_pairs,
                          make=cache.make, collate=cache.collate, rank=rank, world_size=world_size)
    dataset = load_pickapic(config.dataset, config.split, config.streaming)
    if config.streaming and world_size > 1:
        from datasets.distributed import split_dataset_by_node
        dataset = split_dataset_by_node(dataset, rank, world_size)
    transform = PairTransform(config.resolution, config.random_crop, config.random_flip)
    return PairStream(dataset, transform, config.batch_size, seed=config.seed,
                      empty_prompt_prob=config.empty_prompt_prob, max_pairs=config.max_train_pairs,
                      rank=0 if config.streaming else rank, world_size=1 if config.streaming else world_size)


def _resume_and_open_logs(run: TrainingRun) -> int:
    """Restore the checkpoint asked for (if any), prepare the output folder; return the start step."""
    config, acc = run.config, run.accelerator
    start_step = 0

    def load(path: Path) -> dict:
        _check_resume_compatible(path, config, acc.num_processes)
        return ckpt.load_checkpoint(path, acc.unwrap_model(run.unet), run.optimizer, run.lr_scheduler,
                                    run.generator, rank=acc.process_index, scaler=acc.scaler)

    resume_from, state = ckpt.load_first_good(ckpt.resume_candidates(config.resume, run.out), load)
    if resume_from is not None:
        start_step = state["step"]
        run.stream.load_state_dict(state["data"])
    if acc.is_main_process:
        run.out.mkdir(parents=True, exist_ok=True)
        ckpt.clean_partial(run.out)
        ckpt.remove_after(run.out, start_step)  # one timeline: `latest` continues this run, not an abandoned one
        run.history.records = truncate_history(run.out / "history.jsonl", start_step)
        effective = config.batch_size * config.grad_accum * acc.num_processes
        write_atomic(run.out / "config.json", json.dumps(
            {**config.to_dict(), "effective_batch_pairs": effective, "world_size": acc.num_processes}, indent=1))
        if config.report_to:
            acc.init_trackers("dpo-tutorial", config={k: v for k, v in config.to_dict().items()
                                                     if isinstance(v, (int, float, str, bool))})
    acc.wait_for_everyone()
    return start_step


def optimizer_step(run: TrainingRun, batches) -> tuple[list[DPOLossOutput], bool, bool]:
    """``grad_accum`` micro-batches, then one update. Returns (outputs, updated, finite).

    A non-finite loss or gradient skips the update (``finite`` False). Under fp16 the GradScaler owns
    overflowing gradients: it skips that update itself and lowers its scale, which is routine in the first
    steps, so only a non-finite *loss* counts as non-finite there.
    """
    config, acc = run.config, run.accelerator
    scaled = acc.scaler is not None
    scale_before = acc.scaler.get_scale() if scaled else None
    outs, loss_ok, grads_ok = [], True, True
    for _ in range(config.grad_accum):
        batch = next(batches)
        with acc.accumulate(run.unet):
            result = dpo_step(run.parts, run.unet, batch, config.beta, config.loss_type, run.generator,
                              run.ref_unet, resolution=config.resolution)
            acc.backward(result.loss)  # every process backprops, so DDP never waits for a skipped one
            loss_ok = loss_ok and bool(torch.isfinite(result.loss))
            if acc.sync_gradients:
                grads_ok = loss_ok and _gradients_finite(run)
                if loss_ok and (grads_ok or scaled):
                    run.optimizer.step()  # fp16: the scaler skips it when the gradients overflowed
                    run.lr_scheduler.step()
                run.optimizer.zero_grad(set_to_none=True)
        outs.append(result)
    # the scaler lowers its scale exactly when it skipped an overflowing update (accelerate's own
    # step_was_skipped misses that for fused optimizers, which the scaler always calls)
    skipped_by_scaler = scaled and acc.scaler.get_scale() < scale_before
    return outs, loss_ok and grads_ok and not skipped_by_scaler, loss_ok and (grads_ok or scaled)


def _gradients_finite(run: TrainingRun) -> bool:
    """Clip (when ``max_grad_norm`` > 0) and report whether every gradient is finite.

    The total norm that clipping computes is finite iff every gradient is, so it doubles as the check.
    """
    if run.config.max_grad_norm > 0:
        norm = run.accelerator.clip_grad_norm_(run.params, run.config.max_grad_norm)
        if norm is not None:
            return bool(torch.isfinite(norm))
    return all(p.grad is None or bool(torch.isfinite(p.grad).all()) for p in run.params)


def _log(run: TrainingRun, step: int, outs: list[DPOLossOutput], updated: bool, seconds: float, bar,
         data_seconds: float = 0.0) -> None:
    """Append the step's record to ``history.jsonl`` (``data_seconds``: time the step waited for its batches)."""
    record = {"step": step, **_mean_metrics(outs, run.accelerator), "lr": run.lr_scheduler.get_last_lr()[0],
              "skipped_update": not updated, "skipped_pairs": sum(run.stream.skipped.values()),
              "seconds": round(seconds, 3), "data_seconds": round(data_seconds, 4)}
    if run.accelerator.is_main_process:
        append_record(run.out / "history.jsonl", record)
        run.history.records.append(record)
        bar.set_postfix(loss=f"{record['loss']:.4f}", acc=f"{record['implicit_acc']:.2f}")
        if run.config.report_to:
            run.accelerator.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=step)


def _save(run: TrainingRun, step: int, prune: bool = True) -> None:
    acc = run.accelerator
    ckpt.save_checkpoint(run.out, step, trainable=_trainable_state(acc.unwrap_model(run.unet)),
                         optimizer=run.optimizer, lr_scheduler=run.lr_scheduler, generator=run.generator,
                         data_state=(run.batches or run.stream).state_dict(), extra={"config": run.config.to_dict()},
                         rank=acc.process_index, world_size=acc.num_processes, barrier=acc.wait_for_everyone,
                         limit=run.config.checkpoints_total_limit if prune else None, scaler=acc.scaler)


def train(config: TrainConfig) -> History:
    """Run Diffusion-DPO fine-tuning described by ``config``; return the per-step :class:`History`.

    Works the same on a laptop CPU (toy preset), one GPU, or several processes under ``accelerate
    launch`` / ``torchrun`` (effective batch = ``batch_size * grad_accum * processes`` pairs; only the
    main process logs, checkpoints and exports). Artefacts in ``config.output_dir``: ``history.jsonl``,
    ``config.json``, ``checkpoint-<step>/``, ``pytorch_lora_weights.safetensors`` (or ``unet/`` for a
    full fine-tune), ``data_summary.json``, ``summary.json`` (:mod:`dpo_tutorial.summary`: the last 10%
    of steps averaged, and the held-out implicit-reward accuracy when ``heldout_split`` is set) and, for LoRA runs, ``samples.png`` (top: base, bottom: DPO).
    A non-finite loss or gradient skips that update; ``max_nonfinite_steps`` in a row save a checkpoint
    and stop with ``FloatingPointError`` (under fp16, overflowing gradients are the GradScaler's to skip).
    """
    run = setup_run(config)
    start_step = _resume_and_open_logs(run)
    run.batches = Prefetcher(run.stream, prefetch_depth(config, run.accelerator.device, run.cached))
    try:
        _loop(run, start_step)
    finally:
        run.batches.close()
    run.history.data_summary = _data_summary(run.stream)
    if run.accelerator.is_main_process:
        _finish(run.accelerator.unwrap_model(run.unet), run.parts, config, run.history, run.stream.first_captions)
    run.accelerator.wait_for_everyone()
    run.accelerator.end_training()
    release_output_dir(run.out)
    return run.history


def _loop(run: TrainingRun, start_step: int) -> None:
    """Optimizer steps ``start_step + 1 .. max_steps``: update, log, checkpoint, stop on repeated non-finite."""
    from tqdm.auto import tqdm

    config, batches = run.config, run.batches
    bar = tqdm(range(start_step, config.max_steps), initial=start_step, total=config.max_steps,
               desc="Diffusion-DPO", disable=not run.accelerator.is_local_main_process)
    t0, bad_in_a_row = time.perf_counter(), 0
    for step in bar:
        waited = batches.total_wait
        outs, updated, finite = optimizer_step(run, batches)
        bad_in_a_row = 0 if finite else bad_in_a_row + 1
        _log(run, step + 1, outs, updated, time.perf_counter() - t0, bar, batches.total_wait - waited)
        stop = bad_in_a_row >= config.max_nonfinite_steps
        if stop or step + 1 == config.max_steps or (
                config.checkpoint_every and (step + 1) % config.checkpoint_every == 0):
            _save(run, step + 1, prune=bad_in_a_row == 0)  # keep the checkpoints from before a blow-up
        if stop:
            raise FloatingPointError(
                f"{bad_in_a_row} optimizer steps in a row had a non-finite loss or gradient (last at step "
                f"{step + 1}); the learning rate ({run.optimizer.param_groups[0]['lr']:g} in use) or beta ({config.beta}) is probably too large, "
                f"or fp16 overflowed (try bf16). Checkpoint saved in {run.out}")


def _data_summary(stream: PairStream) -> dict:
    """Ties, invalid labels and undecodable images skipped; one warning when anything was unusable."""
    summary = {"ties_dropped": stream.ties + stream.skipped.get("tie", 0),
               "invalid_labels": stream.invalid_labels + stream.skipped.get("invalid", 0),
               "undecodable_skipped": stream.skipped.get("undecodable", 0)}
    others = {f"{reason}_skipped": n for reason, n in sorted(stream.skipped.items())
              if reason not in ("tie", "invalid", "undecodable") and n}
    summary.update(others)  # missing_image, not_bytes, oversized, bad_caption: only when they happened
    if summary["undecodable_skipped"] or summary["invalid_labels"] or others:
        extra = "".join(f", {n} {k.removesuffix('_skipped')}" for k, n in others.items())
        warnings.warn(f"skipped {summary['undecodable_skipped']} pair(s) whose images did not decode and "
                      f"{summary['invalid_labels']} with an invalid label_0 (NaN or outside [0, 1]){extra}")
    return summary


def _finish(unet, parts: DiffusionParts, config: TrainConfig, history: History, captions: list[str]) -> None:
    """Export the LoRA (or UNet), the data summary and the base-vs-DPO grid."""
    out = Path(config.output_dir)
    if config.full_finetune:
        shutil.rmtree(out / ".tmp-unet", ignore_errors=True)
        unet.save_pretrained(out / ".tmp-unet")
        ckpt.remove_folder(out / "unet")
        os.replace(out / ".tmp-unet", out / "unet")
    else:
        history.lora_path = str(export_lora(unet, out, parts.is_sdxl))
    (out / "data_summary.json").write_text(json.dumps(history.data_summary, indent=1))
    history.summary = tail_means(history.records)
    if config.heldout_split and not config.full_finetune:
        history.summary.update(heldout_accuracy(parts, unet, config))
    (out / "summary.json").write_text(json.dumps(history.summary, indent=1))
    if config.sample_grid and not config.full_finetune and captions:
        from .sample import generate_with_and_without_lora, labelled_grid, make_pipeline

        unet.eval()
        caps = list(dict.fromkeys(captions))[:4]
        seeds = list(range(len(caps)))
        base, dpo = generate_with_and_without_lora(make_pipeline(parts, unet), caps, seeds,
                                                   steps=config.sample_steps, guidance_scale=config.guidance_scale,
                                                   resolution=config.resolution)
        labelled_grid([base, dpo], ["base", "DPO"], caps, scale=max(1, 128 // config.resolution)).save(
            out / "samples.png")
