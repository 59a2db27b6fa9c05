"""Reliability harness: ``python -m tests.reliability`` (a command, not a test; writes docs/reliability.md).

corpus.py builds the bad-input corpus; __main__.py drives it through the CLI, the live app's API, the
web page (headless Chromium) and the edge runner; soak.py (when present) adds load and soak figures.
"""
