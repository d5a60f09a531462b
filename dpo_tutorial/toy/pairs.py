"""Build a Pick-a-Pic-v2-style preference data set for the shapes world.

For each pair: a caption, two samples of the flawed base pipeline for that caption with different
seeds, and a label from the programmatic judge (``judge.score``):
``label_0 = 1`` if image 0 scores higher, ``0`` if lower, ``0.5`` if the scores agree within
``TIE_TOL`` (ties are kept, as in Pick-a-Pic). Then a fraction ``label_noise`` of the non-tie labels
is flipped, playing the part of careless human raters.

Each split is one parquet file with exactly the Pick-a-Pic v2 columns and types.

Held-out captions: three colour x shape combinations (:data:`UNSEEN_CAPTIONS`) never occur in the
``train`` and ``validation`` splits, so a model trained on them has never seen a preference about those
captions. Every colour and every shape still occurs in training (yellow with all three shapes). The
``test`` split draws all 12 captions equally often, so it holds pairs of both kinds: *seen* captions
(new seeds only) and *unseen* captions.

Run: ``python -m dpo_tutorial.toy.pairs`` (one CPU thread, a few minutes).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import torch

from dpo_tutorial.pickapic import encode_image, pickapic_row, write_pickapic_parquet
from dpo_tutorial.sample import generate, load_pipeline
from dpo_tutorial.toy import (
    GUIDANCE_SCALE,
    PAIRS_DIR,
    PIPELINE_DIR,
    SAMPLE_STEPS,
    judge,
    world,
)
from dpo_tutorial.toy.tastes import preference_labels

DEFAULT_PIPELINE = PIPELINE_DIR
DEFAULT_OUT = PAIRS_DIR
MODEL_NAME = "tiny-sd-shapes"
NUM_INFERENCE_STEPS = SAMPLE_STEPS
TIE_TOL = 1e-3
BASE_TIME = np.datetime64("2023-04-01T00:00:00", "ns")
# one combination per shape, each in another colour: red circle, green square, blue triangle
UNSEEN_CAPTIONS = tuple(world.caption_for(colour, shape) for colour, shape in zip(world.COLOURS, world.SHAPES))
TRAINING_SPLITS = ("train", "validation")  # the splits that never show an unseen caption


def seen_captions() -> list[str]:
    """The 9 captions the training and validation pairs use (all but :data:`UNSEEN_CAPTIONS`), colour-major."""
    return [c for c in world.all_captions() if c not in UNSEEN_CAPTIONS]


def split_captions(split: str) -> list[str]:
    """The captions a split's pairs cycle through: the seen ones for ``train``/``validation``, all 12 for ``test``."""
    return seen_captions() if split in TRAINING_SPLITS else world.all_captions()


def judge_labels(img0: np.ndarray, img1: np.ndarray, captions: list[str],
                 rng: np.random.Generator, label_noise: float) -> np.ndarray:
    """label_0 per pair: 1 / 0 / 0.5 (tie) from judge scores, then flip ``label_noise`` of non-ties."""
    s0 = judge.score_batch(img0, captions).numpy()  # (N,)
    s1 = judge.score_batch(img1, captions).numpy()  # (N,)
    return preference_labels(s0, s1, label_noise, rng, TIE_TOL)


def _uid(rng: np.random.Generator) -> str:
    """A reproducible random UUID string."""
    return str(uuid.UUID(bytes=rng.bytes(16), version=4))


