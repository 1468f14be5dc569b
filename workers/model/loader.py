"""Read and write checkpoints in the Apriel2 Hugging Face layout: config.json + safetensors + tokenizer files.

Loading builds the model on the meta device and assigns the read tensors as
its parameters, so weights are not copied once read (unless a dtype conversion
is asked for, or a CPU tensor sits misaligned in the file). Every mismatch
names the tensor.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from policies.errors import CheckpointError, ConfigError
from workers.model.config import SupernetConfig, load_config
from workers.model.supernet import SupernetLM

log = logging.getLogger(__name__)

SKIPPED_PREFIXES = ("model.vision_encoder.", "model.multi_modal_projector.")
FP32_PARAMETERS = ("A_log", "dt_bias")  # gate parameters feed fp32 math; keep them fp32 in a bf16 model
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def safetensors_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as exc:
            raise CheckpointError(f"{index}: not a valid safetensors index ({exc})") from None
        return [directory / name for name in sorted(set(weight_map.values()))]
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{directory}: no *.safetensors files")
    return files


def read_tensors(directory: str | Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    directory = Path(directory)
    tensors: dict[str, torch.Tensor] = {}
    for file in safetensors_files(directory):
        if not file.exists():
            raise CheckpointError(f"{file}: listed in the safetensors index but missing")
        try:
            with safe_open(str(file), framework="pt", device=str(device)) as handle:
                for name in handle.keys():
                    if not name.startswith(SKIPPED_PREFIXES):
                        tensors[name] = _aligned(handle.get_tensor(name))
        except (OSError, RuntimeError, ValueError) as exc:
            if isinstance(exc, CheckpointError):
                raise
            raise CheckpointError(f"{file}: unreadable safetensors file ({exc})") from None
    return tensors


def _aligned(tensor: torch.Tensor) -> torch.Tensor:
    """CPU tensors come as views of the memory-mapped file, at whatever offset the file put them.

    BLAS on a misaligned buffer runs hundreds of times slower, so those (and only those)
    are copied once into aligned memory; GPU tensors are read straight into device memory.
    """
    if tensor.device.type == "cpu" and tensor.data_ptr() % 64:
        return tensor.clone()
    return tensor


def expected_shapes(config: SupernetConfig) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        model = SupernetLM(config)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def check_tensors(config: SupernetConfig, tensors: dict[str, torch.Tensor], source: str) -> None:
    expected = expected_shapes(config)
    missing = [name for name in expected if name not in tensors]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"{source}: missing tensor {missing[0]} of shape {list(expected[missing[0]])}{more}")
    for name, tensor in tensors.items():
        if name not in expected:
            if name == "lm_head.weight" and config.tie_word_embeddings:
                continue
            raise CheckpointError(f"{source}: unexpected tensor {name}: the config has no place for it")
        if tuple(tensor.shape) != expected[name]:
            raise CheckpointError(
                f"{source}: tensor {name} has shape {list(tensor.shape)}, the config implies {list(expected[name])}"
            )


def build_model(config: SupernetConfig, tensors: dict[str, torch.Tensor], source: str = "checkpoint") -> SupernetLM:
    """Wrap already-read tensors in a model without copying them."""
    check_tensors(config, tensors, source)
    with torch.device("meta"):
        model = SupernetLM(config)
    wanted = model.state_dict().keys()
    model.load_state_dict({k: v for k, v in tensors.items() if k in wanted}, assign=True, strict=True)
    model.reset_buffers()
    return model.eval()


def load_checkpoint(directory: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                    kernels: str = "auto") -> SupernetLM:
    """Load a supernet; ``kernels``: "auto" picks ``kernels.select_kernels`` (Triton + fla on CUDA, numba on a
    CPU), "fla" requires the CUDA set, "torch" forces the plain-torch path."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ConfigError(f"{directory}: no such checkpoint folder (make one with `supernet-router checkpoint tiny --out DIR`)")
    config = load_config(directory)
    tensors = read_tensors(directory, device)
    if dtype is not None:
        tensors = {k: v if k.endswith(FP32_PARAMETERS) and v.dtype == torch.float32 else v.to(dtype)
                   for k, v in tensors.items()}
    model = build_model(config, tensors, str(directory))
    if kernels != "torch":
        from workers.model.kernels import select_kernels

        model.use_kernels(select_kernels(model.device, required=kernels == "fla"))
    return model


def save_checkpoint(model: SupernetLM, directory: str | Path, tokenizer_dir: str | Path | None = None,
                    dtype: torch.dtype | None = None) -> Path:
    """Write config.json, model.safetensors and (copied from ``tokenizer_dir``) the tokenizer files.

    ``dtype`` converts floating tensors on the way out, except the fp32 gate parameters.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if dtype is not None:
        state = {k: v if k.endswith(FP32_PARAMETERS) or not v.is_floating_point() else v.to(dtype).contiguous()
                 for k, v in state.items()}
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(model.config.raw, indent=2) + "\n")
    if tokenizer_dir is not None and Path(tokenizer_dir).resolve() != directory.resolve():
        for name in TOKENIZER_FILES:
            if (Path(tokenizer_dir) / name).exists():
                shutil.copy(Path(tokenizer_dir) / name, directory / name)
    return directory
