"""PickScore: the learned human-preference scorer the Diffusion-DPO paper evaluates SD 1.5 / SDXL with.

PickScore (Kirstain et al. 2023, arXiv 2305.01569) is CLIP-ViT-H/14 fine-tuned on Pick-a-Pic's preference
pairs. It scores an image ``x`` against a caption ``c`` as a temperature-scaled cosine similarity:

    score(x, c) = exp(logit_scale) * < E_img(x) / |E_img(x)| , E_txt(c) / |E_txt(c)| >

with ``logit_scale`` a learned scalar of the CLIP model. Diffusion-DPO (Wallace et al. 2023) picked its
checkpoints by median PickScore on Pick-a-Pic's 500 ``validation_unique`` prompts, and later papers report
mean PickScore there (e.g. SD 1.5 20.53 -> DPO-SD1.5 20.98, arXiv 2406.04314). As ``judge_score`` of
:func:`dpo_tutorial.evaluate.evaluate` it gives both the mean scores and the win-rate: the share of
prompts on which the DPO image scores higher than the base image for the same seed.

The weights are ``yuvalkirstain/PickScore_v1``; its processor (tokenizer + 224-px image transform) is
LAION's ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``. Both load from the hub (about 4 GB) or from local
folders in the same format; the tests use a tiny random-weight stand-in from
:func:`dpo_tutorial.fixtures.build_tiny_pickscore`.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import AutoProcessor, CLIPModel

PICKSCORE_MODEL = "yuvalkirstain/PickScore_v1"
PICKSCORE_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"


def _features(output) -> torch.Tensor:
    """``get_*_features`` returns the projected embedding (transformers 4) or an output holding it (5)."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class PickScore:
    """A ``judge_score(images, captions) -> (N,)`` callable for :func:`dpo_tutorial.evaluate.evaluate`.

    ``model`` / ``processor``: hub ids or local folders (a folder holding both may be passed as both).
    Images are ``(N, H, W, 3)`` uint8 arrays (what :mod:`dpo_tutorial.sample` returns), scored in batches of
    ``batch_size`` under ``torch.inference_mode``.
    """

    def __init__(self, model: str | Path = PICKSCORE_MODEL, processor: str | Path = PICKSCORE_PROCESSOR,
                 device: str | torch.device | None = None, dtype: torch.dtype | None = None,
                 batch_size: int = 16):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = dtype or (torch.float16 if self.device.type == "cuda" else torch.float32)
        try:
            self.processor = AutoProcessor.from_pretrained(str(processor))
            self.model = CLIPModel.from_pretrained(str(model), dtype=dtype).to(self.device).eval()
        except OSError as err:
            raise OSError(f"could not load PickScore (model {str(model)!r}, processor {str(processor)!r}): "
                          f"{str(err)[:200]}. Offline? Pass local folders in the same format "
                          f"(CLIPModel weights + CLIP processor files).") from err
        self.batch_size = batch_size

    @torch.inference_mode()
    def __call__(self, images: np.ndarray, captions: list[str]) -> np.ndarray:
        """PickScore of image ``i`` against caption ``i``: ``(N,)`` float64."""
        if len(images) != len(captions):
            raise ValueError(f"PickScore needs one caption per image: got {len(images)} images and "
                             f"{len(captions)} captions")
        scores = []
        for i in range(0, len(images), self.batch_size):
            scores.append(self._score_batch(list(images[i:i + self.batch_size]), captions[i:i + self.batch_size]))
        return np.concatenate(scores) if scores else np.zeros(0)

    def _score_batch(self, images: list[np.ndarray], captions: list[str]) -> np.ndarray:
        pil = [Image.fromarray(np.asarray(im, dtype=np.uint8)) for im in images]
        pixels = self.processor(images=pil, return_tensors="pt")["pixel_values"]  # (n, 3, S, S)
        text = self.processor(text=captions, padding=True, truncation=True, return_tensors="pt")
        dtype = next(self.model.parameters()).dtype
        image_emb = _features(self.model.get_image_features(pixel_values=pixels.to(self.device, dtype)))
        text_emb = _features(self.model.get_text_features(**{k: v.to(self.device) for k, v in text.items()}))
        image_emb = image_emb.float() / image_emb.float().norm(dim=-1, keepdim=True)  # (n, D)
        text_emb = text_emb.float() / text_emb.float().norm(dim=-1, keepdim=True)  # (n, D)
        scale = self.model.logit_scale.float().exp()
        return (scale * (image_emb * text_emb).sum(dim=-1)).double().cpu().numpy()  # (n,)
