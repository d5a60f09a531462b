"""Each notebook's sd15 path on a CUDA GPU, with its peak GPU memory.

No download (a GPU machine may have no network): an SD 1.5-*shaped* pipeline with random weights (UNet
860M, VAE 84M, CLIP text 123M parameters, the published configs) and a Pick-a-Pic-format parquet of
512-px JPEGs stand in for the hub. Each notebook runs with ``DPO_TUTORIAL_PRESET=sd15`` and ``FAST=1``
(the preset's batch sizes, resolution, fp16 and checkpointing; fewer steps), then a last cell prints
``torch.cuda.max_memory_allocated()``. Output: one table row per notebook (pass/fail, seconds, peak GiB).

    python benchmarks/gpu_check.py --out "$OUT"     # benchmarks/gpu_check.sh runs it with the rest
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))  # the sibling benchmark modules (bench_gpu, bench_data_wait)
PEAK = "import torch; print('PEAK_GIB', torch.cuda.max_memory_allocated() / 2**30)"


def build_sd15_shaped(out: Path, tiny: bool = False) -> Path:
    """A diffusers SD 1.5 pipeline folder with the real architectures and random weights (fp16 on disk).

    The configs are ``bench_gpu``'s (UNet 860M, VAE 84M, CLIP text 123M parameters); ``tiny`` shrinks every
    part (``bench_gpu``'s tiny configs: a 64-px pipeline with SD's 8x VAE) for a CPU run of the same code.
    Built on the GPU when there is one (random initialisation of 860M parameters is slow on a CPU).
    """
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from bench_gpu import text_config, unet_config, vae_config
    from dpo_tutorial.testing.fixtures import WORDS
    from dpo_tutorial.tokenizer import build_clip_tokenizer

    tok = build_clip_tokenizer(WORDS, out / "tokenizer", model_max_length=77)
    unet_cfg = unet_config("sd15", tiny)
    device = "cuda" if torch.cuda.is_available() and not tiny else "cpu"
    with torch.device(device):
        torch.manual_seed(0)
        text = CLIPTextModel(CLIPTextConfig(**text_config(unet_cfg["cross_attention_dim"], tiny),
                                            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                            pad_token_id=tok.pad_token_id))
        unet = UNet2DConditionModel(**unet_cfg)
        vae = AutoencoderKL(**vae_config(tiny), sample_size=64 if tiny else 512)
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                          beta_end=0.012, clip_sample=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=unet, scheduler=sched,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.to(torch.float16).save_pretrained(str(out))
    counts = {n: sum(p.numel() for p in m.parameters()) / 1e6 for n, m in (("unet", unet), ("vae", vae),
                                                                            ("text", text))}
    print("parameters (M):", {k: round(v, 1) for k, v in counts.items()})
    return out


def run_notebook(path: Path, env: dict, workdir: Path) -> tuple[bool, float, float | None, str]:
    """Execute one notebook plus the peak-memory cell; return (ok, seconds, peak GiB, last error line)."""
    import nbformat
    from nbclient import NotebookClient

    os.environ.update(env)
    nb = nbformat.read(str(path), as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell(PEAK))
    t0, ok, err = time.perf_counter(), True, ""
    try:
        NotebookClient(nb, timeout=1800, kernel_name="python3", resources={"metadata": {"path": str(workdir)}}).execute()
    except Exception as e:  # noqa: BLE001 - reported in the table
        ok, err = False, str(e).strip().splitlines()[-1][:200]
    printed = "".join(o.get("text", "") for o in nb.cells[-1].get("outputs", []))
    peak = float(printed.split("PEAK_GIB")[1]) if "PEAK_GIB" in printed else None
    return ok, time.perf_counter() - t0, peak, err


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "gpu-check-out"))
    parser.add_argument("--notebooks", nargs="*", default=None, help="stems, e.g. 05_one_training_step")
    args = parser.parse_args()
    from bench_data_wait import write_pairs

    from dpo_tutorial.testing.fixtures import build_tiny_pickscore

    out = Path(args.out)
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    pipe = build_sd15_shaped(work / "sd15-shaped")
    for split in ("train", "validation_unique"):
        write_pairs(work / "pickapic" / f"{split}.parquet", n_pairs=48, size=512, seed=len(split))
    env = {"DPO_TUTORIAL_PRESET": "sd15", "DPO_TUTORIAL_FAST": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "DPO_TUTORIAL_OVERRIDES": json.dumps({"pretrained": str(pipe), "dataset": str(work / "pickapic"),
                                                 "output_dir": str(work / "runs" / "sd15")}),
           "DPO_TUTORIAL_PICKSCORE": str(build_tiny_pickscore(work / "pickscore", image_size=224))}
    rows = ["| notebook | ran | seconds | peak GPU memory (GiB) | error |", "|---|---|---|---|---|"]
    for path in sorted((ROOT / "notebooks").glob("*.ipynb")):
        if args.notebooks and path.stem not in args.notebooks:
            continue
        ok, seconds, peak, err = run_notebook(path, env, work)
        rows.append(f"| {path.stem} | {'yes' if ok else 'FAILED'} | {seconds:.0f} | "
                    f"{'-' if peak is None else f'{peak:.2f}'} | {err} |")
        print(rows[-1], flush=True)
    (out / "gpu_check.md").write_text("\n".join(rows) + "\n")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
