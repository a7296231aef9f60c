"""Property tests: random config overrides and malformed data files given to the CLI.

Whatever is given, the CLI either trains (exit 0) or exits non-zero with a one-line documented error
that names the offending input; it never lets a raw exception escape.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from equimodal.cli import main

BASE = ["--set", "train.epochs=1", "--set", "train.progress=false", "--set", "train.probe=false",
        "--set", "data.options.views=fac,mor"]  # fmt: skip
KEYS = [
    "train.epochs", "train.seed", "train.grad_accum", "train.on_nonfinite", "train.checkpoint_every",
    "optim.lr", "optim.name", "optim.momentum", "optim.schedule", "optim.step_size", "data.batch_size",
    "balancer.name", "model.fusion", "balancer.options.alpha", "train.nope", "optim",
    "data.options.views",
]  # fmt: skip
VALUES = st.one_of(
    st.integers(-3, 300).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(str),
    st.sampled_from(
        ["", "none", "true", "[1, 2]", "{a: 1}", "sgd", "amss", "cosine", "skip", "abc", "fac,zzz", "1e-3"]
    ),
    st.text(alphabet="abc:{}[],=- ", max_size=6),
)


def _run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main(args)
    captured = capsys.readouterr()
    return code, " ".join((captured.out + captured.err).split())


@settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(key=st.sampled_from(KEYS), value=VALUES)
def test_random_overrides_train_or_fail_naming_the_key(key: str, value: str, capsys) -> None:
    code, text = _run(["train", *BASE, "--set", f"{key}={value}"], capsys)
    if code == 0:
        return
    assert code in (2, 3), text  # 2: bad input, 3: the values trained into a non-finite loss (documented)
    assert "Traceback" not in text
    if code == 3:  # the run started (its folder announced first), then stopped with one error line
        assert text.count("error:") == 1 and "error: Non-finite values at epoch" in text
        return
    assert text.startswith("error:")
    named = key.split(".")[-1] in text or key in text or str(value).strip() in text
    assert named, f"the error does not name {key}={value!r}: {text}"


@settings(
    max_examples=25,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(content=st.binary(max_size=200), dataset=st.sampled_from(["custom_csv", "custom_npz", "manifest"]))
def test_malformed_data_files_are_named(tmp_path: Path, content: bytes, dataset: str, capsys) -> None:
    path = tmp_path / ("data.npz" if dataset == "custom_npz" else "data.csv")
    path.write_bytes(content)
    code, text = _run(
        ["train", *BASE[:6], "--set", f"data.name={dataset}", "--set", f"data.options.path={path}"], capsys
    )
    assert code == 2, text
    assert text.startswith("error:") and "Traceback" not in text
    assert path.name in text, text
