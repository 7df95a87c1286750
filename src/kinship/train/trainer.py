"""One trainer for every method: data on the device, DDP, schedules, exact resume, k-NN monitor.

Exactness of resume rests on four facts: the batch order (and the labeled stream) is a function of
(seed, epoch, step); the augmentation generator is re-seeded from (seed, global step) at every
step, identically on every process; refreshes are due at fixed positions and run exactly once per
position; and every piece of state (weights, optimizer, the method's queues, caches and tables,
position, refresh record, partial loss sums, RNG) is in the checkpoint. So a run stopped anywhere,
at an epoch boundary or mid-epoch, and resumed computes what the straight run computes.

Checkpoints are written every ``train.checkpoint_every`` epochs, and besides every
``checkpoint_every_steps`` steps or ``checkpoint_every_min`` minutes for jobs interrupted more often
than an epoch lasts; always to a temporary file renamed into place, so a kill at any moment leaves
the previous checkpoint intact, and ``--resume`` on a folder without one starts the run.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from kinship import checkpoint
from kinship.assembly import RunData, assemble_training, load_run_data, make_loader
from kinship.augment.views import compiled_views
from kinship.blocks.features import extract_features, pixel_features
from kinship.blocks.knn import knn_accuracy, topk_accuracy
from kinship.config import AugmentConfig, RunConfig, save_config, to_dict
from kinship.data import BatchPlan, ImageSet, TensorLoader
from kinship.data.store import seeded_subset
from kinship.data.stream import FileImages, StreamingLoader
from kinship.errors import CheckpointError, DataError, NonFiniteLossError, WriteError
from kinship.methods import Method, StepInfo
from kinship.methods.base import run_step
from kinship.optim import LRSchedule, set_learning_rate
from kinship.runtime import (
    agree,
    all_reduce,
    deterministic,
    init_distributed,
    is_distributed,
    progress_bar,
    rank,
    resolve_device,
    tune_cpu_allocator,
    tune_cuda,
    use_bf16,
    world_size,
)
from kinship.train.loggers import RunLog, check_loggers
from kinship.train.online_probe import OnlineProbe

# the config keys a resumed run may change: when to stop, save, log or evaluate, how many processes
# read the files, and where a collective times out; none of them changes what a step computes
FREE_ON_RESUME = frozenset(
    {
        "train.epochs",
        "train.time_limit_min",
        "train.stop_after_steps",
        "train.stop_after_epochs",
        "train.checkpoint_every",
        "train.checkpoint_every_steps",
        "train.checkpoint_every_min",
        "train.log_every",
        "train.progress",
        "train.loggers",
        "train.online_probe",
        "train.dist_timeout_min",
        "train.allow_resharding",
        "eval.knn_every",
        "eval.classifier_every",
        "data.workers",
        "data.prefetch",
        "data.decode_threads",
    }
)


@dataclass
class Position:
    epoch: int = 0  # epoch being (or about to be) trained, scan epochs included
    step_in_epoch: int = 0
    global_step: int = 0


@dataclass
class Schedule:
    """Step counts of a run: ``scan_epochs`` without updates, then ``train.epochs`` of training."""

    steps_per_epoch: int
    scan_epochs: int
    train_epochs: int

    @property
    def epochs(self) -> int:
        return self.scan_epochs + self.train_epochs

    @property
    def scan_steps(self) -> int:
        return self.scan_epochs * self.steps_per_epoch

    @property
    def total_steps(self) -> int:
        return self.epochs * self.steps_per_epoch


@dataclass
class Run:
    """What a run has assembled, and where it stands."""

    data: RunData
    method: Method
    step_fn: nn.Module  # the method, or its DDP or compiled wrapper
    optimizer: torch.optim.Optimizer
    schedule: Schedule
    lr_at: LRSchedule
    pos: Position
    generator: torch.Generator  # each step's augmentation draws, re-seeded per step


def features(
    network: nn.Module, images: ImageSet | FileImages, recipe: AugmentConfig, config: RunConfig, autocast: bool
) -> torch.Tensor:
    """Evaluation-view features of an image set in memory (computed where called), or of streamed
    files (each process decodes and embeds its share, the rows gathered: every process must call it)."""
    if isinstance(images, FileImages):
        return images.features(network, recipe, config.eval.batch_size, autocast)
    return extract_features(network, images, recipe, config.eval.batch_size, autocast)


def knn_eval(method: Method, data: RunData, config: RunConfig, autocast: bool) -> dict[str, float]:
    """Weighted k-NN top-1/top-5 of the method's backbone: train bank, test queries."""
    net = method.eval_backbone
    bank = features(net, data.bank, method.eval_recipe, config, autocast)
    queries = features(net, data.test, method.eval_recipe, config, autocast)
    acc = knn_accuracy(bank, data.bank.labels, queries, data.test.labels, config.eval.knn_k, config.eval.knn_temperature)
    return {"top1": acc[1], "top5": acc[5]}


