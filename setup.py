"""Build script: the package itself is pure Python; C++/CUDA extensions are added here.

torch must already be installed (``pip install --no-build-isolation -e .``).
"""
from setuptools import setup

setup()
