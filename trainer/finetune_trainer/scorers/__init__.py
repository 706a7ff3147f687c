"""The built-in scorers: offline-safe `evaluate` modules (the library's "metrics"), one folder each.

`scoring.load_scorer(name)` loads `<name>/<name>.py` by path, so no Hub download is needed.
evaluate copies only that one script into its module cache, so the scripts import their shared
code (`common.py`, `scoring.perplexity`) absolutely, from the installed package. The
names, directions and tasks of the scores are the contract's, in `finetune_api.metrics`.
"""
