"""The Plug-and-Play Pruning Module (PPM): scores visual tokens given the question.

Our design (the paper's exact architecture is not public; see docs/DESIGN.md, section 4):

    visual_tokens [B, N, D] --norm, proj--> [B, N, d] + type[visual] + row/col position
    text_embeds   [B, T, D] --norm, proj--> [B, T, d] + type[text], a learned null token prepended
    num_blocks x ( visual self-attention -> cross-attention to the text -> MLP ), pre-norm residual
    head: norm -> Linear(d, 1) -> scores [B, N]

The null text token keeps cross-attention defined when a row has no valid text.
Checkpoints are a directory holding `config.json` and `model.safetensors`.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from covipal.errors import CovipalError

CHECKPOINT_FORMAT = "covipal-ppm"
CHECKPOINT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


@dataclass
class PPMConfig:
    hidden_size: int  # D, the language model's width (visual tokens arrive after the projector)
    grid_size: int  # the visual tokens form a grid_size x grid_size raster
    dim: int = 256  # d, the PPM's internal width
    num_blocks: int = 2
    num_heads: int = 4
    mlp_ratio: int = 4

    def __post_init__(self) -> None:
        if self.dim % self.num_heads:
            raise CovipalError(f"PPM dim ({self.dim}) must be divisible by num_heads ({self.num_heads})")

    @property
    def num_visual_tokens(self) -> int:
        return self.grid_size * self.grid_size


class PPMAttention(nn.Module):
    """Multi-head attention; `key_mask [B, T]` (True = attend) is optional."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.o_proj = nn.Linear(dim, dim)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        return x.view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)  # [B, H, L, dh]

    def forward(self, queries: torch.Tensor, keys: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        q = self._split_heads(self.q_proj(queries))  # [B, H, N, dh]
        k = self._split_heads(self.k_proj(keys))  # [B, H, T, dh]
        v = self._split_heads(self.v_proj(keys))  # [B, H, T, dh]
        attn_mask = None if key_mask is None else key_mask[:, None, None, :]  # [B, 1, 1, T]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # [B, H, N, dh]
        batch, _, length, _ = out.shape
        return self.o_proj(out.transpose(1, 2).reshape(batch, length, -1))  # [B, N, d]


class PPMBlock(nn.Module):
    """Visual self-attention, cross-attention from visual to text, then an MLP (pre-norm residuals)."""

    def __init__(self, config: PPMConfig):
        super().__init__()
        dim = config.dim
        self.self_attn_norm = nn.LayerNorm(dim)
        self.self_attn = PPMAttention(dim, config.num_heads)
        self.cross_attn_norm = nn.LayerNorm(dim)
        self.text_norm = nn.LayerNorm(dim)
        self.cross_attn = PPMAttention(dim, config.num_heads)
        self.mlp_norm = nn.LayerNorm(dim)
        hidden = config.mlp_ratio * dim
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, visual: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        x = self.self_attn_norm(visual)
        visual = visual + self.self_attn(x, x)  # [B, N, d]
        visual = visual + self.cross_attn(self.cross_attn_norm(visual), self.text_norm(text), text_mask)
        return visual + self.mlp(self.mlp_norm(visual))  # [B, N, d]


class PruningModule(nn.Module):
    """Scores `[B, N]` for visual tokens `[B, N, D]` given text embeddings `[B, T, D]` and `text_mask [B, T]`."""

    def __init__(self, config: PPMConfig):
        super().__init__()
        self.config = config
        dim = config.dim
        self.input_norm = nn.LayerNorm(config.hidden_size)
        self.input_proj = nn.Linear(config.hidden_size, dim)
        self.type_embed = nn.Embedding(2, dim)  # 0 = visual, 1 = text
        self.row_embed = nn.Embedding(config.grid_size, dim)
        self.col_embed = nn.Embedding(config.grid_size, dim)
        self.null_text = nn.Parameter(torch.zeros(1, 1, dim))
        self.blocks = nn.ModuleList(PPMBlock(config) for _ in range(config.num_blocks))
        self.output_norm = nn.LayerNorm(dim)
        self.score_head = nn.Linear(dim, 1)

    def _grid_positions(self) -> torch.Tensor:
        side = torch.arange(self.config.grid_size, device=self.row_embed.weight.device)
        rows = self.row_embed(side)[:, None, :]  # [G, 1, d]
        cols = self.col_embed(side)[None, :, :]  # [1, G, d]
        return (rows + cols).reshape(-1, self.config.dim)  # [G*G, d], raster order

    def forward(self, visual_tokens: torch.Tensor, text_embeds: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        batch, num_visual, hidden = visual_tokens.shape
        if num_visual != self.config.num_visual_tokens or hidden != self.config.hidden_size:
            raise CovipalError(
                f"this PPM expects visual tokens [B, {self.config.num_visual_tokens}, {self.config.hidden_size}], "
                f"got {list(visual_tokens.shape)}"
            )
        dtype = self.input_proj.weight.dtype
        visual = self.input_proj(self.input_norm(visual_tokens.to(dtype)))  # [B, N, d]
        visual = visual + self.type_embed.weight[0] + self._grid_positions()
        text = self.input_proj(self.input_norm(text_embeds.to(dtype))) + self.type_embed.weight[1]  # [B, T, d]
        text = torch.cat([self.null_text.expand(batch, -1, -1).to(dtype), text], dim=1)  # [B, 1+T, d]
        always = torch.ones(batch, 1, dtype=torch.bool, device=text_mask.device)
        text_mask = torch.cat([always, text_mask.bool()], dim=1)  # [B, 1+T]
        for block in self.blocks:
            visual = block(visual, text, text_mask)
        return self.score_head(self.output_norm(visual)).squeeze(-1).float()  # [B, N]

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def flops(self, num_visual: int, num_text: int) -> int:
        """Matrix-multiply FLOPs (2 per multiply-add) of one forward for one sample; norms and activations excluded."""
        c, n, t = self.config, num_visual, num_text + 1  # +1: the null text token
        d, hidden, mlp = c.dim, c.hidden_size, c.mlp_ratio * c.dim
        macs = (n + num_text) * hidden * d  # input projection
        per_block = (
            4 * n * d * d + 2 * n * n * d  # self-attention: projections, scores and weighted sum
            + 2 * n * d * d + 2 * t * d * d + 2 * n * t * d  # cross-attention
            + 2 * n * d * mlp  # MLP
        )
        macs += c.num_blocks * per_block + n * d  # blocks, score head
        return 2 * macs

    def save(self, directory: str | Path, metadata: dict | None = None) -> Path:
        """Write `config.json` (config + optional metadata) and `model.safetensors` into `directory`."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        record = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "config": asdict(self.config),
                  "metadata": metadata or {}}
        (directory / CONFIG_FILE).write_text(json.dumps(record, indent=2) + "\n")
        tensors = {name: t.detach().contiguous().cpu() for name, t in self.state_dict().items()}
        save_file(tensors, str(directory / WEIGHTS_FILE))
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> "PruningModule":
        """Load a checkpoint written by `save`."""
        directory = Path(directory)
        config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
        if not config_path.is_file() or not weights_path.is_file():
            raise CovipalError(f"no PPM checkpoint at {directory}: expected {CONFIG_FILE} and {WEIGHTS_FILE}")
        record = json.loads(config_path.read_text())
        if record.get("format") != CHECKPOINT_FORMAT or record.get("version", 0) > CHECKPOINT_VERSION:
            raise CovipalError(f"{config_path} is not a covipal PPM checkpoint of version <= {CHECKPOINT_VERSION}")
        known = {f.name for f in fields(PPMConfig)}
        module = cls(PPMConfig(**{k: v for k, v in record["config"].items() if k in known}))
        module.load_state_dict(load_file(str(weights_path)), strict=True)
        return module.eval()


def weights_sha256(directory: str | Path) -> str:
    """The sha256 of a checkpoint's weights file: which PPM a record or cache refers to."""
    return hashlib.sha256((Path(directory) / WEIGHTS_FILE).read_bytes()).hexdigest()


def describe(ppm: PruningModule, num_visual: int, num_text: int) -> str:
    """One line with the parameter count and FLOPs, for logs and CLIs."""
    gflops = ppm.flops(num_visual, num_text) / 1e9
    return (f"PPM: {ppm.num_parameters() / 1e6:.2f} M parameters, {gflops:.3f} GFLOPs per sample "
            f"at {num_visual} visual + {num_text} text tokens (d={ppm.config.dim}, blocks={ppm.config.num_blocks})")


def default_ppm_config(hidden_size: int, num_visual_tokens: int, dim: int = 256, num_blocks: int = 2) -> PPMConfig:
    """The default PPM for a model whose visual tokens form a square grid."""
    grid = math.isqrt(num_visual_tokens)
    if grid * grid != num_visual_tokens:
        raise CovipalError(f"the PPM needs a square grid of visual tokens, got {num_visual_tokens}")
    return PPMConfig(hidden_size=hidden_size, grid_size=grid, dim=dim, num_blocks=num_blocks)
