"""A saved model read a part at a time, for the commands that answer queries (search, the page, `Gallery`).

    model = load_model("runs/NAME")      # the config alone: no tower, no tokenizer, no transformers
    model.encode_text("a dog")           # reads the text tower and its head now (transformers' too, for an hf tower)

`load_model` reads a run folder's config and the towers it is asked for (none by default); any other tower
is read from the same folder, with its projection head, the first time anything uses it, so a text query
never loads the image tower (nor timm, nor torchvision) and an image query never loads the text tower.
Until then text is tokenized by the saved `tokenizer.json` through the `tokenizers` library alone, as
transformers' tokenizer tokenizes it (tests/test_cold_query.py compares them), so a text query imports no
transformers either; and where an engine serves a tower from a graph already checked against these very
weights (registry.py), the tower's torch weights are never read at all. The weights file is the one read
when the model was loaded: a tower asked for after it changed is refused, not mixed in.
"""
from __future__ import annotations

import threading
from pathlib import Path

import torch

from clipModel import CheckpointError, CLIPModel, model_folder

from clip_foundation.engines.saved import saved_tokenizer

TOWERS = ("image", "text")
_READING = threading.Lock()  # two queries of the page asking for the same tower read it once


def _stamp(folder: Path) -> tuple[int, int, int]:
    st = (folder / "model.safetensors").stat()
    return st.st_size, st.st_mtime_ns, st.st_ino  # a file written since, or replaced, differs


class LazyModel(CLIPModel):
    """A `CLIPModel` (`load_model`) whose left-out towers, and tokenizer, are read from its folder on first use."""

    def __getattr__(self, name: str):
        try:
            value = super().__getattr__(name)  # nn.Module's: parameters, buffers and submodules
        except AttributeError:
            if name != "tokenizer" or "folder" not in vars(self):
                raise
            from transformers import AutoTokenizer
            with _READING:
                if "tokenizer" not in vars(self):
                    self.tokenizer = AutoTokenizer.from_pretrained(self.folder, trust_remote_code=False)
            return vars(self)["tokenizer"]
        tower = name.rpartition("_")[0]
        if value is None and tower in TOWERS and "folder" in vars(self):  # a tower left out, or its head
            self.read_tower(tower)
            value = super().__getattr__(name)
        return value

    def has_tower(self, tower: str) -> bool:
        """Whether `tower` ("image" or "text") is in memory (reading nothing)."""
        return self._modules.get(f"{tower}_encoder") is not None

    def reads(self, checkpoint) -> bool:
        """Whether the towers not in memory would be read from `checkpoint`'s weights file, unchanged since."""
        return (Path(checkpoint).resolve() == self.folder.resolve()
                and _stamp(self.folder) == self.stamp)

    def read_tower(self, tower: str) -> None:
        """Read `tower` and its projection head from the folder now, unless they are in memory."""
        with _READING:
            if self.has_tower(tower):
                return
            if _stamp(self.folder) != self.stamp:
                raise CheckpointError(f"{self.folder / 'model.safetensors'} changed since this model was loaded "
                                      "from it: load the model again")
            part = CLIPModel.from_pretrained(self.folder, self.device, towers=(tower,))
            for name in (f"{tower}_encoder", f"{tower}_projection"):  # into the None slots (add_module would ask
                self._modules[name] = part.get_submodule(name).train(self.training)  # for them, reading them again)
            if tower == "text" and "tokenizer" not in vars(self):
                self.tokenizer = part.tokenizer

    def tokenize(self, texts) -> dict[str, torch.Tensor]:
        """`CLIPModel.tokenize`; before transformers' tokenizer is loaded, by the saved tokenizer.json alone."""
        if "tokenizer" in vars(self) or "folder" not in vars(self):
            return super().tokenize(texts)
        if "tokenizer_json" not in vars(self):  # read with the first text (an image query reads none)
            self.tokenizer_json = saved_tokenizer(self.folder, self.config.text.max_length)
        if self.tokenizer_json is None:
            return super().tokenize(texts)  # no fast tokenizer saved: transformers' (__getattr__)
        encoded = self.tokenizer_json.encode_batch([texts] if isinstance(texts, str) else list(texts))
        return {"input_ids": torch.tensor([e.ids for e in encoded], dtype=torch.long),
                "attention_mask": torch.tensor([e.attention_mask for e in encoded], dtype=torch.long)}

    def save_pretrained(self, folder, extra_config: dict | None = None) -> Path:
        """`CLIPModel.save_pretrained`, with every tower read first: a model is saved whole."""
        for tower in TOWERS:
            self.read_tower(tower)
        return super().save_pretrained(folder, extra_config)


def load_model(checkpoint, device=None, towers=()) -> LazyModel:
    """The saved model in `checkpoint` (a folder, or a Hub id: its snapshot in the Hub cache) with `towers`
    read now and the rest when first used (see the module's docstring); CheckpointError as from_pretrained."""
    folder = Path(model_folder(checkpoint))
    stamp = _stamp(folder) if (folder / "model.safetensors").is_file() else None  # else from_pretrained says why
    model = LazyModel.from_pretrained(folder, device, towers=tuple(towers))
    model.folder, model.stamp = folder, stamp
    if model.tokenizer is None:  # read when asked for: __getattr__
        del model.tokenizer
    return model

