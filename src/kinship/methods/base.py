"""The contract between the trainer and a method.

A method is an ``nn.Module`` that owns its networks and all of its cross-sample state (queues,
banks, caches, centres, tables) as parameters or buffers, so that ``state_dict`` is the whole state
a resumed run needs; state that spans samples is kept identical on every process (gathered or
all-reduced). It is built with its config section, a backbone and the :class:`TrainData` handle.

Each step the trainer calls ``begin_step(step)`` (host-side decisions), ``step_batch(batch, step)``
(the rows the step trains on), ``views(batch, step)`` (augmentation, outside any autograd or DDP
wrapper: the views, then any per-sample draws ``forward`` needs, at positions the method's phase
flags fix), then ``forward(views, batch, step)`` for a loss and logs, steps the optimizer, then
``after_step`` (EMA targets live there). ``forward`` is what
``train.compile`` compiles: it reads no number that changes from step to step on the host (the
step's schedule values live in tensors that ``begin_step`` fills, its phases in flags that
``begin_step`` sets), so one graph serves every step of a phase. Besides, a method may declare

- ``scan_epochs``: leading epochs whose steps run ``forward`` under ``no_grad`` with no optimizer
  step and no ``after_step`` (``step.update`` is False); the learning-rate schedule starts after them;
- ``refreshes()``: work due every N epochs or steps (a k-means over the whole data set, a prototype
  refresh), run by :meth:`refresh` on every process before the step at which it is due, exactly
  once per due position, also across a resume;
- ``on_epoch_end``: per-epoch metrics for ``metrics.jsonl``.

A method config names its augmentation recipes by role: ``augment`` (one recipe for every view),
``view1`` / ``view2`` (an asymmetric pair), ``weak`` / ``strong`` (the target or pseudo-label view and
the online or student view), ``local`` (multi-crop's small crops).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from kinship.config import AugmentConfig, MethodConfig
from kinship.data import Batch, DataInfo, TrainData
from kinship.optim import training_step

__all__ = ["Batch", "DataInfo", "Method", "Refresh", "StepInfo", "TrainData", "run_step"]


@dataclass
class StepInfo:
    epoch: int  # counting scan epochs
    step: int  # global step, from 0, counting scan steps
    total_steps: int
    generator: torch.Generator  # this step's random draws, seeded by (seed, step): the same on every process
    shared_seed: int  # identical on every process at this step (e.g. shuffle-BN permutation)
    steps_per_epoch: int = 1
    update: bool = True  # False in a scan epoch: forward under no_grad, no optimizer step

    @property
    def step_in_epoch(self) -> int:
        return self.step - self.epoch * self.steps_per_epoch


@dataclass(frozen=True)
class Refresh:
    """Work a method asks for every ``every`` epochs (at the epoch's first step) or steps, from
    ``start`` on (in the same unit)."""

    name: str
    every: int
    unit: str = "epoch"  # epoch | step
    start: int = 0

    def __post_init__(self) -> None:
        if self.every < 1 or self.unit not in ("epoch", "step") or self.start < 0:
            raise ValueError(f"refresh '{self.name}': every >= 1, unit epoch or step and start >= 0, got {self}")

    def due(self, epoch: int, step_in_epoch: int, global_step: int) -> bool:
        if self.unit == "step":
            return global_step >= self.start and (global_step - self.start) % self.every == 0
        return step_in_epoch == 0 and epoch >= self.start and (epoch - self.start) % self.every == 0


class Method(nn.Module):
    Config: type[MethodConfig] = MethodConfig

    def __init__(self, config: MethodConfig, backbone: nn.Module, data: TrainData) -> None:
        super().__init__()
        self.config, self.backbone = config, backbone
        self.data = data  # not a module: the trainer's handle, never saved

    @property
    def data_info(self) -> DataInfo:
        return self.data.info

    @property
    def eval_backbone(self) -> nn.Module:
        """The backbone that evaluation and export use (the online one; a method with an EMA teacher
        that its paper evaluates, as MIRA does, returns the teacher's)."""
        return self.backbone

    def cluster_scores(self, features: torch.Tensor) -> torch.Tensor | None:
        """(N, K) scores of the method's own cluster or prototype head for eval-backbone features
        (N, D), whose argmax is its clustering; None for methods without one."""
        return None

    def classifiers(self) -> dict[str, nn.Module]:
        """The method's own classifiers of images, by name (e.g. the EMA and the online network of a
        semi-supervised method): networks from an evaluation view to class logits, whose test
        accuracy the trainer logs and ``kinship eval classifier`` reports; empty for the others."""
        return {}

    def chain(self, *modules: nn.Module) -> nn.Sequential:
        """``modules`` applied in sequence (its own submodules, not copies), in the method's train or
        eval mode, so that a caller restoring the wrapper's mode leaves them as they were."""
        return nn.Sequential(*modules).train(self.training)

    @property
    def eval_recipe(self) -> AugmentConfig:
        """Crop size and normalisation of the evaluation view."""
        raise NotImplementedError

    @property
    def scan_epochs(self) -> int:
        return 0

    @property
    def per_process_batch_norm(self) -> bool:
        """True: keep BN per process under DDP (no SyncBN), e.g. where the method shuffles the batch
        across processes so that BN cannot leak information between samples (MoCo's shuffle-BN)."""
        return False

    @property
    def unused_parameters(self) -> bool:
        """True if some steps leave trainable parameters without a gradient (prototypes frozen in
        the first epochs): DDP then finds them at every step, and leaves them untouched."""
        return False

    def begin_step(self, step: StepInfo) -> dict[str, float]:
        """Host-side work before the step: schedule values written into buffers that ``forward``
        reads, phase flags (prototypes frozen, queue in use); returns the values to log."""
        return {}

    def step_batch(self, batch: Batch, step: StepInfo) -> Batch:
        """The batch this step trains on: the loader's, or with rows appended as ``batch.extra``."""
        return batch

    def view_recipes(self, labeled: bool = False) -> list[AugmentConfig]:
        """The recipes of the views that ``views`` makes of the step's batch (``labeled``: of its
        labeled batch), in order. A streaming loader cuts their crops while it decodes the files
        (:mod:`kinship.data.stream`); a step may take a prefix of them."""
        raise NotImplementedError(f"{type(self).__name__} declares no view_recipes, which streamed data needs")

    def views(self, batch: Batch, step: StepInfo) -> list[torch.Tensor]:
        """The augmented views of ``batch`` this method trains on."""
        raise NotImplementedError

    def forward(
        self, views: list[torch.Tensor], batch: Batch, step: StepInfo
    ) -> tuple[torch.Tensor, dict[str, float | torch.Tensor]]:
        raise NotImplementedError

    def after_step(self, step: StepInfo) -> None:
        """Called after each optimizer step (EMA updates live here)."""

    def refreshes(self) -> list[Refresh]:
        return []

    def refresh(self, name: str, step: StepInfo) -> dict | None:
        """Run the refresh ``name`` due before ``step``; may return metrics for ``metrics.jsonl``."""
        raise NotImplementedError(f"{type(self).__name__} declares refresh '{name}' but does not implement it")

    def on_epoch_end(self, epoch: int) -> dict | None:
        """Called on every process after the last step of ``epoch``; may return metrics."""
        return None


def run_step(
    method: Method,
    step_fn: Callable,
    optimizer: torch.optim.Optimizer,
    batch: Batch,
    step: StepInfo,
    autocast_device: str | None = None,
    views: list[torch.Tensor] | None = None,
    phase: Callable[[str], contextlib.AbstractContextManager] = lambda name: contextlib.nullcontext(),
) -> tuple[torch.Tensor, dict, list[torch.Tensor]]:
    """One training step, as the trainer and the bench run it: the method's host-side decisions and
    its views (``views`` given: those, already made), then an optimizer step on ``step_fn`` (the
    method, or its DDP or compiled wrapper) and ``after_step``; in a scan epoch the forward alone,
    without gradient. ``phase(name)`` wraps "views", "step" and "after_step" (the bench's op logs).
    Returns the loss, the logs (the step's scheduled values included) and the views."""
    with phase("views"):
        scheduled = method.begin_step(step)
        batch = method.step_batch(batch, step)
        if views is None:
            views = method.views(batch, step)
    if not step.update:
        with torch.no_grad(), torch.autocast(autocast_device or "cpu", dtype=torch.bfloat16, enabled=autocast_device is not None):
            loss, logs = method(views, batch, step)  # no DDP wrapper: nothing to reduce
        return loss, {**logs, **scheduled}, views
    with phase("step"):
        loss, logs = training_step(optimizer, lambda: step_fn(views, batch, step), autocast_device)
    with phase("after_step"):
        method.after_step(step)
    return loss, {**logs, **scheduled}, views
