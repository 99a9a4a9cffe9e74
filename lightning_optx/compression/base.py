"""The compressor interface shared by compressed DDP and DiLoCo.

A :class:`Compressor` averages a list of tensors across ranks through a compressed representation, in
place: on return every tensor holds (an approximation of) the mean over ranks, bit-identical on every rank.
State that must survive a checkpoint (error-feedback residuals, PowerSGD's Q memories, iteration counter,
random state) is keyed by the caller's stable tensor keys (parameter names), never by DDP bucket, so it is
independent of how DDP happens to bucket gradients.

Residuals differ per rank; :meth:`Compressor.state_dict` returns this rank's state and each rank writes its
own beside the checkpoint (:mod:`lightning_optx.checkpointing`).

Shared rules of the implementations (:mod:`lightning_optx.compression`):

- a tensor is compressed only where that saves bytes; the others ("raw" tensors: 1-D biases and norms,
  small matrices) are averaged exactly in ONE flat fp32 all-reduce per call (:func:`mean_flat_`);
- with ``comm.active == False`` (one process) the same compression is applied, only nothing is sent, so a
  single-process run shows the compression error and error feedback works;
- math runs in fp32 whatever the input dtype (fp16/bf16 inputs are upcast, the result is cast back), and
  state lives on the tensor's device;
- ``payload_bytes(tensors, world_size)`` is exactly what the :class:`~lightning_optx.distributed.CommLedger`
  records for one ``reduce_`` on this rank, hence ``0`` for ``world_size == 1`` (nothing is sent).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_optx.distributed import Communicator, wire_bytes

__all__ = ["Compressor", "check_inputs", "clone_state", "mean_flat_", "residual_for", "world_size_of"]


class Compressor(ABC):
    """Averages tensors across ranks through a compressed representation (see module docstring).

    Args:
        error_feedback: keep what compression dropped (per rank, per tensor) and add it to the next input.

    Examples:
        >>> from lightning_optx.compression import TopK
        >>> from lightning_optx.distributed import Communicator, wire_bytes
        >>> compressor: Compressor = TopK(density=0.25)     # any implementation, used the same way
        >>> grads = [torch.tensor([[1.0, -4.0, 0.5, 0.0], [2.0, 0.1, 0.0, 0.3]]), torch.ones(4)]
        >>> compressor.reduce_(grads, ["fc.weight", "fc.bias"], Communicator(), tag="grad")
        >>> grads[0]
        tensor([[ 0., -4.,  0.,  0.],
                [ 2.,  0.,  0.,  0.]])
        >>> compressor.end_iteration()
        >>> sorted(compressor.state_dict())
        ['iteration', 'residuals', 'server_residuals', 'velocities']
    """

    name: str = "compressor"

    def __init__(self, error_feedback: bool = True) -> None:
        self.error_feedback = bool(error_feedback)
        self.residuals: dict[Hashable, Tensor] = {}
        self.iteration = 0

    @abstractmethod
    def reduce_(self, tensors: Sequence[Tensor], keys: Sequence[Hashable], comm: Communicator,
                tag: str = "grad") -> None:
        """Replace every tensor in place by the (approximate) mean over the ranks of ``comm``."""

    @abstractmethod
    def payload_bytes(self, tensors: Sequence[Tensor], world_size: int) -> int:
        """Analytic number of bytes this rank puts into collectives for one :meth:`reduce_` of ``tensors``."""

    def end_iteration(self) -> None:
        """Called by the owner once per synchronisation round (optimizer step, DiLoCo round)."""
        self.iteration += 1

    @property
    def level(self) -> float:
        """The current compression level (PowerSGD rank, top-k density...); for logging and adaptation."""
        return 1.0

    def wire_bytes(self, tensors: Sequence[Tensor], world_size: int) -> float:
        """Bytes one rank sends plus receives for one :meth:`reduce_` (ring algorithms, see
        :func:`~lightning_optx.distributed.wire_bytes`). Default: everything goes through all-reduces."""
        return float(wire_bytes("all_reduce", self.payload_bytes(tensors, world_size), world_size))

    def compression_ratio(self, tensors: Sequence[Tensor], world_size: int) -> float:
        """Bytes an fp32 ring all-reduce of the same tensors sends and receives, divided by this compressor's.

        Counted on the wire (sent + received per rank), so a code that is all-gathered pays for every rank's
        payload it receives. For ``world_size < 2`` (where nothing is sent) it is evaluated for two ranks.
        """
        world = max(2, world_size)
        raw = wire_bytes("all_reduce", sum(t.numel() * 4 for t in tensors), world)
        return raw / max(1.0, self.wire_bytes(tensors, world))

    def state_dict(self) -> dict[str, Any]:
        """This rank's state: copies (never live references) of tensors, plain python objects otherwise."""
        return {"iteration": self.iteration, "residuals": clone_state(self.residuals)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.iteration = int(state["iteration"])
        self.residuals = clone_state(state["residuals"])


def residual_for(compressor: Compressor, key: Hashable, like: Tensor) -> Tensor:
    """The residual of ``key`` on ``like``'s device and dtype (zeros the first time)."""
    r = compressor.residuals.get(key)
    if r is None or r.shape != like.shape:
        r = torch.zeros_like(like)
    elif r.device != like.device or r.dtype != like.dtype:
        r = r.to(like)
    compressor.residuals[key] = r
    return r


def world_size_of(comm: Communicator) -> int:
    """Number of ranks that take part in ``comm``'s collectives (1 when it is inactive)."""
    return comm.world_size if comm.active else 1


def check_inputs(tensors: Sequence[Tensor], keys: Sequence[Hashable]) -> None:
    """Raise ``ValueError`` unless there is exactly one distinct key per tensor."""
    if len(tensors) != len(keys):
        raise ValueError(f"`keys` must have one key per tensor, got {len(keys)} keys for {len(tensors)} tensors.")
    if len(set(keys)) != len(keys):
        raise ValueError(f"`keys` must be distinct, got keys={list(keys)!r}.")


def clone_state(tensors: Mapping[Hashable, Tensor]) -> dict[Hashable, Tensor]:
    """Detached copies of a ``{key: tensor}`` state map (so a saved state never changes afterwards)."""
    return {k: v.detach().clone() for k, v in tensors.items()}


def mean_flat_(outputs: Sequence[Tensor], comm: Communicator, tag: str,
               sources: Sequence[Tensor] | None = None, divide_first: bool = False) -> None:
    """Exact mean over ranks of ``sources`` (default: ``outputs``) through ONE flat fp32 all-reduce.

    The result is written into ``outputs`` (cast to their dtype). ``divide_first`` divides by the world size
    before summing (as PyTorch's default DDP hook does) instead of after. Issues no collective (and records
    nothing) when there is nothing to send.

    Examples:
        >>> from lightning_optx.distributed import Communicator, wire_bytes
        >>> t = [torch.ones(2), torch.full((1, 2), 3.0)]
        >>> mean_flat_(t, Communicator(), tag="grad")    # one process: the mean is the tensor itself
        >>> t[1]
        tensor([[3., 3.]])
    """
    sources = outputs if sources is None else sources
    if not outputs or sum(t.numel() for t in outputs) == 0:
        return
    world = world_size_of(comm)
    flat = torch.cat([s.detach().reshape(-1).to(torch.float32) for s in sources])
    if divide_first:
        flat.div_(world)
        comm.all_reduce_(flat, op="sum", tag=tag)
    else:
        comm.all_reduce_(flat, op="mean", tag=tag)
    offset = 0
    for out in outputs:
        out.copy_(flat[offset:offset + out.numel()].view_as(out))
        offset += out.numel()
