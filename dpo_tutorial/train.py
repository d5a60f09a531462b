"""``train(config) -> History``: Diffusion-DPO fine-tuning of a LoRA (or the whole UNet) on accelerate.

One straight flow (:func:`train`, the functions below in this order):

1. :func:`check_inputs`: every input a run needs, before anything heavy loads: the settings, the model's
   folder or hub id, the dataset (opened once) and its usable pairs, the held-out split the end of the run
   scores, a given latent cache;
2. :func:`setup_run`: accelerate, the output folder (claimed and locked), the model's parts with the LoRA
   (or the unfrozen UNet and its frozen reference), *one* batch source — the latent cache (given, or built
   into the run folder when it pays) or the images — the optimizer and the lr schedule;
3. :func:`resume`: the checkpoint to continue from, if any, checked against this run's settings;
4. :func:`run_loop`: optimizer steps (:func:`optimizer_step`, one :func:`dpo_tutorial.step.dpo_step` per
   micro-batch), one line per step in ``history.jsonl``, checkpoints;
5. :func:`write_artefacts`: the LoRA (or UNet), ``data_summary.json``, ``summary.json`` with the held-out
   score, and the base-vs-DPO grid ``samples.png``.

One optimizer step (per micro-batch of ``B`` pairs, see :func:`dpo_tutorial.step.dpo_step`): encode the
``2B`` images (winners then losers) and the ``B`` captions (or read them from the cache), draw one noise
and one timestep per pair, run the policy (LoRA on) and the reference (LoRA off, no grad), take the loss
of Wallace et al. (arXiv 2311.12908) Eq. 14, backward; after ``grad_accum`` micro-batches clip and step.
"""
from __future__ import annotations

import gc
import os
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import set_seed
from datasets.distributed import split_dataset_by_node
from diffusers.optimization import get_scheduler
from tqdm.auto import tqdm

from . import checkpoint as ckpt
from . import files
from .cache import LatentCache, auto_cache, check_cache
from .config import ConfigError, TrainConfig
from .data import (
    DataError,
    PairStream,
    PairTransform,
    check_dataset_source,
    load_pickapic,
    usable_rows,
)
from .evaluate import heldout_accuracy
from .hub import is_hub_id
from .loss import STEP_METRICS, DPOLossOutput
from .models import (
    DiffusionParts,
    check_source,
    export_lora,
    export_unet,
    latent_shape,
    load_parts,
    prepare_for_training,
    weight_dtype,
)
from .prefetch import Prefetcher
from .run_dir import (
    History,
    append_record,
    check_resume,
    claim_run_folder,
    lock_output_dir,
    plan_rerun,
    read_history,
    release_output_dir,
    truncate_history,
    write_run_config,
)
from .sample import write_sample_grid
from .step import dpo_step
from .summary import tail_means
from .threads import threads_per_process, use_threads


# ------------------------------------------------------------------------------------ 1. inputs
@dataclass
class Inputs:
    """What :func:`check_inputs` found: the opened dataset (``None`` when training from a given cache) and why the
    closing held-out score cannot be measured (``None`` when it can, or when it is only known at the end)."""

    dataset: object
    heldout_skipped: str | None


def heldout_problem(config: TrainConfig) -> str | None:
    """Why ``config.heldout_split`` cannot be scored at the end of the run, checked now; ``None`` when it can (or,
    for a hub dataset, when that is only known once it is read: a failure then is a notice, never an error)."""
    if not config.heldout_split:
        return None
    if config.full_finetune:
        return "a full fine-tune's held-out score is not measured at the end of its run"
    if config.streaming or is_hub_id(config.dataset):
        return None
    if Path(config.dataset).expanduser().is_file() and config.heldout_split != config.split:
        return f"{config.dataset} is one parquet file: it has no separate {config.heldout_split!r} split"
    try:
        usable_rows(load_pickapic(config.dataset, config.heldout_split)["label_0"])
    except DataError as err:
        return f"split {config.heldout_split!r} of {config.dataset} cannot be scored ({err})"
    return None


