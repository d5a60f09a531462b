"""Evaluate a real Diffusion-DPO model the way the paper measures it, resumably.

A base pipeline (SD 1.x or SDXL, folder or hub id) and a tuned model — a LoRA folder (a ``train``
output) or a full UNet (folder or hub id, e.g. ``mhdang/dpo-sd1.5-text2image-v1``) — are compared on:

- **Implicit-reward accuracy** (Wallace et al., arXiv 2311.12908, Table 2): on held-out Pick-a-Pic
  pairs, how often the tuned model's implicit reward ``-β/2 · (model_diff - ref_diff)`` prefers the
  labelled winner, with the base model as the reference, averaged over ``num_draws`` shared
  (noise, timestep) draws per pair (:func:`dpo_tutorial.evaluate.implicit_reward_accuracy`). The paper
  reports 60.8% (DPO-SD1.5) and 72.0% (DPO-SDXL) on Pick-a-Pic v2's validation pairs.
- **PickScore** (:class:`dpo_tutorial.pickscore.PickScore`) of base and tuned images for the same
  captions and the same seeds: mean and median of each, and the per-prompt win-rate of tuned over base
  (ties count ½) with its 95% interval (:func:`dpo_tutorial.evaluate.win_rate`). Later papers report mean
  PickScore on the 500 ``validation_unique`` captions (SD 1.5 20.53 -> DPO 20.98; SDXL 21.95 -> 22.64).

At full size this is hours of GPU work, so everything goes to an output folder as it is made and a rerun
continues where the last one stopped:

- ``settings.json``: what is measured (models, captions, pairs, sampler, seeds). A rerun with other
  settings is refused; a folder holding anything else is refused.
- ``prompts.jsonl``: one line per prompt (caption, seed, both scores, both image files), appended and
  flushed as each sampling batch finishes; ``images/base/NNNNN.png`` and ``images/tuned/NNNNN.png``.
- ``implicit.jsonl``: one line per chunk of ``pair_batch`` rows (rows read, pairs scored, pairs right).
  Chunk ``k`` draws its noise from seed ``seed + k``, so a resumed run scores exactly what an unbroken
  run would.
- ``report.json``: the numbers, rewritten from the two logs at the end of every run.

A line cut short by a crash is dropped and redone. Captions and pairs are read with ``datasets``
streaming when asked (``streaming=True``), so only the rows used are downloaded, never Pick-a-Pic's 335 GB.
"""
from __future__ import annotations

import csv
import json
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from itertools import islice
from pathlib import Path

import numpy as np
import torch
from diffusers import DDPMScheduler
from PIL import Image
from tqdm.auto import tqdm

from .config import ConfigError
from .data import DataError, load_pickapic
from .evaluate import check_count, check_lora_fits, implicit_reward_accuracy, win_rate
from .files import LOCK_FILE, atomic, clean_partial, is_partial, write_json
from .models import DiffusionParts, ModelError, reference_mode
from .pickscore import PickScore
from .run_dir import LORA_FILE, append_record, lock_output_dir, release_output_dir
from .sample import generate, load_text2image_pipeline, load_unet

SETTINGS_FILE, PROMPTS_FILE, IMPLICIT_FILE = "settings.json", "prompts.jsonl", "implicit.jsonl"
REPORT_FILE = "report.json"
PROMPT_KEYS = ("index", "caption", "seed", "base_score", "tuned_score", "base_image", "tuned_image", "seconds")
CHUNK_KEYS = ("chunk", "rows", "pairs", "right", "seconds")
PROMPT_FILE_SUFFIXES = (".txt", ".tsv", ".csv", ".json")
PROMPT_COLUMNS = ("prompt", "caption", "text")  # PartiPrompts' TSV calls its column "Prompt"

