"""Modules:

- `fastai_memmap.format`: The on-disk layout of a fastai_memmap store, specified here and implemented below: manifest, shards, validation."""

from importlib.metadata import PackageNotFoundError, version as _version

try: __version__ = _version('fastai_memmap')
except PackageNotFoundError: __version__ = 'unknown'
