"""``kinship eval``: the papers' evaluation protocols on one checkpoint, sharing one feature extraction.

Features of the frozen evaluation backbone (BN in eval mode, centre view, no augmentation) are
extracted once for the train and test splits and cached under ``<out>/eval_cache/``, keyed by the
checkpoint file's SHA-256, the data settings and the evaluation view; every protocol reads them.
The protocols that train on images (SGD linear probe, fine-tuning) use the decoded uint8 images on
the device. ``run_all`` writes ``report.json``, ``report.md`` and the PNGs into the output folder.
"""

from __future__ import annotations

import copy
import datetime
import hashlib
import json
import time
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from kinship import checkpoint
from kinship.assembly import RunData, build_config, load_pretrained, load_run_data
from kinship.blocks.features import extract_features
from kinship.blocks.kmeans import assign, kmeans
from kinship.blocks.knn import knn_accuracy
from kinship.config import Protocol, apply_overrides, to_dict
from kinship.data import labeled_subset
from kinship.data.subsets import save_indices
from kinship.errors import ConfigError, DataError
from kinship.eval import plots
from kinship.eval.finetune import Classifier, classifier_accuracy, random_head, train_classifier, train_recipe
from kinship.eval.linear import Standardizer, linear_probe
from kinship.eval.metrics import class_cosines, clustering_scores, neighbour_purity
from kinship.runtime import environment, resolve_device, tune_cpu_allocator, use_bf16

PROTOCOLS = typing.get_args(Protocol)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_labels(data: RunData) -> None:
    """Evaluation needs a labeled test split whose classes the train split has."""
    train_labels, test_labels = data.bank.labels, data.test.labels
    if (train_labels < 0).any() or (test_labels < 0).any():
        raise DataError("evaluation needs labels on every train and test image; this dataset has unlabeled images")
    missing = sorted(set(test_labels.unique().tolist()) - set(train_labels.unique().tolist()))
    if missing:
        raise DataError(f"the test split has labels {missing[:10]} that the train split lacks: the label sets do not match")
    if data.test.classes and data.bank.classes and list(data.test.classes) != list(data.bank.classes):
        raise DataError(
            f"the train and test splits name different classes: {data.bank.classes[:5]}... vs {data.test.classes[:5]}..."
        )


@dataclass
class Features:
    train: torch.Tensor  # (N_train, D): the k-NN bank (the train split or its eval.knn_train_limit subset)
    test: torch.Tensor  # (N_test, D)
    head_test: torch.Tensor | None  # (N_test,) argmax of the method's cluster head, if it has one
    head_k: int  # the head's number of clusters (0 without a head)
    seconds: float
    cached: bool


