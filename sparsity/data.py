"""Built-in data: scikit-learn's bundled handwritten digits (real data, no download), and dataset helpers.

``digits`` gives 1,797 8x8 grey images of 10 classes as 32x32 RGB PIL images with a fixed, stratified
train/validation split (1,437 / 360), so timm's transforms and loaders work on it unchanged.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from .errors import UserError

__all__ = ["DigitsDataset", "DIGITS_MEAN", "DIGITS_STD", "build_dataset", "DataError", "resolve_data",
           "trained_data_config", "fixed_img_size", "timm_pillow_compat"]

_log = logging.getLogger(__name__)
DIGITS_MEAN = (0.3057, 0.3057, 0.3057)
DIGITS_STD = (0.3235, 0.3235, 0.3235)
_IMG_EXT = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".ppm", ".tif", ".tiff")


def _posterize(img, bits_to_keep, **_):
    """timm's ``posterize`` augmentation for any Pillow. RandAugment's posterize levels ask for 0 bits at the top
    magnitude (``rand-m9-mstd0.5-inc1``: about 0.15 % of images), which Pillow up to 12 turns into a black image and
    Pillow 13 refuses with a ValueError, ending the run mid-epoch."""
    if bits_to_keep <= 0:
        return img.point(lambda _: 0)  # keep no bit: what ImageOps.posterize(img, 0) returned before Pillow 13
    if bits_to_keep >= 8:
        return img
    from PIL import ImageOps  # self-contained: DataLoader workers started with spawn re-import this module

    return ImageOps.posterize(img, bits_to_keep)


def timm_pillow_compat() -> None:
    """Route timm's posterize ops through :func:`_posterize` when this Pillow refuses 0 bits (call it before the
    transforms are built: timm's ops take the function when they are created; a second call changes nothing)."""
    from PIL import ImageOps
    from timm.data import auto_augment

    try:
        ImageOps.posterize(Image.new("L", (1, 1)), 0)
    except ValueError:
        for name, op in list(auto_augment.NAME_TO_OP.items()):
            if op is auto_augment.posterize:
                auto_augment.NAME_TO_OP[name] = _posterize


class DataError(UserError):
    """The data set cannot be used; the message says what to change."""


class DigitsDataset(torch.utils.data.Dataset):
    """scikit-learn's digits as 32x32 RGB images. ``split`` is ``train`` (80 %) or ``validation`` (20 %)."""

    def __init__(self, split: str = "train", transform=None, img_size: int = 32) -> None:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        if split not in ("train", "validation", "val", "test"):
            raise DataError(f"digits has splits 'train' and 'validation', got {split!r}")
        data = load_digits()
        idx = np.arange(len(data.target))
        train_idx, val_idx = train_test_split(idx, test_size=0.2, random_state=0, stratify=data.target)
        keep = np.sort(train_idx if split == "train" else val_idx)
        images = (data.images[keep] / 16.0 * 255.0).round().astype(np.uint8)  # (N, 8, 8)
        self.images = [Image.fromarray(im).resize((img_size, img_size), Image.BILINEAR).convert("RGB")
                       for im in images]
        self.targets = data.target[keep].astype(np.int64).tolist()
        self.transform = transform
        self.classes = [str(c) for c in range(10)]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        img = self.images[i]
        if self.transform is not None:
            img = self.transform(img)
        return img, self.targets[i]


