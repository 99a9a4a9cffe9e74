"""The Poisson loader: whatever the training data source, rebuild its DataLoader around Poisson batches.

Lightning hands every training data source (a DataLoader passed to ``trainer.fit(train_dataloaders=...)``, a
datamodule, ``LightningModule.train_dataloader()``) through one object, ``trainer.fit_loop._data_source``, whose
``dataloader()`` the fit loop calls inside the context that records loader arguments (so that it can later
re-create the loader with a ``DistributedSampler``). :func:`install` wraps that call: the user's loader comes
out, and a loader over the same data set, ``collate_fn``, workers and pin-memory setting, with a
:class:`~lightning_optx.functional.privacy.PoissonBatchSampler`, goes to the loop. So all three sources get the
same Poisson batches, and Lightning's own re-creation under DDP keeps them (the sampler ignores the
``DistributedSampler`` and shards the data set itself).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch.utils.data import (
    BatchSampler,
    DataLoader,
    DistributedSampler,
    IterableDataset,
    RandomSampler,
    SequentialSampler,
)

from lightning_optx.callbacks.differential_privacy.opacus_internals import lightning_data_source
from lightning_optx.functional import privacy as P

_UNIFORM_SAMPLERS = (SequentialSampler, RandomSampler, DistributedSampler)
_FIX = "or pass DifferentialPrivacy(poisson_sampling=False) (epsilon is then an approximation, not a guarantee)"


@dataclass
class LoaderGeometry:
    """What the accountant needs to know about the Poisson loader of one fit."""

    sample_rate: float
    dataset_size: int
    steps_per_epoch: int


def check_rebuildable(loader: Any) -> DataLoader:
    """The loader, if it can be rebuilt around Poisson batches; otherwise an error that names the fix."""
    if not isinstance(loader, DataLoader):
        raise ValueError(f"DifferentialPrivacy needs the training data as one torch DataLoader, got "
                         f"{type(loader).__name__} (several loaders, or another iterable): pass a single DataLoader "
                         f"over a map-style data set, {_FIX}.")
    if isinstance(loader.dataset, IterableDataset):
        raise ValueError("DifferentialPrivacy: Poisson sampling needs a map-style data set (with __len__ and "
                         f"__getitem__), got the IterableDataset {type(loader.dataset).__name__}: use a map-style "
                         f"data set, {_FIX}.")
    batch_sampler = loader.batch_sampler
    if batch_sampler is not None and type(batch_sampler) is not BatchSampler \
            and not isinstance(batch_sampler, P.PoissonBatchSampler):
        raise ValueError(f"DifferentialPrivacy: the training DataLoader has a custom batch sampler "
                         f"({type(batch_sampler).__name__}); Poisson sampling replaces it, which would silently "
                         f"drop what it does. Give the DataLoader a batch_size instead, {_FIX}.")
    sampler = loader.sampler
    if not isinstance(sampler, _UNIFORM_SAMPLERS):
        raise ValueError(f"DifferentialPrivacy: the training DataLoader has a custom sampler "
                         f"({type(sampler).__name__}); Poisson sampling (each sample with the same probability) "
                         f"replaces it, which would silently change the data distribution. Use shuffle=True or "
                         f"no sampler, {_FIX}.")
    batch_size = loader.batch_size or getattr(batch_sampler, "batch_size", None)
    if not isinstance(batch_size, int):
        raise ValueError("DifferentialPrivacy: the training DataLoader has no batch_size; give it one (the "
                         "expected Poisson batch size per device and micro-batch).")
    return loader


def poisson_loader(loader: DataLoader, *, world_size: int, rank: int, accumulate: int, generator: Any,
                   seed: int | None, epoch_source: Callable[[], int], token: str) -> tuple[DataLoader, LoaderGeometry]:
    """A DataLoader over ``loader``'s data set with Poisson batches (Opacus' collate for empty batches)."""
    from opacus.data_loader import dtype_safe, shape_safe, wrap_collate_with_empty

    check_rebuildable(loader)
    dataset = loader.dataset
    batch_size = loader.batch_size or loader.batch_sampler.batch_size  # type: ignore[union-attr]
    size = len(dataset)  # type: ignore[arg-type]
    rate = P.sample_rate_for(int(batch_size), size, world_size, accumulate)
    steps = P.steps_per_epoch(rate)
    first = dataset[0]
    shapes = dtypes = None
    if isinstance(first, (tuple, list)):
        shapes = [(0, *shape_safe(x)) for x in first]
        dtypes = [dtype_safe(x) for x in first]
    batch_sampler = P.PoissonBatchSampler(
        SequentialSampler(dataset),  # type: ignore[arg-type]
        batch_size=max(1, round(batch_size)),
        num_samples=size,
        sample_rate=rate,
        steps=steps,
        accumulate=accumulate,
        num_replicas=world_size,
        rank=rank,
        seed=seed,
        generator=generator,
        epoch_source=epoch_source,
        token=token,
    )
    collate = wrap_collate_with_empty(collate_fn=loader.collate_fn, sample_empty_shapes=shapes, dtypes=dtypes)
    # Opacus' wrapper learns the structure of an empty batch from the first non-empty one it collates; with workers
    # each worker has its own copy, so a worker whose first Poisson batch is empty returned a bare list (a crash for
    # a dict-returning collate_fn). Give it that structure now, in the main process, before workers copy it.
    collate.first_batch = copy.deepcopy(loader.collate_fn([first])) if loader.collate_fn is not None else [first]
    kwargs: dict[str, Any] = {}
    if loader.num_workers > 0:
        kwargs = {"prefetch_factor": loader.prefetch_factor, "persistent_workers": loader.persistent_workers}
    rebuilt = DataLoader(
        dataset,
        batch_sampler=batch_sampler,
        num_workers=loader.num_workers,
        collate_fn=collate,
        pin_memory=loader.pin_memory,
        timeout=loader.timeout,
        worker_init_fn=loader.worker_init_fn,
        multiprocessing_context=loader.multiprocessing_context,
        generator=loader.generator,
        **kwargs,
    )
    return rebuilt, LoaderGeometry(rate, size, steps)


def install(trainer: Any, rebuild: Callable[[Any], DataLoader],
            patch: Callable[[object, str, Callable[..., Any]], None]) -> None:
    """Make the fit loop's data source return ``rebuild(user_loader)``, whatever the source is."""
    source = lightning_data_source(trainer)
    original = source.dataloader

    def dataloader() -> DataLoader:
        return rebuild(original())

    patch(source, "dataloader", dataloader)


def plain_loader_geometry(loader: Any, world_size: int, accumulate: int) -> LoaderGeometry:
    """``poisson_sampling=False``: the sample rate the accountant assumes for the user's own batches."""
    batch_size = getattr(loader, "batch_size", None) or getattr(getattr(loader, "batch_sampler", None),
                                                                "batch_size", None)
    dataset = getattr(loader, "dataset", None)
    if not isinstance(batch_size, int) or dataset is None:
        raise ValueError("DifferentialPrivacy: cannot read the batch size and data set of the training loader.")
    size = len(dataset)
    rate = P.sample_rate_for(batch_size, size, world_size, accumulate)
    return LoaderGeometry(rate, size, P.steps_per_epoch(rate))
