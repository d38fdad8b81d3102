"Out-of-core n-dimensional array datasets for fastai. The version is defined once, in settings.ini."
from importlib.metadata import PackageNotFoundError, version as _version

try: __version__ = _version('fastai_memmap')
except PackageNotFoundError: __version__ = 'unknown'
