"""The CLI turns user errors into one line and exit code 2, never a traceback."""

import pytest

from densemtl.cli import build_parser, main


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    out = capsys.readouterr().out
    for command in ("train", "evaluate", "predict", "bench", "data"):
        assert command in out


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["train", "/nonexistent.yaml"], "/nonexistent.yaml"),
        (["train", "{config}", "train.lr=abc"], "train.lr"),
        (["train", "{config}", "data.tasks=[sky]"], "sky"),
        (["evaluate"], "--checkpoint"),
        (["evaluate", "--predictions", "somewhere"], "--dataset"),
    ],
)
def test_bad_input_exits_2_with_one_line(tmp_path, capsys, argv, needle):
    config = tmp_path / "c.yaml"
    config.write_text("train:\n  steps: 1\n")
    code = main([arg.format(config=config) for arg in argv])
    err = capsys.readouterr().err
    assert code == 2
    assert needle in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
