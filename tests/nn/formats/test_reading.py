"""The shared readers: torch_load runs no code from a file unless trusted; read_safetensors names the
file and the key in every error."""
import pytest
import torch
from safetensors.torch import save_file

from tckernels.nn.formats import FormatError, MissingKeyError, PickledObject, torch_load
from tckernels.nn.formats.reading import read_safetensors, safetensors_keys
from tests.nn.formats import SIDE_EFFECTS, Evil, truncate


def test_torch_load_trust_pickle_opt_in(tmp_path):
    p = tmp_path / "evil.pt"
    torch.save({"w": torch.ones(2), "payload": Evil()}, p)
    SIDE_EFFECTS.clear()
    out = torch_load(p)
    assert SIDE_EFFECTS == [] and isinstance(out["payload"], PickledObject)
    out = torch_load(p, trust_pickle=True)
    assert SIDE_EFFECTS == [("ran code from the checkpoint",)]


def test_read_safetensors_all_or_some_keys(tmp_path):
    p = tmp_path / "w.safetensors"
    tensors = {"a": torch.arange(6.0).reshape(2, 3), "b": torch.ones(4, dtype=torch.bfloat16)}
    save_file(tensors, p)
    out = read_safetensors(p)
    assert sorted(out) == ["a", "b"] and all(torch.equal(out[k], tensors[k]) for k in tensors)
    assert out["b"].dtype == torch.bfloat16
    assert list(read_safetensors(p, ["b"])) == ["b"]
    assert sorted(safetensors_keys(p)) == ["a", "b"]


def test_read_safetensors_errors_name_file_and_key(tmp_path):
    p = tmp_path / "w.safetensors"
    save_file({"a": torch.zeros(1000), "b": torch.zeros(1000)}, p)
    with pytest.raises(MissingKeyError, match=r"w\.safetensors.*'c'.*file has keys: a, b"):
        read_safetensors(p, ["a", "c"])
    truncate(p, 0.9)  # the header is intact, the last tensor's bytes are not
    with pytest.raises(FormatError, match=r"w\.safetensors.*truncated or corrupt") as e:
        read_safetensors(p)
    assert e.value.path == str(p)
    with pytest.raises(FileNotFoundError):
        read_safetensors(tmp_path / "nope.safetensors")
