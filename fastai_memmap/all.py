"Everything a user needs: `from fastai_memmap.all import *`"
from fastai_memmap.errors import *
from fastai_memmap.store import *
from fastai_memmap.write import *
from fastai_memmap.data import *
from fastai_memmap.show import *
from fastai_memmap.subsets import *
from fastai_memmap.sparse import *
from fastai_memmap.convert import *
from fastai_memmap.remote import *
from fastai_memmap.dask_io import *
from fastai_memmap.distrib import *
from fastai_memmap.resume import *
