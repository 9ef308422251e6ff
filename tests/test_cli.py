"""The CLI turns user errors into one line and exit code 2, never a traceback."""

import pytest
import yaml

from densemtl.cli import build_parser, main
from densemtl.config import to_dict
from tests.conftest import tiny_config


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
        (["train", "{config}", "data.dataset=nyud", "--out", "{tmp}/run"], "data.root"),
        (["train", "{config}", "model.arch=sharing", "data.tasks=[depth]", "--out", "{tmp}/run"], "sharing.base_task"),
        (["evaluate"], "--checkpoint"),
        (["evaluate", "--predictions", "somewhere"], "--dataset"),
        (["evaluate", "--predictions", "{tmp}", "--dataset", "nyud"], "--root"),
    ],
)
def test_bad_input_exits_2_with_one_line(tmp_path, capsys, argv, needle):
    config = tmp_path / "c.yaml"
    config.write_text("train:\n  steps: 1\n")
    code = main([arg.format(config=config, tmp=tmp_path) for arg in argv])
    err = capsys.readouterr().err
    assert code == 2
    assert needle in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_overrides_may_follow_options(tmp_path, monkeypatch):
    seen = {}

    def fake_training(config, resume, overwrite):
        seen.update(lr=config.train.lr, out=config.out_dir, resume=resume)

    monkeypatch.setattr("densemtl.engine.run.run_training", fake_training)
    config = tmp_path / "c.yaml"
    config.write_text("train:\n  steps: 1\n")
    assert main(["train", str(config), "--out", str(tmp_path / "run"), "train.lr=0.25", "--resume"]) == 0
    assert seen == {"lr": 0.25, "out": str(tmp_path / "run"), "resume": True}


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["data", "check", "{tmp}", "stray"], "unrecognized arguments: stray"),
        (["data", "check", "{tmp}", "data.root=x"], "'data check' reads no key=value settings: data.root=x"),
        (["evaluate", "--predictions", "{tmp}", "--dataset", "synthetic", "eval.edge_protocol=invpt"],
         "evaluate --predictions reads key=value settings only with --data: eval.edge_protocol=invpt"),
        (["predict", "--checkpoint", "c.pt", "{tmp}", "{tmp}", "--out", "{tmp}/o", "--video"],
         "predict --video takes one folder of frames, got 2"),
        (["bench", "{config}", "stray"], "override 'stray': expected key=value"),
    ],
)
def test_stray_arguments_are_named(tmp_path, capsys, argv, needle):
    config = tmp_path / "c.yaml"
    config.write_text("train:\n  steps: 1\n")
    try:
        code = main([arg.format(config=config, tmp=tmp_path) for arg in argv])
    except SystemExit as exit_:
        code = exit_.code
    assert code == 2 and needle in capsys.readouterr().err


def test_unknown_option_is_refused(capsys):
    with pytest.raises(SystemExit) as info:
        main(["train", "c.yaml", "--fast"])
    assert info.value.code == 2 and "--fast" in capsys.readouterr().err


def test_train_writes_into_a_folder_of_other_files_only_with_overwrite(tmp_path, capsys):
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(to_dict(tiny_config(tmp_path, "train.steps=1"))))
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "results.json").write_text("my figures")
    (folder / "notes.txt").write_text("my notes")
    assert main(["train", str(config), "--out", str(folder)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"densemtl: error: {folder}: not empty and not a densemtl run (2 entries: notes.txt, ")
    assert "--overwrite" in err and len(err.splitlines()) == 1
    assert sorted(path.name for path in folder.iterdir()) == ["notes.txt", "results.json"]
    assert (folder / "results.json").read_text() == "my figures"
    (tmp_path / "empty").mkdir()
    assert main(["train", str(config), "--out", str(tmp_path / "empty")]) == 0
    assert main(["train", str(config), "--out", str(tmp_path / "empty")]) == 0  # a run: started afresh
    assert main(["train", str(config), "--out", str(folder), "--overwrite"]) == 0
    assert (folder / "notes.txt").read_text() == "my notes" and (folder / "checkpoints" / "last.pt").is_file()
    assert main(["train", str(config), "--out", str(config)]) == 2
    assert "is a file" in capsys.readouterr().err
