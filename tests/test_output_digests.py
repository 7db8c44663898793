"""Every writer's output for fixed inputs and seeds is bit-identical to the recorded digests
(tests/output_digests.json, recorded with `python tests/output_digests.py record` before the
package was restructured). The cases run in one fresh process with MKL_CBWR set (see
output_digests.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent
RECORDED = json.loads((HERE / "output_digests.json").read_text())


@pytest.fixture(scope="module")
def current() -> dict:
    result = subprocess.run(
        [sys.executable, str(HERE / "output_digests.py"), "print"], capture_output=True, text=True, check=True
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", sorted(RECORDED))
def test_output_matches_recorded_digest(case, current):
    assert current[case] == RECORDED[case]
