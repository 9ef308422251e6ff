"""``densemtl compare``: seeds grouped as mean ± std, Delta-m against named baselines, mixed protocols refused."""

import json
from pathlib import Path

import numpy as np
import pytest

from densemtl.cli import main
from densemtl.config import to_dict
from densemtl.engine.compare import compare
from densemtl.engine.results import protocol_record
from densemtl.metrics.delta_m import delta_m
from tests.conftest import tiny_config

TASKS = ["semseg", "depth"]


def write_result(tmp_path: Path, name: str, results: dict, *overrides: str, split: str = "val") -> Path:
    """A result file as training or evaluate writes it: config, protocol, results."""
    config = tiny_config(tmp_path, f"data.tasks=[{','.join(results)}]", f"name={name.split('_s')[0]}", *overrides)
    payload = {"config": to_dict(config), "protocol": protocol_record(config, split, list(results)),
               "results": results, "cost": {"parameters": 1000, "gflops": 0.5}}
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(payload))
    return path


def figures(miou: float, rmse: float) -> dict:
    return {"semseg": {"mIoU": miou, "pixelAcc": 90.0}, "depth": {"rmse": rmse}}


def test_seeds_are_grouped_and_delta_m_is_against_the_baselines_mean(tmp_path, capsys):
    runs = [write_result(tmp_path, f"mtl_s{seed}", figures(miou, rmse), f"train.seed={seed}")
            for seed, miou, rmse in [(0, 40.0, 0.60), (1, 44.0, 0.70), (2, 42.0, 0.65)]]
    other = write_result(tmp_path, "mtl_s0_lr", figures(30.0, 0.9), "train.lr=0.1")  # another recipe
    baselines = [write_result(tmp_path, f"single_s{seed}", {"semseg": {"mIoU": m}}, "model.arch=single",
                              f"train.seed={seed}") for seed, m in [(0, 41.0), (1, 43.0)]]
    baselines.append(write_result(tmp_path, "depth_single", {"depth": {"rmse": 0.5}}, "model.arch=single"))
    result = compare(runs + [other], baselines)
    assert [len(row["seeds"]) for row in result.rows] == [3, 1]
    row = result.rows[0]
    assert row["seeds"] == [0, 1, 2]
    assert row["tasks"]["semseg"]["mean"] == pytest.approx(42.0)
    assert row["tasks"]["semseg"]["std"] == pytest.approx(np.std([40.0, 44.0, 42.0], ddof=1))
    reference = {"semseg": {"mIoU": 42.0}, "depth": {"rmse": 0.5}}
    per_seed = [delta_m(figures(m, r), reference) for m, r in [(40.0, 0.60), (44.0, 0.70), (42.0, 0.65)]]
    assert row["delta_m"]["mean"] == pytest.approx(np.mean(per_seed))
    assert row["delta_m"]["std"] == pytest.approx(np.std(per_seed, ddof=1))
    assert row["relative"]["depth"]["mean"] == pytest.approx(-100 * (0.65 - 0.5) / 0.5)
    assert result.rows[1]["delta_m"]["std"] == 0.0

    argv = ["compare", *map(str, runs), "--baselines", *map(str, baselines), "--out", str(tmp_path / "t.csv")]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "42.00 ± 2.00" in out and f"{np.mean(per_seed):.2f} ± {np.std(per_seed, ddof=1):.2f}" in out
    assert out.strip().endswith(f"comparison written to {tmp_path / 't.csv'}")
    header, first = (tmp_path / "t.csv").read_text().splitlines()
    assert header.startswith("run,seeds,semseg mIoU,depth rmse,params (M),GFLOPs,Δm (%)")
    assert first.startswith("mtl,3,42.00 ± 2.00,0.65 ± 0.05,0.001,0.500,")
    assert main(["compare", *map(str, runs), "--out", str(tmp_path / "t.json")]) == 0
    assert json.loads((tmp_path / "t.json").read_text())["rows"][0]["seeds"] == [0, 1, 2]


@pytest.mark.parametrize(
    "overrides, split, needle",
    [
        ((), "test", "split val vs test"),
        (("data.synthetic.height=40",), "val", "image_size [32, 48] vs [40, 48]"),
        (("eval.boundary_thresholds=7",), "val", "the edge metric settings differ (thresholds 5 vs 7)"),
    ],
)
def test_mixed_protocols_are_refused_in_one_line(tmp_path, capsys, overrides, split, needle):
    edge = {"edge": {"odsF": 50.0}}
    first = write_result(tmp_path, "a", edge, "eval.boundary_thresholds=5")
    second = write_result(tmp_path, "b", edge, "eval.boundary_thresholds=5", *overrides, split=split)
    assert main(["compare", str(first), str(second)]) == 2
    err = capsys.readouterr().err
    assert needle in err and str(first) in err and str(second) in err and len(err.strip().splitlines()) == 1


