"""Golden values: one training step of each method's official code on the fixed inputs of
``tests/golden_cases.py``, written to ``tests/golden/official_steps.json`` for ``tests/test_golden.py``.

    python benchmarks/golden_official.py --coke DIR --cmsf DIR --msf DIR --swav DIR --moco DIR --mira DIR

Each DIR is a checkout of the official repository (never part of kinship):
idstcv/CoKe, UCDvision/CMSF, UMBCvision/MSF, facebookresearch/swav, facebookresearch/moco (a commit
that still has ``moco/builder.py``), movinghoon/mira; ``--commit NAME=SHA`` records which commit
each checkout is (read from its ``.git`` when it has one). Only the methods whose checkout is given
are rerun; the other entries of the file are kept.

For every case the kinship method's networks and state are copied into the official model (same
float64 weights, BN buffers, bank, queue, cache, centres, duals, labels); the official step runs on
the same crops on CPU (``.cuda()`` is a no-op here, ``torch.distributed`` a one-process gloo group)
and its loss, gradient norms (under kinship's parameter names), updated state and, for an EMA method,
the target's move after an SGD step of 0.1 are recorded. BYOL's official code is JAX
(deepmind-research/byol); BYOL-asym with a constant momentum is checked against MSF's official
step with k = 1, which the MSF paper (Sec. 3) states is BYOL.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import json
import os
import subprocess
import sys
import types
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
import golden_cases as gc  # noqa: E402

OUT = ROOT / "tests" / "golden" / "official_steps.json"
REPOS = {
    "coke": "idstcv/CoKe",
    "cmsf": "UCDvision/CMSF",
    "msf": "UMBCvision/MSF",
    "swav": "facebookresearch/swav",
    "moco": "facebookresearch/moco",
    "mira": "movinghoon/mira",
}


# -- plumbing ---------------------------------------------------------------------------------
def transplant(source: nn.Module, target: nn.Module) -> dict[str, str]:
    """Copy ``source``'s state into ``target`` entry by entry in order (same shape and kind of entry),
    zeroing a target bias that the source lacks (kinship drops the bias of a Linear before BN, which
    BN cancels). Returns source parameter name -> target parameter name."""
    src = list(source.state_dict().items())
    names, i = {}, 0
    with torch.no_grad():
        for name, tensor in target.state_dict().items():
            kind = name.rsplit(".", 1)[-1]
            if i < len(src) and src[i][1].shape == tensor.shape and src[i][0].rsplit(".", 1)[-1] == kind:
                tensor.copy_(src[i][1])
                names[src[i][0]] = name
                i += 1
            elif kind == "bias":
                tensor.zero_()
            else:
                raise ValueError(f"no source entry for {name} (next: {src[i][0] if i < len(src) else None})")
    if i != len(src):
        raise ValueError(f"source entries left over from {src[i][0]}")
    return names


def transplant_parts(source: nn.Module, parts: dict[str, nn.Module]) -> dict[str, str]:
    """:func:`transplant` into the official modules ``parts`` (their names in the official model, in
    order); returns kinship parameter name -> official parameter name."""
    names = transplant(source, nn.Sequential(*parts.values()))
    prefixes = list(parts)
    return {k: prefixes[int(v.split(".", 1)[0])] + "." + v.split(".", 1)[1] for k, v in names.items()}


class Encoder(nn.Module):
    """The stand-in for an official ResNet: kinship's ConvNet features, then ``fc``."""

    def __init__(self, features: nn.Module, num_classes: int = 1000) -> None:
        super().__init__()
        self.features = copy.deepcopy(features)
        self.fc = nn.Linear(features.feature_dim, num_classes)
        self.inplanes = features.feature_dim  # what movinghoon/mira reads as the feature size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


def module_of(method: nn.Module, *names: str) -> nn.Sequential:
    """kinship submodules in sequence, named as in the method (for gradient lookup)."""
    seq = nn.Sequential()
    for name in names:
        seq.add_module(name, getattr(method, name))
    return seq


