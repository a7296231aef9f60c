"""UMT: Uni-Modal Teacher (Du et al., "On Uni-Modal Feature Learning in Supervised Multi-Modal Learning",
ICML 2023): the fused CE plus a feature distillation from frozen unimodal teachers."""

from __future__ import annotations

import copy
import logging
import os
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..types import MultimodalOutput, output_features
from ..utils.run_files import BEST
from .base import Balancer, Batch
from .registry import register_balancer

log = logging.getLogger(__name__)

Teacher = str | os.PathLike | nn.Module | Mapping[str, Tensor]


def _teacher_command(modality: str) -> str:
    """The command that trains modality ``modality``'s teacher."""
    return (
        f"equimodal train <same data and model options> --set balancer.name=unimodal "
        f"--set balancer.options.modality={modality} --out <folder>"
    )


def encoder_prefix(model: nn.Module, modality: str) -> str:
    """The ``state_dict`` prefix of ``model.encoders[modality]`` (``"encoders.audio."`` for equimodal's
    models), found by identity among the model's named modules, not by a name rule."""
    target = model.encoders[modality]
    for name, module in model.named_modules():
        if module is target:
            return f"{name}." if name else ""
    raise ValueError(f"model.encoders[{modality!r}] is not a submodule of the model.")  # pragma: no cover


def read_teacher_folder(folder: Path, modality: str, prefix: str, seed: int | None) -> dict[str, Tensor]:
    """The weights of ``modality``'s encoder in a unimodal run folder's ``best.pt`` (read as data only).

    Raises:
        ValueError: no ``best.pt``, a file that is not an equimodal checkpoint, or a run that is not
            ``balancer.name=unimodal`` of ``modality`` (each message names the file, expected and found).
    """
    path = folder / BEST
    if not path.is_file():
        what = "no folder" if not folder.exists() else f"no {BEST} in it (the run has not finished an epoch)"
        raise ValueError(
            f"umt teacher of {modality!r}: expected a run folder written by a unimodal run, found {what} at "
            f"{str(folder)!r}. Train it with `{_teacher_command(modality)}`."
        )
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, OSError, EOFError) as err:
        raise ValueError(
            f"umt teacher of {modality!r}: {str(path)!r} cannot be read as an equimodal checkpoint (data only, "
            f"weights_only=True): {type(err).__name__}: {str(err)[:160]}."
        ) from None
    config = ckpt.get("config") if isinstance(ckpt, dict) else None
    if not isinstance(config, dict) or not isinstance(ckpt.get("model"), dict):
        raise ValueError(
            f"umt teacher of {modality!r}: {str(path)!r} is not an equimodal checkpoint (expected a mapping with "
            "'model' and 'config')."
        )
    balancer = config.get("balancer") or {}
    found = (balancer.get("name"), (balancer.get("options") or {}).get("modality"))
    if found != ("unimodal", modality):
        raise ValueError(
            f"umt teacher of {modality!r}: {str(path)!r} is not a unimodal run of {modality!r}: expected "
            f"balancer.name=unimodal with modality={modality!r}, found name={found[0]!r}, modality={found[1]!r}. "
            f"Train it with `{_teacher_command(modality)}`."
        )
    run_seed = (config.get("train") or {}).get("seed")
    if seed is not None and run_seed is not None and run_seed != seed:
        log.warning(
            "umt teacher of %r: %s was trained with seed %s, this run has seed %s",
            modality,
            path,
            run_seed,
            seed,
        )
    return {k[len(prefix) :]: v for k, v in ckpt["model"].items() if k.startswith(prefix)}


