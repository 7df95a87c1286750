"""An online linear probe: a linear classifier on the backbone's features of each step's first view,
detached, trained beside the method with an optimizer of its own (solo-learn's and lightly's online
linear evaluation). Its figure is the accuracy on each batch *before* the batch's update, averaged
over the epoch: an estimate of held-out accuracy on training views, with no extra forward pass.

The features come from a forward hook on the method's backbone (its first call in a step whose
rows are a multiple of the batch: the first view comes first), labelled with the ground truth where
known (the probe reads no label the method trains on). The rows of every process are gathered, so
each process holds the same probe; its state is in the checkpoint, so a resumed run continues it
exactly. It starts at zero and draws no random number: the method's run is unchanged by it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kinship.runtime import all_gather_cat


class OnlineProbe(nn.Module):
    def __init__(self, backbone: nn.Module, classes: int, lr: float = 0.1) -> None:
        super().__init__()
        dim = backbone.feature_dim
        self.classifier = nn.Sequential(nn.BatchNorm1d(dim, affine=False), nn.Linear(dim, classes))
        nn.init.zeros_(self.classifier[1].weight)
        nn.init.zeros_(self.classifier[1].bias)
        self.optimizer = torch.optim.SGD(self.classifier.parameters(), lr=lr, momentum=0.9)
        self.register_buffer("correct", torch.zeros((), dtype=torch.long))  # this epoch's, over every process
        self.register_buffer("seen", torch.zeros((), dtype=torch.long))
        self.features: torch.Tensor | None = None
        self.rows = 0
        backbone.register_forward_hook(self.capture)

    def capture(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        if self.rows and self.features is None and output.dim() == 2 and len(output) % self.rows == 0:
            self.features = output[: self.rows].detach()

    def expect(self, rows: int) -> None:
        """The next backbone call of ``rows`` (or a multiple) rows is this step's first view."""
        self.features, self.rows = None, rows

    @torch.enable_grad()
    def update(self, labels: torch.Tensor) -> None:
        """One SGD step on the captured features (all processes' rows) and ``labels`` (-1: unknown),
        after counting the predictions made before it."""
        features, self.features, self.rows = self.features, None, 0
        if features is None:
            return
        x, y = all_gather_cat(features.float()), all_gather_cat(labels)
        known = (y >= 0).float()  # masks, not selections: nothing is read back from the device
        self.classifier.train()
        logits = self.classifier(x)
        with torch.no_grad():
            self.correct += ((logits.argmax(1) == y).float() * known).sum().long()
            self.seen += known.sum().long()
        loss = (F.cross_entropy(logits, y.clamp_min(0), reduction="none") * known).sum() / known.sum().clamp_min(1)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()

    def end_epoch(self) -> dict[str, float]:
        """{"online_probe_top1": the epoch's accuracy before each update}, and a fresh count."""
        seen = int(self.seen)
        metrics = {"online_probe_top1": 100 * int(self.correct) / seen} if seen else {}
        self.correct.zero_()
        self.seen.zero_()
        return metrics

    def state(self) -> dict:
        return {"module": self.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load(self, state: dict) -> None:
        self.load_state_dict(state["module"])
        self.optimizer.load_state_dict(state["optimizer"])