def gradients(module: nn.Module) -> dict[str, torch.Tensor]:
    """The gradients the official step left, by official parameter name."""
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


def grad_norms(case: gc.Case, names: dict[str, str], grads: dict[str, torch.Tensor]) -> dict[str, float]:
    """The norms the case records, under kinship's labels."""
    return {label: grads[names[kin]].norm().item() for label, kin in case.grads.items()}


def flat(params) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in params])


def sgd(module: nn.Module) -> None:
    with torch.no_grad():
        for p in module.parameters():
            if p.grad is not None:
                p -= 0.1 * p.grad


def next_step_move(official: nn.Module, target: nn.Module, before: torch.Tensor, momentum_update) -> float:
    """An SGD step of 0.1, then the official EMA update that the next step makes before its forward:
    how far the target moved from ``before``."""
    sgd(official)
    momentum_update()
    return (flat(target.parameters()) - before).norm().item()


@contextmanager
def on_path(folder: Path):
    sys.path.insert(0, str(folder))
    try:
        yield
    finally:
        sys.path.remove(str(folder))
        for name in [n for n, m in sys.modules.items() if loaded_from(m, folder)]:
            del sys.modules[name]


def loaded_from(module: types.ModuleType, folder: Path) -> bool:
    """Whether ``module`` came from ``folder``: its file, or for a namespace package (the official
    repositories' ``src/`` without ``__init__.py``) its search path, so that the next checkout's
    package of the same name is imported afresh."""
    places = [getattr(module, "__file__", None) or ""]
    path = getattr(module, "__path__", None)
    if isinstance(path, list) or type(path).__name__ == "_NamespacePath":  # not torch.ops's look-alikes
        places += list(path)
    return any(str(folder) in str(place) for place in places)


def stub(name: str, **attrs) -> None:
    module = types.ModuleType(name)
    module.__dict__.update(attrs)
    sys.modules[name] = module


def setup() -> None:
    torch.Tensor.cuda = lambda self, *a, **k: self  # the official code's .cuda() calls, on CPU
    nn.Module.cuda = lambda self, *a, **k: self
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29533")
        dist.init_process_group("gloo", rank=0, world_size=1)


# -- the cases ----------------------------------------------------------------------------------
def run_moco(root: Path) -> dict:
    case = gc.moco()
    m = case.method
    with on_path(root):
        builder = importlib.import_module("moco.builder")
        official = builder.MoCo(
            lambda num_classes: Encoder(m.backbone, num_classes), dim=8, K=32, m=0.99, T=0.2, mlp=True
        ).double()
        names = transplant_parts(
            module_of(m, "backbone", "head"),
            {"encoder_q.features": official.encoder_q.features, "encoder_q.fc": official.encoder_q.fc},
        )
        official.encoder_k.load_state_dict(official.encoder_q.state_dict())
        official.queue.copy_(m.queue.rows.T)
        official.queue_ptr.fill_(int(m.queue.ptr))
        before = flat(official.encoder_k.parameters()).clone()
        logits, labels = official(case.views[0], case.views[1])
        loss = F.cross_entropy(logits, labels)
        loss.backward()
        out = {
            "loss": loss.item(),
            "grads": grad_norms(case, names, gradients(official)),
            "queue": gc.checksum(official.queue.T),
            "ptr": int(official.queue_ptr),
        }
        out["target_move"] = next_step_move(official, official.encoder_k, before, official._momentum_update_key_encoder)
    return out


def mean_shift_model(cls, method, **kwargs):
    """An official (C)MSF model on kinship's weights: resnet.__dict__[arch] builds the stand-in."""
    resnet = sys.modules["models.resnet"]
    resnet.__dict__["resnet_kinship"] = lambda: Encoder(method.backbone)
    official = cls("resnet_kinship", **kwargs).double()
    names = transplant_parts(
        module_of(method, "backbone", "projector", "predictor"),
        {
            "encoder_q.features": official.encoder_q.features,
            "encoder_q.fc": official.encoder_q.fc,
            "predict_q": official.predict_q,
        },
    )
    official.encoder_t.load_state_dict(official.encoder_q.state_dict())
    return official, names


