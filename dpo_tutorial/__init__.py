"""dpo-tutorial: Diffusion-DPO (Wallace et al., arXiv 2311.12908), taught and run for real.

The package owns every function the notebooks use::

    from dpo_tutorial import diffusion_dpo_loss, shared_noise, shared_timesteps, get_preset, train
    history = train(get_preset("toy", max_steps=50))
"""
from .config import ConfigError, TrainConfig, get_preset
from .loss import DPOLossOutput, diffusion_dpo_loss
from .noise import shared_noise, shared_timesteps
from .train import History, train  # noqa: E402  (heavy libraries are imported inside the functions)

__all__ = ["ConfigError", "DPOLossOutput", "History", "TrainConfig", "diffusion_dpo_loss", "get_preset",
           "shared_noise", "shared_timesteps", "train"]
__version__ = "0.1.0"
