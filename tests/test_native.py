"""import tckernels without its native extension: one warning that says what to do, and the
reference backend serves every op."""
import subprocess
import sys
import textwrap


def test_missing_extension_falls_back_with_one_warning():
    code = textwrap.dedent(
        """
        import sys, warnings
        sys.modules["tckernels._C"] = None  # makes `from tckernels import _C` fail
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import torch, tckernels
            v, i = tckernels.encode_topk(torch.randn(4, 8), torch.randn(16, 8), None, 3)
            y = tckernels.sparse_decode(v, i, torch.randn(16, 8))
        msgs = [str(w.message) for w in caught if "tckernels._C" in str(w.message)]
        assert len(msgs) == 1, msgs
        assert "pip install" in msgs[0] and "reference backend" in msgs[0]
        assert "cpu" not in tckernels.available_backends("cpu")
        from tckernels import _backend
        assert _backend.resolve(None, "cpu") == "reference"
        assert y.shape == (4, 8)
        print("ok")
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("ok")


def test_the_advice_names_a_shadowing_source_tree(tmp_path):
    from tckernels._native import advice

    checkout = tmp_path / "checkout"
    (checkout / "tckernels").mkdir(parents=True)
    (checkout / "csrc").mkdir()
    (checkout / "pyproject.toml").write_text("")
    installed = tmp_path / "site-packages" / "tckernels"
    installed.mkdir(parents=True)

    shadowed = advice(checkout / "tckernels", installed)
    assert f"from the source tree {(checkout / 'tckernels').resolve()}, which shadows the installed copy" in shadowed
    assert str(installed) in shadowed and "Run from another directory" in shadowed

    unbuilt = advice(checkout / "tckernels", None)
    assert f"`pip install -e {checkout.resolve()}` builds it there" in unbuilt and "TCK_CUDA=0" in unbuilt

    broken_install = advice(installed, None)
    assert "Reinstall with `pip install -v tckernels`" in broken_install
