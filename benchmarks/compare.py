"""Methods compared at equal budget: pre-train each (or reuse its finished run), evaluate, tabulate, plot.

    python benchmarks/compare.py --study cmsf --out runs/compare_cmsf [--set train.epochs=9 ...]
    python benchmarks/compare.py --study pairs --seeds 0,1,2 --out runs/pairs [--only SwAV ...]
    python benchmarks/compare.py --study coke --out runs/compare_coke --pixels
    python benchmarks/compare.py --study clim --out runs/compare_clim
    python benchmarks/compare.py --study sscl --out runs/compare_sscl

A study is a list of (name, config, overrides); the shared ``--set`` overrides apply to every run
(same data, backbone, epochs and batch). Each run is evaluated with k-NN (k=200/T=0.1 and
k=20/T=0.07), the L-BFGS linear probe and neighbour purity (plus clustering where a study asks),
and the results go to ``<out>/results.json``, ``<out>/results.md`` and ``<out>/results.png``. With
``--seeds`` every run is repeated with ``train.seed`` set to each seed (its own folder) and the
table gives mean ± std (sample std) over the seeds. A finished run's row is kept in its folder
(``row.json``), so separate processes can run the seeds of one study in parallel and a last call
without ``--only`` tabulates them all. ``--pixels`` adds spherical k-means on the raw pixels.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from kinship.assembly import build_method, load_config, load_run_data  # noqa: E402
from kinship.blocks.features import pixel_features  # noqa: E402
from kinship.blocks.kmeans import assign, kmeans  # noqa: E402
from kinship.eval.metrics import clustering_scores  # noqa: E402
from kinship.eval.suite import Evaluation  # noqa: E402
from kinship.runtime import resolve_device  # noqa: E402
from kinship.train.trainer import Trainer  # noqa: E402

BYOL_ASYM = ("BYOL-asym", "configs/cmsf_cpu.yaml", ["method.constraint=none", "method.topk=1"])  # k = 1: BYOL, one direction
CMSF_SUP = ("CMSF-sup", "configs/cmsf_cpu.yaml", ["method.constraint=supervised", "method.topk=10"])
SWAV = ("SwAV", "configs/swav_cpu.yaml", [])
MIRA_NO_EMA = ("MIRA w/o EMA", "configs/mira_cpu.yaml", ["method.ema_teacher=false"])
MOCO_DEMO = ("MoCo v2", "configs/demo.yaml", ["train.epochs=9"])  # the demo at the studies' 9 epochs
SUPERVISED_ONLY = ["method.pseudo_label_weight=0"]  # of fixmatch_cpu.yaml
LABELS_4000 = ["data.labeled_per_class=400"]
STUDIES = {
    "cmsf": [
        BYOL_ASYM,
        ("MSF", "configs/cmsf_cpu.yaml", ["method.constraint=none"]),
        ("CMSF-self", "configs/cmsf_cpu.yaml", []),
        ("CMSF-semi 10%", "configs/cmsf_cpu.yaml", ["method.constraint=semi", "method.topk=10", "data.labeled_fraction=0.1"]),
        CMSF_SUP,
    ],
    # MIRA's Table 8: SwAV vs MIRA without EMA differ only by the pseudo-labels; K = 10 makes the
    # prototype head a 10-way clustering of CIFAR-10 (the K = 3000 head is not one)
    "swav_mira": [
        SWAV,
        MIRA_NO_EMA,
        ("MIRA", "configs/mira_cpu.yaml", []),
        ("SwAV K=10", "configs/swav_cpu.yaml", ["method.prototypes=10"]),
        ("MIRA K=10", "configs/mira_cpu.yaml", ["method.prototypes=10"]),
    ],
    # CoKe's K = 10 head against the other methods' K = 10 heads and k-means, its ablations (gamma' = 0:
    # no lower bound, eta = 0: greedy assignment), and the network after the scan epoch alone (random
    # weights, BN statistics of one pass over the data, the online clustering of those features)
    "coke": [
        ("CoKe", "configs/coke_cpu.yaml", []),
        ("CoKe gamma'=0", "configs/coke_cpu.yaml", ["method.gamma=0"]),
        ("CoKe eta=0 (greedy)", "configs/coke_cpu.yaml", ["method.eta=0"]),
        ("CoKe scan only", "configs/coke_cpu.yaml", ["train.stop_after_epochs=1"]),
        ("SwAV K=10", "configs/swav_cpu.yaml", ["method.prototypes=10"]),
        ("MIRA K=10", "configs/mira_cpu.yaml", ["method.prototypes=10"]),
    ],
    # CLIM against MoCo v2 (the demo's recipe, 9 epochs): CLIM's preset (7 epochs, about the demo's
    # wall time) and CLIM at the demo's 9 epochs; the positive selections of the paper's Table 6
    # (Eq. 2's centre-wise, plain k-NN, random) at the preset's budget
    "clim": [
        MOCO_DEMO,
        ("CLIM", "configs/clim_cpu.yaml", []),
        ("CLIM, 9 epochs", "configs/clim_cpu.yaml", ["train.epochs=9"]),
        ("CLIM k-NN selection", "configs/clim_cpu.yaml", ["method.selection=knn"]),
        ("CLIM random selection", "configs/clim_cpu.yaml", ["method.selection=random"]),
    ],
    # SsCL against FixMatch and supervised-only training at the same budget (SsCL's Table 1 and
    # FixMatch's baselines) with 250 and 4,000 labels, and SsCL without its co-calibration
    "sscl": [
        ("SsCL 250", "configs/sscl_cpu.yaml", []),
        ("FixMatch 250", "configs/fixmatch_cpu.yaml", []),
        ("Supervised-only 250", "configs/fixmatch_cpu.yaml", SUPERVISED_ONLY),
        ("SsCL 250 no calibration", "configs/sscl_cpu.yaml", ["method.calibration=none"]),
        ("SsCL 4000", "configs/sscl_cpu.yaml", LABELS_4000),
        ("FixMatch 4000", "configs/fixmatch_cpu.yaml", LABELS_4000),
        ("Supervised-only 4000", "configs/fixmatch_cpu.yaml", [*SUPERVISED_ONLY, *LABELS_4000]),
    ],
    # the pairs whose order docs/results.md discusses, to be run with --seeds: MIRA w/o EMA vs SwAV,
    # CMSF-sup vs BYOL-asym, MoCo v2 (the demo, without its time guard) vs BYOL-asym
    "pairs": [
        MOCO_DEMO,
        BYOL_ASYM,
        CMSF_SUP,
        SWAV,
        MIRA_NO_EMA,
    ],
}
PROTOCOLS = ("knn", "linear", "purity", "clustering", "classifier")
# (header, key) of the table; a column shows when any run has its key
COLUMNS = [
    ("EMA classifier", "classifier_ema"),
    ("online classifier", "classifier_online"),
    ("median last 20", "classifier_median"),
    ("mask rate", "mask_rate"),
    ("pseudo-label acc", "pseudo_accuracy"),
    ("k-NN k200", "knn_200"),
    ("k-NN k20", "knn_20"),
    ("linear", "linear"),
    ("purity@20", "purity_20"),
    ("positives' purity", "positives_purity"),
    ("intra-class cos", "intra_class_cosine"),
    ("k-means ACC", "kmeans_acc"),
    ("k-means NMI", "kmeans_nmi"),
    ("k-means ARI", "kmeans_ari"),
    ("head K (occupied)", "head_k"),
    ("head ACC", "head_acc"),
    ("head NMI", "head_nmi"),
    ("head ARI", "head_ari"),
]


def run_one(name: str, config_path: str, overrides: list[str], out: Path, seed: int | None = None) -> dict:
    folder = out / re.sub(r"[^a-z0-9]+", "_", name.lower().replace("%", "pct")).strip("_")
    if seed is not None:
        folder = folder.with_name(f"{folder.name}_s{seed}")
        overrides = [*overrides, f"train.seed={seed}"]
    if (folder / "row.json").is_file():
        return json.loads((folder / "row.json").read_text())
    config = load_config(config_path, overrides)
    tick = time.time()
    if (
        not (folder / "last.pt").is_file()
        or json.loads((folder / "metrics.jsonl").read_text().splitlines()[-1]).get("summary") is None
    ):
        Trainer(config, folder, log=print).fit()
    minutes = (time.time() - tick) / 60
    evaluation = Evaluation(folder / "last.pt", folder, [], progress=False, log=lambda *_: None)
    results = {p: evaluation.run(p) for p in PROTOCOLS}
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    summary = records[-1]["summary"]
    row = {
        "name": name,
        "seed": config.train.seed,
        "device": str(resolve_device(config.train.device)),
        "config": config_path,
        "overrides": overrides,
        "train_minutes": summary["minutes"],
        "epochs": summary["epochs_done"],
        "random_init_knn": summary.get("knn_random_init_top1"),
        "knn_200": results["knn"]["weighted"][1]["top1"],
        "knn_20": results["knn"]["weighted"][0]["top1"],
        "linear": results["linear"]["top1"],
        "purity_20": results["purity"]["purity"].get("20"),
        "run": str(folder),
        "wall_minutes": minutes,
    }
    if "rows" in results["classifier"]:  # semi-supervised methods: their own classifiers, the last epoch's pseudo-labels
        for r in results["classifier"]["rows"]:
            row[f"classifier_{r['classifier']}"] = r["top1"]
        row["classifier_median"] = results["classifier"]["rows"][0]["median_last_20"]
        row["intra_class_cosine"] = results["purity"]["intra_class_cosine"]
        last = [r for r in records if "mask_rate" in r and r["epoch"] == row["epochs"]]
        if last:
            row["mask_rate"] = 100 * statistics.mean(r["mask_rate"] for r in last)
            if "pseudo_accuracy" in last[0]:
                row["pseudo_accuracy"] = 100 * statistics.mean(r["pseudo_accuracy"] for r in last)
    refreshes = [r for r in records if "purity_selected" in r]
    if refreshes:  # CLIM: the share of its last refresh's positives that are of the anchor's class
        row["positives_purity"] = 100 * refreshes[-1]["purity_selected"]
    for r in results["clustering"]["rows"]:
        prefix = "head" if r["clustering"] == "method head argmax" else "kmeans"
        row.update({f"{prefix}_{m}": r[m] for m in ("acc", "nmi", "ari")})
        if prefix == "head":
            row["head_k"] = f"{r['k']} ({r['occupied']})"
    (folder / "row.json").write_text(json.dumps(row, indent=2))
    return row


def pixel_row(config_path: str, overrides: list[str], out: Path) -> dict:
    """Spherical k-means (K = classes, fit on train, applied to test) on raw pixels of the evaluation view."""
    folder = out / "raw_pixels"
    if (folder / "row.json").is_file():
        return json.loads((folder / "row.json").read_text())
    config = load_config(config_path, overrides)
    data = load_run_data(config, resolve_device(config.train.device), None)
    recipe = build_method(config, data.handle).eval_recipe
    train, test = pixel_features(data.bank, recipe), pixel_features(data.test, recipe)
    k = int(data.bank.labels.max()) + 1
    fit = kmeans(train, k, restarts=config.eval.clustering_restarts, seed=config.train.seed, spherical=True)
    predicted, _ = assign(F.normalize(test, dim=1), fit.centroids)
    scores = clustering_scores(data.test.labels.cpu(), predicted.cpu())
    row = {
        "name": "raw pixels",
        "seed": config.train.seed,
        "config": config_path,
        "overrides": overrides,
        "epochs": 0,
        "train_minutes": 0.0,
        "random_init_knn": None,
        **{f"kmeans_{m}": scores[m] for m in ("acc", "nmi", "ari")},
    }
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "row.json").write_text(json.dumps(row, indent=2))
    return row


def over_seeds(rows: list[dict]) -> list[dict]:
    """One row per name: mean and sample std of every numeric column over its seeds."""
    merged = []
    for name in dict.fromkeys(r["name"] for r in rows):
        runs = [r for r in rows if r["name"] == name]
        row = {
            "name": name,
            "seeds": [r["seed"] for r in runs],
            "epochs": runs[0]["epochs"],
            "random_init_knn": runs[0]["random_init_knn"],
        }
        for key in ["train_minutes"] + [k for _, k in COLUMNS]:
            values = [r[key] for r in runs if isinstance(r.get(key), (int, float))]
            if values:
                row[key] = statistics.mean(values)
                row[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        merged.append(row)
    return merged


def write(rows: list[dict], out: Path, title: str, command: str) -> None:
    (out / "results.json").write_text(json.dumps(rows, indent=2))
    columns = [(h, k) for h, k in COLUMNS if any(k in r for r in rows)]

    def cell(r: dict, key: str) -> str:
        v = r.get(key)
        if v is None:
            return ""
        if f"{key}_std" in r:
            return f"{v:.2f} ± {r[key + '_std']:.2f}"
        return f"{v:.2f}" if isinstance(v, float) else str(v)

    seeds = "seeds" in rows[0] if rows else False
    lines = [
        f"# {title}",
        "",
        f"`{command}`",
        "",
        f"| method | {'seeds | ' if seeds else ''}epochs | train min | " + " | ".join(h for h, _ in columns) + " |",
        "|---" * (len(columns) + 3 + seeds) + "|",
    ]
    for r in rows:
        lines.append(
            f"| {r['name']} | {(' '.join(map(str, r['seeds'])) + ' | ') if seeds else ''}{r['epochs']} | "
            f"{r['train_minutes']:.1f} | " + " | ".join(cell(r, k) for _, k in columns) + " |"
        )
    if rows and rows[0]["random_init_knn"] is not None:
        lines += ["", f"Random init, k-NN k200: {rows[0]['random_init_knn']:.2f}."]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    fig, ax = plt.subplots(figsize=(8, 4.4), dpi=110)
    names = [r["name"] for r in rows]
    bars = [
        ("classifier_ema", "EMA classifier"),
        ("knn_200", "k-NN (k 200, T 0.1)"),
        ("linear", "linear probe"),
        ("purity_20", "purity@20"),
        ("kmeans_nmi", "k-means NMI"),
        ("head_nmi", "head NMI"),
    ]
    bars = [(k, label) for k, label in bars if any(k in r for r in rows)]
    width = 0.8 / len(bars)
    for i, (key, label) in enumerate(bars):
        ax.bar(
            [j + (i - (len(bars) - 1) / 2) * width for j in range(len(rows))],
            [r.get(key, 0) for r in rows],
            width,
            yerr=[r.get(f"{key}_std", 0) for r in rows],
            capsize=2,
            label=label,
        )
    if rows and rows[0]["random_init_knn"] is not None:
        ax.axhline(rows[0]["random_init_knn"], color="gray", ls="--", lw=1, label="random init k-NN")
    slanted = max(map(len, names)) > 12  # long names: slanted, the legend below them
    ax.set_xticks(range(len(rows)), names, rotation=20 if slanted else 0, ha="right" if slanted else "center")
    ax.set_ylabel("%")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.3 if slanted else -0.1), ncol=3)
    fig.tight_layout()
    fig.savefig(out / "results.png")
    plt.close(fig)
    mask_curves(rows, out)


def mask_curves(rows: list[dict], out: Path) -> None:
    """Semi-supervised runs: the share of unlabeled images above the threshold, and the accuracy of the
    EMA classifier, over training (``<out>/mask_rate.png``)."""
    runs = [r for r in rows if "mask_rate" in r and "run" in r]
    if not runs:
        return
    fig, (ax_mask, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.8), dpi=110)
    for r in runs:
        records = [json.loads(line) for line in (Path(r["run"]) / "metrics.jsonl").read_text().splitlines()]
        steps = [x for x in records if "mask_rate" in x]
        ax_mask.plot([x["step"] for x in steps], [100 * x["mask_rate"] for x in steps], lw=1, label=r["name"])
        evals = [x for x in records if "classifier_ema_top1" in x]
        ax_acc.plot(
            [x["epoch"] for x in evals], [x["classifier_ema_top1"] for x in evals], marker="o", ms=3, lw=1, label=r["name"]
        )
    ax_mask.set(xlabel="step", ylabel="pseudo-labels above the threshold (%)")
    ax_acc.set(xlabel="epoch", ylabel="EMA classifier test top-1 (%)")
    ax_acc.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "mask_rate.png")
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--study", required=True, choices=sorted(STUDIES))
    parser.add_argument("--out", required=True)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="applied to every run")
    parser.add_argument("--only", action="append", default=[], help="run only these names")
    parser.add_argument("--seeds", default="", help="comma-separated train.seed values: each run once per seed, mean ± std")
    parser.add_argument("--pixels", action="store_true", help="add k-means on raw pixels (the first run's data and view)")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()] or [None]
    command = " ".join(
        ["python benchmarks/compare.py", f"--study {args.study}", f"--out {args.out}"]
        + ([f"--seeds {args.seeds}"] if args.seeds else [])
    )
    rows = []
    for name, config, overrides in STUDIES[args.study]:
        if args.only and name not in args.only:
            continue
        for seed in seeds:
            rows.append(run_one(name, config, overrides + args.set, out, seed))
            write(over_seeds(rows) if args.seeds else rows, out, f"{args.study} study", command)
            print(json.dumps(rows[-1]))
    if args.pixels:
        name, config, overrides = STUDIES[args.study][0]
        rows.append(pixel_row(config, overrides + args.set, out))
        write(over_seeds(rows) if args.seeds else rows, out, f"{args.study} study", command + " --pixels")


if __name__ == "__main__":
    main()
