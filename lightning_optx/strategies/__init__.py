"""Distributed strategies (subclasses of Lightning's ``DDPStrategy``), registered by name at import.

``import lightning_optx`` registers every name below in Lightning's ``StrategyRegistry``, so
``Trainer(strategy="local_sgd")`` works without building the strategy object yourself.
"""

from typing import Any

from lightning.pytorch.strategies import StrategyRegistry

from lightning_optx.strategies.compressed_ddp import CompressedDDPStrategy
from lightning_optx.strategies.diloco import DiLoCoStrategy
from lightning_optx.strategies.local_sgd import LocalSGDStrategy

__all__ = ["CompressedDDPStrategy", "DiLoCoStrategy", "LocalSGDStrategy", "register_strategies"]

_REGISTERED: dict[str, tuple[type, str, dict[str, Any]]] = {
    "local_sgd": (LocalSGDStrategy, "Local SGD: parameters averaged every `period` steps", {}),
    "ddp_powersgd": (CompressedDDPStrategy, "DDP with PowerSGD (rank 4) compression", {"compressor": "powersgd"}),
    "ddp_topk": (CompressedDDPStrategy, "DDP with top-k (1%) gradient sparsification", {"compressor": "topk"}),
    "ddp_sign": (CompressedDDPStrategy, "DDP with 1-bit sign compression and error feedback", {"compressor": "sign"}),
    "ddp_fp16": (CompressedDDPStrategy, "DDP with fp16 gradient all-reduce", {"compressor": "fp16"}),
    "ddp_bf16": (CompressedDDPStrategy, "DDP with bf16 gradient all-reduce", {"compressor": "bf16"}),
    "diloco": (DiLoCoStrategy, "DiLoCo: H=500 inner steps, outer Nesterov (lr 0.7, momentum 0.9)", {}),
    "diloco_x": (
        DiLoCoStrategy,
        "DiLoCoX: DiLoCo with one-step-delay overlap and adaptive PowerSGD-compressed pseudo-gradients",
        {"overlap": True, "compressor": "powersgd", "compressor_options": {"rank": 8}, "adaptive_compression": True},
    ),
}


def register_strategies() -> None:
    """(Re-)register every lightning-optx strategy name in Lightning's ``StrategyRegistry``."""
    for name, (cls, description, init_params) in _REGISTERED.items():
        StrategyRegistry.register(name, cls, description=description, override=True, **init_params)


register_strategies()