def mean_shift_step(case: gc.Case, official: nn.Module, names: dict, *inputs) -> dict:
    m = case.method
    official.queue.copy_(m.bank.rows)
    official.labels.copy_(m.bank.column("label"))
    official.queue_ptr.fill_(int(m.bank.ptr))
    before = flat(official.encoder_t.parameters()).clone()
    loss = official(case.views[1], case.views[0], *inputs)[0]  # (online crop, target crop, ...)
    loss.backward()
    out = {
        "loss": loss.item(),
        "grads": grad_norms(case, names, gradients(official)),
        "bank": gc.checksum(official.queue),
        "bank_labels": official.labels.tolist(),
    }
    out["target_move"] = next_step_move(official, official.encoder_t, before, official._momentum_update_target_encoder)
    return out


def run_msf(root: Path) -> dict:
    results = {}
    with on_path(root):
        train_msf = importlib.import_module("train_msf")
        for name, make, topk in (("msf", gc.msf, 3), ("byol", gc.byol, 1)):
            case = make()
            m = case.method
            official, names = mean_shift_model(train_msf.MeanShift, m, m=0.99, mem_bank_size=16, topk=topk)
            if name == "msf":
                results[name] = mean_shift_step(case, official, names, case.batch.labels)
                continue
            # BYOL: the bank's other rows never matter with k = 1 (the own target is the nearest)
            before = flat(official.encoder_t.parameters()).clone()
            loss = official(case.views[0], case.views[1], case.batch.labels)[0]
            loss.backward()
            out = {"loss": loss.item(), "grads": grad_norms(case, names, gradients(official))}
            out["target_move"] = next_step_move(official, official.encoder_t, before, official._momentum_update_target_encoder)
            results[name] = out
    return results


def run_cmsf(root: Path) -> dict:
    results = {}
    with on_path(root):
        sys.modules.setdefault("pdb", types.ModuleType("pdb"))
        self_sup = importlib.import_module("self_supervised.train_cmsf_self")
        sup = importlib.import_module("supervised.train_cmsf_sup")
        semi = importlib.import_module("semi_supervised.pseudo_cmsf")
        for module in (self_sup, sup, semi):
            module.get_shuffle_ids = lambda n: (torch.arange(n), torch.arange(n))  # BN is permutation-invariant

        case = gc.cmsf_self()
        m = case.method
        official, names = mean_shift_model(
            self_sup.ConstrainedMeanShiftSelf, m, m=0.99, mem_bank_size=16, topk=3, dataset_size=gc.SIZE, topkp=4
        )
        official.index_queue.copy_(m.bank.column("index"))
        official.pool[0].copy_(m.previous_of_image.rows)  # the visit before the latest: pool[qindex]
        official.pool[1].copy_(m.cache.rows)  # the latest visit, overwritten at this one
        official.pool_qindex.zero_()
        results["cmsf_self"] = mean_shift_step(case, official, names, case.batch.labels, case.batch.index)

        for name in ("cmsf_supervised", "cmsf_supervised_short"):
            case = getattr(gc, name)()
            m = case.method
            official, names = mean_shift_model(sup.MeanShift, m, m=0.99, mem_bank_size=16, topk=m.config.topk)
            results[name] = mean_shift_step(case, official, names, case.batch.labels)

        case = gc.cmsf_semi()
        m = case.method
        opt = argparse.Namespace(
            topk_lbl=1, use_conf=True, conf_th=m.config.confidence, sup_mem_bank_size=16, cache_sup=False, cache_conf_unsup=False
        )
        official, names = mean_shift_model(
            semi.PseudoCMSF, m, mlp_xent="mlp", m=0.99, mem_bank_size=16, topk=3, ncls=gc.CLASSES, opt=opt
        )
        transplant(m.pseudo.classifier, official.mlp_head)
        official.mlp_head.eval()  # as train_pseudo_cmsf.py during the CMSF steps
        official.gt_labels.copy_(m.bank.column("label"))
        labels = case.batch.labels
        results["cmsf_semi"] = mean_shift_step(case, official, names, labels.clamp_min(0), (labels < 0).long())
    return results


