"""DP-SGD through Opacus as a Lightning callback, in parts:

* :mod:`.callback`: :class:`DifferentialPrivacy`, the adapter between Lightning's hooks and the parts below;
* :mod:`.checks`: what is refused (arguments, trainer settings, strategies, callbacks, layers) and why, and how
  DP-SGD runs under the strategy (one process, DDP, or one DP-SGD per replica under Local SGD and DiLoCo);
* :mod:`.budget`: the noise multiplier, the accountant's record, the budget guard and the checkpointed state;
* :mod:`.backward`: the module's ``backward`` patched for ghost clipping and gradient accumulation;
* :mod:`.randomness`: secret (default), reproducible (``seed=``) or secure randomness for batches and noise;
* :mod:`.loader`: the training loader rebuilt with Poisson batches, whatever the data source;
* :mod:`.optimizer`: Opacus' DP optimizer with fp32 clipping, the budget guard and one normalisation per step;
* :mod:`.ghost`: ghost clipping with book-keeping (norms and clipped sum in one backward pass);
* :mod:`.opacus_internals`: every Opacus internal relied on, with the versions it was checked against.
"""

from lightning_optx.callbacks.differential_privacy.callback import DifferentialPrivacy

__all__ = ["DifferentialPrivacy"]
