"""Model diffing with a trained adapter run: what ``python -m training.analyze RUN_DIR`` computes.

``run.py`` loads a run (its adapted model, the reference, the base and the held-out data);
``faithfulness.py``, ``features.py`` and ``hesitation.py`` each compute one part of the analysis and
return plain numbers (JSON-able dicts); ``report.py`` turns them into markdown and figures.
"""
