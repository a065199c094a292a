"""The photos the accuracy benchmark runs on, each as a few deterministic views, preprocessed per model.

- foolbox's 20 ImageNet JPEGs (512x512, the label in the file name) and four of scikit-image's colour
  photos (``astronaut``, ``chelsea``, ``coffee``, ``rocket``, unlabelled) are the evaluation photos;
- five other scikit-image colour photos (``motorcycle_left``/``_right``, a stereo pair, so both stay on
  this side; ``hubble_deep_field``, ``retina``, ``ihc``) are held out for calibration only.

Files are found by path, without importing the packages (foolbox: ``make models``; scikit-image:
``pip install --no-deps scikit-image``, only its bundled ``data/`` folder is read).

A view resizes the shorter side, crops 224x224 at a relative position and may mirror it. The first view
is the model's own preprocessing (resize 256 / centre-crop 224 for MobileNetV2, resize 224 / centre-crop
224 for EfficientNet-Lite0).
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pretrained

CROP = 224
SKIMAGE_EVALUATION = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg")
SKIMAGE_CALIBRATION = (
    "motorcycle_left.png",
    "motorcycle_right.png",
    "hubble_deep_field.jpg",
    "retina.jpg",
    "ihc.png",
)


@dataclass(frozen=True)
class Photo:
    name: str  # "foolbox/imagenet_00_243", "skimage/chelsea"
    path: str
    label: int | None  # ImageNet class, when the file name carries one


@dataclass(frozen=True)
class View:
    """Resize the shorter side to ``resize`` (``None``: the model's own), crop at ``(fx, fy)`` of the
    room left (0.5 = centre), mirror when ``flip``."""

    name: str
    resize: int | None
    fx: float = 0.5
    fy: float = 0.5
    flip: bool = False


VIEWS = (
    View("centre", None),
    View("centre-flipped", None, flip=True),
    View("zoom-320", 320),
    View("upper-left-288", 288, 0.2, 0.2),
    View("lower-right-288-flipped", 288, 0.8, 0.8, flip=True),
)


@dataclass(frozen=True)
class Preprocessing:
    """A model's input: shorter side resized to ``resize``, centre 224 crop, then ``norm``
    (``imagenet``: ImageNet mean/std; ``half``: (x/255 - 0.5)/0.5)."""

    resize: int
    norm: str


def _package_dir(name: str, install: str) -> str:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"the accuracy benchmark needs {name!r}: {install}")
    return next(iter(spec.submodule_search_locations))


def foolbox_photos() -> list[Photo]:
    found = pretrained.foolbox_imagenet_images()
    if not found:
        raise SystemExit("the accuracy benchmark needs foolbox's photos: make models")
    return [
        Photo("foolbox/" + os.path.splitext(os.path.basename(path))[0], path, label) for path, label in found
    ]


def skimage_photos(files: tuple[str, ...]) -> list[Photo]:
    folder = os.path.join(_package_dir("skimage", "pip install --no-deps scikit-image"), "data")
    return [Photo("skimage/" + os.path.splitext(f)[0], os.path.join(folder, f), None) for f in files]


def view_tensor(photo: Photo, view: View, preprocessing: Preprocessing) -> np.ndarray:
    """``[1, 3, 224, 224]`` float32, NCHW. The centre view equals ``pretrained.imagenet_preprocess``."""
    from PIL import Image

    image = pretrained.resize_shorter_side(
        Image.open(photo.path).convert("RGB"), view.resize or preprocessing.resize
    )
    new_width, new_height = image.size
    left, top = round((new_width - CROP) * view.fx), round((new_height - CROP) * view.fy)
    image = image.crop((left, top, left + CROP, top + CROP))
    if view.flip:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    pixels = np.asarray(image, np.float32) / 255.0
    if preprocessing.norm == "imagenet":
        pixels = (pixels - pretrained.IMAGENET_MEAN) / pretrained.IMAGENET_STD
    elif preprocessing.norm == "half":
        pixels = (pixels - 0.5) / 0.5
    else:
        raise ValueError(f"unknown normalisation {preprocessing.norm!r}")
    return np.ascontiguousarray(pixels.transpose(2, 0, 1)[None], dtype=np.float32)


def views_of(photos: list[Photo], preprocessing: Preprocessing) -> np.ndarray:
    """All views of all photos, photo-major: ``[len(photos) * len(VIEWS), 1, 3, 224, 224]``."""
    return np.stack([view_tensor(p, v, preprocessing) for p in photos for v in VIEWS])


@dataclass(frozen=True)
class PhotoSet:
    """What the speed benchmarks evaluate and calibrate on: 120 views of 24 photos (foolbox's labelled 20 and
    skimage's evaluation photos), the labelled centre views, and the held-out calibration crops, also saved
    as ``.npy`` files in ``calibration_dir`` (what ``--calibration-samples`` reads)."""

    views: np.ndarray  # [views, 1, 3, 224, 224]
    labelled: list[tuple[int, int]]  # (view, label) of each labelled photo's centre view
    calibration: list[np.ndarray]
    calibration_dir: Path


def photo_set(preprocessing: Preprocessing, calibration_dir: Path) -> PhotoSet:
    photos = foolbox_photos() + skimage_photos(SKIMAGE_EVALUATION)
    views = views_of(photos, preprocessing)
    per_photo = len(views) // len(photos)
    labelled = [(i * per_photo, p.label) for i, p in enumerate(photos) if p.label is not None]
    calibration = list(views_of(skimage_photos(SKIMAGE_CALIBRATION), preprocessing))
    calibration_dir.mkdir(parents=True)
    for i, crop in enumerate(calibration):
        np.save(calibration_dir / f"{i:03d}.npy", crop)
    return PhotoSet(views, labelled, calibration, calibration_dir)
