"""The embedded offline toy: a "shapes world" and a tiny, deliberately flawed Stable Diffusion.

- ``world``: renders 32x32 images of a coloured shape and their captions ("a red circle").
- ``judge``: a transparent programmatic scorer that plays the human rater.
- ``pretrain``: trains the tiny SD pipeline from scratch; it often draws the wrong colour.
- ``pairs``: samples the base model and writes Pick-a-Pic-v2-style preference pairs.
- ``evaluation``: base vs DPO on held-out prompts, the judge playing the raters.
- ``tastes``: preferences no caption names (bigger, left, brighter), each with a scorer; a scripted labeller.
- ``labelling``: candidate pairs, a label file in the Pick-a-Pic schema that survives restarts, the widget.
- ``your_taste``: DPO on the learner's labels and the measured shift (notebook 08).

Shipped assets live in ``assets/``: ``tiny-sd-shapes/`` (a ``StableDiffusionPipeline`` folder) and
``pickapic-shapes/`` (``train``/``validation``/``test`` parquet files).
"""
from ..config import PRESETS, TOY_PAIRS_DIR, TOY_PIPELINE_DIR

PIPELINE_DIR = TOY_PIPELINE_DIR
PAIRS_DIR = TOY_PAIRS_DIR

# how the toy samples (pairs, evaluation, the sample grid), as the toy preset does: the pipeline's own DDPM
# ancestral sampler, and no classifier-free guidance (it would amplify the colour the caption names)
SAMPLE_STEPS = PRESETS["toy"]["sample_steps"]
GUIDANCE_SCALE = PRESETS["toy"]["guidance_scale"]