def teacher_encoder(student: nn.Module, weights: Mapping[str, Tensor], where: str) -> nn.Module:
    """A frozen copy of ``student`` (an encoder) holding ``weights``, in eval mode.

    Raises:
        ValueError: a missing or extra entry, or a shape that differs from the student's (naming ``where``,
            the entry, the expected and the found shape).
    """
    expected = student.state_dict()
    missing = sorted(set(expected) - set(weights))
    extra = sorted(set(weights) - set(expected))
    if missing or extra:
        raise ValueError(
            f"{where} does not hold the student's encoder: missing {missing[:5]}, unexpected {extra[:5]} "
            f"(expected the {len(expected)} entries of the student's encoder). Train the teacher with the same "
            "model options (encoders) as this run."
        )
    for key, value in expected.items():
        if tuple(weights[key].shape) != tuple(value.shape):
            raise ValueError(
                f"{where}: entry {key!r} has shape {tuple(weights[key].shape)}, expected {tuple(value.shape)} "
                "(the student's encoder). Train the teacher with the same model options as this run."
            )
    teacher = copy.deepcopy(student)
    teacher.load_state_dict({k: v.to(expected[k].dtype) for k, v in weights.items()})
    teacher.requires_grad_(False)
    return teacher.eval()


def feature_mse(student: Tensor, teacher: Tensor) -> Tensor:
    """The mean squared error over every element (``nn.MSELoss()``'s default ``reduction="mean"``)."""
    return F.mse_loss(student, teacher.to(student.dtype))


