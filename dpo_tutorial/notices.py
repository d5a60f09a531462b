"""Third-party log notices the package's own calls trigger and a learner cannot act on, dropped by message.

Every other log record still shows: the filters match one message fragment on one logger each.
"""
from __future__ import annotations

import logging

# (logger, message fragment): third-party notices the package's own calls trigger that say nothing a
# learner can act on. transformers: "`X` requires torchvision (not installed); falling back to `XPil`" (the
# package never uses torchvision, whose PyPI build does not pair with the CPU torch, and wants the PIL
# fallback); diffusers: "No LoRA keys associated to CLIPTextModel" (our LoRAs adapt the UNet only), and, when the
# frozen UNet is cast to bf16/fp16, "modules ... that should be kept in float32: []" (an empty list: none is).
KNOWN_NOTICES = (("transformers.utils.import_utils", "requires torchvision (not installed)"),
                 ("diffusers.loaders.lora_base", "No LoRA keys associated to CLIPTextModel"),
                 ("diffusers.loaders.lora_pipeline", "No LoRA keys associated to CLIPTextModel"),
                 ("diffusers.loaders.peft", "No LoRA keys associated to CLIPTextModel"),
                 ("diffusers.models.modeling_utils", "that should be kept in float32: []"))


class _DropNotice:
    """A logging filter that drops records containing one message fragment, and nothing else."""

    def __init__(self, fragment: str):
        self.fragment = fragment

    def filter(self, record) -> bool:
        return self.fragment not in record.getMessage()


def quiet_known_notices() -> None:
    """Drop the :data:`KNOWN_NOTICES` (once per logger); this module calls it when it is imported, which the
    package's ``__init__`` does first, before any diffusers or transformers import."""
    for name, fragment in KNOWN_NOTICES:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropNotice) and f.fragment == fragment for f in logger.filters):
            logger.addFilter(_DropNotice(fragment))


quiet_known_notices()
