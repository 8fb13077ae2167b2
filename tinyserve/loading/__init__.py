"""Checkpoints from disk: a HF directory (config.json + safetensors) or one GGUF file.

Pickle-based checkpoints (.bin, .pt, .pth, .ckpt) are refused: unpickling runs arbitrary code.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import ModelConfig
from ..errors import ModelNotFound, UnsafeCheckpoint, WeightsError
from .model_config import config_from_gguf, config_from_hf, config_from_json_file

__all__ = [
    "Checkpoint",
    "config_from_gguf",
    "config_from_hf",
    "config_from_json_file",
    "load_checkpoint",
]

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


@dataclass
class Checkpoint:
    path: Path
    format: str  # "safetensors" | "gguf"
    config: ModelConfig
    tensors: dict[str, Any]  # HF names -> np.ndarray | BF16Array | QuantTensor
    metadata: dict[str, Any] = field(default_factory=dict)  # GGUF key/values

    @property
    def model_dir(self) -> Path:
        return self.path if self.path.is_dir() else self.path.parent


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read config and (memory-mapped) tensors from a HF directory or a .gguf file."""
    path = Path(path)
    if not path.exists():
        raise ModelNotFound(f"no such model file or directory: {path}")
    if path.is_file() and path.suffix in PICKLE_SUFFIXES:
        raise UnsafeCheckpoint(
            f"{path} is a pickle checkpoint; refusing to unpickle it (use safetensors or GGUF)"
        )
    if path.is_file() and path.suffix == ".gguf":
        from .gguf_file import read_gguf

        gf = read_gguf(path)
        config = gf.config()
        return Checkpoint(path, "gguf", config, gf.tensors, gf.metadata)
    if path.is_file() and path.suffix == ".safetensors":
        path = path.parent
    if path.is_dir():
        from .safetensors_file import read_safetensors_dir

        config = config_from_json_file(path / "config.json")
        if (
            not any(path.glob("*.safetensors"))
            and not (path / "model.safetensors.index.json").exists()
        ):
            pickles = [p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES]
            if pickles:
                raise UnsafeCheckpoint(
                    f"{path} holds only pickle checkpoints ({', '.join(pickles)}); refusing to unpickle them"
                )
        return Checkpoint(path, "safetensors", config, read_safetensors_dir(path))
    raise WeightsError(f"{path}: not a model directory, .gguf or .safetensors file")
