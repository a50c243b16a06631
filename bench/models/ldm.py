"""The part of a class-conditional latent diffusion model that diffusers has no class for.

LDM-4-G (CompVis/latent-diffusion ``cin256-v2``) conditions its U-Net on a learned
class embedding: ``ldm/modules/encoders/modules.py``'s ``ClassEmbedder`` is an
``nn.Embedding(n_classes, embed_dim)`` whose row for label ``y`` is the U-Net's
cross-attention context, one token long. ``cin256-v2`` has 1001 rows: the 1000
ImageNet classes and, at index 1000, the null class that classifier-free guidance
pairs each sample with.

``ClassEmbedder`` below is the same table as a diffusers model, so it is saved and
loaded (``class_embedder/`` of a converted directory) like the U-Net and the VQ
autoencoder. diffusers is imported here, at module level: import this module only
where the model is needed.
"""

from __future__ import annotations

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from torch import nn

SUBFOLDER = "class_embedder"


class ClassEmbedder(ModelMixin, ConfigMixin):
    """Class label -> 1-token context, as the original ``ClassEmbedder``.

    ``num_classes`` labels are real classes; ``null_class`` (``None`` when the
    checkpoint has no extra row) is the label of the unconditional half of
    classifier-free guidance.
    """

    config_name = "config.json"

    @register_to_config
    def __init__(self, num_embeddings: int = 1001, embedding_dim: int = 512, num_classes: int = 1000,
                 null_class: int | None = 1000):
        super().__init__()
        self.embedding = nn.Embedding(num_embeddings, embedding_dim)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        """``labels`` (B,) int -> contexts (B, 1, embedding_dim)."""
        return self.embedding(labels[:, None])