class Evaluation:
    """One checkpoint, its data and its cached features; one method per protocol."""

    def __init__(
        self,
        checkpoint_path: str | Path,
        out_dir: str | Path | None = None,
        overrides: list[str] = (),
        progress: bool = True,
        log: Callable[[str], Any] = print,
    ) -> None:
        tune_cpu_allocator()
        self.path = Path(checkpoint_path)
        state = checkpoint.read_checkpoint(self.path)
        self.config = build_config(apply_overrides(state["config"], list(overrides)))
        self.out_dir = Path(out_dir) if out_dir is not None else self.path.parent
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.progress, self.log = progress, log
        self.device = resolve_device(self.config.train.device)
        self.autocast = use_bf16(self.config.train.precision, self.device)
        self.data = load_run_data(self.config, self.device, None)
        check_labels(self.data)
        self.method = load_pretrained(self.path, state, self.config, self.data.handle.info, self.device)
        self.backbone, self.recipe = self.method.eval_backbone, self.method.eval_recipe
        self.sha256 = file_sha256(self.path)
        self.num_classes = int(max(self.data.bank.labels.max(), self.data.test.labels.max())) + 1
        self._features: Features | None = None

    # -- features ----------------------------------------------------------------------------
    def cache_path(self) -> Path:
        # "format" 2: the head's K is stored beside its argmax (a format-1 file would report K 0)
        key = {
            "format": 2,
            "checkpoint": self.sha256,
            "data": to_dict(self.config.data),
            "bank": self.config.eval.knn_train_limit,
            "recipe": to_dict(self.recipe),
            "autocast": self.autocast,
        }
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        return self.out_dir / "eval_cache" / f"features-{digest}.pt"

    def features(self) -> Features:
        if self._features is not None:
            return self._features
        path, tick = self.cache_path(), time.time()
        if path.is_file():
            saved = torch.load(path, map_location=self.device, weights_only=True)
            self._features = Features(
                saved["train"], saved["test"], saved.get("head_test"), int(saved.get("head_k", 0)), time.time() - tick, True
            )
            self.log(f"features: cached {path} ({len(saved['train'])} train, {len(saved['test'])} test)")
            return self._features
        extract = dict(batch_size=self.config.eval.batch_size, autocast=self.autocast, progress=self.progress)
        train = extract_features(self.backbone, self.data.bank, self.recipe, desc="features: train", **extract)
        test = extract_features(self.backbone, self.data.test, self.recipe, desc="features: test", **extract)
        with torch.no_grad():
            scores = self.method.cluster_scores(test)
        head_test, head_k = (None, 0) if scores is None else (scores.argmax(1), scores.shape[1])
        saved = {"train": train, "test": test}
        if head_test is not None:
            saved.update(head_test=head_test, head_k=torch.tensor(head_k))
        checkpoint.save_atomic(saved, path)
        self._features = Features(train, test, head_test, head_k, time.time() - tick, False)
        self.log(f"features: {len(train)} train and {len(test)} test images in {self._features.seconds:.1f} s, cached at {path}")
        return self._features

    # -- protocols ---------------------------------------------------------------------------
    def knn(self) -> dict:
        f, ev = self.features(), self.config.eval
        y_train, y_test = self.data.bank.labels, self.data.test.labels
        weighted = []
        for k, temperature in ev.knn_protocols:
            acc = knn_accuracy(f.train, y_train, f.test, y_test, k, temperature)
            weighted.append({"k": k, "T": temperature, "top1": acc[1], "top5": acc[5]})
        plain = [{"k": k, "top1": knn_accuracy(f.train, y_train, f.test, y_test, k, None)[1]} for k in ev.knn_plain_k]
        return {"weighted": weighted, "plain": plain, "bank": len(f.train), "queries": len(f.test)}

    def linear(self) -> dict:
        lc, f = self.config.eval.linear, self.features()
        y_train, y_test = self.data.bank.labels, self.data.test.labels
        if lc.mode == "lbfgs":
            result, _, _ = linear_probe(
                f.train,
                y_train,
                f.test,
                y_test,
                self.num_classes,
                tuple(lc.l2_grid),
                lc.val_fraction,
                self.config.train.seed,
                lc.max_iter,
                self.progress,
            )
            return {"mode": "lbfgs", **result}
        # SGD on augmented images through the frozen backbone (the ImageNet-scale protocol)
        head = random_head(f.train.shape[1], self.num_classes, self.device)
        model = Classifier(copy.deepcopy(self.backbone), Standardizer.fit(f.train), head, train_backbone=False)
        losses = train_classifier(
            model,
            self.data.bank,
            train_recipe(self.recipe, lc.crop_scale),
            lc.epochs,
            lc.batch_size,
            0.0,
            lc.lr,
            0.9,
            lc.weight_decay,
            lc.milestones,
            self.config.train.seed,
            self.autocast,
            self.progress,
            "linear probe (sgd)",
        )
        acc = classifier_accuracy(model, self.data.test, y_test, self.recipe, self.config.eval.batch_size, self.autocast)
        return {"mode": "sgd", "top1": acc[1], "top5": acc[5], "epochs": lc.epochs, "final_loss": losses[-1]}

    def finetune(self) -> dict:
        fc = self.config.eval.finetune
        settings = [("fraction", v) for v in fc.fractions] + [("per_class", v) for v in fc.per_class]
        rows = [self.finetune_on(kind, value) for kind, value in settings]
        return {"settings": rows, "epochs": fc.epochs, "head_init": fc.head_init}

    def finetune_on(self, kind: str, value: float) -> dict:
        """Fine-tune the whole network on a seeded labeled subset (``value``: a fraction of each class
        or a count per class), its classifier started from the frozen probe fitted on that subset."""
        fc, ev, tick = self.config.eval.finetune, self.config.eval, time.time()
        tag = f"{100 * value:g}pct" if kind == "fraction" else f"{value}perclass"
        subset = labeled_subset(
            self.data.train.labels, value if kind == "per_class" else 0, value if kind == "fraction" else 0.0, fc.seed
        )
        save_indices(subset, self.out_dir / f"finetune_{tag}_indices.json")
        sub = self.data.train.subset(subset)
        feats = extract_features(self.backbone, sub, self.recipe, ev.batch_size, self.autocast)
        lc = ev.linear
        probe, head, standardize = linear_probe(
            feats, sub.labels, self.features().test, self.data.test.labels, self.num_classes, tuple(lc.l2_grid),
            lc.val_fraction, fc.seed, lc.max_iter,
        )  # fmt: skip
        if fc.head_init == "random":
            head = random_head(feats.shape[1], self.num_classes, self.device)
        head = copy.deepcopy(head).requires_grad_(True)
        model = Classifier(copy.deepcopy(self.backbone), standardize, head, train_backbone=True)
        losses = train_classifier(
            model, sub, train_recipe(self.recipe, fc.crop_scale), fc.epochs, fc.batch_size, fc.lr_backbone, fc.lr_head,
            fc.momentum, fc.weight_decay, None, fc.seed, self.autocast, self.progress, f"fine-tune {tag}",
        )  # fmt: skip
        acc = classifier_accuracy(model, self.data.test, self.data.test.labels, self.recipe, ev.batch_size, self.autocast)
        self.log(f"fine-tune {tag} ({len(subset)} images): top-1 {acc[1]:.2f}% (frozen probe {probe['top1']:.2f}%)")
        return {
            "labels": tag,
            "images": len(subset),
            "frozen_probe_top1": probe["top1"],
            "frozen_probe_top5": probe["top5"],
            "top1": acc[1],
            "top5": acc[5],
            "final_loss": losses[-1],
            "seconds": time.time() - tick,
        }

    def clustering(self) -> dict:
        """k-means fitted on train features, applied to the test split (SCAN protocol); and the method's head."""
        f, ev = self.features(), self.config.eval
        k = ev.clustering_k or self.num_classes
        fit = kmeans(f.train, k, restarts=ev.clustering_restarts, seed=self.config.train.seed, spherical=True)
        predicted, _ = assign(torch.nn.functional.normalize(f.test.float(), dim=1), fit.centroids)
        y = self.data.test.labels.cpu()
        rows = [{"clustering": "k-means (spherical, fit on train)", "k": k, **clustering_scores(y, predicted.cpu())}]
        if f.head_test is not None:
            rows.append(
                {
                    "clustering": "method head argmax",
                    "k": f.head_k,
                    "occupied": len(f.head_test.unique()),
                    **clustering_scores(y, f.head_test.cpu()),
                }
            )
        return {"rows": rows, "restarts": ev.clustering_restarts}

    def purity(self) -> dict:
        f = self.features()
        purity = neighbour_purity(f.test, self.data.test.labels, f.train, self.data.bank.labels, tuple(self.config.eval.purity_k))
        return {"purity": {str(k): v for k, v in purity.items()}, **class_cosines(f.test, self.data.test.labels)}

    def tsne(self) -> dict:
        f = self.features()
        pick = plots.stratified_sample(self.data.test.labels, self.config.eval.tsne_points, self.config.train.seed)
        title = f"t-SNE of {len(pick)} test features: {self.config.method.name}, {self.config.model.backbone}"
        return plots.tsne_png(
            f.test[pick.to(self.device)],
            self.data.test.labels[pick.to(self.device)],
            list(self.data.test.classes),
            self.out_dir / "tsne.png",
            title,
            self.config.train.seed,
        )

    def classifier(self) -> dict:
        """The method's own classifiers (a semi-supervised method's EMA and online networks) on the
        test split, and the median of their last 20 test evaluations logged during training (the
        figure FixMatch-style papers report)."""
        networks = self.method.classifiers()
        if not networks:
            return {"skipped": f"method {self.config.method.name} has no classifier of its own"}
        metrics = self.path.parent / "metrics.jsonl"
        records = plots.read_metrics(metrics) if metrics.is_file() else []
        rows = []
        for name, network in networks.items():
            acc = classifier_accuracy(
                network, self.data.test, self.data.test.labels, self.recipe, self.config.eval.batch_size, self.autocast
            )
            logged = [r[f"classifier_{name}_top1"] for r in records if f"classifier_{name}_top1" in r][-20:]
            rows.append(
                {
                    "classifier": name,
                    "top1": acc[1],
                    "top5": acc[5],
                    "logged": len(logged),
                    "median_last_20": float(torch.tensor(logged).median()) if logged else None,
                }
            )
        return {"rows": rows}

    def curves(self) -> dict:
        metrics = self.path.parent / "metrics.jsonl"
        if not metrics.is_file():
            return {"skipped": f"no metrics.jsonl beside {self.path}"}
        return plots.curves_png(metrics, self.out_dir / "curves.png", f"{self.config.method.name}: training curves")

    # -- running -----------------------------------------------------------------------------
    def run(self, protocol: str) -> dict:
        if protocol not in PROTOCOLS:
            raise ConfigError(f"unknown protocol '{protocol}'; choose from {', '.join(PROTOCOLS)} or all")
        needs_features = protocol not in ("curves", "classifier")
        if needs_features:
            self.features()
        tick = time.time()
        result = getattr(self, protocol)()
        result["seconds"] = time.time() - tick
        return result

    def header(self) -> dict:
        f = self._features
        return {
            "checkpoint": str(self.path),
            "sha256": self.sha256,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": torch.cuda.get_device_name(self.device)
            if self.device.type == "cuda"
            else f"CPU ({environment()['cores']} cores)",
            "method": self.config.method.name,
            "backbone": self.config.model.backbone,
            "width": self.config.model.width,
            "data": {
                "name": self.config.data.name,
                "path": self.config.data.path,
                "train": len(self.data.bank.labels),
                "test": len(self.data.test.labels),
                "classes": self.num_classes,
            },
            "features": None if f is None else {"dim": f.train.shape[1], "seconds": f.seconds, "cached": f.cached},
            "environment": environment(),
        }

    def run_all(self, protocols: list[str] | None = None) -> dict:
        results = {}
        for protocol in protocols or self.config.eval.protocols:
            self.log(f"eval {protocol} ...")
            try:
                results[protocol] = self.run(protocol)
            except DataError as exc:  # e.g. fine-tuning on streamed data: the other protocols still run
                results[protocol] = {"skipped": str(exc), "seconds": 0.0}
            result = results[protocol]
            self.log(
                f"eval {protocol}: " + (f"skipped: {result['skipped']}" if "skipped" in result else f"{result['seconds']:.1f} s")
            )
        report = {**self.header(), "protocols": results}
        (self.out_dir / "report.json").write_text(json.dumps(report, indent=2))
        (self.out_dir / "report.md").write_text(markdown_report(report))
        return report