def first_slot(labels: torch.Tensor) -> torch.Tensor:
    """Each image's label: the single-view code keeps ``ls`` label slots per image, the first in use before its stage 2."""
    return labels[..., 0] if labels.dim() == 2 else labels


def run_coke(root: Path) -> dict:
    results = {}
    with on_path(root):
        for name, file in (("coke_two_views", "coke.builder_double_view"), ("coke_one_view", "coke.builder_single_view")):
            case = getattr(gc, name)()
            m, cfg = case.method, case.method.config
            builder = importlib.import_module(file)
            kwargs = dict(
                K=cfg.clusters,
                dim=cfg.dim,
                num_ins=gc.SIZE,
                num_head=len(cfg.clusters),
                T=cfg.temperature,
                dual_lr=cfg.eta,
                ratio=cfg.gamma,
            )
            if cfg.views == 1:
                kwargs["stage"] = 10**6  # no moving-average stage
            official = builder.CoKe(lambda num_classes: Encoder(m.backbone, num_classes), **kwargs)  # float32, as the case
            names = transplant_parts(
                module_of(m, "backbone", "projector", "predictor"),
                {
                    "encoder.features": official.encoder.features,
                    "encoder.fc": official.encoder.fc,
                    "predictor": official.predictor,
                },
            )
            for h, head in enumerate(m.heads):
                getattr(official, f"pre_center_{h}").copy_(head.centres.previous.T)
                getattr(official, f"cur_center_{h}").copy_(head.centres.running.T)
                getattr(official, f"dual_{h}").copy_(head.duals)
                getattr(official, f"counter_{h}").copy_(head.centres.counts)
                first_slot(official.assign_labels[h]).copy_(head.labels)
            official.load_param()
            for views, batch in case.warmup:
                with torch.no_grad():
                    official(*views, batch.index, gc.EPOCH)
            H, ce = len(cfg.clusters), nn.CrossEntropyLoss()
            if cfg.views == 2:  # main_double_view.py's loss
                p1, p2, x1, x2, labels = official(case.views[0], case.views[1], case.batch.index, gc.EPOCH)
                soft1 = [F.softmax(x, dim=1).detach() for x in x1]
                soft2 = [F.softmax(x, dim=1).detach() for x in x2]
                a, loss_pred, loss_proj = cfg.alpha, 0, 0
                for j in range(H):
                    loss_pred = loss_pred + a * ce(p1[j], labels[j]) + a * ce(p2[j], labels[j])
                    loss_proj = loss_proj + a * ce(x1[j], labels[j]) + a * ce(x2[j], labels[j])
                    loss_pred = loss_pred - (1 - a) * (
                        torch.mean(torch.sum(F.log_softmax(p1[j], 1) * soft2[j], 1))
                        + torch.mean(torch.sum(F.log_softmax(p2[j], 1) * soft1[j], 1))
                    )
                    loss_proj = loss_proj - (1 - a) * (
                        torch.mean(torch.sum(F.log_softmax(x1[j], 1) * soft2[j], 1))
                        + torch.mean(torch.sum(F.log_softmax(x2[j], 1) * soft1[j], 1))
                    )
                loss = (0.5 / (2.0 * H)) * (loss_pred + loss_proj)
            else:  # main_single_view.py's loss, before its stage 2 (coke_beta = the prediction's share)
                pred, proj, labels = official(case.views[0], case.batch.index, gc.EPOCH)
                loss = sum(
                    cfg.pred_weight * ce(pred[j], labels[j]) / H + (1 - cfg.pred_weight) * ce(proj[j], labels[j]) / H
                    for j in range(H)
                )
            loss.backward()
            out = {"loss": loss.item(), "grads": grad_norms(case, names, gradients(official))}
            for h in range(H):
                out[f"head{h}"] = {
                    "labels": first_slot(official.assign_labels[h]).tolist(),
                    "duals": official.duals[h].tolist(),
                    "running": gc.checksum(official.cur_centers[h].T),
                }
            results[name] = out
            del sys.modules[file]
    return results