def check_inputs(config: TrainConfig) -> Inputs:
    """Check everything the run will need, in one line each, before accelerate or any model starts: the settings,
    the model source, the dataset (opened here, once: the run reads this very object) and its usable pairs, a
    given latent cache, and the held-out split (a missing one is a one-line notice and no held-out score)."""
    config.validate()
    check_source(config.pretrained)
    dataset = None
    if config.cache:
        check_cache(config.cache, config, shards=False)  # its shards are read and checked once, when it is opened
    else:
        check_dataset_source(config.dataset, config.split)
        dataset = load_pickapic(config.dataset, config.split, config.streaming)
        if not config.streaming:
            usable_rows(dataset["label_0"])
    skipped = heldout_problem(config)
    if skipped and config.heldout_split and not config.full_finetune:
        warnings.warn(f"no held-out score at the end of this run: {skipped}; pass --heldout-split '' to silence this")
    return Inputs(dataset, skipped)


# ------------------------------------------------------------------------------------ 2. set-up
def start_accelerator(config: TrainConfig) -> Accelerator:
    """accelerate for this run; several processes without a GPU (torchrun / accelerate launch on CPU) form a gloo
    process group (accelerate forms one only when told ``cpu=True``; otherwise each process would train alone)."""
    multi_cpu = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    # accelerate keeps one state per process (a notebook's kernel) and refuses another precision in it ("restart
    # your runtime"); a single process resets it. These are accelerate's private names: checked before use.
    state = getattr(AcceleratorState, "_shared_state", None)
    if state and state.get("_mixed_precision", config.mixed_precision) != config.mixed_precision and \
            int(os.environ.get("WORLD_SIZE", "1")) == 1 and hasattr(AcceleratorState, "_reset_state"):
        AcceleratorState._reset_state(reset_partial_state=True)
    accelerator = Accelerator(gradient_accumulation_steps=config.grad_accum, mixed_precision=config.mixed_precision,
                              log_with=config.report_to, project_dir=config.output_dir, cpu=multi_cpu)
    if config.num_processes and accelerator.num_processes != config.num_processes:
        raise ConfigError(f"expected {config.num_processes} processes but this run has {accelerator.num_processes}: "
                          "the launcher started a different number (on CPU, `accelerate launch --cpu "
                          "--num_processes 2` silently starts one); see README 'When one machine is not enough'")
    return accelerator


def make_optimizer(params, config: TrainConfig):
    """AdamW over the trainable parameters: bitsandbytes' 8-bit one when asked, else torch's fused kernel.

    The fused kernel updates every tensor in one call; with ~100 small LoRA tensors it is 3.5x faster
    than the per-tensor loop on CPU (``benchmarks/bench_step.py``) and gives the same update.
    """
    if config.use_8bit_adam:
        try:
            import bitsandbytes as bnb  # optional: only this setting needs it, and only on a GPU
        except ImportError as err:
            raise ConfigError("use_8bit_adam needs bitsandbytes: pip install bitsandbytes") from err
        return bnb.optim.AdamW8bit(params, lr=config.lr, weight_decay=config.weight_decay)
    params = list(params)
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay, fused=fused)


def make_stream(config: TrainConfig, rank: int, world_size: int, dataset=None, cache_dir: str | Path | None = None,
                expected_latent_shape: tuple[int, ...] | None = None) -> PairStream:
    """This process's share of the pairs: from the latent cache ``cache_dir`` (default ``config.cache``) when there is
    one, else from ``dataset`` (default: loaded here), a stream split by node, a map-style dataset sharded by rank."""
    cache_dir = cache_dir or config.cache
    if cache_dir:
        cache = LatentCache(cache_dir, config, expected_latent_shape)
        return PairStream(cache, cache.transform, config.batch_size, seed=config.seed, max_pairs=config.max_train_pairs,
                          make=cache.make, collate=cache.collate, rank=rank, world_size=world_size)
    dataset = load_pickapic(config.dataset, config.split, config.streaming) if dataset is None else dataset
    if config.streaming and world_size > 1:
        dataset = split_dataset_by_node(dataset, rank, world_size)
    transform = PairTransform(config.resolution, config.random_crop, config.random_flip)
    return PairStream(dataset, transform, config.batch_size, seed=config.seed,
                      empty_prompt_prob=config.empty_prompt_prob, max_pairs=config.max_train_pairs,
                      rank=0 if config.streaming else rank, world_size=1 if config.streaming else world_size)


