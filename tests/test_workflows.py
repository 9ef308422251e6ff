"""docs/workflows.md: every ``densemtl`` line of its ``sh`` blocks runs, in order, with the exit code it states.

The commands run in this process (``densemtl.cli.main``) from a folder holding a copy of ``configs/``, with
tiny sizes added to each command that builds a config, and shell globs expanded as a shell would.
"""

from __future__ import annotations

import glob
import re
import shlex
import shutil
from pathlib import Path

from densemtl.cli import main
from tests.conftest import REPO

DOCUMENT = REPO / "docs" / "workflows.md"
EXIT = re.compile(r"#\s*exit (\d+)")


def document_commands() -> list[tuple[list[str], int]]:
    """``(argv, expected exit code)`` of each ``densemtl`` line in the document's ``sh`` blocks."""
    blocks = re.findall(r"```sh\n(.*?)```", DOCUMENT.read_text(), flags=re.S)
    commands = []
    for line in (line for block in blocks for line in block.splitlines()):
        if line.startswith("densemtl "):
            command, _, comment = line.partition("#")
            expected = EXIT.search("#" + comment)
            commands.append((shlex.split(command)[1:], int(expected.group(1)) if expected else 0))
    return commands


def tiny(argv: list[str], cache: Path) -> list[str]:
    """``argv`` at test size: small scenes, two steps, few repeats (only for commands that build a config)."""
    sizes = ["data.synthetic.height=32", "data.synthetic.width=48", "data.synthetic.num_train=8",
             "data.synthetic.num_val=4", "data.synthetic.num_test=4", "data.synthetic.num_clips=1",
             "data.synthetic.clip_length=3", f"data.synthetic.cache_dir={cache}", "data.batch_size=4",
             "train.steps=2", "train.warmup_steps=1", "sharing.phase_steps=[2,2,1,1]",
             "model.neck_channels=16", "model.head_channels=16"]
    if argv[0] == "train" or argv[:2] == ["data", "synth"] or (argv[0] == "bench" and "--checkpoint" not in argv):
        return argv + sizes + (["--repeats", "1"] if argv[0] == "bench" else [])
    return argv + (["--repeats", "1", "--images", "2"] if argv[0] == "bench" else [])


def expand(argv: list[str]) -> list[str]:
    return [match for item in argv for match in (sorted(glob.glob(item)) if "*" in item else [item])]


def test_every_command_of_the_workflows_document_runs(tmp_path, monkeypatch, capsys):
    shutil.copytree(REPO / "configs", tmp_path / "configs")
    monkeypatch.chdir(tmp_path)
    commands = document_commands()
    assert len(commands) > 25
    for argv, expected in commands:
        capsys.readouterr()
        code = main(tiny(expand(argv), tmp_path / "cache"))
        output = capsys.readouterr()
        assert code == expected, (argv, output.err[-2000:])
        if expected == 2:
            assert len(output.err.strip().splitlines()) == 1, (argv, output.err)
    table = (tmp_path / "runs" / "table.md").read_text()
    assert "synthetic test split, 32x48" in table and "| synthetic | 3 |" in table and "Δm (%)" in table
    assert "Δm (%)" in (tmp_path / "runs" / "table_val.csv").read_text().splitlines()[0]
    assert (tmp_path / "runs" / "video" / "sharing" / "video.gif").is_file()