@register_balancer("umt")
class UMT(Balancer):
    """UMT (Du et al., ICML 2023): ``L = CE(fused, y) + scaling * sum_m MSE(z_m, t_m)``.

    ``z_m`` is the student's pooled feature of modality m (``out.features[m]``) and ``t_m`` the feature of a
    frozen teacher encoder, modality m's encoder from a separately trained unimodal model, applied to the
    same input ``batch[m]`` without gradient. The distillation keeps each encoder learning the features it
    would learn alone (the paper's "uni-modal features"), which joint training leaves under-learned, while
    the fused CE learns the cross-modal ones.

    No official code is known; the formula follows BalanceBenchmark's ``balancemm/trainer/UMT_trainer.py``
    (``training_step``, lines 129-147: ``loss = CE(output) + scaling * MSE(teacher feature, student
    feature)`` summed over modalities, ``nn.MSELoss()`` with its default mean over all elements, active
    while ``modulation_starts <= epoch <= modulation_ends``; teachers loaded in ``__init__``, lines 38-53,
    from each modality's newest ``unimodalTrainer_<m>`` checkpoint) and ``configs/trainer_config.yaml``
    (``UMT: scaling 10, modulation_starts 0, modulation_ends 80``).

    Teachers: ``teachers`` maps every modality to a run folder of ``equimodal train`` with
    ``balancer.name=unimodal`` and ``balancer.options.modality=<m>`` (its ``best.pt``, read with
    ``weights_only=True``; the folder's run must be unimodal of that modality), or, in a loop of one's own,
    to a trained encoder (an ``nn.Module``) or its ``state_dict``. Each teacher is a deep copy of the
    student's encoder with the teacher's weights, frozen, in eval mode, moved with the student's device.

    Defaults: ``scaling=10`` (BalanceBenchmark's config; the paper's value was not verified here), the
    window: all epochs (the paper distils throughout; BalanceBenchmark's 0-80 covers its 30-epoch runs).

    Deviations from BalanceBenchmark, each an option: the teachers run in eval mode (BalanceBenchmark never
    calls ``eval()`` on them, so batch norm uses batch statistics and dropout stays on:
    ``teacher_mode="train"``); any number of modalities; teachers found by an explicit folder per modality
    (BalanceBenchmark takes the newest folder whose name matches); the teachers' checkpoints must be
    equimodal run folders (BalanceBenchmark's ``from models.avclassify_model import ...`` at line 24 does not
    import as released).

    Args:
        model: a contract model whose output carries ``features`` and whose ``features[m]`` is
            ``model.encoders[m](batch[m])`` (equimodal's models).
        teachers: ``{modality: run folder | nn.Module | state_dict}``, every modality; required.
        scaling: the distillation weight (lambda).
        teacher_mode: ``"eval"`` (frozen statistics) or ``"train"`` (BalanceBenchmark's teachers).
        start_epoch, end_epoch: the window; seed: only compared with the teacher runs' seed (a warning).
    """

    needs_batch: ClassVar[bool] = True
    unimodal_runs_option: ClassVar[str | None] = "teachers"

    def __init__(
        self,
        model: nn.Module,
        *,
        teachers: Mapping[str, Any] | None = None,
        scaling: float = 10.0,
        teacher_mode: Literal["eval", "train"] = "eval",
        **options: Any,
    ) -> None:
        super().__init__(model, **options)
        scaling = self.check_option("scaling", scaling, low=0)
        teacher_mode = self.check_option("teacher_mode", teacher_mode, choices=("eval", "train"))
        self.scaling, self.teacher_mode = float(scaling), teacher_mode
        self.teachers = nn.ModuleDict(self._build_teachers(teachers))

    def _build_teachers(self, teachers: Mapping[str, Any] | None) -> dict[str, nn.Module]:
        mods = self.modalities
        if not isinstance(teachers, Mapping) or set(teachers) != set(mods):
            found = (
                "none"
                if teachers is None
                else (sorted(teachers) if isinstance(teachers, Mapping) else teachers)
            )
            example = ", ".join(f"{m}: <folder of the unimodal run of {m}>" for m in mods)
            raise ValueError(
                f"Balancer 'umt' needs option 'teachers', a frozen unimodal teacher for every modality {mods}; "
                f"found {found!r}. Train one unimodal run per modality of the same data, model and seed "
                f"(`equimodal compare --balancers umt` trains them as its reference rows and sets this option itself; or "
                f"`{_teacher_command(mods[0])}`), then pass --set 'balancer.options.teachers={{{example}}}'."
            )
        built = {}
        for m in mods:
            student, spec = self.model.encoders[m], teachers[m]
            if isinstance(spec, nn.Module):
                weights, where = spec.state_dict(), f"the teacher module of {m!r}"
            elif isinstance(spec, Mapping):
                weights, where = dict(spec), f"the teacher state_dict of {m!r}"
            elif isinstance(spec, (str, os.PathLike)):
                folder = Path(spec).expanduser()
                prefix = encoder_prefix(self.model, m)
                weights = read_teacher_folder(folder, m, prefix, self.seed)
                where = f"umt teacher of {m!r}: {str(folder / BEST)!r} (entries under {prefix!r})"
            else:
                raise TypeError(
                    f"Balancer 'umt' option 'teachers[{m!r}]': expected a run folder, an nn.Module or a "
                    f"state_dict, found {type(spec).__name__}."
                )
            teacher = teacher_encoder(student, weights, where)
            ref = next(iter(student.parameters()), None)
            built[m] = teacher if ref is None else teacher.to(ref.device)
        return built

    def teacher_features(self, batch: Batch) -> dict[str, Tensor]:
        """Every teacher's feature of ``batch[m]``, without gradient (in the mode ``teacher_mode`` says)."""
        feats = {}
        with torch.no_grad():
            for m, teacher in self.teachers.items():
                x = batch[m]
                ref = next(iter(teacher.parameters()), None)
                if ref is not None and ref.device != x.device:
                    teacher.to(x.device)
                teacher.train(self.teacher_mode == "train")
                feats[m] = teacher(x)
        return feats

    def objective(self, out: MultimodalOutput, target: Tensor, batch: Batch | None) -> Tensor:
        """The fused CE plus ``scaling`` times the summed feature MSEs to the teachers."""
        features = output_features(out, "umt distils the encoder features")
        teach = self.teacher_features(batch or {})  # needs_batch: the base class checked batch is given
        mse = []
        for m in self.modalities:
            z, t = features[m], teach[m]
            if z.shape != t.shape:
                raise ValueError(
                    f"umt: the teacher of {m!r} gives features of shape {tuple(t.shape)}, the student "
                    f"{tuple(z.shape)}; umt expects features[{m!r}] = model.encoders[{m!r}](batch[{m!r}])."
                )
            mse.append(feature_mse(z, t))
        distill = torch.stack(mse)
        fused = F.cross_entropy(out.logits, target)
        self.record("mse", distill)
        self.record("fused_loss", fused)
        return fused + self.scaling * distill.sum()
