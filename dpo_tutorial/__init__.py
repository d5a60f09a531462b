"""dpo-tutorial: Diffusion-DPO (Wallace et al., arXiv 2311.12908), taught and run for real.

The package owns every function the notebooks use::

    from dpo_tutorial import diffusion_dpo_loss, shared_noise, shared_timesteps, get_preset, train
    history = train(get_preset("toy", max_steps=50))

Modules, one concept each (``docs/ARCHITECTURE.md`` draws them and follows a run through them):

- ``config``: ``TrainConfig`` (every setting of a run), the ``toy``/``sd15``/``sdxl`` presets, validation.
- ``errors``: the errors a user can act on (one line each).
- ``loss``: the Diffusion-DPO loss (Eq. 14) and its metrics; hinge, IPO, SFT and the legacy variant.
- ``noise``: one noise and one timestep per pair, shared by winner and loser.
- ``pickapic``: the Pick-a-Pic v2 format: schema, row builder, parquet writer.
- ``data``: reading Pick-a-Pic pairs: ties, winner-first order, paired crop/flip, the resumable stream.
- ``cache``: the latent cache (VAE latents and text embeddings encoded once), checked when read back.
- ``prefetch``: batches prepared in a background thread while the model trains.
- ``models``: loading SD / SDXL parts, preparing them for training, the LoRA, the reference pass, export.
- ``step``: one DPO step: encode a batch, noise it, policy and reference passes, the loss.
- ``train``: ``train(config) -> History``: inputs checked, parts, one batch source, the loop, the artefacts.
- ``checkpoint``: atomic, exactly resumable checkpoints that hold tensors and numbers, never code.
- ``run_dir``: a run's output folder and its rules: history, lock, marker, when a run may continue it.
- ``files``: atomic writes, safe deletes, output folders the package owns.
- ``threads``: how many CPU threads torch uses.
- ``summary``: a finished run's closing report (last-10% means, held-out implicit accuracy).
- ``sample``: images with and without the LoRA for the same captions and seeds; grids.
- ``evaluate``: win-rate with CI, judge accuracy, implicit-reward accuracy, the held-out score.
- ``paper_eval``: real SD 1.5 / SDXL models the paper's way (implicit accuracy on Pick-a-Pic, PickScore), resumable.
- ``pickscore``: PickScore, the learned preference scorer, as a judge for SD 1.5 / SDXL.
- ``analysis``: the notebooks' measurements (spread of ``model_diff`` estimates, per-pair errors).
- ``plots``: one function per figure; ``figures``: regenerates ``figures/`` with them.
- ``notebook_env``: the environment switches the notebooks read (``DPO_TUTORIAL_FAST``, preset, overrides,
  runs folder), their ``DEVICE`` and frozen-weight dtype.
- ``hub``: hub id vs local path, and a fast "is the Hub reachable" check before loading a hub id.
- ``notices``: the third-party log notices a learner cannot act on, dropped by message.
- ``tokenizer``: builds the small CLIP tokenizer of the toy model and the test stand-ins.
- ``toy``: the shapes world, its judge, the scripts that made the shipped model and pairs, its evaluation, and
  notebook 08's tastes, labelling widget and training on the learner's own labels.
- ``cli``: the ``dpo-tutorial`` command.
- ``testing``: test support (tiny stand-in pipelines, the cross-device guard); nothing else imports it.
"""
import gc as _gc

# The imports below build about 500,000 objects (torch, diffusers, peft, datasets). The garbage collector would
# scan them again and again while they are made, about 1 s of a 6 s import, and none of them is garbage: it
# is paused meanwhile, then left as it was found.
_collecting = _gc.isenabled()
_gc.disable()
try:
    from . import notices  # noqa: F401  (first: drops the known third-party notices before any library logs one)
    from .config import ConfigError, TrainConfig, get_preset
    from .loss import DPOLossOutput, diffusion_dpo_loss
    from .noise import shared_noise, shared_timesteps
    from .run_dir import History
    from .train import train
finally:
    if _collecting:
        _gc.enable()
    del _collecting

__all__ = ["ConfigError", "DPOLossOutput", "History", "TrainConfig", "diffusion_dpo_loss", "get_preset",
           "shared_noise", "shared_timesteps", "train"]
__version__ = "0.1.0"
