"""The ``bgremoval`` command line (:mod:`tasks.cli.main`); ``main`` is the console script's entry point."""

from tasks.cli.main import main

__all__ = ["main"]