def build_rows(img0: np.ndarray, img1: np.ndarray, captions: list[str], labels: np.ndarray,
               rng: np.random.Generator, first_ranking_id: int) -> list[dict]:
    """One Pick-a-Pic v2 row per pair (:func:`dpo_tutorial.pickapic.pickapic_row`), with reproducible uids."""
    n = len(captions)
    uid0 = [_uid(rng) for _ in range(n)]
    uid1 = [_uid(rng) for _ in range(n)]
    counts = {c: captions.count(c) for c in set(captions)}
    seconds = np.sort(rng.integers(0, 30 * 24 * 3600, size=n))
    created = BASE_TIME + seconds.astype("timedelta64[s]")
    users = rng.integers(1, 200, size=n)
    return [pickapic_row(captions[i], encode_image(img0[i]), encode_image(img1[i]), labels[i], first_ranking_id + i,
                         uids=(uid0[i], uid1[i]), created_at=created[i], model=MODEL_NAME, user_id=users[i],
                         num_example_per_prompt=counts[captions[i]], url="https://example.invalid/pickapic-shapes/{}.jpg")
            for i in range(n)]


def make_pairs(pipeline_dir: str | Path = DEFAULT_PIPELINE, out_dir: str | Path = DEFAULT_OUT,
               n_train: int = 2500, n_val: int = 300, n_test: int = 600, seed: int = 0,
               label_noise: float = 0.1, steps: int = NUM_INFERENCE_STEPS,
               guidance: float = GUIDANCE_SCALE, command: str | None = None) -> dict[str, dict[str, float]]:
    """Sample, judge and write ``out_dir/{train,validation,test}.parquet``; returns split stats.

    Each split cycles through :func:`split_captions` in a shuffled order, so its captions occur equally
    often (to within one pair). ``command``: the command line that ran, recorded in ``meta.json``.
    """
    pipe = load_pipeline(pipeline_dir)
    rng = np.random.default_rng(seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stats, ranking_id = {}, 0
    for split, n in (("train", n_train), ("validation", n_val), ("test", n_test)):
        start = time.time()
        caps = split_captions(split)
        captions = [caps[i % len(caps)] for i in rng.permutation(n)]
        seeds = rng.choice(2**31 - 1, size=2 * n, replace=False)
        imgs = generate(pipe, captions + captions, list(seeds), steps, guidance)  # (2n, 32, 32, 3) uint8
        img0, img1 = imgs[:n], imgs[n:]
        labels = judge_labels(img0, img1, captions, rng, label_noise)
        rows = build_rows(img0, img1, captions, labels, rng, ranking_id)
        ranking_id += n
        write_pickapic_parquet(out / f"{split}.parquet", rows)
        colour_ok = judge.correct_batch(imgs, captions + captions)[0].float().mean().item()
        stats[split] = {"pairs": n, "unseen_caption_pairs": sum(c in UNSEEN_CAPTIONS for c in captions),
                        "ties": float(np.mean(labels == 0.5)), "colour_acc": colour_ok,
                        "seconds": time.time() - start}
        print(f"{split}: {stats[split]}", flush=True)
    meta = {"pipeline": MODEL_NAME, "num_inference_steps": steps, "guidance_scale": guidance,
            "label_noise": label_noise, "tie_tol": TIE_TOL, "seed": seed,
            "unseen_captions": list(UNSEEN_CAPTIONS), "unseen_in": ["test"], "command": command, "stats": stats}
    (out / "meta.json").write_text(json.dumps(meta, indent=1))
    return stats


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point: ``python -m dpo_tutorial.toy.pairs``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pipeline", default=str(DEFAULT_PIPELINE))
    parser.add_argument("--out", default=str(DEFAULT_OUT))
    parser.add_argument("--n-train", type=int, default=2500)
    parser.add_argument("--n-val", type=int, default=300)
    parser.add_argument("--n-test", type=int, default=600)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--label-noise", type=float, default=0.1)
    parser.add_argument("--guidance", type=float, default=GUIDANCE_SCALE)
    parser.add_argument("--steps", type=int, default=NUM_INFERENCE_STEPS)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    shown = sys.argv[1:] if argv is None else argv
    make_pairs(args.pipeline, args.out, args.n_train, args.n_val, args.n_test, args.seed,
               args.label_noise, args.steps, args.guidance, command=" ".join(["dpo-tutorial toy pairs", *shown]))


if __name__ == "__main__":
    main()
