"""Package layout: the top-level folders ``codegen/`` and ``patterns/`` install as
``attndsl.codegen`` and ``attndsl.patterns``, so ``pip install`` adds one top-level name."""
from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["attndsl", "attndsl.*"]) + ["attndsl.codegen", "attndsl.patterns"],
    package_dir={"attndsl.codegen": "codegen", "attndsl.patterns": "patterns"},
    package_data={"attndsl": ["py.typed", "tuned/*.json", "tuned/README.md"]},
)