def prefetch_depth(config: TrainConfig, device: torch.device, cached: bool) -> int:
    """Batches to read ahead in a background thread: ``config.prefetch`` when set, else 2 on an accelerator reading
    images and 0 otherwise. On a CPU-only run the compute already uses every core, and a reader thread beside it
    only slows the step (toy, 2 threads, from the latent cache: 0.19 s a step in the loop, 0.32 s with the thread)."""
    if config.prefetch is not None:
        return config.prefetch
    return 0 if cached or device.type == "cpu" else 2


@dataclass
class TrainingRun:
    """Everything one training run holds (built by :func:`setup_run`)."""

    config: TrainConfig
    accelerator: Accelerator
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
    heldout_skipped: str | None = None
    cached: bool = False  # the stream reads a latent cache (lookups, nothing to decode)
    batches: Prefetcher | None = None  # set by train(): the stream, read ahead in a background thread
    start_step: int = 0  # set by resume()
    timeline_open: bool = False  # the folder's history and newer checkpoints were settled (first logged step)


def setup_run(config: TrainConfig) -> TrainingRun:
    """Steps 1 and 2 of the flow: checked inputs, accelerate, the output folder, the prepared model, one batch
    source, the optimizer and the lr schedule."""
    inputs = check_inputs(config)
    accelerator = start_accelerator(config)
    use_threads(threads_per_process(config.num_threads, accelerator.num_processes))
    if accelerator.is_main_process:
        claim_run_folder(config)
        lock_output_dir(config.output_dir)
    accelerator.wait_for_everyone()
    set_seed(config.seed)
    parts = load_parts(config.pretrained, config.vae, config.prediction_type)
    parts.vae_encode_batch_size = config.vae_encode_batch_size
    params, ref_unet = prepare_for_training(parts, config, weight_dtype(accelerator.mixed_precision))
    for module in (parts.vae, *parts.text_encoders, *([ref_unet] if ref_unet is not None else [])):
        module.to(accelerator.device)
    shape = latent_shape(parts.vae.config, config.resolution)
    cache_dir = config.cache
    if not cache_dir:
        with accelerator.main_process_first():  # the main process builds the run's latent cache, the others read it
            cache_dir = auto_cache(config, parts, inputs.dataset, accelerator.num_processes)
    stream = make_stream(config, accelerator.process_index, accelerator.num_processes, inputs.dataset, cache_dir,
                         shape)
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
                       heldout_skipped=inputs.heldout_skipped, cached=bool(cache_dir))


# ------------------------------------------------------------------------------------ 3. resume
def resume(run: TrainingRun) -> int:
    """Restore the checkpoint asked for (``--resume``: a folder, or ``latest`` with fallbacks to older ones), checked
    against this run's settings (:func:`dpo_tutorial.run_dir.check_resume`); write ``config.json``; return the step
    the run continues from. The folder's newer checkpoints and later history lines (an abandoned continuation)
    are settled only once this run has logged its first step (:func:`open_timeline`)."""
    config, acc = run.config, run.accelerator

    def load(path: Path) -> dict:
        check_resume(path, config, acc.num_processes)
        return ckpt.load_checkpoint(path, acc.unwrap_model(run.unet), run.optimizer, run.lr_scheduler,
                                    run.generator, rank=acc.process_index, scaler=acc.scaler,
                                    agree=lambda ok: all_ranks_agree(acc, ok))

    resume_from, state = ckpt.load_first_good(ckpt.resume_candidates(config.resume, run.out), load)
    if resume_from is not None:
        run.start_step = state["step"]
        run.stream.load_state_dict(state["data"])
    if acc.is_main_process:
        files.clean_partial(run.out)
        run.history.records = [r for r in read_history(run.out / "history.jsonl") if r.get("step", 0) <= run.start_step]
        write_run_config(run.out, config, acc.num_processes)
        if config.report_to:
            acc.init_trackers("dpo-tutorial", config={k: v for k, v in config.to_dict().items()
                                                     if isinstance(v, (int, float, str, bool))})
    acc.wait_for_everyone()
    return run.start_step