def _table(title: str, columns: list[str], rows: list[list], before: str = "", after: str = "") -> list[str]:
    """A Markdown section: its title, a sentence before and after, and a table of ``rows``."""
    return [
        f"## {title}",
        "",
        *([before, ""] if before else []),
        "| " + " | ".join(columns) + " |",
        "|---" * len(columns) + "|",
        *("| " + " | ".join(map(str, row)) + " |" for row in rows),
        "",
        *([after, ""] if after else []),
    ]


def _knn_markdown(r: dict) -> list[str]:
    rows = [["weighted", s["k"], s["T"], f"{s['top1']:.2f}", f"{s['top5']:.2f}"] for s in r["weighted"]]
    rows += [["majority", s["k"], "-", f"{s['top1']:.2f}", "-"] for s in r["plain"]]
    return _table("k-NN (cosine, frozen backbone, train split as the bank)", ["vote", "k", "T", "top-1", "top-5"], rows)


def _linear_markdown(r: dict) -> list[str]:
    how = (
        "full-batch L-BFGS logistic regression on cached, l2-normalised and standardised features, "
        f"l2 = {r['l2']:g} chosen on 10% of train"
        if r["mode"] == "lbfgs"
        else f"SGD on augmented images, {r['epochs']} epochs"
    )
    return _table("Linear probe", ["top-1", "top-5"], [[f"{r['top1']:.2f}", f"{r['top5']:.2f}"]], before=f"{how}.")


