"""lightning-optx: Lightning callbacks and strategies for recent optimization research.

Add a callback to your ``Trainer`` and leave your ``LightningModule`` unmodified::

    import lightning as L
    from lightning_optx import Grokfast

    trainer = L.Trainer(callbacks=[Grokfast(filter="ema", alpha=0.98, lamb=2.0)])
"""

from lightning_optx.callbacks import (
    DifferentialPrivacy,
    DropoutSchedule,
    EarlyDropout,
    GradES,
    GradientSurgery,
    Grokfast,
    LateDropout,
)
from lightning_optx.strategies import CompressedDDPStrategy, DiLoCoStrategy, LocalSGDStrategy

__version__ = "0.1.0"

__all__ = [
    "CompressedDDPStrategy",
    "DiLoCoStrategy",
    "DifferentialPrivacy",
    "DropoutSchedule",
    "EarlyDropout",
    "GradES",
    "GradientSurgery",
    "Grokfast",
    "LateDropout",
    "LocalSGDStrategy",
    "__version__",
]