class CheckedImages(torch.utils.data.Dataset):
    """Wraps an image dataset with a policy for unreadable images: ``fail`` raises a :class:`DataError` naming
    the file; ``skip`` logs a warning and serves the next image instead."""

    def __init__(self, dataset, policy: str = "fail") -> None:
        if policy not in ("fail", "skip"):
            raise DataError(f"--on-bad-image must be fail or skip, got {policy!r}")
        self.dataset = dataset
        self.policy = policy
        if hasattr(dataset, "_max_retries"):
            dataset._max_retries = 1  # let failures reach this wrapper instead of timm's silent retry
            logging.getLogger("timm.data.dataset").addFilter(_NO_TIMM_SKIP)  # this wrapper reports them (once)

    @property
    def transform(self):
        return self.dataset.transform

    @transform.setter
    def transform(self, value):  # timm's create_loader sets the transform on the dataset it is given
        self.dataset.transform = value

    def __getattr__(self, name):
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __len__(self) -> int:
        return len(self.dataset)

    def _name(self, i: int) -> str:
        try:
            return str(self.dataset.filename(i, absolute=True))
        except Exception:  # noqa: BLE001 - only for the message
            return f"sample {i}"

    def _cause(self, j: int, e: Exception) -> Exception:
        """The decoder's own error: timm's retry loop replaces it with a bare "Failed to load 1 consecutive
        samples", so the file is opened again here to get the message worth showing."""
        if not (isinstance(e, RuntimeError) and "consecutive samples" in str(e)):
            return e
        try:
            with Image.open(self._name(j)) as im:
                im.load()
        except Exception as real:  # noqa: BLE001 - whatever PIL says is the message
            return real
        return e

    def __getitem__(self, i: int):
        for attempt in range(min(len(self), 50)):
            j = (i + attempt) % len(self)
            try:
                return self.dataset[j]
            except (OSError, RuntimeError, ValueError) as e:
                e = self._cause(j, e)
                if self.policy == "fail":
                    raise DataError(f"unreadable image {self._name(j)} ({type(e).__name__}: {e}); fix or remove it, "
                                    "or pass --on-bad-image skip") from None
                _log.warning("skipping unreadable image %s (%s)", self._name(j), e)
        raise DataError(f"50 unreadable images in a row from {self._name(i)}; check the data set")