def _finetune_markdown(r: dict) -> list[str]:
    columns = ["labels", "images", "frozen probe top-1", "fine-tuned top-1", "fine-tuned top-5"]
    rows = [
        [s["labels"], f"{s['images']:,}", f"{s['frozen_probe_top1']:.2f}", f"{s['top1']:.2f}", f"{s['top5']:.2f}"]
        for s in r["settings"]
    ]
    before = f"{r['epochs']} epochs, classifier initialised from: {r['head_init']}."
    return _table("Semi-supervised fine-tuning (whole network)", columns, rows, before=before)


def _clustering_markdown(r: dict) -> list[str]:
    rows = [
        [s["clustering"], f"{s['k']}{' (%d)' % s['occupied'] if 'occupied' in s else ''}", f"{s['acc']:.2f}", f"{s['nmi']:.2f}"]
        + [f"{s['ari']:.2f}"]
        for s in r["rows"]
    ]
    return _table("Clustering of the test split", ["clustering", "K (occupied)", "ACC", "NMI", "ARI"], rows)


def _purity_markdown(r: dict) -> list[str]:
    ks = list(r["purity"])
    after = (
        f"Mean cosine similarity of test pairs: same class {r['intra_class_cosine']:.4f}, "
        f"different classes {r['inter_class_cosine']:.4f}."
    )
    rows = [["purity (%)", *(f"{r['purity'][k]:.2f}" for k in ks)]]
    return _table("Neighbour purity (test queries, train bank)", ["k", *ks], rows, after=after)