def open_timeline(run: TrainingRun) -> None:
    """Once the run has made its first step: drop the history lines and checkpoints after the step it started from
    (one timeline: ``--resume latest`` continues this run, not an abandoned one). Until then a crash leaves the
    folder as it was."""
    truncate_history(run.out / "history.jsonl", run.start_step)
    ckpt.remove_after(run.out, run.start_step)
    run.timeline_open = True


# ------------------------------------------------------------------------------------ 4. the loop
def all_ranks_agree(accelerator, flag: bool) -> bool:
    """``flag`` on every process (a logical AND over processes): the decisions that change the weights, the
    GradScaler or the lr schedule must be the same on every process, or their states drift apart."""
    if accelerator.num_processes == 1:
        return flag
    votes = accelerator.reduce(torch.tensor([float(flag)], device=accelerator.device), reduction="sum")
    return bool(votes.item() == accelerator.num_processes)


def optimizer_step(run: TrainingRun, batches) -> tuple[list[DPOLossOutput], bool, bool]:
    """``grad_accum`` micro-batches, then one update. Returns (outputs, updated, finite).

    A non-finite loss on any process, or a non-finite gradient, skips the update on every process (``finite``
    False). Under fp16 the GradScaler owns overflowing gradients: it skips that update itself and lowers its
    scale, which is routine in the first steps, so only a non-finite *loss* counts as non-finite there.
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
                loss_ok = all_ranks_agree(acc, loss_ok)
                grads_ok = loss_ok and _gradients_finite(run)  # gradients are averaged: the same on every process
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
    """Append the step's record to ``history.jsonl``: each metric averaged over micro-batches and processes, the lr,
    whether the update was skipped, elapsed ``seconds`` and ``data_seconds`` (time the step waited for its batches)."""
    means = torch.stack([o.step_metrics() for o in outs]).mean(0).to(run.accelerator.device)
    means = run.accelerator.reduce(means, reduction="mean")
    record = {"step": step, **dict(zip(STEP_METRICS, means.tolist())), "lr": run.lr_scheduler.get_last_lr()[0],
              "skipped_update": not updated, "skipped_pairs": sum(run.stream.skipped.values()),
              "seconds": round(seconds, 3), "data_seconds": round(data_seconds, 4)}
    if run.accelerator.is_main_process:
        if not run.timeline_open:
            open_timeline(run)
        append_record(run.out / "history.jsonl", record)
        run.history.records.append(record)
        bar.set_postfix(loss=f"{record['loss']:.4f}", acc=f"{record['implicit_acc']:.2f}")
        if run.config.report_to:
            run.accelerator.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=step)


def _save(run: TrainingRun, step: int, prune: bool = True) -> None:
    acc = run.accelerator
    trainable = {n: p for n, p in acc.unwrap_model(run.unet).named_parameters() if p.requires_grad}
    ckpt.save_checkpoint(run.out, step, trainable=trainable, optimizer=run.optimizer, lr_scheduler=run.lr_scheduler,
                         generator=run.generator, data_state=(run.batches or run.stream).state_dict(),
                         extra={"config": run.config.to_dict()}, rank=acc.process_index,
                         world_size=acc.num_processes, agree=lambda ok: all_ranks_agree(acc, ok),
                         limit=run.config.checkpoints_total_limit if prune else None, scaler=acc.scaler)


class NonFiniteStop(FloatingPointError):
    """Raised by every process at the same step (the decision is taken together): ``max_nonfinite_steps`` optimizer
    steps in a row had a non-finite loss or gradient."""


def run_loop(run: TrainingRun) -> None:
    """Optimizer steps ``start_step + 1 .. max_steps``: update, log, checkpoint, stop on repeated non-finite ones."""
    config, batches = run.config, run.batches
    bar = tqdm(range(run.start_step, config.max_steps), initial=run.start_step, total=config.max_steps,
               desc="Diffusion-DPO", disable=not run.accelerator.is_local_main_process)
    t0, bad_in_a_row = time.perf_counter(), 0
    for step in bar:
        waited = batches.total_wait
        outs, updated, finite = optimizer_step(run, batches)
        bad_in_a_row = 0 if finite else bad_in_a_row + 1  # the same on every process (optimizer_step agrees)
        _log(run, step + 1, outs, updated, time.perf_counter() - t0, bar, batches.total_wait - waited)
        stop = bad_in_a_row >= config.max_nonfinite_steps
        if stop or step + 1 == config.max_steps or (
                config.checkpoint_every and (step + 1) % config.checkpoint_every == 0):
            _save(run, step + 1, prune=bad_in_a_row == 0)  # keep the checkpoints from before a blow-up
        if stop:
            raise NonFiniteStop(
                f"{bad_in_a_row} optimizer steps in a row had a non-finite loss or gradient (last at step "
                f"{step + 1}); the learning rate ({run.optimizer.param_groups[0]['lr']:g} in use) or beta "
                f"({config.beta}) is probably too large, or fp16 overflowed (try bf16). Checkpoint saved in {run.out}")


# ------------------------------------------------------------------------------------ 5. artefacts
def data_summary(stream: PairStream) -> dict:
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


def closing_summary(run: TrainingRun, unet) -> dict:
    """The last-10% means of the run's records and its held-out score (:func:`dpo_tutorial.evaluate.heldout_accuracy`),
    or why there is none. A held-out split that fails only now (a hub dataset) is a notice, never an error."""
    config, summary = run.config, tail_means(run.history.records)
    if run.heldout_skipped:
        summary["heldout_skipped"] = run.heldout_skipped
    elif config.heldout_split:
        try:
            summary.update(heldout_accuracy(run.parts, unet, config))
        except DataError as err:
            summary["heldout_skipped"] = f"split {config.heldout_split!r} of {config.dataset} cannot be scored ({err})"
            warnings.warn(f"no held-out score: {summary['heldout_skipped']}")
    return summary


def write_artefacts(run: TrainingRun) -> None:
    """The trained weights (the LoRA in the diffusers format, or the UNet folder), ``data_summary.json``,
    ``summary.json`` and, for a LoRA, the base-vs-DPO grid ``samples.png``; main process only."""
    config, out, history = run.config, run.out, run.history
    unet = run.accelerator.unwrap_model(run.unet)
    if config.full_finetune:
        export_unet(unet, out)
    else:
        history.lora_path = str(export_lora(unet, out, run.parts.is_sdxl))
    files.write_json(out / "data_summary.json", history.data_summary)
    history.summary = closing_summary(run, unet)
    files.write_json(out / "summary.json", history.summary)
    captions = run.stream.first_captions
    if config.sample_grid and not config.full_finetune and captions:
        write_sample_grid(run.parts, unet, captions, out / "samples.png", config.sample_steps, config.guidance_scale,
                          config.resolution)


# ------------------------------------------------------------------------------------ the whole run
def train(config: TrainConfig) -> History:
    """Run Diffusion-DPO fine-tuning described by ``config``; return the per-step :class:`History`.

    Works the same on a laptop CPU (toy preset), one GPU, or several processes under ``accelerate
    launch`` / ``torchrun`` (effective batch = ``batch_size * grad_accum * processes`` pairs; only the
    main process logs, checkpoints and exports). Artefacts in ``config.output_dir``: ``history.jsonl``,
    ``config.json``, ``checkpoint-<step>/``, ``pytorch_lora_weights.safetensors`` (or ``unet/`` for a
    full fine-tune), ``data_summary.json``, ``summary.json`` (:mod:`dpo_tutorial.summary`: the last 10%
    of steps averaged, and the held-out implicit-reward accuracy when ``heldout_split`` is set) and, for
    LoRA runs, ``samples.png`` (top: base, bottom: DPO). A non-finite loss or gradient skips that update on
    every process; ``max_nonfinite_steps`` in a row save a checkpoint and stop with ``FloatingPointError``
    (under fp16, overflowing gradients are the GradScaler's to skip).
    """
    run = setup_run(config)
    last_barrier = None
    try:  # whatever stops the run, the folder's lock is released (a notebook may call train again at once)
        resume(run)
        run.batches = Prefetcher(run.stream, prefetch_depth(config, run.accelerator.device, run.cached))
        try:
            run_loop(run)
        finally:
            run.batches.close()
        run.history.data_summary = data_summary(run.stream)
        if run.accelerator.is_main_process:
            write_artefacts(run)
        last_barrier = barrier(run.accelerator)
    except NonFiniteStop:  # every process stops at the same step: all of them meet here
        last_barrier = barrier(run.accelerator)
        raise
    finally:
        run.accelerator.end_training()
        release_output_dir(run.out)
        release_process_group(run, last_barrier)
    return run.history


def barrier(accelerator):
    """Wait for every process; return the barrier's handle (``None`` for a single process), for
    :func:`release_process_group`."""
    if accelerator.num_processes == 1:
        return None
    if not torch.distributed.is_initialized():  # several processes on a backend of their own (XLA): no handle
        accelerator.wait_for_everyone()
        return None
    handle = torch.distributed.barrier(async_op=True)
    handle.wait()
    return handle


def release_process_group(run: TrainingRun, last_barrier) -> None:
    """Drop the prepared model, and with it the process group's last reference, while the caller still holds
    ``last_barrier`` (the handle of the run's final barrier; ``None``: one process, nothing to do).

    gloo's worker threads are joined when the group is freed, by a thread that holds the GIL. Had a worker thread
    held the last reference to the final barrier, it would free it there and wait for the GIL to do so: each
    thread waits for the other, and a finished run never exits (seen once in ~60 two-process runs on a loaded
    CPU: the stack showed ``~ProcessGroupGloo`` joining a thread stuck in ``~AsyncBarrierWork``). Held by the
    caller, the barrier is freed after the join, by the caller's thread.
    """
    if last_barrier is None:
        return
    run.unet = None
    run.accelerator.free_memory()  # the prepared (DDP) model holds the group
    gc.collect()  # the group is freed here, not at some later collection


def train_or_reuse(config: TrainConfig) -> tuple[History, TrainConfig]:
    """``(history, config)`` of ``config``'s run: trained now, or reused when a finished run of the same settings
    already sits in ``output_dir`` (or a numbered sibling, see :func:`dpo_tutorial.run_dir.plan_rerun`).

    The notebooks share one toy run this way: the first that needs it trains it (~2 minutes on a CPU), the others
    load its history, summary and LoRA in a second. The returned config's ``output_dir`` is where the run lives.
    """
    plan = plan_rerun(config)
    if plan.action != "finished":
        return train(plan.config), plan.config
    history = History.load(plan.config.output_dir)
    print(f"reusing the finished run in {files.shown_path(plan.config.output_dir)} ({len(history)} steps, "
          "same settings)")
    return history, plan.config


def first_steps(config: TrainConfig, num_steps: int) -> dict:
    """The first ``num_steps`` optimizer steps of a fresh run of ``config`` (the LoRA starts at zero), in a
    temporary folder: nothing is saved.

    Returns ``(num_steps, B)`` tensors ``model_diff``, ``ref_diff`` and ``logits`` of each step's batch (all its
    micro-batches), measured as training measures them, before that step's update, and the ``(num_steps,)``
    learning rate ``lr`` each update used. Step 1 measures the untrained LoRA (policy = reference, so every
    ``model_diff - ref_diff`` is exactly 0).
    """
    rows = {"model_diff": [], "ref_diff": [], "logits": []}
    lrs = []
    with tempfile.TemporaryDirectory() as folder:
        run = setup_run(config.replace(output_dir=folder, resume=None, max_steps=max(config.max_steps, num_steps),
                                       sample_grid=False, cache_latents=False))  # a few steps: not worth a cache
        try:
            batches = iter(run.stream)
            for _ in range(num_steps):
                lrs.append(run.lr_scheduler.get_last_lr()[0])
                outs, _, _ = optimizer_step(run, batches)
                for key in rows:
                    rows[key].append(torch.cat([getattr(o, key).float().cpu() for o in outs]))
        finally:
            run.accelerator.end_training()
            release_output_dir(folder)
    return {**{key: torch.stack(values) for key, values in rows.items()}, "lr": torch.tensor(lrs)}
