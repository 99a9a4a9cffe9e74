"""DDP whose gradient all-reduce goes through a compressor (PowerSGD, top-k, sign, fp16/bf16)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lightning_optx.compression import COMPRESSORS, Compressor, get_compressor
from lightning_optx.distributed import agree, all_reduce_mean_coalesced_
from lightning_optx.functional.common import all_finite
from lightning_optx.strategies._ddp_base import OptxDDPStrategy, local_ddp_kwargs


class CompressedDDPStrategy(OptxDDPStrategy):
    """Data-parallel training with compressed gradient averaging, on CPU/gloo as well as CUDA/NCCL.

    DDP's own all-reduce is replaced by a no-op comm hook; once backward has finished on the last
    micro-batch of an optimizer step, all gradients are averaged in one call to the compressor, keyed by
    parameter name. ``on_before_optimizer_step`` therefore sees the (decompressed) averaged gradient, the
    same on every rank, exactly where plain DDP would. Compression does not overlap the backward pass
    (a deliberate trade: one call over all gradients makes the compressor state independent of DDP's
    bucketing, so it checkpoints and resumes bit for bit).

    Under fp16 AMP the gradients are divided by the loss scale before compression and multiplied back
    after, so error-feedback residuals live in unscaled units; a step with inf/NaN gradients on any rank is
    averaged uncompressed and leaves the compressor state untouched (the grad scaler then skips it).

    Error-feedback residuals differ per rank; each rank writes its own into its checkpoint file (nothing is
    gathered, see :mod:`lightning_optx.checkpointing`).

    **Several nodes** (``num_nodes > 1``): the gradients are first averaged at full precision inside each node
    (one coalesced fp32 all-reduce over the node's fast links), then compressed across nodes only: process
    ``i`` of every node exchanges with process ``i`` of the other nodes (one group per local index), all with
    the node's average as input, so every process ends with the same result. Each of the node's processes
    carries the full compressed payload across nodes, in parallel on its own links; the ledger counts the two
    stages as ``comm/intra_node_bytes`` and ``comm/inter_node_bytes``.

    **Buffers** (BatchNorm statistics): as with DDP's default ``broadcast_buffers=True``, every rank uses rank 0's
    buffers, but they are broadcast through the ledger (tag ``"buffers"``, one broadcast per dtype) after each
    optimizer step rather than by DDP before every forward, outside it. Training-mode forwards are unchanged
    (BatchNorm normalises with the batch's statistics); ``broadcast_buffers=False`` leaves each rank its own.

    Args:
        compressor: a :class:`~lightning_optx.compression.Compressor` or one of ``"powersgd"``, ``"topk"``,
            ``"sign"``, ``"fp16"``, ``"bf16"``.
        error_feedback: keep and re-inject what compression dropped (ignored for a compressor object).
        compressor_options: options of the named compressor, e.g. ``{"rank": 4}`` or ``{"density": 0.01}``.
        check_finite: look for inf/NaN before compressing; ``None`` does it only when a grad scaler is used.
        **kwargs: passed to Lightning's ``DDPStrategy``.

    Examples:
        >>> strategy = CompressedDDPStrategy("powersgd", compressor_options={"rank": 4, "start_iter": 10})
        >>> strategy.compressor.level
        4.0
    """

    strategy_name = "compressed_ddp"
    _replica_size_arg = None  # groups per node when num_nodes > 1 (a node's processes reduce together first)
    _ddp_on_replicas = False  # DDP's own hook is a no-op here; the compressed sync runs after backward

    def __init__(
        self,
        compressor: str | Compressor = "powersgd",
        error_feedback: bool = True,
        compressor_options: dict[str, Any] | None = None,
        check_finite: bool | None = None,
        **kwargs: Any,
    ) -> None:
        if isinstance(compressor, Compressor):
            if compressor_options:
                raise ValueError("`compressor_options` is only used with a compressor name, not a Compressor object.")
            self.compressor = compressor
        else:
            if not isinstance(compressor, str) or compressor.lower() not in COMPRESSORS:
                raise ValueError(
                    f"`compressor` must be a Compressor or one of {sorted(COMPRESSORS)}, got compressor={compressor!r}."
                )
            options = dict(compressor_options or {})
            if compressor not in ("fp16", "bf16"):
                options.setdefault("error_feedback", error_feedback)
            self.compressor = get_compressor(compressor, **options)
        self.broadcast_buffers = bool(kwargs.pop("broadcast_buffers", True))
        kwargs.pop("forward_sync_buffers", None)
        super().__init__(**local_ddp_kwargs(kwargs, "CompressedDDPStrategy"))
        self.check_finite = check_finite
        self.skipped_nonfinite_syncs = 0

    def _hook_allreduces(self) -> bool:
        return False

    def post_backward(self, closure_loss: Tensor) -> None:
        super().post_backward(closure_loss)
        model = self.model
        if model is not None and getattr(model, "require_backward_grad_sync", True):
            with self._collective_scope():
                self._sync_gradients()

    def _sync_gradients(self) -> None:
        named = list(self._named_trainable_params())
        missing = [n for n, p in named if p.grad is None]
        if missing:
            raise RuntimeError(
                f"{type(self).__name__}: parameters {missing[:5]} received no gradient in this step. Every rank must "
                "send the same tensors; freeze unused parameters (requires_grad=False) before fitting."
            )
        grads = [p.grad for _, p in named]
        assert all(g is not None for g in grads)
        self.average_gradients_(grads, [n for n, _ in named], tag="grad")  # type: ignore[arg-type]

    def average_gradients_(self, tensors: list[Tensor], names: list[str], tag: str = "grad") -> bool:
        """Average ``tensors`` (gradients in the loss scale) across all ranks in place, as this strategy does.

        Node replicas: full precision inside the node first, compressed across nodes. fp16 AMP: compressed in
        unscaled units; a step with inf/NaN on any rank is averaged uncompressed and leaves the compressor
        state untouched. The compressor's state is keyed by ``names`` (so several gradients of one parameter,
        e.g. per task, each keep their own error feedback); one call is one compressor iteration. Callbacks that
        average gradients themselves (gradient surgery) call it once per optimizer step, on every rank with the
        same names. Returns whether the gradients were compressed (``False``: a non-finite step).
        """
        with self._collective_scope():
            return self._average_gradients_(tensors, names, tag)

    def _average_gradients_(self, tensors: list[Tensor], names: list[str], tag: str) -> bool:
        check = self.check_finite if self.check_finite is not None else self._grad_scale() != 1.0
        if check and not agree(all_finite(tensors), self.world_comm, how="all"):
            self.skipped_nonfinite_syncs += 1
            all_reduce_mean_coalesced_(tensors, self.world_comm, tag=tag)
            return False
        if self.replica_comm is not None:  # several nodes: full precision inside the node, compressed across
            all_reduce_mean_coalesced_(tensors, self.replica_comm, tag=tag)
        scale = self._grad_scale()
        if scale != 1.0:
            torch._foreach_div_(tensors, scale)
        self.compressor.reduce_(tensors, names, self.comm, tag=tag)
        self.compressor.end_iteration()
        if scale != 1.0:
            torch._foreach_mul_(tensors, scale)
        return True

    def _after_optimizer_step(self) -> None:
        if not self.broadcast_buffers or not self.world_comm.active:
            return
        assert self.lightning_module is not None
        by_dtype: dict[torch.dtype, list[Tensor]] = {}
        for b in self.lightning_module.buffers():
            by_dtype.setdefault(b.dtype, []).append(b)
        with torch.no_grad():
            for buffers in by_dtype.values():
                flat = torch.cat([b.detach().reshape(-1) for b in buffers])
                self.world_comm.broadcast_(flat, src=0, tag="buffers")
                offset = 0
                for b in buffers:
                    b.detach().copy_(flat[offset:offset + b.numel()].view_as(b))
                    offset += b.numel()

    def _extra_metrics(self) -> dict[str, float]:
        return {"comm/compression_level": float(self.compressor.level)}

    def _rank_state(self) -> dict[str, Any]:
        return {"compressor": self.compressor.state_dict()}

    def _load_rank_state(self, state: dict[str, Any]) -> None:
        if "compressor" in state:
            self.compressor.load_state_dict(state["compressor"])

    def _shared_state(self) -> dict[str, Any]:
        return {"skipped_nonfinite_syncs": self.skipped_nonfinite_syncs}

    def _load_shared_state(self, state: dict[str, Any]) -> None:
        self.skipped_nonfinite_syncs = int(state.get("skipped_nonfinite_syncs", 0))
