"""Packaging for mlip_fast.

``kernels/`` (Triton kernels) has no ``__init__.py`` on purpose: a top-level package named ``kernels`` is
imported by transformers as Hugging Face's ``kernels`` package. It ships as ``mlip_fast.kernels``.
The source-tree shim ``mlip_fast/kernels/__init__.py`` is not shipped, nor are the checkout's other packages
(``benchmarks/``, the apps in ``tools/``): only ``mlip_fast`` is included (``tests/test_packaging.py``).
"""
import re
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent
INIT = (HERE / "mlip_fast" / "_version.py").read_text()
VERSION = re.search(r'__version__ = "([^"]+)"', INIT).group(1)
LICENSE = re.search(r'__license__ = "([^"]+)"', INIT).group(1)  # an SPDX expression; LICENSE holds the text

# kernels/<op>/ folders are subpackages of mlip_fast.kernels (found under kernels/, mapped by package_dir)
KERNEL_PACKAGES = {f"mlip_fast.kernels.{name}" for name in find_packages(where="kernels")}
PACKAGES = sorted(set(find_packages(include=["mlip_fast", "mlip_fast.*"])) | {"mlip_fast.kernels"} | KERNEL_PACKAGES)

setup(
    name="mlip_fast",
    version=VERSION,
    description="MLIP (medical language-image pre-training with masked local representation learning) "
    "with fused Triton kernels",
    long_description=(HERE / "README.md").read_text() if (HERE / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    license=LICENSE,
    license_files=["LICENSE"],
    packages=PACKAGES,
    package_dir={"mlip_fast.kernels": "kernels"},
    package_data={
        "mlip_fast": ["py.typed"],  # PEP 561: the package ships its type hints
        "mlip_fast.models": ["model_configs/*.json"],
        "mlip_fast.preprocess": ["vocab/*.txt"],
        "mlip_fast.eval": ["prompts/*.json", "splits/*.json"],
        "mlip_fast.train": ["ds_configs/*.json"],
        "mlip_fast.kernels": ["*.h"],  # the C kernels' shared vector math
        "mlip_fast.kernels.patch_sentence_ot": ["*.c"],  # the CPU Sinkhorn kernel, built on first use
        "mlip_fast.kernels.varlen_attention": ["*.c"],  # the CPU attention kernel, built on first use
    },
    # The library and inference: a model, its preprocessing, the losses and ops (chunked on CPU), evaluation.
    install_requires=[
        "torch>=2.11,<2.14",
        "transformers>=5.17,<6",
        "huggingface_hub>=1.0,<3",  # already required by transformers; MLIP is a PyTorchModelHubMixin
        "numpy>=1.26",
        "pillow>=10",
        "tqdm>=4.66",
        "safetensors>=0.4",
        # ROC curves and AUC of every evaluation (the training app's validation included); 1.3 gives the +inf
        # first threshold the curves rely on
        "scikit-learn>=1.3",
    ],
    entry_points={"console_scripts": ["mlip-train = mlip_fast.train.launch:main"]},
    extras_require={
        "train": ["deepspeed>=0.18,<0.20"],  # the training app (deepspeed train.py / mlip-train)
        "shards": ["webdataset>=1.0,<2"],  # WebDataset tar shards (python -m mlip_fast.data.shards)
        "plots": ["matplotlib>=3.8"],  # the PNG plots of runs and evaluations (skipped, with a notice, without it)
        # the fused Triton kernels (CUDA builds of torch bring triton already); flash-attn / xformers attention
        "gpu": ["triton>=3.6,<3.10", "flash-attn>=2.6", "xformers>=0.0.28"],
        "dev": ["pytest>=8", "pytest-benchmark>=5"],
        # the peers the benchmarks compare with (the GPU ones need CUDA; each is skipped with a reason when absent)
        "bench": ["maxsim-cpu>=0.1", "late-interaction-kernels>=0.4", "flash-maxsim>=0.3"],
        "dicom": ["pydicom>=3.0"],
        "fast-jpeg": ["simplejpeg>=1.7"],
        # --report-to tensorboard / wandb (DeepSpeed's monitors; checked before a run starts)
        "tensorboard": ["tensorboard>=2.14"],
        "wandb": ["wandb>=0.16"],
        "all": ["deepspeed>=0.18,<0.20", "webdataset>=1.0,<2", "matplotlib>=3.8", "triton>=3.6,<3.10", "pydicom>=3.0",
                "simplejpeg>=1.7"],
    },
)
