"""A pytest plugin that counts the distinct Triton kernel specialisations a test run launches.

    TRITON_INTERPRET=1 TCK_KIT_SPECS=specs.json python -m pytest -p scripts.kit_specs tests/...

Under Triton's interpreter nothing is compiled, but every launch still names its kernel, its
constexpr values, its launch options and its arguments. On a GPU each distinct combination of those
that Triton keys its cache on (the kernel, the constexprs and options, the argument dtypes, and for
integers and pointers whether they are divisible by 16 or equal to 1) is one compilation; this
plugin writes how many there are per kernel, which is what the GPU kit's time plan multiplies by
the measured compile time of one specialisation.
"""
from __future__ import annotations

import inspect
import json
import os

_SEEN: set = set()


def _arg_key(value):
    if hasattr(value, "dtype") and hasattr(value, "data_ptr"):
        return ("tensor", str(value.dtype), value.data_ptr() % 16 == 0)
    if isinstance(value, bool):
        return ("bool", value)
    if isinstance(value, int):
        return ("int", value % 16 == 0, value == 1)
    if isinstance(value, float):
        return ("float",)
    return ("other", type(value).__name__, repr(value)[:80])


def _install():
    from triton.runtime.interpreter import InterpretedFunction

    original = InterpretedFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        params = list(inspect.signature(self.fn).parameters.values())
        key = [self.fn.__name__]
        for p, value in zip(params, args):
            const = "constexpr" in str(p.annotation)
            key.append((p.name, repr(value) if const else _arg_key(value)))
        for name in sorted(kwargs):
            v = kwargs[name]
            key.append((name, repr(v) if not hasattr(v, "data_ptr") else _arg_key(v)))
        _SEEN.add(tuple(key))
        return original(self, *args, grid=grid, warmup=warmup, **kwargs)

    InterpretedFunction.run = run


def pytest_configure(config):
    if os.environ.get("TRITON_INTERPRET") == "1":
        _install()


def pytest_sessionfinish(session, exitstatus):
    path = os.environ.get("TCK_KIT_SPECS")
    if not path:
        return
    per_kernel: dict = {}
    for key in _SEEN:
        per_kernel[key[0]] = per_kernel.get(key[0], 0) + 1
    with open(path, "w") as f:
        json.dump({"specialisations": len(_SEEN), "per_kernel": per_kernel,
                   "tests": session.testscollected}, f, indent=1)
