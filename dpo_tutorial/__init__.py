"""dpo-tutorial: Diffusion-DPO (Wallace et al., arXiv 2311.12908), taught and run for real.

The package owns every function the notebooks use::

    from dpo_tutorial import diffusion_dpo_loss, shared_noise, shared_timesteps, get_preset, train
    history = train(get_preset("toy", max_steps=50))

Modules, one concept each (``docs/ARCHITECTURE.md`` draws them):

- ``config``: ``TrainConfig`` (every setting of a run), the ``toy``/``sd15``/``sdxl`` presets, validation.
- ``loss``: the Diffusion-DPO loss (Eq. 14) and its metrics; hinge, IPO, SFT and the legacy variant.
- ``noise``: one noise and one timestep per pair, shared by winner and loser.
- ``pickapic``: the Pick-a-Pic v2 format: schema, row builder, parquet writer.
- ``data``: reading Pick-a-Pic pairs: ties, winner-first order, paired crop/flip, the resumable stream.
- ``prefetch``: batches prepared in a background thread while the model trains.
- ``models``: loading SD / SDXL parts, the LoRA adapter, the reference pass (adapter off).
- ``step``: one DPO step: encode a batch, noise it, policy and reference passes, the loss.
- ``train``: ``train(config) -> History``: the loop on accelerate, logging, checkpoints, export.
- ``checkpoint``: atomic, exactly resumable checkpoints that hold tensors and numbers, never code.
- ``run_dir``: a run's output folder: the history file, atomic writes, the writer lock, the resume rules.
- ``rerun``: what ``train`` does when its output folder already holds a run (report, resume, or ``<dir>-2``).
- ``cache``: the optional latent cache (VAE latents and text embeddings encoded once).
- ``summary``: a finished run's closing report (last-10% means, held-out implicit accuracy).
- ``sample``: images with and without the LoRA for the same captions and seeds.
- ``evaluate``: win-rate with CI, judge accuracy, implicit-reward accuracy.
- ``pickscore``: PickScore, the learned preference scorer, as a judge for SD 1.5 / SDXL.
- ``analysis``: the notebooks' measurements (spread of ``model_diff`` estimates, per-pair errors).
- ``plots``: one function per figure; ``figures``: regenerates ``figures/`` with them.
- ``notebook_env``: the environment switches the notebooks read (``DPO_TUTORIAL_FAST``, preset, overrides,
  runs folder), their ``DEVICE`` and frozen-weight dtype.
- ``device_guard``: a CPU-only check that every tensor reaches its model's device (tests of the GPU path).
- ``hub``: hub id vs local path, and a fast "is the Hub reachable" check before loading a hub id.
- ``tokenizer``: builds the small CLIP tokenizer of the toy model and the test stand-ins.
- ``fixtures``: tiny random-weight SD / SDXL / PickScore stand-ins for tests and benchmarks (not imported
  by the rest of the package).
- ``toy``: the shapes world, its judge, the scripts that made the shipped model and pairs, its evaluation, and
  notebook 08's tastes, labelling widget and training on the learner's own labels.
- ``cli``: the ``dpo-tutorial`` command.
"""
from .config import ConfigError, TrainConfig, get_preset
from .loss import DPOLossOutput, diffusion_dpo_loss
from .noise import shared_noise, shared_timesteps
from .models import quiet_known_notices
from .train import History, train  # noqa: E402  (heavy libraries are imported inside the functions)

# before any diffusers / transformers import of ours: drop the few third-party notices that say nothing a
# learner can act on (models.KNOWN_NOTICES), by message; every other log record still shows
quiet_known_notices()

__all__ = ["ConfigError", "DPOLossOutput", "History", "TrainConfig", "diffusion_dpo_loss", "get_preset",
           "shared_noise", "shared_timesteps", "train"]
__version__ = "0.1.0"