def classifier_eval(method: Method, data: RunData, config: RunConfig, autocast: bool) -> dict[str, float]:
    """Test top-1/top-5 of each of the method's own classifiers (``classifier_<name>_top1``)."""
    out = {}
    for name, network in method.classifiers().items():
        scores = features(network, data.test, method.eval_recipe, config, autocast)
        acc = topk_accuracy(scores, data.test.labels)
        out.update({f"classifier_{name}_top1": acc[1], f"classifier_{name}_top5": acc[5]})
    return out


def limited(images: ImageSet | FileImages, limit: int, split: str) -> ImageSet | FileImages:
    """A seeded subset of ``limit`` images (all of them at 0)."""
    keep = seeded_subset(len(images), limit, split)
    return images if keep is None else images.subset(keep)


def pixel_knn(method: Method, data: RunData, config: RunConfig) -> float:
    """k-NN on the raw pixels of the evaluation view: of ``eval.baseline_limit`` bank and test images
    (streamed data: 1,000 by default, a 224 px view being 600 KB of float pixels), or of all."""
    limit = config.eval.baseline_limit or (1_000 if data.streamed else 0)
    bank, test = limited(data.bank, limit, "train"), limited(data.test, limit, "test")
    bank_pixels, test_pixels = (pixel_features(images, method.eval_recipe, config.eval.batch_size) for images in (bank, test))
    return knn_accuracy(bank_pixels, bank.labels, test_pixels, test.labels, config.eval.knn_k, config.eval.knn_temperature)[1]


