"""Source-tree shim: makes ``mlip_fast.kernels`` resolve to the top-level ``kernels/`` folder.

Installed wheels map ``kernels/`` to ``mlip_fast.kernels`` through setuptools' ``package_dir`` and do not
ship this file. ``kernels/`` itself must never get an ``__init__.py`` (transformers would import it as
Hugging Face's ``kernels`` package).
"""
import os

__path__ = [os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "kernels")]