# upper bounds of the count arguments (the messages say what a larger value would cost)
MAX_PROMPTS = 10_000  # PartiPrompts: 1,632; HPSv2's benchmark: 3,200; validation_unique: 500
MAX_PAIRS = 50_000  # Pick-a-Pic v2's validation split: 20,596 rows
MAX_NUM_DRAWS = 64
MAX_STEPS = 1000
MAX_SAMPLE_BATCH = 64
MAX_PAIR_BATCH = 1024


@dataclass
class PaperEvalSettings:
    """Everything that decides the numbers of one evaluation (``settings.json``); one field per CLI flag.

    Exactly one of ``lora`` / ``unet`` names the tuned model; at least one of ``captions`` (PickScore part)
    and ``pairs`` (implicit-reward part) is given. ``resolution`` None: the model's own size.
    """

    pretrained: str
    lora: str | None = None
    unet: str | None = None
    vae: str | None = None
    captions: str | None = None
    captions_split: str = "validation_unique"
    num_prompts: int = 500
    pairs: str | None = None
    pairs_split: str = "validation"
    max_pairs: int = MAX_PAIRS
    num_draws: int = 8
    pair_batch: int = 64
    steps: int = 50
    guidance_scale: float = 7.5
    resolution: int | None = None
    seed: int = 0
    pickscore_model: str = "yuvalkirstain/PickScore_v1"
    pickscore_processor: str = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
    streaming: bool = False
    dtype: str = "auto"

    def check(self) -> None:
        """Raise ``ConfigError`` (one line) for a missing choice or a count beyond its bound, naming its cost."""

        if (self.lora is None) == (self.unet is None):
            raise ConfigError("pass exactly one tuned model: --lora DIR (a LoRA) or --unet DIR_OR_HUB_ID (a full UNet)")
        if not self.captions and not self.pairs:
            raise ConfigError("nothing to measure: pass --captions (PickScore of generated images) and/or --pairs "
                              "(implicit-reward accuracy)")
        if self.dtype not in ("auto", "float16", "bfloat16", "float32"):
            raise ConfigError(f"invalid --dtype {self.dtype!r}: expected auto, float16, bfloat16 or float32")
        passes = 2 * self.steps * (2 if self.guidance_scale > 1 else 1)
        check_count("--steps", self.steps, MAX_STEPS, f"run {passes:,} UNet passes per prompt (base and tuned)")
        check_count("--num-prompts", self.num_prompts, MAX_PROMPTS,
                    f"sample {2 * self.num_prompts:,} images ({passes * self.num_prompts:,} UNet passes)")
        check_count("--num-draws", self.num_draws, MAX_NUM_DRAWS,
                    f"run {4 * self.num_draws:,} UNet passes per pair (winner and loser, tuned and reference)")
        check_count("--max-pairs", self.max_pairs, MAX_PAIRS,
                    f"score up to {self.max_pairs:,} pairs x {self.num_draws} draws = "
                    f"{4 * self.max_pairs * self.num_draws:,} UNet passes")
        check_count("--pair-batch", self.pair_batch, MAX_PAIR_BATCH,
                    f"hold {self.pair_batch:,} decoded pairs in memory at once")
        if self.resolution is not None:
            check_count("--resolution", self.resolution, 4096, f"sample {self.resolution}-px images")
        if self.seed < 0:
            raise ConfigError(f"invalid --seed {self.seed}: expected an integer >= 0")

    def to_dict(self) -> dict:
        """Plain dict (what ``settings.json`` holds)."""
        return asdict(self)


def normalised(settings: PaperEvalSettings) -> PaperEvalSettings:
    """``settings`` with every local path made absolute (so a rerun from another folder is the same evaluation)."""
    def absolute(value):
        return str(Path(value).expanduser().resolve()) if value and Path(value).expanduser().exists() else value

    paths = ("pretrained", "lora", "unet", "vae", "captions", "pairs", "pickscore_model", "pickscore_processor")
    return PaperEvalSettings(**{f.name: absolute(getattr(settings, f.name)) if f.name in paths
                                else getattr(settings, f.name) for f in fields(settings)})


# --- the output folder --------------------------------------------------------------------------------

