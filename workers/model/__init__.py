"""The Super Apriel (Apriel2) supernet in plain torch, with fla kernels on CUDA."""

from workers.model.config import SupernetConfig, load_config
from workers.model.loader import load_checkpoint, save_checkpoint
from workers.model.supernet import SupernetLM

__all__ = ["SupernetConfig", "SupernetLM", "load_checkpoint", "load_config", "save_checkpoint"]
