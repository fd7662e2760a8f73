"""The lean training loop for transcoder adapters: ``python -m training.train`` (see README.md here).

Modules, in the order the loop uses them: ``config`` (the run configuration), ``data`` (records to
token ids and loss masks, resumable batches), ``forward_utils`` (layer-by-layer and mixed forwards),
``losses`` (the bridging objective), ``checkpoint`` (atomic, exactly resumable checkpoints),
``evaluate`` (validation metrics and sample generations), ``train`` (the loop). ``make_tiny_pair``
made the embedded tiny base/reference pair in ``assets/tiny``.
"""
