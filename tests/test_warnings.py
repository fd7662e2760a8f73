"""The suite's warning policy (pyproject.toml): a FutureWarning or DeprecationWarning raised at a
line of the project's own code is an error; one raised elsewhere is not."""
import warnings

import pytest


def _warn_from(module_name: str, category):
    code = compile("import warnings\nwarnings.warn('old API', category)\n", f"<{module_name}>", "exec")
    exec(code, {"__name__": module_name, "category": category})


@pytest.mark.parametrize("module", ["tckernels.models.adapter", "training.train"])
@pytest.mark.parametrize("category", [FutureWarning, DeprecationWarning])
def test_own_deprecations_fail(module, category):
    with pytest.raises(category, match="old API"):
        _warn_from(module, category)


def test_other_modules_only_warn():
    with warnings.catch_warnings(record=True) as caught:
        _warn_from("somebody_else", FutureWarning)
    assert [str(w.message) for w in caught] == ["old API"]