def prepare_out_dir(out_dir: str | Path, settings: PaperEvalSettings) -> Path:
    """Create ``out_dir`` (or accept one holding this very evaluation), take its lock and write ``settings.json``.

    Refused with ``ConfigError``: a folder holding an evaluation with other settings (the message names
    them), files this command did not write, or an evaluation still running there (the lock is released by
    :func:`run_paper_eval`, or when the process ends).
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file: expected a folder for the evaluation's images and report")
    saved = out / SETTINGS_FILE
    entries = list(out.iterdir()) if out.is_dir() else []
    foreign = sorted(p.name for p in entries if p.name != LOCK_FILE and not is_partial(p))  # not a lock or leftover
    if foreign and not saved.is_file():
        raise ConfigError(f"{out} holds files this command did not write ({', '.join(foreign[:3])}): pass an empty "
                          "or new folder as --out")
    lock_output_dir(out, flag="--out")  # before anything is cleaned or written: one evaluation per folder
    try:
        clean_partial(out)  # a file a killed evaluation was writing
        if saved.is_file():
            check_same_settings(saved, settings)
        else:
            write_json(saved, settings.to_dict())
    except BaseException:
        release_output_dir(out)
        raise
    return out


def check_same_settings(saved: Path, settings: PaperEvalSettings) -> None:
    """Raise ``ConfigError`` unless ``saved`` (a folder's ``settings.json``) holds exactly ``settings``."""
    out = saved.parent
    try:
        before = json.loads(saved.read_text())
    except ValueError as err:
        raise ConfigError(f"{saved} is not valid JSON ({err}): delete {out} to start over") from err
    if not isinstance(before, dict):
        raise ConfigError(f"{saved} holds no settings object: delete {out} to start over")
    now = settings.to_dict()
    changed = [f"{k} {before.get(k)!r} -> {now[k]!r}" for k in now if before.get(k) != now[k]]
    if changed:
        raise ConfigError(f"{out} holds an evaluation with other settings ({'; '.join(changed)[:300]}): pass "
                          "another --out, or the same settings to continue it")


def read_log(path: Path, keys: tuple[str, ...] = ()) -> list[dict]:
    """The records of an append-only JSON-lines log; a last line cut short by a crash is dropped from the file.

    A damaged line before the last, or a record without one of ``keys``, is a ``DataError`` naming the file
    and the line.
    """
    if not path.is_file():
        return []
    lines = path.read_bytes().split(b"\n")
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as err:
            if any(rest.strip() for rest in lines[number:]):
                raise DataError(f"{path} line {number} is not JSON ({err}): delete the folder to start over") from err
            good = b"".join(kept + b"\n" for kept in lines[:number - 1] if kept.strip())
            with atomic(path) as tmp:  # drop the torn last line, so the next append starts on a fresh line
                tmp.write_bytes(good)
            break
        missing = [k for k in keys if k not in record] if isinstance(record, dict) else list(keys) or ["an object"]
        if missing:
            raise DataError(f"{path} line {number} lacks {', '.join(missing)}: delete the folder to start over")
        records.append(record)
    return records


# --- captions and pairs ----------------------------------------------------------------------------------

def read_prompt_file(path: Path) -> list[str]:
    """Prompts from a ``.txt`` (one a line), ``.tsv`` / ``.csv`` (a ``Prompt``/``caption``/``text`` column, as
    PartiPrompts' ``PartiPrompts.tsv``) or ``.json`` file (a list of strings, as HPSv2's benchmark prompts)."""

    text = path.read_text(encoding="utf-8")
    if path.suffix == ".txt":
        return [line.strip() for line in text.splitlines() if line.strip()]
    if path.suffix == ".json":
        data = json.loads(text)
        if not isinstance(data, list) or not all(isinstance(p, str) for p in data):
            raise DataError(f"{path} is not a JSON list of prompt strings")
        return [p.strip() for p in data if p.strip()]
    rows = list(csv.DictReader(text.splitlines(), delimiter="\t" if path.suffix == ".tsv" else ","))
    columns = {name.strip().lower(): name for name in (rows[0].keys() if rows else [])}
    column = next((columns[c] for c in PROMPT_COLUMNS if c in columns), None)
    if column is None:
        raise DataError(f"{path} has no prompt column (its columns: {', '.join(columns) or 'none'}): expected one of "
                        f"{', '.join(PROMPT_COLUMNS)}")
    return [r[column].strip() for r in rows if (r[column] or "").strip()]


def load_captions(source: str, split: str = "validation_unique", num_prompts: int = 500,
                  streaming: bool = False) -> list[str]:
    """The first ``num_prompts`` distinct captions of a prompt file or a Pick-a-Pic-format dataset's ``split``.

    A dataset (hub id, folder, ``.parquet``) is read with :func:`dpo_tutorial.data.load_pickapic`; with
    ``streaming`` only the rows up to the last caption used are fetched.
    """

    path = Path(source).expanduser()
    if path.suffix in PROMPT_FILE_SUFFIXES:
        if not path.is_file():
            raise DataError(f"prompt file {source!r} does not exist: expected a .txt, .tsv, .csv or .json file")
        captions = read_prompt_file(path)
    else:
        rows = load_pickapic(source, split, streaming=streaming)
        captions = []
        seen = set()
        for row in rows:
            caption = (row["caption"] or "").strip()
            if caption and caption not in seen:
                seen.add(caption)
                captions.append(caption)
                if len(captions) == num_prompts:
                    break
    captions = list(dict.fromkeys(captions))[:num_prompts]
    if not captions:
        where = "" if path.suffix in PROMPT_FILE_SUFFIXES else f" split {split!r}"
        raise DataError(f"no captions in {source!r}{where}: expected at least one non-empty caption")
    return captions


# --- models -----------------------------------------------------------------------------------------------

@dataclass
class Models:
    """The loaded pipeline and the two models it can run: ``base`` and ``tuned``.

    With a LoRA both are the pipeline's UNet (adapter off / on); with a full UNet, ``tuned_unet`` is a
    second UNet swapped into the pipeline for the tuned images.
    """

    pipe: object
    tuned_unet: torch.nn.Module | None  # None: the tuned model is the LoRA inside pipe.unet
    resolution: int

    @contextmanager
    def running(self, which: str):
        """Inside the block the pipeline samples with ``which`` ("base" or "tuned")."""

        base_unet = self.pipe.unet
        if self.tuned_unet is None:
            if which == "base":
                with reference_mode(base_unet):
                    yield self.pipe
            else:
                yield self.pipe
            return
        if which == "tuned":
            self.pipe.unet = self.tuned_unet
        try:
            yield self.pipe
        finally:
            self.pipe.unet = base_unet

    def parts(self):
        """:class:`~dpo_tutorial.models.DiffusionParts` of the pipeline (DDPM noise scheduler from its config)."""

        pipe = self.pipe
        sdxl = getattr(pipe, "text_encoder_2", None) is not None
        tokenizers = [pipe.tokenizer, pipe.tokenizer_2] if sdxl else [pipe.tokenizer]
        encoders = [pipe.text_encoder, pipe.text_encoder_2] if sdxl else [pipe.text_encoder]
        noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        return DiffusionParts(tokenizers, encoders, pipe.vae, pipe.unet, noise_scheduler, sdxl)


def torch_dtype(name: str, device: torch.device) -> torch.dtype:
    """``"auto"`` -> float16 on a GPU, float32 on a CPU; else the named dtype."""
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def check_unet_fits(base, tuned, source: str, pretrained: str) -> None:
    """Raise ``ModelError`` unless the tuned UNet has the base UNet's interface and only finite weights."""

    keys = ("in_channels", "out_channels", "cross_attention_dim", "addition_embed_type", "block_out_channels")
    differ = [f"{k} {tuned.config.get(k)!r} vs {base.config.get(k)!r}" for k in keys
              if tuned.config.get(k) != base.config.get(k)]
    if differ:
        raise ModelError(f"the UNet {source} does not fit {pretrained} ({'; '.join(differ)}): expected a UNet tuned "
                         "from this pipeline")
    bad = [name for name, p in tuned.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        raise ModelError(f"the UNet {source} holds NaN or infinite values in {len(bad)} tensors (first: {bad[0]}): "
                         "expected the weights of a run that did not diverge")


def load_models(settings: PaperEvalSettings, device: str | torch.device | None = None) -> Models:
    """The base pipeline on ``device`` with the LoRA loaded into it, or with the full tuned UNet beside it."""

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch_dtype(settings.dtype, device)
    pipe = load_text2image_pipeline(settings.pretrained, device, dtype, settings.vae)
    tuned_unet = None
    if settings.lora:
        if not (Path(settings.lora) / LORA_FILE).is_file():
            raise ConfigError(f"--lora {settings.lora!r} holds no pytorch_lora_weights.safetensors: "
                              "pass a train output folder")
        check_lora_fits(pipe, settings.pretrained, settings.lora)
    else:
        tuned_unet = load_unet(settings.unet, dtype, device)
        check_unet_fits(pipe.unet, tuned_unet, settings.unet, settings.pretrained)
    resolution = settings.resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor
    return Models(pipe, tuned_unet, resolution)


# --- the two measurements ---------------------------------------------------------------------------------

def sample_and_score(models: Models, out: Path, captions: list[str], settings: PaperEvalSettings, judge_factory,
                     sample_batch: int = 4, progress: bool = True) -> list[dict]:
    """Base and tuned images of every caption not yet in ``prompts.jsonl``, scored, saved and logged.

    Prompt ``i`` uses seed ``settings.seed + i`` for both models. Returns every prompt's record, in order.
    ``judge_factory()`` builds the judge (PickScore) the first time there is something to score.
    """

    log = out / PROMPTS_FILE
    done = {r["index"]: r for r in read_log(log, PROMPT_KEYS)}
    for index, record in done.items():
        if index >= len(captions) or record["caption"] != captions[index]:
            raise DataError(f"{log} records prompt {index} as {record['caption']!r}, but the captions now give "
                            f"{captions[index] if index < len(captions) else 'no such prompt'!r}: the caption source "
                            "changed; pass another --out")
    todo = [i for i in range(len(captions)) if i not in done]
    judge = judge_factory() if todo else None
    for folder in ("base", "tuned"):
        (out / "images" / folder).mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=len(captions), initial=len(done), desc="sampling base and tuned", unit="prompt",
               disable=not progress)
    for start in range(0, len(todo), sample_batch):
        chunk = todo[start:start + sample_batch]
        caps, seeds = [captions[i] for i in chunk], [settings.seed + i for i in chunk]
        began = time.perf_counter()
        images, scores = {}, {}
        for which in ("base", "tuned"):
            with models.running(which) as pipe:
                images[which] = generate(pipe, caps, seeds, settings.steps, settings.guidance_scale, models.resolution)
            scores[which] = np.asarray(judge(images[which], caps), float)
        seconds = (time.perf_counter() - began) / len(chunk)
        for k, index in enumerate(chunk):
            names = {w: f"images/{w}/{index:05d}.png" for w in ("base", "tuned")}
            for which, name in names.items():
                with atomic(out / name) as tmp:
                    Image.fromarray(images[which][k]).save(tmp, format="PNG")
            record = {"index": index, "caption": caps[k], "seed": seeds[k], "base_score": float(scores["base"][k]),
                      "tuned_score": float(scores["tuned"][k]), "base_image": names["base"],
                      "tuned_image": names["tuned"], "seconds": round(seconds, 3)}
            append_record(log, record, sync=True)
            done[index] = record
        bar.update(len(chunk))
    bar.close()
    return [done[i] for i in range(len(captions))]


def score_pairs(models: Models, out: Path, settings: PaperEvalSettings, progress: bool = True) -> list[dict]:
    """Implicit-reward accuracy, chunk by chunk of ``pair_batch`` rows, each chunk logged to ``implicit.jsonl``.

    Stops when the split ends or ``max_pairs`` non-tie pairs are scored. Chunk ``k`` seeds its noise and
    timesteps with ``settings.seed + k``. Returns every chunk's record.
    """

    log = out / IMPLICIT_FILE
    records = read_log(log, CHUNK_KEYS)
    for k, record in enumerate(records):
        if record.get("chunk") != k:
            raise DataError(f"{log} line {k + 1} records chunk {record.get('chunk')!r}, expected {k}: delete the "
                            "folder to start over")
    scored, rows_read = sum(r["pairs"] for r in records), sum(r["rows"] for r in records)
    if scored >= settings.max_pairs:
        return records
    dataset = load_pickapic(settings.pairs, settings.pairs_split, streaming=settings.streaming)
    rows = islice(iter(dataset), rows_read, None)  # past the rows earlier runs scored
    parts = models.parts()
    policy, reference = (models.pipe.unet, None) if models.tuned_unet is None else (models.tuned_unet, models.pipe.unet)
    bar = tqdm(total=len(dataset) if hasattr(dataset, "__len__") else None, initial=rows_read,
               desc="implicit-reward accuracy", unit="row", disable=not progress)
    while scored < settings.max_pairs:
        chunk = list(islice(rows, settings.pair_batch))
        if not chunk:
            break
        k = len(records)
        began = time.perf_counter()
        try:
            accuracy, count = implicit_reward_accuracy(
                parts, policy, chunk, models.resolution, num_draws=settings.num_draws, seed=settings.seed + k,
                max_pairs=settings.max_pairs - scored, return_count=True, ref_unet=reference)
        except DataError:  # no decodable non-tie pair in this chunk
            accuracy, count = 0.0, 0
        record = {"chunk": k, "rows": len(chunk), "pairs": count, "right": right_pairs(accuracy, count),
                  "seconds": round(time.perf_counter() - began, 3)}
        append_record(log, record, sync=True)
        records.append(record)
        scored += count
        bar.set_postfix(pairs=scored, accuracy=f"{sum(r['right'] for r in records) / max(scored, 1):.3f}")
        bar.update(len(chunk))
    bar.close()
    return records


# --- the report -------------------------------------------------------------------------------------------

def right_pairs(accuracy: float, n: int) -> float:
    """How many of ``n`` pairs an ``accuracy`` (a float32 mean, say) stands for: right pairs count 1 and exact ties
    ½, so the count is a multiple of ½; ``accuracy * n`` alone may land just below it (0.57 in float32 × 100 is
    56.99999...), which :func:`accuracy_interval` would read as 56 right and two ties."""
    return round(2 * float(accuracy) * n) / 2


def accuracy_interval(right: float, n: int) -> tuple[float, float, float]:
    """``(accuracy, low, high)``: ``right`` of ``n`` pairs, with the 95% interval that
    :func:`~dpo_tutorial.evaluate.win_rate` gives the same per-pair outcomes (1 right, 0 wrong, ½ for an exact
    tie of the implicit rewards)."""

    whole = int(right)
    half = round(2 * (right - whole))  # 0 or 1 pair at exactly 1/2
    outcomes = np.r_[np.ones(whole), np.full(half, 0.5), np.zeros(n - whole - half)]  # (n,)
    return win_rate(np.full(n, 0.5), outcomes)


def summarise(prompts: list[dict] | None, chunks: list[dict] | None, settings: PaperEvalSettings) -> dict:
    """``report.json``'s content from the two logs."""

    report = {"settings": settings.to_dict()}
    if prompts:
        base = np.array([r["base_score"] for r in prompts])  # (N,)
        tuned = np.array([r["tuned_score"] for r in prompts])  # (N,)
        rate, low, high = win_rate(base, tuned)
        report["pickscore"] = {"prompts": len(prompts), "base_mean": float(base.mean()),
                               "tuned_mean": float(tuned.mean()), "base_median": float(np.median(base)),
                               "tuned_median": float(np.median(tuned)), "win_rate": rate, "win_rate_ci_low": low,
                               "win_rate_ci_high": high, "gpu_seconds": round(sum(r["seconds"] for r in prompts), 1)}
    if chunks is not None:
        n = sum(c["pairs"] for c in chunks)
        right = sum(c["right"] for c in chunks)
        acc, low, high = accuracy_interval(right, n) if n else (float("nan"),) * 3
        report["implicit_reward"] = {"pairs": n, "rows_read": sum(c["rows"] for c in chunks), "accuracy": acc,
                                     "ci_low": low, "ci_high": high, "num_draws": settings.num_draws,
                                     "gpu_seconds": round(sum(c["seconds"] for c in chunks), 1)}
    return report


def run_paper_eval(settings: PaperEvalSettings, out_dir: str | Path, device: str | torch.device | None = None,
                   sample_batch: int = 4, progress: bool = True, judge=None) -> dict:
    """Run (or continue) the evaluation in ``out_dir``; write and return ``report.json``'s content.

    ``sample_batch``: prompts sampled at once (memory only; the numbers do not depend on it). ``judge``: a
    ``score(images, captions)`` callable replacing PickScore (default: PickScore from the settings' model
    and processor, loaded only when there is something to score).
    """

    settings.check()
    check_count("--sample-batch", sample_batch, MAX_SAMPLE_BATCH, f"sample {2 * sample_batch} images at once")
    settings = normalised(settings)
    out = prepare_out_dir(out_dir, settings)
    try:
        return evaluate_in(out, settings, device, sample_batch, progress, judge)
    finally:
        release_output_dir(out)


def evaluate_in(out: Path, settings: PaperEvalSettings, device, sample_batch: int, progress: bool, judge) -> dict:
    """The body of :func:`run_paper_eval`, in the prepared and locked folder ``out``."""
    captions = (load_captions(settings.captions, settings.captions_split, settings.num_prompts, settings.streaming)
                if settings.captions else None)
    models = load_models(settings, device)
    device = models.pipe.device

    def judge_factory():
        return judge if judge is not None else PickScore(settings.pickscore_model, settings.pickscore_processor,
                                                         device=device)
    prompts = None
    if captions:
        prompts = sample_and_score(models, out, captions, settings, judge_factory, sample_batch, progress)
    chunks = score_pairs(models, out, settings, progress) if settings.pairs else None
    report = summarise(prompts, chunks, settings)
    write_json(out / REPORT_FILE, report)
    return report


def report_lines(report: dict, out_dir: str | Path) -> list[str]:
    """The lines ``dpo-tutorial evaluate --pretrained ...`` prints for a finished report."""
    lines = [f"report: {Path(out_dir) / REPORT_FILE}"]
    if "pickscore" in report:
        p = report["pickscore"]
        lines += [f"PickScore on {p['prompts']} prompts, same seeds for both   base      tuned",
                  f"  mean                                          {p['base_mean']:<9.3f} {p['tuned_mean']:.3f}",
                  f"  median                                        {p['base_median']:<9.3f} {p['tuned_median']:.3f}",
                  (f"  win-rate tuned over base (ties count 1/2)     {p['win_rate']:.3f}  95% CI "
                   f"[{p['win_rate_ci_low']:.3f}, {p['win_rate_ci_high']:.3f}]"),
                  f"  images in {Path(out_dir) / 'images'}"]
    if "implicit_reward" in report:
        r = report["implicit_reward"]
        lines.append(f"implicit-reward accuracy (tuned vs base as reference): {r['accuracy']:.3f}  95% CI "
                     f"[{r['ci_low']:.3f}, {r['ci_high']:.3f}] on {r['pairs']} pairs, {r['num_draws']} draws each")
    return lines
