"""Ghost clipping with book-keeping: per-sample gradient norms and the clipped sum in one backward pass.

Opacus' ghost-norm hooks give every sample's gradient norm without per-sample gradients for ``nn.Linear`` and
``nn.Embedding``; the hooks here also keep each layer's inputs and output gradients, so that once all norms are
known the clipped sum ``sum_i c_i g_i`` follows from them directly
(:func:`~lightning_optx.functional.privacy.clipped_gradient_sum`) instead of from a second backward pass.

Precision: the captured bf16/fp16 tensors are promoted to fp32 before the norms and the clipped sum are computed,
and the clipped sum is kept in fp32 (``p._optx_clipped_sum``) until the noise is added, so the bound holds under
bf16-mixed and bf16-true as in fp32.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from lightning_optx.functional import privacy as P


def _promote(t: Any) -> Any:
    """A low-precision floating tensor in fp32; anything else (token ids, fp32, fp64) unchanged."""
    if isinstance(t, Tensor) and t.is_floating_point() and t.dtype != P.work_dtype(t.dtype):
        return t.to(P.work_dtype(t.dtype))
    return t


_HOOK_CLASSES: dict[str, type] = {}


def bookkeeping_hooks_class() -> type:
    """Opacus' ghost-clipping hooks, changed to keep each layer's inputs and output gradients (book-keeping)."""
    if "ghost" in _HOOK_CLASSES:
        return _HOOK_CLASSES["ghost"]
    from opacus.grad_sample import GradSampleHooksFastGradientClipping
    from opacus.grad_sample.functorch import ft_compute_per_sample_gradient, prepare_layer
    from opacus.layers.dp_rnn import DPGRU, DPLSTM, DPRNN
    from opacus.utils.module_utils import trainable_parameters

    class BookkeepingGhostClippingHooks(GradSampleHooksFastGradientClipping):
        """Per backward pass: every sample's gradient norm per parameter (ghost norms for ``nn.Linear`` and
        ``nn.Embedding``, from per-sample gradients for the others, as Opacus' ghost clipping does), and what the
        clipped sum needs: the inputs and output gradients of the ghost-norm layers, the per-sample gradients of
        the others (which Opacus computes and drops; kept here until the end of the backward pass)."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._captured: list[tuple[nn.Module, list[Tensor], Tensor]] = []
            self._per_sample: list[dict[Tensor, Tensor]] = []
            self._norms: dict[Tensor, Tensor] = {}

        def add_hooks(self, *, loss_reduction: str = "mean", batch_first: bool = True,
                      force_functorch: bool = False) -> None:
            """A forward hook per layer that records its inputs (Opacus' ``capture_activations_hook``) and puts a
            gradient hook on its output. Opacus registers full backward hooks instead, which wrap every layer's
            inputs and outputs in extra autograd nodes; the output's gradient is all the norms need, and a tensor
            hook gets it for less (it also sees through a later in-place op, e.g. ``ReLU(inplace=True)``)."""
            if hasattr(self._module, "autograd_grad_sample_hooks"):
                raise ValueError("Trying to add hooks twice to the same model")
            self._module.autograd_grad_sample_hooks = []
            self.autograd_grad_sample_hooks = self._module.autograd_grad_sample_hooks
            for module in self.iterate_submodules(self._module):
                if type(module) in (DPRNN, DPLSTM, DPGRU):
                    continue
                if force_functorch or type(module) not in self.GRAD_SAMPLERS:
                    prepare_layer(module, batch_first=batch_first)
                self.autograd_grad_sample_hooks.append(module.register_forward_hook(
                    functools.partial(self._forward_hook, loss_reduction=loss_reduction, batch_first=batch_first)))
            self.enable_hooks()

        def _forward_hook(self, module: nn.Module, forward_input: Any, output: Any, *, loss_reduction: str,
                          batch_first: bool) -> None:
            recorded = len(getattr(module, "activations", ()))
            self.capture_activations_hook(module, forward_input, output)
            if len(getattr(module, "activations", ())) == recorded:
                return  # not recorded (eval mode, no grad, hooks disabled): no gradient to capture either
            out = output[0] if isinstance(output, (tuple, list)) else output
            out.register_hook(functools.partial(self._output_gradient_hook, module, loss_reduction=loss_reduction,
                                                batch_first=batch_first))

        def _output_gradient_hook(self, module: nn.Module, grad: Tensor, *, loss_reduction: str,
                                  batch_first: bool) -> None:
            self.capture_backprops_hook(module, None, (grad,), loss_reduction, batch_first)

        def _per_sample_gradients(self, module: nn.Module, activations: Any, backprops: Tensor) -> Any:
            sampler = None if self.force_functorch else self.GRAD_SAMPLERS.get(type(module))
            return (sampler or ft_compute_per_sample_gradient)(module, activations, backprops)

        def capture_backprops_hook(self, module: nn.Module, _forward_input: Any, forward_output: Any,
                                   loss_reduction: str, batch_first: bool) -> None:
            if not self.hooks_enabled:
                return
            params = [p for _, p in trainable_parameters(module)]
            if any(p._forward_counter > 1 for p in params):
                raise ValueError(
                    f"DifferentialPrivacy(grad_sample_mode='ghost'): {type(module).__name__} ran more than once in one "
                    "forward pass (shared weights or a reused layer); use grad_sample_mode='hooks'."
                )
            activations, backprops = self.rearrange_grad_samples(
                module=module, backprops=forward_output[0].detach(), loss_reduction=loss_reduction,
                batch_first=batch_first)
            if self.use_ghost_clipping and type(module) in self.NORM_SAMPLERS:
                activations, backprops = [_promote(a) for a in activations], _promote(backprops)
                norms = self.NORM_SAMPLERS[type(module)](module, activations, backprops)
                self._captured.append((module, activations, backprops))
            else:  # no ghost norm for this layer: per-sample gradients (as Opacus does), kept for the clipped sum
                grads = self._per_sample_gradients(module, activations, backprops)
                norms = {p: _promote(g).flatten(1).norm(2, dim=-1) for p, g in grads.items()}
                self._per_sample.append(grads)
            for p in params:
                p._forward_counter -= 1
            self._norms.update({p: n for p, n in norms.items() if p.requires_grad})
            if not module.activations and hasattr(module, "max_batch_len"):
                del module.max_batch_len

        def clipped_sums(self) -> dict[Tensor, Tensor]:
            """The clipped per-sample gradients of the last backward pass, summed; forgets the captured tensors."""
            captured, per_sample_grads, norms = self._captured, self._per_sample, self._norms
            self._captured, self._per_sample, self._norms = [], [], {}
            if not norms:
                return {}
            per_sample = torch.stack([_promote(n) for n in norms.values()]).norm(2, dim=0)
            self.per_sample_gradient_norms = per_sample
            coefficients = P.clip_coefficients(per_sample, self.max_grad_norm)
            sums: dict[Tensor, Tensor] = {}
            for module, activations, backprops in captured:
                for p, g in P.clipped_gradient_sum(module, activations, backprops, coefficients,
                                                   self._per_sample_gradients).items():
                    sums[p] = sums[p] + g if p in sums else g
            for grads in per_sample_grads:
                for p, g in grads.items():
                    if p.requires_grad:
                        total = torch.einsum("n,n...->...", coefficients, _promote(g).to(coefficients.dtype))
                        sums[p] = sums[p] + total if p in sums else total
            return sums

    _HOOK_CLASSES["ghost"] = BookkeepingGhostClippingHooks
    return BookkeepingGhostClippingHooks



