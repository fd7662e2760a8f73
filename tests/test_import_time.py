"""``import tckernels`` costs little on top of ``import torch``: no transformers (tckernels.models is
imported on first use, its Auto classes registered once transformers is imported) and no dynamo."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

PROBE = r"""
import json, sys, time
t0 = time.perf_counter()
import torch
t1 = time.perf_counter()
import tckernels
t2 = time.perf_counter()
loaded = [m for m in ("transformers", "tckernels.models", "torch._dynamo") if m in sys.modules]
print(json.dumps({"torch": t1 - t0, "tckernels": t2 - t1, "loaded": loaded}))
"""


def _probe(code: str = PROBE) -> dict:
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def runs():
    return [_probe() for _ in range(3)]


def test_import_tckernels_loads_neither_transformers_nor_dynamo(runs):
    assert all(r["loaded"] == [] for r in runs), runs


def test_import_tckernels_costs_little_next_to_torch(runs):
    # the best of three runs, against torch's own import measured in the same process: a busy
    # machine slows both alike
    extra = min(r["tckernels"] for r in runs)
    torch_s = min(r["torch"] for r in runs)
    assert extra <= max(0.5, 0.35 * torch_s), f"import tckernels took {extra:.2f} s after import torch ({torch_s:.2f} s)"


def test_auto_classes_are_registered_once_transformers_is_imported():
    code = r"""
import json, sys
import tckernels
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
print(json.dumps({"registered": "qwen2_transcoder" in CONFIG_MAPPING, "models": "tckernels.models" in sys.modules}))
"""
    assert _probe(code) == {"registered": True, "models": True}
    # transformers imported first, then tckernels: registered at once
    code_first = "import transformers\n" + code
    assert _probe(code_first) == {"registered": True, "models": True}


def test_models_reached_as_an_attribute():
    code = "import json, tckernels\nprint(json.dumps({'has': hasattr(tckernels.models, 'Qwen2ForCausalLMWithTranscoder')}))"
    assert _probe(code) == {"has": True}
