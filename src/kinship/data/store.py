"""Datasets as decoded uint8 tensors: images (N, 3, H, W) and labels (N,), decoded once, kept on device.

Sources: kinship's JPEG npz (``docs/data.md``; ``kinship pack-npz`` writes one), torchvision
CIFAR-10/100 and STL-10 (downloaded into the data folder on first use, :mod:`kinship.data.home`, or
where ``data.path`` points when ``download`` is set), any ImageFolder (each image whole,
resized to a square, with its original aspect ratio), and a small synthetic set for tests. Label -1
marks an unlabeled image (STL-10's unlabeled split).
"""

from __future__ import annotations

import math
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, TypeVar

import numpy as np
import torch
from PIL import Image

from kinship.config import DataConfig
from kinship.data.home import DATA_ENV, OFFLINE_ENV, PACKED, data_home, dataset_path, downloads_allowed, managed
from kinship.data.subsets import CIFAR100_SUPERCLASS_NAMES, cifar100_superclasses
from kinship.errors import DataError
from kinship.runtime import barrier, rank

# torchvision 0.29 deprecates its image decoders in favour of torchcodec; they still work, and are
# the fastest batched JPEG decoder on torch 2.11 (the GPU machines) through 2.14.
warnings.filterwarnings(
    "ignore", message="The image decoding and encoding capabilities of TorchVision", category=DeprecationWarning
)


@dataclass
class ImageSet:
    images: torch.Tensor  # uint8 (N, 3, H, W)
    labels: torch.Tensor  # int64 (N,), -1 = unlabeled
    classes: list[str]
    # float (N,): each image's original width / height where it is stored resized to a square
    # (ImageFolder); None: the stored shape is the original (CIFAR, STL-10)
    aspect: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.ndim != 4 or self.images.shape[1] != 3:
            raise DataError(f"images must be uint8 (N, 3, H, W), got {tuple(self.images.shape)} {self.images.dtype}")
        if self.labels.shape != (self.images.shape[0],):
            raise DataError(f"labels must have shape ({self.images.shape[0]},), got {tuple(self.labels.shape)}")

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, rows: slice | torch.Tensor) -> "ImageSet":
        if isinstance(rows, torch.Tensor):
            rows = rows.to(self.images.device)
        aspect = None if self.aspect is None else self.aspect[rows]
        return ImageSet(self.images[rows], self.labels[rows], self.classes, aspect)

    def subset(self, rows: torch.Tensor) -> "ImageSet":
        """The images of ``rows`` (as :class:`~kinship.data.stream.FileImages`, whose subsets stay undecoded)."""
        return self[rows]

    def to(self, device: torch.device) -> "ImageSet":
        aspect = None if self.aspect is None else self.aspect.to(device)
        return ImageSet(self.images.to(device), self.labels.to(device), self.classes, aspect)


def _threads(requested: int) -> int:
    return requested if requested > 0 else (os.cpu_count() or 1)


