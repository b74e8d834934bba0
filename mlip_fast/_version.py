"""The package's version and licence, in a module that imports nothing: every layer may read them (run records,
checkpoints, model cards) without importing the package root, which names the models and the losses."""
__version__ = "0.1.0"
__license__ = "MIT"  # SPDX id; setup.py reads it from here, model cards name it
