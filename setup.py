"""Build script. Pure Python for now: metadata lives in pyproject.toml; native extensions
(csrc/) will be declared here."""

from setuptools import setup

setup()