def run_mira(root: Path) -> dict:
    stub("wandb")
    case = gc.mira()
    m, cfg = case.method, case.method.config
    with on_path(root):
        train = importlib.import_module("train")
        train.build_encoder = lambda arch, zero_init_residual=True, cifar=False: Encoder(m.backbone)
        official = train.Model(out_dim=cfg.dim, proj_hidden_dim=cfg.hidden, num_prototypes=cfg.prototypes).double()
        names = transplant_parts(
            module_of(m, "backbone", "projector"),
            {"model.encoder.features": official.model["encoder"].features, "model.projector": official.model["projector"]},
        )
        official.model["encoder"].fc = nn.Identity()
        official.ema_model["encoder"].fc = nn.Identity()
        with torch.no_grad():
            official.model["head"].weight_v.copy_(m.head.weight)
            official.model["head"].weight_g.fill_(1)
        names["head.weight"] = "model.head.weight_v"
        official.ema_model.load_state_dict(official.model.state_dict())
        grads = {}

        class Optimizer:  # records the gradients the official step leaves, then steps SGD 0.1
            def step(self):
                grads.update(gradients(official))
                sgd(official)

            def zero_grad(self):
                official.zero_grad(set_to_none=True)

        class Scaler:
            def scale(self, loss):
                return loss

            def step(self, optimizer):
                optimizer.step()

            def update(self):
                pass

        args = argparse.Namespace(
            beta_initial=cfg.beta_start,
            beta_final=cfg.beta_end,
            epochs=gc.TOTAL_STEPS // gc.STEPS_PER_EPOCH,
            iters_per_epoch=gc.STEPS_PER_EPOCH,
            ema_momentum=cfg.momentum_base,
            ema_momentum_final=1.0,
            tau_t=cfg.tau_teacher,
            tau_s=cfg.tau_student,
            iters=cfg.iterations,
            freeze_head_epochs=cfg.freeze_prototypes_epochs,
            channel_last=False,
        )
        trainer = types.SimpleNamespace(args=args, model=official, optimizer=Optimizer(), scaler=Scaler(), _step=gc.STEP)
        trainer.beta_momentum = train.Trainer.beta_momentum.fget(trainer)
        trainer.ema_momentum = train.Trainer.ema_momentum.fget(trainer)

        def ema() -> torch.Tensor:
            return flat([*official.ema_model["encoder"].parameters(), *official.ema_model["projector"].parameters()])

        before = ema().clone()
        result = train.Trainer._train_step(trainer, (list(case.views), case.batch.labels), gc.EPOCH)
        trainer._step = gc.STEP + 1  # the next step moves the teacher first, with its own momentum
        official._update_ema_params(train.Trainer.ema_momentum.fget(trainer))
        out = {
            "loss": float(result["Train/loss"]),
            "grads": grad_norms(case, names, grads),
            "target_move": (ema() - before).norm().item(),
        }
    return out