def decode_jpeg_buffers(buffers: np.ndarray, offsets: np.ndarray, threads: int, where: str) -> torch.Tensor:
    """Decode concatenated JPEG files (``buffers[offsets[i]:offsets[i+1]]``) into uint8 (N, 3, H, W)."""
    from torchvision.io import ImageReadMode, decode_jpeg

    def decode(data: torch.Tensor | list[torch.Tensor]) -> torch.Tensor | list[torch.Tensor]:
        return decode_jpeg(data, mode=ImageReadMode.RGB)

    n = len(offsets) - 1
    chunk = max(1, min(2048, -(-n // max(1, threads))))

    def decode_chunk(start: int) -> list[torch.Tensor]:
        stop = min(n, start + chunk)
        datas = [torch.from_numpy(buffers[offsets[i] : offsets[i + 1]]) for i in range(start, stop)]
        try:
            return decode(datas)
        except RuntimeError:
            for i, data in enumerate(datas):  # find the culprit to name it
                try:
                    decode(data)
                except RuntimeError as exc:
                    raise DataError(f"cannot decode image {start + i} of {where}: {exc}") from None
            raise

    with ThreadPoolExecutor(threads) as pool:
        parts = [img for part in pool.map(decode_chunk, range(0, n, chunk)) for img in part]
    shapes = {tuple(p.shape) for p in parts}
    if len(shapes) != 1:
        raise DataError(f"images of {where} differ in size: {sorted(shapes)[:3]}")
    return torch.stack(parts)


def ensure_packed(config: DataConfig) -> Path:
    """The packed file of a managed ``data.name``, built first where it is missing (by the first
    process; the others wait for it)."""
    path = dataset_path(config)
    if managed(config) and config.name in PACKED and not path.is_file():
        if rank() == 0:
            build_packed(config.name, path)
        barrier()
    return path


def build_packed(name: str, path: Path) -> None:
    """Download ``name``'s torchvision source into the data folder and pack it at ``path``, or a
    DataError naming the file to place there."""
    source = PACKED[name][0]
    root = data_home() / "torchvision"
    try:
        if not downloads_allowed():
            raise DataError(f"{OFFLINE_ENV} is set")
        print(f"kinship: building {path} from torchvision's {source} in {root} (first use only)", flush=True)
        train, test = (load_torchvision(source, root, split, True, 32) for split in ("train", "test"))
    except DataError as exc:
        reason = exc.__cause__ or exc
        raise DataError(
            f"{path} is missing and {source} cannot be downloaded here ({reason}): put {path.name} there "
            f"(kinship pack-npz {source} --download --out FILE builds it where there is a network), or set "
            f"{DATA_ENV} to the folder that holds it"
        ) from None
    pack_npz(train, test, path)
    print(f"kinship: wrote {path}", flush=True)


def load_npz(path: Path, split: str, threads: int) -> ImageSet:
    if not path.is_file():
        raise DataError(
            f"dataset file not found: {path}; build one with kinship pack-npz (docs/data.md), or leave data.path "
            "empty to use the data folder's copy (built there on first use)"
        )
    try:
        data = np.load(path, allow_pickle=False)
        buffers, offsets, labels = data[f"{split}_jpeg"], data[f"{split}_offsets"], data[f"{split}_labels"]
        classes = [str(c) for c in data["classes"]]
        aspect = torch.from_numpy(data[f"{split}_aspect"].astype(np.float32)) if f"{split}_aspect" in data else None
    except (KeyError, ValueError, OSError) as exc:
        raise DataError(f"{path} is not a kinship JPEG npz with a '{split}' split: {exc}") from None
    if len(offsets) < 2:
        raise DataError(f"the {split} split of {path} holds no images")
    images = decode_jpeg_buffers(buffers, offsets, threads, f"the {split} split in {path}")
    return ImageSet(images, torch.from_numpy(labels.astype(np.int64)), classes, aspect)


def pack_npz(train: ImageSet, test: ImageSet, path: Path, quality: int = 75) -> None:
    """Write two splits as kinship's JPEG npz (the format :func:`load_npz` reads): each split's images
    ordered by class (stable), JPEG-encoded, concatenated with their offsets; written atomically."""
    from torchvision.io import encode_jpeg

    arrays: dict[str, np.ndarray] = {"classes": np.array(train.classes)}
    for split, data in (("train", train), ("test", test)):
        order = torch.argsort(data.labels, stable=True)
        files = [f.numpy() for f in encode_jpeg(list(data.images[order].cpu()), quality=quality)]
        arrays[f"{split}_jpeg"] = np.concatenate(files)
        arrays[f"{split}_offsets"] = np.cumsum([0] + [len(f) for f in files]).astype(np.int64)
        arrays[f"{split}_labels"] = data.labels[order].cpu().numpy().astype(np.int64)
        if data.aspect is not None:  # images resized to squares: their original width / height
            arrays[f"{split}_aspect"] = data.aspect[order].cpu().numpy().astype(np.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "wb") as f:
        np.savez(f, **arrays)
    os.replace(temporary, path)


def load_torchvision(name: str, root: Path, split: str, download: bool, image_size: int) -> ImageSet:
    import torchvision.datasets as tvd

    train = split == "train"
    try:
        if name in ("cifar10", "cifar100"):
            ds = (tvd.CIFAR10 if name == "cifar10" else tvd.CIFAR100)(str(root), train=train, download=download)
            images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
            return ImageSet(images, torch.as_tensor(ds.targets, dtype=torch.int64), list(ds.classes))
        if name == "stl10":
            ds = tvd.STL10(str(root), split="train+unlabeled" if train else "test", download=download)
            images = torch.from_numpy(ds.data)
            if image_size != images.shape[-1]:
                images = _resize_uint8(images, image_size)
            return ImageSet(images, torch.as_tensor(ds.labels, dtype=torch.int64), list(ds.classes))
    except RuntimeError as exc:
        hint = "" if download else " (to download it: data.download: true, or pack-npz --download)"
        raise DataError(f"{name} not found under {root}: {exc}{hint}") from None
    except OSError as exc:  # the download itself failed (no network, a proxy, a full disk)
        raise DataError(
            f"cannot download {name} into {root}: {exc}; download it where there is a network and put it there"
        ) from exc
    raise DataError(f"unknown torchvision dataset '{name}'")


def _resize_uint8(images: torch.Tensor, size: int) -> torch.Tensor:
    x = torch.nn.functional.interpolate(images.float(), size=(size, size), mode="bilinear", antialias=True)
    return x.round_().clamp_(0, 255).to(torch.uint8)


UNREADABLE = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)  # what PIL raises for a file it cannot read
SUBSTITUTE_TRIES = 16  # unreadable files in a row before streamed data gives up
Read = TypeVar("Read")


def first_readable(files: list[Path], i: int, read: Callable[[Path], Read], failed: list[tuple[str, str]]) -> tuple[Read, int]:
    """``read`` of file ``i``, or of the next file of the list (cyclic) that reads: streamed data's
    substitute for an unreadable file, a function of the list alone. Each failure is appended to
    ``failed`` as (path, error); :data:`SUBSTITUTE_TRIES` in a row are a DataError."""
    for _ in range(min(SUBSTITUTE_TRIES, len(files))):
        try:
            return read(files[i]), i
        except (DataError, *UNREADABLE) as exc:
            failed.append((str(files[i]), str(exc) if isinstance(exc, DataError) else f"{type(exc).__name__}: {exc}"))
            i = (i + 1) % len(files)
    raise DataError(
        f"{SUBSTITUTE_TRIES} unreadable images in a row, the last {failed[-1][0]} ({failed[-1][1]}): "
        "kinship check-data FOLDER lists every file that does not decode"
    )


def read_image_file(path: Path, size: int, center: int = 0) -> tuple[torch.Tensor, float]:
    """One image file -> (uint8 (3, size, size), original width / height): the *whole* image resized
    to a square, so that random-resized crops can reach its borders; the aspect ratio lets the crop
    sampler and the evaluation view undo the squeeze (:mod:`kinship.augment.views`). ``center`` > 0:
    instead torchvision's Resize(center) + CenterCrop(size) of the file (its rounding included),
    decoded at the JPEG reduction that keeps the crop at least ``size`` px (aspect 1 returned)."""
    try:
        with Image.open(path) as img:
            w, h = img.size
            if center:
                short, long = min(w, h), max(w, h)
                new_w, new_h = (center, int(center * long / short)) if w <= h else (int(center * long / short), center)
                left, top = round((new_w - size) / 2) * w / new_w, round((new_h - size) / 2) * h / new_h
                box_w, box_h = size * w / new_w, size * h / new_h
                img.draft("RGB", (math.ceil(w * size / box_w), math.ceil(h * size / box_h)))
                sx, sy = img.width / w, img.height / h
                img = img.convert("RGB").resize(
                    (size, size), Image.BILINEAR, box=(left * sx, top * sy, (left + box_w) * sx, (top + box_h) * sy)
                )
                return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1), 1.0
            img = img.convert("RGB")
            img = img.resize((size, size), Image.BILINEAR)
            return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1), w / h
    except UNREADABLE as exc:
        raise DataError(f"cannot read image {path}: {exc}") from None


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".webp", ".tif", ".tiff")