def _classifier_markdown(r: dict) -> list[str]:
    columns = ["classifier", "top-1", "top-5", "median of the last 20 logged top-1 (count)"]
    rows = [
        [
            s["classifier"],
            f"{s['top1']:.2f}",
            f"{s['top5']:.2f}",
            f"{s['median_last_20']:.2f} ({s['logged']})" if s["logged"] else "-",
        ]
        for s in r["rows"]
    ]
    return _table("The method's own classifiers (test split)", columns, rows)


def _tsne_markdown(r: dict) -> list[str]:
    return ["## t-SNE of test features", "", f"![t-SNE]({r['png']})", ""]


def _curves_markdown(r: dict) -> list[str]:
    return ["## Training curves", "", f"![training curves]({r['png']})", ""]


MARKDOWN_SECTIONS = {
    "knn": _knn_markdown,
    "linear": _linear_markdown,
    "finetune": _finetune_markdown,
    "clustering": _clustering_markdown,
    "purity": _purity_markdown,
    "classifier": _classifier_markdown,
    "tsne": _tsne_markdown,
    "curves": _curves_markdown,
}


def markdown_report(report: dict) -> str:
    """The report as Markdown: one table per protocol, the pictures, and the time each took."""
    d = report["data"]
    p = {name: r for name, r in report["protocols"].items() if "skipped" not in r}
    skipped = {name: r["skipped"] for name, r in report["protocols"].items() if "skipped" in r}
    env = report["environment"]
    lines = [
        f"# Evaluation of `{report['checkpoint']}`",
        "",
        f"Method **{report['method']}**, backbone {report['backbone']}"
        + (f" (width {report['width']})" if report["backbone"] == "convnet" else "")
        + f"; data {d['name']} ({d['train']:,} train / {d['test']:,} test images, {d['classes']} classes).",
        f"Checkpoint SHA-256 `{report['sha256'][:16]}`; {report['date']}; {report['device']}, "
        f"torch {env.get('torch')}, {env.get('threads', '?')} threads.",
        "",
    ]
    for name, section in MARKDOWN_SECTIONS.items():
        if name in p:
            lines += section(p[name])
    if skipped:
        lines += ["## Skipped", ""] + [f"- {name}: {why}" for name, why in skipped.items()] + [""]
    feats = report.get("features")
    lines += ["## Time per protocol", "", "| step | seconds |", "|---|---|"]
    if feats:
        lines.append(f"| feature extraction{' (cache hit)' if feats['cached'] else ''} | {feats['seconds']:.1f} |")
    lines += [f"| {name} | {r['seconds']:.1f} |" for name, r in p.items()]
    return "\n".join(lines) + "\n"
