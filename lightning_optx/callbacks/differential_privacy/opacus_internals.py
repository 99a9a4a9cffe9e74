"""Every Opacus (and Lightning) name the DP callback relies on beyond the documented API, in one place.

Opacus' public API (``PrivacyEngine.make_private``) wraps the model, the optimizer and the data loader itself;
a Lightning callback cannot hand those over, so :class:`DifferentialPrivacy` builds the same pieces from Opacus'
building blocks and overrides a few of their methods. Those blocks are not all public: names with a leading
underscore, module paths that are not re-exported, attributes the hooks leave on layers and parameters, and
methods whose *behaviour* is overridden. They are listed below with the Opacus versions they were checked
against. :func:`missing_internals` imports and looks up each one, :func:`probe_hook_attributes` runs Opacus'
hooks and optimizers on a one-layer model for the run-time attributes; the callback calls both at construction
(the probe once per process) and so does the test suite, so an Opacus release that moves one fails with a message
naming it instead of training with a silently different mechanism.

Lightning: the training data source (``trainer.fit_loop._data_source``) is private too; it is how every data
source (a loader passed to ``fit``, a datamodule, the module's hook) reaches the training loop, so it is the
one place where the loader can be rebuilt for all of them.

Examples:
    >>> missing_internals()
    []
    >>> OPACUS_CHECKED
    ('1.6.0', '1.6.0')
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from typing import Any

#: Opacus versions (lowest, highest) whose internals were checked against this module. The requirement in
#: pyproject.toml is ``opacus>=1.6,<1.7``; a newer Opacus must be re-checked here before the bound moves.
OPACUS_CHECKED: tuple[str, str] = ("1.6.0", "1.6.0")

#: (module, attribute path, what the callback does with it). An attribute path may be dotted (a class member).
OPACUS_INTERNALS: tuple[tuple[str, str, str], ...] = (
    ("opacus.optimizers", "get_optimizer_class", "picks the DP optimizer class for clipping / DDP / ghost"),
    ("opacus.optimizers", "DPOptimizer.pre_step", "overridden: budget guard, per-step noise seed"),
    ("opacus.optimizers", "DPOptimizer.clip_and_accumulate", "overridden: fp32 clipping"),
    ("opacus.optimizers", "DPOptimizer.add_noise", "overridden: fp32 noise, one draw for all parameters"),
    ("opacus.optimizers", "DPOptimizer.scale_grad", "overridden: one normalisation per Poisson batch"),
    ("opacus.optimizers", "DPOptimizer.grad_samples", "per-sample gradients of the trainable parameters"),
    ("opacus.optimizers", "DPOptimizer._get_flat_grad_sample", "one parameter's per-sample gradient"),
    ("opacus.optimizers", "DPOptimizer.attach_step_hook", "the accountant's per-step hook"),
    ("opacus.optimizers", "DistributedDPOptimizer.reduce_gradients", "overridden: all-reduce in fp32"),
    ("opacus.optimizers", "DPPerLayerOptimizer", "per-layer clipping (attribute `max_grad_norms`)"),
    ("opacus.optimizers", "AdaClipDPOptimizer.clip_and_accumulate", "overridden for empty Poisson batches"),
    ("opacus.optimizers", "AdaClipDPOptimizer.update_max_grad_norm", "overridden for empty Poisson batches"),
    ("opacus.optimizers", "DPOptimizerFastGradientClipping.accumulate", "overridden: take the fp32 clipped sum"),
    ("opacus.optimizers.optimizer", "_check_processed_flag", "Opacus' guard against clipping a gradient twice"),
    ("opacus.optimizers.optimizer", "_mark_as_processed", "Opacus' guard against clipping a gradient twice"),
    ("opacus.optimizers.optimizer", "_generate_noise", "Gaussian noise (secure mode: resistant to fp attacks)"),
    ("opacus.grad_sample.utils", "get_hooks_class", "the per-sample gradient hooks of a grad_sample_mode"),
    ("opacus.grad_sample", "GradSampleHooksFastGradientClipping", "base of the book-keeping ghost hooks"),
    ("opacus.grad_sample", "GradSampleHooksFastGradientClipping.capture_activations_hook", "records inputs"),
    ("opacus.grad_sample", "GradSampleHooksFastGradientClipping.rearrange_grad_samples", "batch-first tensors"),
    ("opacus.grad_sample", "GradSampleHooksFastGradientClipping.iterate_submodules", "layers to hook"),
    ("opacus.grad_sample", "GradSampleHooksFastGradientClipping.enable_hooks", "switches the hooks on"),
    ("opacus.grad_sample", "GradSampleHooksFastGradientClipping.cleanup", "removes the hooks"),
    ("opacus.grad_sample", "GradSampleHooksFastGradientClipping.GRAD_SAMPLERS", "per-sample gradient formulas"),
    ("opacus.grad_sample", "GradSampleHooksFastGradientClipping.NORM_SAMPLERS", "ghost-norm formulas"),
    ("opacus.data_loader", "CollateFnWithEmpty._make_empty_batch", "an empty batch shaped like `first_batch`, "
     "which the loader sets before workers copy the collate function"),
    ("opacus.grad_sample.functorch", "ft_compute_per_sample_gradient", "per-sample gradients, other layers"),
    ("opacus.grad_sample.functorch", "prepare_layer", "per-sample gradients, other layers"),
    ("opacus.layers.dp_rnn", "DPRNN", "layers the ghost hooks skip (their cells are hooked)"),
    ("opacus.layers.dp_rnn", "DPLSTM", "layers the ghost hooks skip (their cells are hooked)"),
    ("opacus.layers.dp_rnn", "DPGRU", "layers the ghost hooks skip (their cells are hooked)"),
    ("opacus.utils.module_utils", "trainable_modules", "the layers that get hooks"),
    ("opacus.utils.module_utils", "trainable_parameters", "the parameters of a hooked layer"),
    ("opacus.validators", "ModuleValidator.VALIDATORS", "layers Opacus cannot train privately"),
    ("opacus.validators", "ModuleValidator.FIXERS", "fix_model=True replacements"),
    ("opacus.data_loader", "wrap_collate_with_empty", "collate of an empty Poisson batch"),
    ("opacus.data_loader", "shape_safe", "collate of an empty Poisson batch"),
    ("opacus.data_loader", "dtype_safe", "collate of an empty Poisson batch"),
    ("opacus.accountants", "create_accountant", "the accountant"),
    ("opacus.accountants", "RDPAccountant.DEFAULT_ALPHAS", "cached RDP epsilon (same orders as Opacus)"),
    ("opacus.accountants.analysis.rdp", "compute_rdp", "cached RDP epsilon"),
    ("opacus.accountants.analysis.rdp", "get_privacy_spent", "cached RDP epsilon"),
    ("opacus.accountants.utils", "get_noise_multiplier", "noise calibration for target_epsilon"),
)

#: Attributes Opacus' hooks and optimizers set or read at run time, which the callback reads or writes (checked
#: by :func:`probe_hook_attributes` on a one-layer model and a DP optimizer around it, not by import).
OPACUS_RUNTIME_ATTRIBUTES: tuple[tuple[str, str], ...] = (
    ("parameter", "_forward_counter"),
    ("parameter", "grad_sample"),
    ("parameter", "summed_grad"),
    ("layer", "activations"),
    ("layer", "max_batch_len"),
    ("hooks", "hooks_enabled"),
    ("hooks", "force_functorch"),
    ("hooks", "use_ghost_clipping"),
    ("hooks", "_module"),
    ("hooks", "autograd_grad_sample_hooks"),
    ("optimizer", "generator"),
    ("optimizer", "expected_batch_size"),
    ("optimizer", "noise_multiplier"),
    ("optimizer", "max_grad_norm"),
    ("DistributedDPOptimizer", "rank"),
    ("DistributedDPOptimizer", "world_size"),
    ("AdaClipDPOptimizer", "sample_size"),
    ("AdaClipDPOptimizer", "unclipped_num"),
)


#: The Lightning internal the loader rebuild relies on: (object path on a Trainer, attribute, why).
LIGHTNING_INTERNALS: tuple[tuple[str, str, str], ...] = (
    ("fit_loop._data_source", "dataloader", "every training data source passes through it"),
)


def _lookup(module: str, path: str) -> Any:
    obj: Any = importlib.import_module(module)
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def missing_internals() -> list[str]:
    """``module:name`` of every listed Opacus internal that cannot be imported or found (empty when all are)."""
    missing = []
    for module, path, _ in OPACUS_INTERNALS:
        try:
            _lookup(module, path)
        except (ImportError, AttributeError):
            missing.append(f"{module}:{path}")
    return missing


def require_internals() -> None:
    """Raise an ``ImportError`` naming the moved internals and the Opacus versions they were checked against."""
    missing = missing_internals()
    if not missing:
        missing = _probed_once()
    if missing:
        import opacus

        raise ImportError(
            f"DifferentialPrivacy relies on Opacus internals that this Opacus ({opacus.__version__}) does not have: "
            f"{', '.join(missing)}. They were checked against opacus {OPACUS_CHECKED[0]}..{OPACUS_CHECKED[1]} "
            "(see lightning_optx/callbacks/differential_privacy/opacus_internals.py): install a checked version "
            "(`pip install 'opacus>=1.6,<1.7'`)."
        )


@functools.cache
def _probed_once() -> list[str]:
    return probe_hook_attributes()


def probe_hook_attributes() -> list[str]:
    """Run Opacus' hooks and DP optimizers on a one-layer model and return the run-time attributes of
    :data:`OPACUS_RUNTIME_ATTRIBUTES` that did not appear (the distributed optimizer, which needs a process
    group, is checked on its constructor's source)."""
    import inspect

    import torch
    from opacus.grad_sample import GradSampleHooksFastGradientClipping
    from opacus.grad_sample.utils import get_hooks_class
    from opacus.optimizers import AdaClipDPOptimizer, DistributedDPOptimizer, DPOptimizer

    found: set[tuple[str, str]] = set()

    def look(kind: str, obj: Any, names: tuple[str, ...]) -> None:
        found.update((kind, n) for n in names if hasattr(obj, n))

    layer = torch.nn.Linear(2, 1)
    x = torch.ones(3, 2, requires_grad=True)  # (an input that needs a gradient keeps the full backward hook quiet)
    hooks = get_hooks_class("hooks")(layer, batch_first=True, loss_reduction="sum")
    try:
        look("hooks", hooks, ("hooks_enabled", "force_functorch", "_module", "autograd_grad_sample_hooks"))
        out = layer(x)
        look("layer", layer, ("activations",))
        look("parameter", layer.weight, ("_forward_counter",))
        out.sum().backward()
        if getattr(layer.weight, "grad_sample", None) is not None:
            found.add(("parameter", "grad_sample"))
        optimizer = DPOptimizer(torch.optim.SGD(layer.parameters(), lr=0.1), noise_multiplier=0.0, max_grad_norm=1.0,
                                expected_batch_size=3)
        look("optimizer", optimizer, ("generator", "expected_batch_size", "noise_multiplier", "max_grad_norm"))
        optimizer.clip_and_accumulate()
        look("parameter", layer.weight, ("summed_grad",))
        layer(x)  # two forwards, one backward: an activation (and with it max_batch_len) is left on the layer
        layer(x).sum().backward()
        look("layer", layer, ("max_batch_len",))
    finally:
        hooks.cleanup()
    ghost = GradSampleHooksFastGradientClipping(torch.nn.Linear(2, 1), batch_first=True, loss_reduction="sum")
    try:
        look("hooks", ghost, ("use_ghost_clipping",))
    finally:
        ghost.cleanup()
    adaclip = AdaClipDPOptimizer(torch.optim.SGD(torch.nn.Linear(2, 1).parameters(), lr=0.1), noise_multiplier=0.0,
                                 target_unclipped_quantile=0.5, clipbound_learning_rate=0.2, max_clipbound=10.0,
                                 min_clipbound=0.1, unclipped_num_std=1.0, max_grad_norm=1.0, expected_batch_size=3)
    look("AdaClipDPOptimizer", adaclip, ("sample_size", "unclipped_num"))
    source = inspect.getsource(DistributedDPOptimizer.__init__)
    found.update(("DistributedDPOptimizer", n) for n in ("rank", "world_size") if f"self.{n} =" in source)
    return [f"{kind}.{name}" for kind, name in OPACUS_RUNTIME_ATTRIBUTES if (kind, name) not in found]


def lightning_data_source(trainer: Any) -> Any:
    """``trainer.fit_loop._data_source``, or an error naming the Lightning internal that moved."""
    source = getattr(getattr(trainer, "fit_loop", None), "_data_source", None)
    dataloader: Callable[[], Any] | None = getattr(source, "dataloader", None)
    if source is None or not callable(dataloader):
        import lightning

        raise RuntimeError(
            "DifferentialPrivacy rebuilds the training loader at `trainer.fit_loop._data_source.dataloader`, which "
            f"this Lightning ({lightning.__version__}) does not have; the callback was checked against lightning "
            "2.4-2.6. Pin a checked Lightning version."
        )
    return source
