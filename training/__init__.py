"""The lean training loop for transcoder adapters: ``python -m training.train`` (see README.md here).

Modules, in the order the loop uses them: ``config`` (the run configuration), ``data`` (records to
token ids and loss masks, resumable batches), ``forward_utils`` (layer-by-layer and mixed forwards),
``losses`` (the bridging objective), ``checkpoint`` (atomic, exactly resumable checkpoints),
``evaluate`` (validation metrics and sample generations), ``train`` (the loop). ``make_tiny_pair``
made the embedded tiny base/reference pair in ``assets/tiny``. ``activations`` (packed text, hooked
MLP activations, a shuffling buffer and an on-disk cache) is the data side of the coming loop that
trains transcoders from a model's activations.
"""

import importlib.util as _util

# the packages of the [train] extra that the loop imports unconditionally: say which extra is missing
# instead of failing later with a bare "No module named 'yaml'"
_missing = [name for name in ("yaml", "transformers", "tqdm") if _util.find_spec(name) is None]
if _missing:
    raise ImportError(
        f"the training loop needs {', '.join(_missing)} (the [train] extra): pip install 'tckernels[train]'"
    )