@dataclass
class Trainer:
    config: RunConfig
    out_dir: Path
    resume: bool = False
    log: Any = print
    summary: dict = field(default_factory=dict)
    # a file of compiled artifacts the user trusts (--compile-cache); default: this user's cache folder
    compile_cache: Path | None = None
    allow_changes: bool = False  # --allow-changes: resume with config keys changed beyond FREE_ON_RESUME

    def __post_init__(self) -> None:
        tune_cpu_allocator()
        self.device = resolve_device(self.config.train.device)
        tune_cuda(self.device)
        init_distributed(self.device, self.config.train.dist_timeout_min)
        self.is_main = rank() == 0
        self.out_dir = Path(self.out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.autocast = use_bf16(self.config.train.precision, self.device)
        self.run_log = RunLog(self.out_dir, self.config.train.loggers, to_dict(self.config), self.is_main)
        self.probe: OnlineProbe | None = None
        self.ckpt_path = self.out_dir / "last.pt"
        self.compile_cache = Path(self.compile_cache or checkpoint.compile_cache_path(to_dict(self.config), self.device))
        self.refreshes: dict[str, dict[str, int]] = {}  # name -> {"count", "step" of the last run}
        self.loss_sum = torch.zeros((), device=self.device)  # this process's losses since the last log line
        self.loss_count = 0
        self.loader: TensorLoader | StreamingLoader | None = None
        self.bad_files: dict[str, str] = {}  # streamed files that failed to decode (every process's): path -> error

    # -- bookkeeping -------------------------------------------------------------------------
    def write_metrics(self, record: dict) -> None:
        self.run_log.write(record)

    def save(self, method: Method, optimizer: torch.optim.Optimizer, pos: Position) -> None:
        """Called on every process: the partial loss sum is the global one (all-reduced)."""
        loss_sum = all_reduce(self.loss_sum.detach().clone())
        self.check_finite(loss_sum.item(), pos)  # the one read-back of a save: a diverged run writes nothing
        self.collect_bad_files(pos)
        self.last_save = time.time()
        if not self.is_main:
            return
        if self.config.train.compile:
            try:
                checkpoint.save_compile_cache(self.compile_cache)
            except (WriteError, RuntimeError) as exc:  # a speed-up only: the checkpoint must not depend on it
                self.log(f"compiled artifacts not saved ({str(exc).splitlines()[0]}); the checkpoint is written all the same")
        state = {
            "config": to_dict(self.config),
            "method": method.state_dict(),
            "optimizer": optimizer.state_dict(),
            "position": [pos.epoch, pos.step_in_epoch, pos.global_step],
            "refreshes": self.refreshes,
            "loss_accumulator": [loss_sum.cpu(), self.loss_count],
            "metrics_lines": self.run_log.lines(),
            **({"online_probe": self.probe.state()} if self.probe is not None else {}),
            "torch_rng": torch.get_rng_state(),
            "world_size": world_size(),
            "data_info": dataclasses.asdict(method.data_info),
            "bad_files": self.bad_files,
        }
        checkpoint.save_atomic(state, self.ckpt_path)

    def resume_state(self) -> dict:
        """The checkpoint to continue, read before any data: a pre-training checkpoint whose config
        is this run's, but for the keys of :data:`FREE_ON_RESUME` (or any, with ``allow_changes``)."""
        state = checkpoint.read_checkpoint(self.ckpt_path, self.device)
        missing = [key for key in ("position", "optimizer", "torch_rng", "metrics_lines") if key not in state]
        if missing:
            raise CheckpointError(f"{self.ckpt_path} lacks {', '.join(missing)}: it is not a checkpoint a run can continue from")
        changed = changed_settings(state["config"], to_dict(self.config))
        fixed = {key: values for key, values in changed.items() if key not in FREE_ON_RESUME}
        listing = ", ".join(f"{key} {old} -> {new}" for key, (old, new) in (fixed or changed).items())
        if fixed and not self.allow_changes:
            raise CheckpointError(
                f"{self.ckpt_path} was written with other settings: {listing}. Resume with the run's own config "
                f"(--resume without --config reads {self.out_dir / 'config.yaml'}), or accept the change with --allow-changes "
                "(the run then no longer computes what it would have)"
            )
        if changed:
            self.log("resuming with changed settings: " + listing)
        return state

    def restore(self, method: Method, optimizer: torch.optim.Optimizer, state: dict) -> Position:
        saved_world = state.get("world_size", 1)
        if saved_world != world_size() and not self.config.train.allow_resharding:
            raise CheckpointError(
                f"{self.ckpt_path} was written by {saved_world} process(es) and this run has {world_size()}: resume "
                f"with {saved_world} (torchrun --nproc_per_node={saved_world}) to continue exactly, or set "
                "train.allow_resharding=true to continue on this number (per-process BN statistics then see other shards)"
            )
        try:
            method.load_state_dict(state["method"])
            optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, KeyError, ValueError) as exc:
            raise CheckpointError(
                f"{self.ckpt_path} does not fit this run's method '{self.config.method.name}' "
                f"(backbone {self.config.model.backbone}): {str(exc).splitlines()[0]}"
            ) from exc
        torch.set_rng_state(state["torch_rng"].cpu())
        self.refreshes = {name: dict(record) for name, record in state.get("refreshes", {}).items()}
        self.bad_files = dict(state.get("bad_files", {}))
        loss_sum, self.loss_count = state.get("loss_accumulator", [torch.zeros(()), 0])
        self.loss_sum = (loss_sum if self.is_main else torch.zeros(())).to(self.device)  # summed over processes at the next log
        if self.probe is not None and "online_probe" in state:
            self.probe.load(state["online_probe"])
        pos = Position(*state["position"])
        self.run_log.start(fresh=False, lines=state["metrics_lines"], step=pos.global_step)  # records after it dropped
        if self.is_main and self.run_log.jsonl.exists():
            for line in self.run_log.jsonl.read_text().splitlines():  # baselines, k-NN and classifier figures so far
                record = json.loads(line)
                self.summary.update({k: v for k, v in record.items() if k.startswith(("knn_", "classifier_"))})
        return pos

    # -- the run -----------------------------------------------------------------------------
    def fit(self) -> dict:
        """Train (or resume) to the end of the schedule or a stop; the run's summary."""
        t = self.config.train
        with compiled_views(t.compile, t.compile_backend, t.compile_mode), deterministic(t.deterministic):
            try:
                return self.run()
            finally:
                if isinstance(self.loader, StreamingLoader):
                    self.loader.close()  # its workers end with the run
                self.run_log.close()

    def run(self) -> dict:
        run = self.set_up()
        stopping = False
        while run.pos.epoch < run.schedule.epochs and not stopping:
            stopping = self.train_epoch(run)
            if is_distributed():
                dist.barrier()
        self.summary.update(
            minutes=(time.time() - self.start_time) / 60,
            epochs_done=run.pos.epoch,
            steps_done=run.pos.global_step,
            stopped_early=run.pos.epoch < run.schedule.epochs,
        )
        self.write_metrics({"summary": self.summary})
        return self.summary

    def set_up(self) -> Run:
        """Data, method, optimizer and schedule; the checkpoint's state restored (read before the
        data), or a fresh run's config written; the loader started and, fresh, the baselines."""
        config, device = self.config, self.device
        torch.manual_seed(config.train.seed)
        self.start_time = self.last_save = time.time()
        checkpoint.remove_stale_temporaries(self.ckpt_path)
        state = self.resume_state() if self.resume and self.ckpt_path.is_file() else None
        check_loggers(config.train.loggers)
        data = load_run_data(config, device, self.out_dir)
        method, step_fn, optimizer = assemble_training(config, data.handle, device)
        if config.train.online_probe and not config.train.compile and data.handle.true_labels is not None:
            self.probe = OnlineProbe(method.backbone, data.handle.info.num_classes).to(device)
        checkpoint.remove_stale_temporaries(self.compile_cache)
        if config.train.compile and checkpoint.load_compile_cache(self.compile_cache):
            self.log(f"compiling from the artifacts in {self.compile_cache}")
        t = config.train
        plan = BatchPlan(data.handle.size, t.batch_size, t.seed, rank(), world_size(), t.steps_per_epoch)
        schedule = Schedule(plan.steps_per_epoch, method.scan_epochs, t.epochs)
        lr_at = LRSchedule.of(config.optim, t.batch_size, schedule.steps_per_epoch, schedule.scan_steps, schedule.total_steps)
        pos = self.start(method, optimizer, state, schedule)
        del state  # the weights are in the method now
        self.loader = make_loader(data, config, plan, device, method)
        if isinstance(self.loader, StreamingLoader):  # its workers start decoding now, before the baselines fill this process
            self.loader.start(pos.epoch, pos.step_in_epoch)
        if not self.resumed and config.eval.baselines:
            self.baselines(method, data)
        return Run(data, method, step_fn, optimizer, schedule, lr_at, pos, torch.Generator(device=device))

    def start(self, method: Method, optimizer: torch.optim.Optimizer, state: dict | None, schedule: Schedule) -> Position:
        """The position to train from: the checkpoint's, with its state restored, or the start."""
        self.resumed = state is not None
        if state is None:
            if self.resume:
                self.log(f"--resume: no checkpoint in {self.out_dir} yet, starting the run")
            self.run_log.start(fresh=True, lines=None, step=0)
            if self.is_main:
                save_config(self.config, self.out_dir / "config.yaml")
            return Position()
        pos = self.restore(method, optimizer, state)
        if pos.step_in_epoch >= schedule.steps_per_epoch or pos.epoch > schedule.epochs:
            raise CheckpointError(
                f"{self.ckpt_path} stopped at epoch {pos.epoch + 1}, step {pos.step_in_epoch}, outside this run's plan of "
                f"{schedule.epochs} epochs of {schedule.steps_per_epoch} steps (train.epochs can only grow, and the "
                "batch and data as written)"
            )
        self.log(f"resumed from {self.ckpt_path} at epoch {pos.epoch + 1}, step {pos.global_step}")
        return pos

    def train_epoch(self, run: Run) -> bool:
        """The rest of the epoch at ``run.pos``, then its end if it completes; whether to stop."""
        pos, schedule, t = run.pos, run.schedule, self.config.train
        bar = progress_bar(
            total=schedule.steps_per_epoch,
            initial=pos.step_in_epoch,
            enabled=self.is_main and t.progress,
            desc=f"epoch {pos.epoch + 1}/{schedule.epochs}",
        )
        epoch_tick, first_step, stopping, save_at_end = time.time(), pos.step_in_epoch, False, False
        self.tick, self.mean_loss = epoch_tick, math.nan
        for batch in self.loader.epoch(pos.epoch, pos.step_in_epoch):
            stopping, save_now = self.train_step(run, batch, bar)
            if pos.step_in_epoch == schedule.steps_per_epoch:
                save_at_end = save_now  # after on_epoch_end below
                continue
            if stopping:
                self.evaluate(run, last=True)
            if save_now or stopping:
                self.save(run.method, run.optimizer, pos)
            if stopping:
                break
        bar.close()
        if bar.disable and self.is_main and t.progress:  # no bar (not a terminal): one line per epoch
            loss_text = "" if math.isnan(self.mean_loss) else f"loss {self.mean_loss:.4f}, "  # nan: no log line yet
            speed = (pos.step_in_epoch - first_step) * t.batch_size / max(time.time() - epoch_tick, 1e-9)
            self.log(
                f"epoch {pos.epoch + 1}/{schedule.epochs}: step {pos.step_in_epoch}/{schedule.steps_per_epoch}, "
                f"{loss_text}{speed:.0f} img/s"
            )
        if pos.step_in_epoch == schedule.steps_per_epoch:
            stopping = self.end_epoch(run, stopping, save_at_end)
        return stopping

    def train_step(self, run: Run, batch, bar) -> tuple[bool, bool]:
        """The refreshes due, one step at its learning rate, the log line when due; (stop, save) after it."""
        pos, config = run.pos, self.config
        run.generator.manual_seed(config.train.seed * 7919 * 1_000_003 + pos.global_step)
        info = StepInfo(
            pos.epoch,
            pos.global_step,
            run.schedule.total_steps,
            run.generator,
            config.train.seed * 1_000_003 + pos.global_step,
            run.schedule.steps_per_epoch,
            update=pos.epoch >= run.schedule.scan_epochs,
        )
        self.run_refreshes(run.method, info)
        lr = run.lr_at(pos.global_step) if info.update else 0.0
        if info.update:
            set_learning_rate(run.optimizer, lr)
        if self.probe is not None:
            self.probe.expect(len(batch.index))
        loss, logs = self.step(run.method, run.step_fn, run.optimizer, batch, info)
        if self.probe is not None:
            self.probe.update(run.method.data.true_labels[batch.index])
        pos.global_step += 1
        pos.step_in_epoch += 1
        self.loss_sum += loss.detach().float()
        self.loss_count += 1
        bar.update(1)
        if pos.step_in_epoch % config.train.log_every == 0 or pos.step_in_epoch == run.schedule.steps_per_epoch:
            self.collect_bad_files(pos)
            self.mean_loss = self.log_losses(pos, lr, logs, time.time() - self.tick, info.update)
            bar.set_postfix(loss=f"{self.mean_loss:.4f}")
            self.tick = time.time()
        return self.interruptions(pos)

    def end_epoch(self, run: Run, stopping: bool, save: bool) -> bool:
        """The method's epoch metrics, the next epoch's position, the monitors and checkpoint due; whether to stop."""
        pos, config = run.pos, self.config
        probe = self.probe.end_epoch() if self.probe is not None else {}
        metrics = {**(run.method.on_epoch_end(pos.epoch) or {}), **probe}
        if metrics:
            self.write_metrics({"epoch": pos.epoch + 1, "step": pos.global_step, **metrics})
        pos.epoch += 1
        pos.step_in_epoch = 0
        stopping = stopping or pos.epoch == config.train.stop_after_epochs < run.schedule.epochs
        last = pos.epoch == run.schedule.epochs or stopping
        self.evaluate(run, last)
        if last or save or pos.epoch % max(1, config.train.checkpoint_every) == 0:
            self.save(run.method, run.optimizer, pos)
        return stopping

    def evaluate(self, run: Run, last: bool) -> None:
        """The k-NN monitor and the method's classifiers, when due (always at the ``last`` position)."""
        epoch, e = run.pos.epoch, self.config.eval
        if last or epoch % max(1, e.knn_every) == 0:
            self.monitor(run.method, run.data, run.pos)
        if run.method.classifiers() and (last or epoch % max(1, e.classifier_every) == 0):
            self.monitor_classifiers(run.method, run.data, run.pos)

    def step(self, method: Method, step_fn: nn.Module, optimizer: torch.optim.Optimizer, batch, info: StepInfo):
        """One step (:func:`kinship.methods.base.run_step`): the loss and the logs."""
        loss, logs, _ = run_step(method, step_fn, optimizer, batch, info, self.device.type if self.autocast else None)
        return loss, logs

    def run_refreshes(self, method: Method, info: StepInfo) -> None:
        """The method's refreshes due at this position, each once: the record (in the checkpoint)
        says which ran, so a resumed run neither repeats nor skips one."""
        for refresh in method.refreshes():
            record = self.refreshes.get(refresh.name, {"count": 0, "step": -1})
            if refresh.due(info.epoch, info.step_in_epoch, info.step) and record["step"] < info.step:
                metrics = method.refresh(refresh.name, info) or {}
                self.refreshes[refresh.name] = {"count": record["count"] + 1, "step": info.step}
                self.write_metrics(
                    {
                        "epoch": info.epoch + 1,
                        "step": info.step,
                        "refresh": refresh.name,
                        "refresh_count": record["count"] + 1,
                        **metrics,
                    }
                )

    def log_losses(self, pos: Position, lr: float, logs: dict, seconds: float, update: bool) -> float:
        """The mean loss over all processes since the last line, written to metrics.jsonl."""
        total = all_reduce(self.loss_sum.clone())
        mean_loss = (total / (self.loss_count * world_size())).item()
        self.check_finite(mean_loss, pos)
        record = {
            "epoch": pos.epoch + 1,
            "step": pos.global_step,
            "loss": mean_loss,
            "lr": lr,
            "img_per_s": self.loss_count * self.config.train.batch_size / max(seconds, 1e-9),
        }
        if not update:
            record["scan"] = True
        record.update({k: float(v) for k, v in logs.items()})
        self.write_metrics(record)
        self.loss_sum.zero_()
        self.loss_count = 0
        return mean_loss

    def collect_bad_files(self, pos: Position) -> None:
        """The streamed files that failed to decode since the last call, from every process: logged
        with their paths, kept in the checkpoint; past ``data.max_bad_files`` of the training images,
        the run stops (on every process alike: each holds the same record)."""
        if not isinstance(self.loader, StreamingLoader):
            return
        new = [(path, self.loader.bad_files[path]) for path in self.loader.new_bad_files]
        self.loader.new_bad_files.clear()
        if is_distributed():
            parts: list = [None] * world_size()
            dist.all_gather_object(parts, new)
            new = [item for part in parts for item in part]
        new = [(path, error) for path, error in new if path not in self.bad_files]
        if not new:
            return
        self.bad_files.update(new)
        for path, error in new:
            self.log(f"step {pos.global_step}: unreadable image {path} ({error}); replaced by the next readable file")
        self.write_metrics({"epoch": pos.epoch + 1, "step": pos.global_step, "bad_files": [path for path, _ in new]})
        share, size = self.config.data.max_bad_files, self.loader.plan.size
        if len(self.bad_files) > share * size:
            raise DataError(
                f"{len(self.bad_files)} of the {size} training images failed to decode, over data.max_bad_files "
                f"({share:g}); the first: {', '.join(list(self.bad_files)[:3])}. kinship check-data "
                f"{self.config.data.path} lists them all"
            )

    def interruptions(self, pos: Position) -> tuple[bool, bool]:
        """(stop now, checkpoint now) after a step. Step counts decide alike on every process;
        decisions from the clock are agreed (one all-reduce, only when a clock option is set)."""
        t = self.config.train
        stop = t.stop_after_steps > 0 and pos.global_step >= t.stop_after_steps
        save = t.checkpoint_every_steps > 0 and pos.global_step % t.checkpoint_every_steps == 0
        if t.time_limit_min > 0 or t.checkpoint_every_min > 0:
            now = time.time()
            out_of_time = t.time_limit_min > 0 and now - self.start_time > 60 * t.time_limit_min
            save_due = t.checkpoint_every_min > 0 and now - self.last_save > 60 * t.checkpoint_every_min
            out_of_time, save_due = agree([out_of_time, save_due], self.device)
            stop, save = stop or out_of_time, save or save_due
        return stop, save

    def check_finite(self, loss: float, pos: Position) -> None:
        """Stop on a loss summed or averaged over the steps since the last log line that is not
        finite: checked at every log line and before every checkpoint, so none holds a diverged run."""
        if not math.isfinite(loss):
            kept = (
                f"the last good checkpoint {self.ckpt_path} is kept"
                if self.ckpt_path.exists()
                else "no checkpoint had been written yet"
            )
            last = pos.global_step - 1
            raise NonFiniteLossError(
                f"loss is {loss} at step {last} (epoch {pos.epoch + 1}), the mean of steps {last - self.loss_count + 1}-{last}; "
                f"training stopped, {kept}. Lower optim.lr, add warm-up (optim.warmup_epochs) or use train.precision: fp32."
            )

    def baselines(self, method: Method, data: RunData) -> None:
        """k-NN on raw pixels and on the network at random init, on the same split and settings
        (on the main process; streamed data: the features on every process)."""
        if not (self.is_main or data.streamed):
            return
        random_init = knn_eval(method, data, self.config, self.autocast)["top1"]
        if not self.is_main:
            return
        pixel = pixel_knn(method, data, self.config)
        self.summary.update(knn_pixel_top1=pixel, knn_random_init_top1=random_init)
        self.write_metrics({"epoch": 0, "knn_pixel_top1": pixel, "knn_random_init_top1": random_init})
        self.log(f"baselines: k-NN top-1 on raw pixels {pixel:.2f}%, on the random-init network {random_init:.2f}%")

    def monitor(self, method: Method, data: RunData, pos: Position) -> None:
        if not (self.is_main or data.streamed):
            return
        acc = knn_eval(method, data, self.config, self.autocast)
        self.summary.update(knn_top1=acc["top1"], knn_top5=acc["top5"])
        self.write_metrics({"epoch": pos.epoch, "knn_top1": acc["top1"], "knn_top5": acc["top5"]})
        self.log(f"epoch {pos.epoch}: k-NN top-1 {acc['top1']:.2f}% top-5 {acc['top5']:.2f}%")

    def monitor_classifiers(self, method: Method, data: RunData, pos: Position) -> None:
        if not (self.is_main or data.streamed):
            return
        acc = classifier_eval(method, data, self.config, self.autocast)
        self.summary.update(acc)
        self.write_metrics({"epoch": pos.epoch, **acc})
        self.log(
            f"epoch {pos.epoch}: classifier top-1 "
            + ", ".join(f"{k.split('_')[1]} {v:.2f}%" for k, v in acc.items() if k.endswith("_top1"))
        )


def changed_settings(before: dict, after: dict, prefix: str = "") -> dict[str, tuple[Any, Any]]:
    """``key: (old, new)`` for every config value that differs (nested sections flattened)."""
    out = {}
    for key in sorted(set(before) | set(after)):
        a, b = before.get(key), after.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out.update(changed_settings(a, b, f"{prefix}{key}."))
        elif a != b:
            out[f"{prefix}{key}"] = (a, b)
    return out