def ghost_backward(hooks: Any, params: list[Tensor], original_backward: Callable[..., Any], loss: Tensor,
                   *args: Any, **kwargs: Any) -> None:
    """Ghost clipping with book-keeping: one backward pass, then the clipped sum from the captured tensors.

    During the backward pass (the module's own ``backward``) the hooks compute every sample's gradient norm,
    layer by layer, with Opacus' ghost-norm formulas (no per-sample gradient for ``nn.Linear``/``nn.Embedding``),
    and keep each layer's inputs and output gradients. Once all norms are known, the clipping factors ``c_i``
    give each layer's clipped sum ``sum_i c_i g_i`` directly, which is added to the step's clipped sum (fp32,
    ``p._optx_clipped_sum``; ``.grad`` gets it rounded to the parameter's dtype). Opacus'
    ``DPLossFastGradientClipping`` instead runs a second backward pass of ``sum_i c_i loss_i``, which needs the
    per-sample losses and zeroes the gradients in between (erasing the earlier micro-batches of an accumulated
    step); this needs neither. The raw gradients the backward pass writes are dropped.
    """
    kept = [p.grad for p in params]  # the clipped sums of earlier micro-batches of this step
    for p in params:
        p.grad = None
    try:
        original_backward(loss, *args, **kwargs)
    finally:
        for p, g in zip(params, kept):
            p.grad = g
    for p, g in hooks.clipped_sums().items():
        previous = p.__dict__.get("_optx_clipped_sum")
        total = g if previous is None else previous + g
        p._optx_clipped_sum = total
        p.grad = total.to(p.dtype) if total.dtype != p.dtype else total