def test_missing_baseline_task_and_split_are_named(tmp_path, capsys):
    run = write_result(tmp_path, "mtl", figures(40.0, 0.6))
    baseline = write_result(tmp_path, "single", {"semseg": {"mIoU": 41.0}}, "model.arch=single")
    assert main(["compare", str(run), "--baselines", str(baseline)]) == 2
    err = capsys.readouterr().err
    assert "no baseline for task 'depth'" in err and "the baselines hold: semseg" in err
    assert main(["compare", str(run), "--split", "test"]) == 2
    assert "results on split 'val', not 'test'" in capsys.readouterr().err
    assert main(["compare", str(run), "--out", str(tmp_path / "t.txt")]) == 2
    assert "must end in .md, .csv, .json" in capsys.readouterr().err
    assert main(["compare", str(run), str(run)]) == 2
    assert "given twice" in capsys.readouterr().err


def test_a_run_directory_and_its_test_evaluation(tmp_path, capsys):
    """Train, evaluate on the test split (written beside the run), compare the run directory on that split."""
    config = tmp_path / "tiny.yaml"
    config.write_text(json.dumps(to_dict(tiny_config(tmp_path, "train.steps=2", "data.tasks=[semseg,depth]"))))
    run = tmp_path / "run"
    assert main(["train", str(config), "--out", str(run)]) == 0
    assert main(["compare", str(run), "--split", "test"]) == 2
    assert "results on split 'val', not 'test'" in capsys.readouterr().err  # results.json: validation
    assert main(["evaluate", "--checkpoint", str(run / "checkpoints" / "best.pt"), "--split", "test"]) == 0
    assert f"figures written to {run / 'evaluation_test.json'}" in capsys.readouterr().out
    assert main(["compare", str(run), "--split", "test"]) == 0
    out = capsys.readouterr().out
    assert "synthetic test split, 32x48" in out
    recorded = json.loads((run / "evaluation_test.json").read_text())
    assert recorded["protocol"]["split"] == "test" and recorded["cost"]["gflops"] > 0
    assert main(["compare", str(run)]) == 0  # results.json: the validation split, cost counted from the config
    assert "synthetic val split" in capsys.readouterr().out


def test_eval_baselines_make_training_and_evaluate_report_delta_m(tmp_path, capsys):
    """Baselines named in the config: evaluate records Delta-m as compare computes it; training prints it, and
    says why not when the baselines were recorded on another split."""
    semseg = write_result(tmp_path, "b_semseg", {"semseg": {"mIoU": 20.0}}, "model.arch=single")
    depth = write_result(tmp_path, "b_depth", {"depth": {"rmse": 1.5}}, "model.arch=single")
    config = tmp_path / "tiny.yaml"
    config.write_text(json.dumps(to_dict(tiny_config(tmp_path, "train.steps=2", "data.tasks=[semseg,depth]",
                                                     f"eval.baselines=[{semseg},{depth}]"))))
    run = tmp_path / "run"
    assert main(["train", str(config), "--out", str(run)]) == 0
    assert "Delta-m vs eval.baselines: " in capsys.readouterr().out
    assert main(["evaluate", "--checkpoint", str(run / "checkpoints" / "best.pt")]) == 0
    assert "Delta-m vs eval.baselines: " in capsys.readouterr().out
    written = json.loads((run / "evaluation_val.json").read_text())
    expected = delta_m(written["results"], {"semseg": {"mIoU": 20.0}, "depth": {"rmse": 1.5}})
    assert written["delta_m"]["delta_m"] == pytest.approx(expected)
    assert set(written["delta_m"]["baselines"]) == set(written["delta_m"]["relative"]) == {"semseg", "depth"}
    assert main(["evaluate", "--checkpoint", str(run / "checkpoints" / "best.pt"), "--split", "test"]) == 2
    assert "results on split 'val', not 'test'" in capsys.readouterr().err
    test_split = write_result(tmp_path, "b_test", {"semseg": {"mIoU": 20.0}}, split="test")
    assert main(["train", str(config), "--out", str(tmp_path / "run2"), f"eval.baselines=[{test_split}]"]) == 0
    printed = capsys.readouterr().out
    assert f"densemtl: Delta-m not reported: {test_split}: results on split 'test', not 'val'" in printed
