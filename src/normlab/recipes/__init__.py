"""Recipes: small applications built on the library, outside it.

- :mod:`normlab.recipes.ddp`: data-parallel training of a digits CNN with SyncBatchNorm
  (``normlab train``; ``python -m normlab.train``; ``torchrun … -m normlab.train``).

A recipe may use every part of normlab; nothing in the library imports a recipe, and no
recipe imports :mod:`normlab.cli` (the command line wraps recipes, not the other way).
"""