class _NoTimmSkipMessage(logging.Filter):
    """Drops timm's "Skipped sample" warning, which is wrong under ``--on-bad-image fail`` (nothing is skipped)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Skipped sample")


_NO_TIMM_SKIP = _NoTimmSkipMessage()


def _is_folder(name: str | None) -> bool:
    return name in (None, "", "folder", "imagefolder") or name.startswith("folder/")


def check_data_dir(name: str | None, data_dir: str | None, download: bool = False) -> None:
    """Refuse a ``--data-dir`` that does not exist where it would be read (``name`` None: not resolved yet, a
    folder). Digits reads none, and a download creates it. Cheap: CLIs call it before building a model."""
    if name == "digits" or not data_dir or download or Path(data_dir).exists():
        return
    hint = ("point it at an ImageFolder root (one folder per class)" if _is_folder(name)
            else "add --dataset-download where a network exists")
    raise DataError(f"--data-dir {data_dir} does not exist; {hint}")


def _check_image_folder(root: str, split_dir: str | None) -> None:
    path = Path(root)
    check_data_dir("", root)
    if not path.is_dir():
        raise DataError(f"--data-dir {root} is not a folder")
    for _, _, files in os.walk(root):
        if any(f.lower().endswith(_IMG_EXT) for f in files):
            return
    raise DataError(f"--data-dir {root} holds no images ({', '.join(_IMG_EXT)}); expected <root>/<class>/<image> "
                    f"or <root>/{split_dir or 'train'}/<class>/<image>")


def fixed_img_size(model) -> int | None:
    """The input side a fixed-size model was built for (a ViT made with ``img_size=32`` keeps timm's 224 in its
    ``pretrained_cfg``), or None (CNNs, dynamic-size models)."""
    fixed = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if isinstance(fixed, (tuple, list)) and not getattr(model, "dynamic_img_size", False):
        return int(fixed[-1])
    return None


def _split_names() -> tuple[str, ...]:
    """Folder names that mark a split layout (<root>/<split>/<class>/<image>) rather than class folders: timm's
    split synonyms (train/training, val/valid/validation/eval/evaluation) and test."""
    from timm.data.dataset_factory import _EVAL_SYNONYM, _TRAIN_SYNONYM

    return (*_TRAIN_SYNONYM, *_EVAL_SYNONYM, "test")


def evaluates_on_training_images(name: str, data_dir: str | None, train_split: str, val_split: str) -> bool:
    """An ImageFolder without split folders: timm (and this project) read the whole root for both splits."""
    if not (_is_folder(name) and data_dir):
        return False
    from timm.data.dataset_factory import _search_split

    return _search_split(data_dir, val_split) == _search_split(data_dir, train_split)


def build_dataset(name: str, data_dir: str | None, split: str, is_training: bool, download: bool = False,
                  img_size: int = 32, on_bad_image: str = "fail"):
    """``digits`` (embedded), or any timm dataset (``''``/``folder`` = ImageFolder at ``data_dir``, or timm's
    ``torch/cifar100`` style names). A missing or empty folder is a :class:`DataError` naming the flag."""
    from timm.data import create_dataset

    if name == "digits":
        return DigitsDataset("train" if is_training else "validation", img_size=img_size)
    if not data_dir:
        raise DataError(f"dataset {name or 'ImageFolder'!r} needs --data-dir (or use --dataset digits, the embedded "
                        "data set)")
    if _is_folder(name):
        from timm.data.dataset_factory import _search_split

        _check_image_folder(data_dir, split)
        root = _search_split(data_dir, split)  # timm's lookup: the split's folder or a synonym (val for validation)
        names = _split_names()
        splits = sorted(d.name for d in Path(data_dir).iterdir() if d.is_dir() and d.name in names)
        if root == data_dir and splits:  # a split layout without this split: never fall back to the whole root
            flag = "--train-split" if is_training else "--val-split"
            raise DataError(f"--data-dir {data_dir} has split folders ({', '.join(splits)}) but none for '{split}'; "
                            f"pass {flag} with one of them")
        return CheckedImages(create_dataset("", root=root, split=split, search_split=False, is_training=is_training),
                             on_bad_image)
    check_data_dir(name, data_dir, download)
    try:
        return create_dataset(name, root=data_dir, split=split, is_training=is_training, download=download)
    except ImportError as e:  # timm's hfds/, hfids/ and tfds/ readers import their library on first use (wds/
        # reports a missing webdataset as a RuntimeError, below)
        package = getattr(e, "name", None) or str(e)
        raise DataError(f"dataset {name!r} needs a package this environment does not have ({package}); install it "
                        "(datasets for hfds/ and hfids/, tensorflow-datasets for tfds/, webdataset for wds/) or use "
                        "an ImageFolder (--dataset '' --data-dir ...)") from None
    except (RuntimeError, FileNotFoundError, ValueError) as e:
        raise DataError(f"cannot open dataset {name!r} at {data_dir}: {e}") from None


def resolve_dataset(args, saved: dict | None = None) -> None:
    """Which data a CLI reads, filled in on ``args`` where not given (``None``).

    ``--dataset``: as given; else, with ``--data-dir``, the training run's kind of data when it read a folder
    (``saved``: the args a checkpoint stores) or an ImageFolder; else the training run's, else the embedded digits.
    ``--data-dir`` and ``--val-split``: the training run's when it is that data set. ``--dataset digits`` with a
    ``--data-dir`` is refused: the directory would be silently ignored.
    """
    saved = saved or {}
    before = saved.get("dataset")
    if args.dataset is None:
        if args.data_dir:
            args.dataset = before if before not in (None, "digits") else ""
        else:
            args.dataset = before if before is not None else "digits"
    elif args.dataset == "digits" and args.data_dir:
        raise DataError(f"--data-dir {args.data_dir} is not read with --dataset digits (the embedded data set): pass "
                        "--dataset '' for an ImageFolder (or a timm data set name), or drop --data-dir")
    if args.dataset != "digits" and before == args.dataset:
        args.data_dir = args.data_dir or saved.get("data_dir")
        if getattr(args, "val_split", "") is None:
            args.val_split = saved.get("val_split")
    if getattr(args, "val_split", "") is None:
        args.val_split = "validation"


def class_to_idx_of(ds) -> dict[str, int] | None:
    """The folder-name -> label mapping of an ImageFolder built by :func:`build_dataset` (None for other kinds)."""
    reader = getattr(getattr(ds, "dataset", ds), "reader", None)
    mapping = getattr(reader, "class_to_idx", None)
    return dict(mapping) if mapping else None


def check_same_classes(train_ds, val_ds, data_dir: str | None) -> None:
    """An ImageFolder labels each class by its sorted position among the split's own folders: splits with other
    class folders would score the validation images against the wrong labels, silently."""
    train, val = class_to_idx_of(train_ds), class_to_idx_of(val_ds)
    if train is None or val is None or train == val:
        return
    only_train, only_val = sorted(set(train) - set(val)), sorted(set(val) - set(train))

    def names(xs: list[str]) -> str:
        return ", ".join(xs[:5]) + (f" and {len(xs) - 5} more" if len(xs) > 5 else "") if xs else "none"

    raise DataError(f"the training and validation folders of --data-dir {data_dir} hold different classes (only in "
                    f"training: {names(only_train)}; only in validation: {names(only_val)}); labels are the classes' "
                    "positions among each split's folders, so give both splits the same class folders, each with at "
                    "least one image")


def num_classes_of(ds) -> int | None:
    """Classes of a data set built by :func:`build_dataset` (None where it does not say)."""
    if hasattr(ds, "classes"):
        return len(ds.classes)
    reader = getattr(ds, "reader", None)
    if reader is not None and hasattr(reader, "class_to_idx"):
        return len(reader.class_to_idx)
    return None


_DATA_KEYS = ("img_size", "crop_pct", "mean", "std", "interpolation")


def resolve_data(args, model: nn.Module, saved: dict | None = None) -> dict:
    """timm's data config (input_size, mean, std, crop_pct, interpolation) for ``model``.

    Precedence: the flags; then ``saved``, the config the model was trained with (a data config: a train
    checkpoint's, see :func:`trained_data_config`, or an export's ``pretrained_cfg``); then the digits data set's
    own (32 px, its mean/std); then the input size a fixed-size model was built for (a ViT made with
    ``img_size=32`` keeps timm's 224 in its ``pretrained_cfg``); then timm's defaults for the model.
    """
    from timm.data import resolve_data_config

    cfg_args = {k: getattr(args, k, None) for k in _DATA_KEYS}
    if saved:
        size = saved.get("input_size")
        for k, v in (("img_size", size[-1] if size else None), *((k, saved.get(k)) for k in _DATA_KEYS[1:])):
            cfg_args[k] = cfg_args[k] or v
    if getattr(args, "dataset", None) == "digits":
        cfg_args["img_size"] = cfg_args["img_size"] or 32
        cfg_args["mean"] = cfg_args["mean"] or DIGITS_MEAN
        cfg_args["std"] = cfg_args["std"] or DIGITS_STD
        cfg_args["crop_pct"] = cfg_args["crop_pct"] or 1.0
    cfg_args["img_size"] = cfg_args["img_size"] or fixed_img_size(model)
    return resolve_data_config({k: v for k, v in cfg_args.items() if v}, model=model)


def trained_data_config(saved_args: dict | None, model: nn.Module) -> dict | None:
    """The data config a train.py run used, from the ``args`` its checkpoints store (None for other files)."""
    if not saved_args:
        return None
    from types import SimpleNamespace

    return resolve_data(SimpleNamespace(**{k: saved_args.get(k) for k in (*_DATA_KEYS, "dataset")}), model)
