"""Config coercion, overrides and errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from equimodal.engine.config import Config, config_from_dict, config_to_dict, list_presets, load_config


def test_defaults_round_trip() -> None:
    cfg = Config()
    assert config_from_dict(config_to_dict(cfg)) == cfg


def test_yaml_strings_are_coerced_by_field_type(tmp_path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lr: 1e-3\n  milestones: [10, 20]\ntrain:\n  epochs: '5'\n  amp: 'yes'\n")
    cfg = load_config(path)
    assert cfg.optim.lr == pytest.approx(1e-3) and isinstance(cfg.optim.lr, float)
    assert cfg.optim.milestones == (10, 20)
    assert cfg.train.epochs == 5 and cfg.train.amp is True


def test_overrides_set_nested_and_option_keys() -> None:
    cfg = load_config(
        None,
        ["optim.lr=0.5", "balancer.name=amss", "balancer.options.temperature=0.3", "optim.milestones=3,4"],
    )
    assert cfg.optim.lr == 0.5
    assert cfg.balancer.options == {"temperature": 0.3}
    assert cfg.optim.milestones == (3, 4)


def test_registered_names_and_options_are_checked_before_any_work() -> None:
    with pytest.raises(ValueError, match=r"Unknown balancer 'amsss'. Did you mean 'amss'"):
        load_config(None, ["balancer.name=amsss"])
    with pytest.raises(
        TypeError, match=r"Balancer 'amss' got unknown option\(s\) \['temprature'\].*'temperature'"
    ):
        load_config(None, ["balancer.name=amss", "balancer.options.temprature=0.5"])
    with pytest.raises(TypeError, match=r"Balancer 'amss' option 'temperature': expected a number"):
        load_config(None, ["balancer.name=amss", "balancer.options.temperature=hot"])
    with pytest.raises(ValueError, match=r"Unknown fusion 'concta'"):
        load_config(None, ["model.fusion=concta"])
    with pytest.raises(TypeError, match=r"Dataset 'mfeat' got unknown option\(s\) \['view'\]"):
        load_config(None, ["data.options.view=fac"])
    with pytest.raises(ValueError, match=r"Unknown encoder 'mpl'"):
        load_config(None, ["model.encoders={fac: {name: mpl}}"])
    assert (
        load_config("cremad").data.name == "cremad"
    )  # a preset may leave its data folder to the command line


def test_unknown_key_suggests_close_match() -> None:
    with pytest.raises(ValueError, match=r"Unknown key in optim 'lrr'.*Did you mean 'lr'"):
        load_config(None, ["optim.lrr=0.1"])
    with pytest.raises(ValueError, match="Unknown config key 'trian'.*'train'"):
        config_from_dict({"trian": {}})


def test_wrong_types_say_what_was_expected() -> None:
    with pytest.raises(TypeError, match=r"train.epochs: expected an integer, found the string 'many'"):
        load_config(None, ["train.epochs=many"])
    with pytest.raises(TypeError, match=r"train.epochs: expected an integer, found float 2.5"):
        load_config(None, ["train.epochs=2.5"])
    with pytest.raises(TypeError, match="train.amp: expected true or false"):
        load_config(None, ["train.amp=maybe"])
    with pytest.raises(TypeError, match="expected a mapping"):
        config_from_dict({"optim": 3})


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["optim.lr=1e308"], r"optim.lr: expected at most 1e\+30 \(float32 .*found 1e\+308"),
        (["optim.weight_decay=1e308"], r"optim.weight_decay: expected at most 1e\+30"),
        (
            ["optim.gamma=1e20", "optim.schedule=step", "optim.step_size=1", "train.epochs=3"],
            r"optim.gamma: .*optim.lr=0.05 times gamma\*\*2 \(the 2 decays of optim.schedule=step in 3 epochs\)",
        ),
        (
            ["balancer.name=gblending", "balancer.options.copy_lr=1e39"],
            r"balancer.options.copy_lr: expected a number of magnitude at most 1e\+30 .*found 1e\+39",
        ),
        (
            ["balancer.name=own_signal", "balancer.options.weight=1e308"],
            r"balancer.options.weight: expected a number of magnitude at most 1e\+30",
        ),
    ],
)
def test_float_options_beyond_float32_reach_are_refused_with_the_key(
    overrides: list[str], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        load_config(None, overrides)


def test_a_huge_learning_rate_exits_2_with_a_message(capsys: pytest.CaptureFixture[str]) -> None:
    from equimodal.cli import main

    assert main(["train", "--set", "optim.lr=1e308", "--set", "train.epochs=1"]) == 2
    err = capsys.readouterr().err
    assert "optim.lr: expected at most 1e+30" in " ".join(err.split())
    assert "Traceback" not in err
    assert (
        load_config(None, ["optim.gamma=2", "optim.schedule=step"]).optim.gamma == 2.0
    )  # a finite peak is fine


def test_bad_override_syntax_and_missing_config() -> None:
    with pytest.raises(ValueError, match="section.key=value"):
        load_config(None, ["optim.lr"])
    with pytest.raises(FileNotFoundError, match="neither a file nor a shipped preset"):
        load_config("no-such-preset")


def test_option_dicts_read_scientific_notation_as_numbers(tmp_path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("balancer:\n  name: ogm\n  options:\n    alpha: 1e-1\n    reference: mean\n")
    cfg = load_config(
        path,
        ["balancer.options.start_epoch=2E0", "model.fusion=attention", "model.fusion_options.d_model=64"],
    )
    assert cfg.balancer.options == {"alpha": 0.1, "reference": "mean", "start_epoch": 2.0}
    assert cfg.model.fusion_options == {"d_model": 64}
    with pytest.raises(TypeError, match="train.epochs: expected an integer, found the string 'inf'"):
        load_config(None, ["train.epochs=inf"])


def _needs_prepared_folder(preset: str) -> bool:
    from equimodal.data.registry import dataset_options

    return "root" in dataset_options(load_config(preset).data.name)


IN_PACKAGE = [p for p in list_presets() if not _needs_prepared_folder(p)]
ON_DISK = [p for p in list_presets() if _needs_prepared_folder(p)]


def test_every_on_disk_preset_has_a_tiny_variant_trained_by_its_dataset_tests() -> None:
    """Presets of the paper's datasets need a prepared folder: tests/prepare/ trains each one's -tiny variant."""
    tests = [p.read_text() for p in (Path(__file__).parent / "prepare").glob("test_*.py")]
    full = [p for p in ON_DISK if not p.endswith("-tiny")]
    assert sorted(full) == ["cremad", "kinetics_sounds", "nvgesture", "sarcasm", "twitter15"]
    for preset in full:
        assert f"{preset}-tiny" in ON_DISK, preset
        assert any(f'"{preset}' in t and '-tiny"' in t and '"train"' in t for t in tests), preset


def test_a_dataset_preset_lives_in_the_folder_of_its_dataset() -> None:
    from equimodal.data.registry import DATASETS
    from equimodal.engine.config import DATASET_DIR, PRESET_DIR, preset_files

    files = preset_files()
    assert set(files) == set(list_presets()) and {"amss_av", "cremad", "cremad-tiny"} <= set(files)
    for name, path in files.items():
        if path.parent == PRESET_DIR:
            continue
        assert path.parent.parent == DATASET_DIR, path
        loader = DATASETS.get(load_config(name).data.name)
        module = getattr(loader, "func", loader).__module__  # image-text datasets register a partial
        assert module.startswith(f"equimodal.data.{path.parent.name}."), (name, module)


def test_a_preset_name_used_twice_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from equimodal.engine import config

    for folder in ("configs", "data/one", "data/two"):
        (tmp_path / folder).mkdir(parents=True)
    (tmp_path / "configs" / "mine.yaml").write_text("train: {epochs: 2}\n")
    (tmp_path / "data" / "one" / "one-tiny.yaml").write_text("train: {epochs: 3}\n")
    monkeypatch.setattr(config, "PRESET_DIR", tmp_path / "configs")
    monkeypatch.setattr(config, "DATASET_DIR", tmp_path / "data")
    assert config.list_presets() == ["mine", "one-tiny"] and load_config("one-tiny").train.epochs == 3
    (tmp_path / "data" / "two" / "mine.yaml").write_text("train: {epochs: 4}\n")
    with pytest.raises(
        ValueError, match=r"Two presets are named 'mine': .*mine.yaml and .*mine.yaml\. Rename"
    ):
        config.list_presets()


@pytest.mark.parametrize("preset", IN_PACKAGE)
def test_every_shipped_preset_trains_one_epoch(preset: str) -> None:
    from equimodal.engine.trainer import train

    cfg = load_config(preset, ["train.epochs=1", "train.progress=false", "train.probe=false"])
    summary = train(cfg)
    assert summary["epochs"] == 1 and 0.0 <= summary["test"]["test_acc"] <= 1.0


def test_betas_drop_last_and_select_from_reach_the_run(tmp_path) -> None:
    from equimodal.engine.trainer import build_optimizer, train

    cfg = load_config(None, ["optim.name=adam", "optim.betas=[0.9, 0.99]"])
    assert build_optimizer(cfg, [torch.nn.Parameter(torch.zeros(1))]).defaults["betas"] == (0.9, 0.99)
    with pytest.raises(ValueError, match=r"optim.betas: expected no betas with optim.name=sgd"):
        load_config(None, ["optim.betas=[0.9, 0.99]"])
    with pytest.raises(ValueError, match=r"optim.betas: expected two numbers in \[0, 1\)"):
        load_config(None, ["optim.name=adam", "optim.betas=[0.9]"])
    with pytest.raises(
        ValueError, match=r"train.select_from: expected an epoch in 0..1 \(train.epochs is 2\)"
    ):
        load_config(None, ["train.epochs=2", "train.select_from=2"])
    fast = ["data.options.views=fac,mor", "train.probe=false", "train.progress=false", "train.epochs=3"]
    summary = train(load_config(None, [*fast, "train.select_from=2", "data.drop_last=true"]), tmp_path / "r")
    assert summary["selected_epoch"] == 2  # the only epoch it may select
    assert load_config("sarcasm").optim.betas == (0.9, 0.99) and load_config("cremad").data.drop_last
    assert load_config("nvgesture").train.select_from == 20
