"""A tiny vision transformer (Dosovitskiy et al., ICLR 2021, arXiv 2010.11929) for the embedded
8x8, 28x28 and 32x32 images, ``(batch, C, H, W) -> (batch, classes)``, and for 1-D signals such
as MNIST-1D, ``(batch, C, L) -> (batch, classes)``.

Decisions:
- Patches of ``patch`` x ``patch`` pixels (or ``patch`` samples of a signal) are embedded by a
  strided convolution (the linear patch projection of the paper); a class token and a learned
  position embedding are prepended/added.
- ``depth`` pre-norm blocks: ``x + Attn(LN(x))`` then ``x + MLP(LN(x))``. The attention keeps
  its four projections ``q``, ``k``, ``v``, ``o`` as separate ``nn.Linear`` modules, so that
  LoRA-Ensemble (``fedens.learners.lora_ensemble``) can wrap each of them.
- ``features`` (the final LayerNorm of the class token) and ``head`` are separate, so a learner
  can put several heads on one body.
- No dropout and no batch norm: the implicit ensembles add their own diversity, and BN
  statistics averaged across non-IID clients misbehave.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from fedens.models import MODELS, ModelSpec


class ViTOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    patch: int = Field(2, ge=1, description="patch side in pixels (or samples of a signal); must divide H and W (8x8 -> 16 tokens) or L")
    dim: int = Field(64, ge=1, description="token width")
    depth: int = Field(2, ge=1, description="transformer blocks")
    heads: int = Field(4, ge=1, description="attention heads; must divide dim")
    mlp_ratio: float = Field(2.0, gt=0, description="hidden width of the block MLP, in units of dim")

    @model_validator(mode="after")
    def _heads_divide_dim(self) -> ViTOptions:
        if self.dim % self.heads:
            raise ValueError(f"heads ({self.heads}) must divide dim ({self.dim})")
        return self


class Attention(nn.Module):
    """Multi-head self-attention with explicit ``q``, ``k``, ``v``, ``o`` projections."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(n, tokens, dim) -> (n, tokens, dim)``."""
        n, t, d = x.shape
        q, k, v = (proj(x).view(n, t, self.heads, d // self.heads).transpose(1, 2) for proj in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)  # (n, heads, tokens, dim / heads)
        return self.o(out.transpose(1, 2).reshape(n, t, d))


class Block(nn.Module):
    """A pre-norm transformer block: ``(n, tokens, dim) -> (n, tokens, dim)``."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        hidden = max(1, round(dim * mlp_ratio))
        self.norm1, self.attn = nn.LayerNorm(dim), Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """Patch embedding, class token, position embedding, ``depth`` blocks, LayerNorm, ``head``."""

    def __init__(self, opts: ViTOptions, input_shape: tuple[int, ...], num_classes: int) -> None:
        super().__init__()
        channels, *size = input_shape
        tokens = 1
        for side in size:
            tokens *= side // opts.patch
        conv = nn.Conv1d if len(size) == 1 else nn.Conv2d  # signals (C, L) or images (C, H, W)
        self.embed = conv(channels, opts.dim, opts.patch, stride=opts.patch)
        self.cls = nn.Parameter(torch.zeros(1, 1, opts.dim))
        self.pos = nn.Parameter(torch.randn(1, tokens + 1, opts.dim) * 0.02)  # ViT's std-0.02 init
        self.blocks = nn.ModuleList(Block(opts.dim, opts.heads, opts.mlp_ratio) for _ in range(opts.depth))
        self.norm = nn.LayerNorm(opts.dim)
        self.head = nn.Linear(opts.dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The normalised class token: ``(n, C, H, W)`` or ``(n, C, L)`` -> ``(n, dim)``."""
        tokens = self.embed(x).flatten(2).transpose(1, 2)  # (n, patches, dim)
        z = torch.cat([self.cls.expand(len(x), -1, -1), tokens], dim=1) + self.pos
        for block in self.blocks:
            z = block(z)
        return self.norm(z[:, 0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(n, classes)`` for images ``(n, C, H, W)``."""
        return self.head(self.features(x))


def check_vit(opts: ViTOptions, input_shape: tuple[int, ...]) -> str | None:
    if len(input_shape) not in (2, 3):
        return f"vit needs images (C, H, W) or signals (C, L), this dataset gives shape {tuple(input_shape)}"
    size = input_shape[1:]
    if any(side % opts.patch for side in size):
        return f"vit patch size {opts.patch} must divide the input size {'x'.join(map(str, size))} (set model.patch)"
    return None


def build_vit(opts: ViTOptions, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    problem = check_vit(opts, input_shape)
    if problem:
        raise ValueError(problem)
    return ViT(opts, input_shape, num_classes)


MODELS.add("vit", ModelSpec(Options=ViTOptions, build=build_vit, check=check_vit))