def list_image_folder(root: Path) -> tuple[list[Path], list[int], list[str]]:
    """ImageFolder layout: ``root/<class>/<image>``; classes sorted by name."""
    if not root.is_dir():
        raise DataError(f"image folder not found: {root}")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise DataError(f"{root} has no class sub-folders (expected root/<class>/<image>)")
    files, labels = [], []
    for label, name in enumerate(classes):
        for path in sorted((root / name).rglob("*")):
            if path.suffix.lower() in IMAGE_SUFFIXES:
                files.append(path)
                labels.append(label)
    if not files:
        raise DataError(f"no images under {root}")
    return files, labels, classes


def read_image_files(
    files: list[Path], size: int, threads: int = 0, substitute: bool = False, center: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode image files on a thread pool (``threads`` 0: all cores) -> uint8 (N, 3, size, size) and
    float (N,) original aspect ratios (:func:`read_image_file`, ``center`` as there). ``substitute``: a file that cannot
    be read is replaced by the next one of ``files`` that can (streamed data, whose bad files the
    training stream reports), instead of an error."""

    def read(i: int) -> tuple[torch.Tensor, float]:
        if not substitute:
            return read_image_file(files[i], size, center)
        return first_readable(files, i, lambda path: read_image_file(path, size, center), [])[0]

    with ThreadPoolExecutor(_threads(threads)) as pool:
        images, aspect = zip(*pool.map(read, range(len(files))))
    return torch.stack(images), torch.tensor(aspect, dtype=torch.float32)


def load_image_folder(root: Path, size: int, threads: int, budget_gb: float = float("inf")) -> ImageSet:
    files, labels, classes = list_image_folder(root)
    need = len(files) * 3 * size * size / 2**30
    if need > budget_gb:
        raise DataError(
            f"{root}: {len(files)} images at {size} px take {need:.1f} GiB decoded, over data.memory_budget_gb "
            f"{budget_gb:g}: stream them (data.streaming: true, the default for imagefolder)"
        )
    images, aspect = read_image_files(files, size, threads)
    return ImageSet(images, torch.tensor(labels, dtype=torch.int64), classes, aspect)


def synthetic(n: int, classes: int = 4, size: int = 16, seed: int = 0) -> ImageSet:
    """Tiny learnable images for tests: each class a colour and a stripe orientation, plus noise."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % classes
    colors = torch.rand(classes, 3, 1, 1, generator=g)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    angle = torch.arange(classes).float() * torch.pi / classes
    stripes = torch.stack([torch.sin((xx * torch.cos(a) + yy * torch.sin(a)) * 1.2) for a in angle])
    base = 0.5 * colors[labels] + 0.3 * stripes[labels].unsqueeze(1) + 0.25
    images = base + 0.1 * torch.randn(n, 3, size, size, generator=g)
    images = (images.clamp(0, 1) * 255).round().to(torch.uint8)
    return ImageSet(images, labels.long(), [f"class{i}" for i in range(classes)])


def load_split(config: DataConfig, split: str) -> ImageSet:
    """Decode one split ("train" or "test") of the configured dataset into memory (CPU)."""
    threads = _threads(config.decode_threads)
    if config.name == "cifar10-npz":
        images = load_npz(ensure_packed(config), split, threads)
    elif config.name in ("cifar10", "cifar100", "stl10"):
        download = config.download or (managed(config) and downloads_allowed())
        images = load_torchvision(config.name, dataset_path(config), split, download, config.image_size)
    elif config.name == "imagefolder":
        if split == "test" and not config.test_path:
            raise DataError("data.test_path (the evaluation split's ImageFolder root) is required for imagefolder")
        root = Path(config.test_path).expanduser() if split == "test" else dataset_path(config)
        images = load_image_folder(root, config.image_size, threads, config.memory_budget_gb)
    elif config.name == "synthetic":
        n = (config.train_limit or 512) if split == "train" else (config.test_limit or 256)
        images = synthetic(n, size=config.image_size, seed=0 if split == "train" else 1)
    else:
        raise DataError(f"unknown data.name '{config.name}'")  # the config's type lists the choices
    if config.superclasses:  # CIFAR-100-20: train and test on the 20 super-classes
        images = ImageSet(images.images, cifar100_superclasses(images.labels), list(CIFAR100_SUPERCLASS_NAMES), images.aspect)
    keep = seeded_subset(len(images), config.train_limit if split == "train" else config.test_limit, split)
    return images if keep is None else images[keep]


def seeded_subset(n: int, limit: int, split: str) -> torch.Tensor | None:
    """Sorted indices of ``data.train_limit`` / ``test_limit`` images of a split of ``n`` (seeded by
    the split), or None for all of them."""
    if not 0 < limit < n:
        return None
    g = torch.Generator().manual_seed(1234 if split == "train" else 4321)
    return torch.randperm(n, generator=g)[:limit].sort().values


def write_image_folder(
    root: Path, classes: int, per_class: int, width: int, height: int, seed: int = 0, quality: int = 90
) -> list[Path]:
    """An ImageFolder of JPEGs for tests and benchmarks: ``classes`` folders of ``per_class`` images
    of about ``width`` x ``height`` px (each side drawn within +-20 %, so shapes vary as in ImageNet),
    each class a colour and a stripe orientation under noise, as :func:`synthetic`."""
    rng = np.random.default_rng(seed)
    colours = rng.uniform(0.2, 0.8, size=(classes, 3))
    files = []
    for label in range(classes):
        folder = root / f"class{label:04d}"
        folder.mkdir(parents=True, exist_ok=True)
        angle = np.pi * label / classes
        for i in range(per_class):
            w, h = (int(s * rng.uniform(0.8, 1.2)) for s in (width, height))
            yy, xx = np.mgrid[0:h, 0:w] * (32 / max(w, h))
            stripes = np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * 1.2)[..., None]
            pixels = 0.5 * colours[label] + 0.3 * stripes + 0.25 + 0.1 * rng.standard_normal((h, w, 3))
            path = folder / f"{label:04d}_{i:05d}.jpg"
            Image.fromarray((pixels.clip(0, 1) * 255).astype(np.uint8)).save(path, quality=quality)
            files.append(path)
    return files
