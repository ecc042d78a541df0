"""The Hugging Face tower kinds: any transformers `AutoModel` as CLIP's image or text encoder
(`--image.kind=hf`, `--text.kind=hf`: ViT and DistilBERT by default). Adapters of `clipModel`'s registry
(IMAGE_ENCODERS["hf"], TEXT_ENCODERS["hf"]), kept in their own file as open_clip keeps hf_model.py."""
from __future__ import annotations

import warnings
from dataclasses import replace
from pathlib import Path

from clipModel import OFFLINE_HINT, ImageEncoder, ImageEncoderConfig, TextEncoder, TextEncoderConfig, _origin

class _HFTower:
    """Shared by both Hugging Face adapters: checkpointing, and the saved architecture config."""
    kind = "hf"

    @classmethod
    def weights_origin(cls, cfg: dict) -> dict:
        name = cfg["name"]
        if not cfg["pretrained"]:
            return super().weights_origin(cfg)
        if Path(name).is_absolute() or Path(name).exists():
            return _origin(f"hf {Path(name).name}", f"a local folder ({Path(name).name})")
        return _origin(f"hf {name}", f"{name} (Hugging Face Hub)", base_model=name)

    @classmethod
    def offline_config(cls, cfg, folder: Path):
        return replace(super().offline_config(cfg, folder), name=str(folder / f"{cls.tower}_encoder"))

    def save_config(self, folder: Path) -> None:
        self.model.config.save_pretrained(folder / f"{self.tower}_encoder")  # rebuilt offline from it

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        model = self.model
        new_api = hasattr(model, "activation_checkpointing_enable")  # transformers >= 5.2x renamed it
        if not enable:
            (model.activation_checkpointing_disable if new_api else model.gradient_checkpointing_disable)()
        elif new_api:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


class HFImageEncoder(_HFTower, ImageEncoder):
    """A transformers AutoModel image tower (ViT by default): the CLS token, or the pooled output
    of convolutional models."""

    def __init__(self, cfg: ImageEncoderConfig):
        super().__init__()
        self.model = _load_hf(cfg.name, cfg.pretrained, "image")
        self.out_dim = self.model.config.hidden_size

    def preprocessing(self, cfg):
        mean = std = (0.5, 0.5, 0.5)
        if not (cfg.mean and cfg.std):  # given, or saved with a checkpoint: no lookup needed
            try:
                from transformers import AutoImageProcessor
                proc = AutoImageProcessor.from_pretrained(cfg.name, trust_remote_code=False)
                mean, std = proc.image_mean, proc.image_std
            except (OSError, ValueError):
                warnings.warn(f"no image processor for {cfg.name!r}; normalising with mean=std=0.5")
        return self.model.config.image_size, mean, std

    def forward(self, images):
        out = self.model(pixel_values=images)
        if out.last_hidden_state.dim() == 3:
            return out.last_hidden_state[:, 0]  # CLS token, as the seed design does
        return out.pooler_output.flatten(1)  # convolutional HF models


class HFTextEncoder(_HFTower, TextEncoder):
    """A transformers AutoModel text tower (DistilBERT by default, MiniLM in the preset)."""

    def __init__(self, cfg: TextEncoderConfig, vocab_size: int):
        super().__init__(cfg)
        self.model = _load_hf(cfg.name, cfg.pretrained, "text")
        self.out_dim = self.model.config.hidden_size

    @classmethod
    def build_tokenizer(cls, cfg: TextEncoderConfig, captions=None):
        from transformers import AutoTokenizer
        try:
            return AutoTokenizer.from_pretrained(cfg.name, trust_remote_code=False)
        except OSError as e:
            raise OSError(f"Could not load the tokenizer of {cfg.name!r}: not a local folder and the "
                          "Hugging Face Hub is unreachable. " + OFFLINE_HINT.format(tower="text")) from e

    def hidden_states(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def _load_hf(name: str, pretrained: bool, tower: str):
    from transformers import AutoConfig, AutoModel
    try:
        config = AutoConfig.from_pretrained(name, trust_remote_code=False)  # a folder's .py never runs
        extra = {"add_pooling_layer": False} if config.model_type == "vit" else {}  # unused pooler
        for attention in ("sdpa", None):  # fused attention kernels where the architecture has them
            kwargs = {**extra, "attn_implementation": attention} if attention else extra
            try:
                if pretrained:
                    return AutoModel.from_pretrained(name, trust_remote_code=False, **kwargs)
                return AutoModel.from_config(config, trust_remote_code=False, **kwargs)
            except ValueError as e:
                if attention is None or "sdpa" not in str(e).lower():
                    raise
    except OSError as e:
        what = "weights" if pretrained else "config"
        raise OSError(f"Could not load the {tower} encoder {what} for {name!r}: it is not a local "
                      f"folder and the Hugging Face Hub is unreachable or has no such model. "
                      + OFFLINE_HINT.format(tower=tower)) from e
