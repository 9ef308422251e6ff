"""The ``cuda`` marker: skipped with a reason without the GPUs a test needs, never skipped silently with them."""

from __future__ import annotations

import pytest

import tests.conftest as helpers

INNER = '''
import pytest

@pytest.mark.cuda
def test_one_gpu():
    pass

@pytest.mark.cuda
def test_gives_up():
    pytest.skip("driver too old")

@pytest.mark.cuda(gpus=2)
def test_two_gpus():
    pass

def test_plain():
    pytest.skip("not a GPU test")
'''


@pytest.mark.parametrize("gpus, outcomes", [
    (0, {"skipped": 4}),
    (1, {"passed": 1, "failed": 1, "skipped": 2}),  # the GPU test that skipped itself fails
    (2, {"passed": 2, "failed": 1, "skipped": 1}),
])
def test_cuda_tests_skip_only_without_their_gpus(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch,
                                                 gpus: int, outcomes: dict[str, int]) -> None:
    monkeypatch.setattr(helpers, "gpus_available", lambda: gpus)
    pytester.makeconftest("from tests.conftest import pytest_collection_modifyitems, pytest_runtest_makereport\n")
    pytester.makeini("[pytest]\nmarkers =\n    cuda: test\n")
    pytester.makepyfile(INNER)
    result = pytester.runpytest("-rs")
    result.assert_outcomes(**outcomes)
    if gpus == 0:
        result.stdout.fnmatch_lines(["*needs 1 CUDA GPU(s), this machine has 0*", "*needs 2 CUDA GPU(s)*"])
    if gpus == 1:
        result.stdout.fnmatch_lines(["*a cuda test was skipped on a machine with 1 GPU(s)*driver too old*"])
