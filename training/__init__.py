"""The lean training loop for transcoder adapters (``python -m training.train``) lives here; see
README.md for its status."""