def run_swav(root: Path) -> dict:
    stub("apex", parallel=types.SimpleNamespace(), amp=None)
    stub("apex.parallel")
    stub("apex.parallel.LARC", LARC=object)
    stub("pandas")  # src/logger.py's statistics table, unused by one step
    case = gc.swav()
    m, cfg = case.method, case.method.config
    with on_path(root):
        main_swav = importlib.import_module("main_swav")
        resnet = importlib.import_module("src.resnet50")

        class Tiny(resnet.ResNet):  # official forward / forward_head on kinship's backbone
            def __init__(self) -> None:
                nn.Module.__init__(self)
                self.eval_mode, self.l2norm = False, True
                self.backbone = copy.deepcopy(m.backbone)
                self.projection_head = nn.Sequential(
                    nn.Linear(16, cfg.hidden), nn.BatchNorm1d(cfg.hidden), nn.ReLU(inplace=True), nn.Linear(cfg.hidden, cfg.dim)
                )
                self.prototypes = nn.Linear(cfg.dim, cfg.prototypes, bias=False)

            def forward_backbone(self, x):
                return self.backbone(x)

        net = Tiny().double()
        names = transplant_parts(
            module_of(m, "backbone", "projector"),
            {"module.backbone": net.backbone, "module.projection_head": net.projection_head},
        )
        with torch.no_grad():
            net.prototypes.weight.copy_(m.head.weight)
        names["head.weight"] = "module.prototypes.weight"

        class Wrapped(nn.Module):  # what DistributedDataParallel looks like to train(): .module, forward
            def __init__(self) -> None:
                super().__init__()
                self.module = net

            def forward(self, inputs):
                return self.module(inputs)

        model = Wrapped()
        grads = {}

        class Optimizer:
            param_groups = [{"lr": 0.0}]

            def zero_grad(self):
                model.zero_grad(set_to_none=True)

            def step(self):
                grads.update(gradients(model))

        main_swav.args = argparse.Namespace(
            crops_for_assign=[0, 1],
            nmb_crops=[2, cfg.local_crops],
            temperature=cfg.temperature,
            epsilon=cfg.epsilon,
            sinkhorn_iterations=cfg.sinkhorn_iterations,
            world_size=1,
            freeze_prototypes_niters=0,
            use_fp16=False,
            rank=1,
        )
        # main_swav.py's queue holds the newest row first and drops its last rows; kinship's ring
        # overwrites the oldest slots from its pointer on: the same rows, newest first from ptr - 1
        queue = torch.stack([q.rows.roll(-int(q.ptr), 0).flip(0) for q in m.queues])
        (_, loss), queue = main_swav.train([list(case.views)], model, Optimizer(), gc.EPOCH, np.zeros(10), queue)
        out = {"loss": loss, "grads": grad_norms(case, names, grads)}
        out.update({f"queue{i}": gc.set_checksum(queue[i]) for i in range(2)})
    return out


RUNNERS = {"coke": run_coke, "cmsf": run_cmsf, "msf": run_msf, "swav": run_swav, "moco": run_moco, "mira": run_mira}


def commit_of(folder: Path) -> str | None:
    try:
        return subprocess.run(
            ["git", "-C", str(folder), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (subprocess.CalledProcessError, FileNotFoundError):
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for name, repo in REPOS.items():
        parser.add_argument(f"--{name}", type=Path, help=f"checkout of {repo}")
    parser.add_argument("--commit", action="append", default=[], help="NAME=SHA: the commit of a checkout without .git")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    commits = dict(item.split("=", 1) for item in args.commit)
    golden = json.loads(args.out.read_text()) if args.out.exists() else {"sources": {}, "cases": {}}
    setup()
    for name, run in RUNNERS.items():
        folder = getattr(args, name)
        if folder is None:
            continue
        commit = commits.get(name) or commit_of(folder)
        produced = run(folder.resolve())
        produced = produced if name in ("cmsf", "msf", "coke") else {{"moco": "mocov2"}.get(name, name): produced}
        for case, values in produced.items():
            golden["cases"][case] = {"source": f"{REPOS[name]}@{commit}", **values}
        golden["sources"][REPOS[name]] = commit
        print(f"{REPOS[name]} @ {commit}: {', '.join(produced)}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(golden, indent=1, sort_keys=True) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
