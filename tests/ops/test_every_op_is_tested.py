"""``pytest -k <op>`` finds tests of every public op in each cross-cutting test module, so a new
op cannot land without its error, gradient and opcheck/compile tests (the per-op modules,
tests/ops/test_<op>.py, match by their file name)."""
import os
import subprocess
import sys

import pytest

import tckernels

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CROSS_CUTTING = ["tests/ops/test_errors.py", "tests/ops/test_gradcheck.py", "tests/ops/test_opcheck_compile.py",
                 "tests/ops/test_autocast.py"]


@pytest.fixture(scope="module")
def collected():
    """The node ids of the cross-cutting modules, as ``pytest --collect-only`` lists them."""
    proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                           *CROSS_CUTTING], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [line for line in proc.stdout.splitlines() if "::" in line]


@pytest.mark.parametrize("module", CROSS_CUTTING, ids=os.path.basename)
@pytest.mark.parametrize("op", tckernels.ops.__all__)
def test_op_is_tested_in(op, module, collected):
    # -k matches a substring of a test's name, its parameter ids or its module: here, of the node id
    assert any(nodeid.startswith(module + "::") and op in nodeid for nodeid in collected), (
        f"{module} has no test whose name or parameter id contains {op!r}"
    )
