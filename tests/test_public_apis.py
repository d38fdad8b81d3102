"""The library relies on public APIs of numpy, plum and fastai only; where it reads a format numpy has no public
reader for (`.npy` version 3.0 headers), it parses it as numpy specifies, and these tests pin the behaviour."""
import ast, mmap
from pathlib import Path
import numpy as np, pytest

from fastai_memmap.convert import from_npy, from_arrays, _read_header
from fastai_memmap.store import MemmapStore

ROOT = Path(__file__).resolve().parent.parent

@pytest.mark.parametrize('version', [(1, 0), (2, 0), (3, 0)])
def test_npy_headers_of_every_version_convert(tmp_path, version):
    X = np.arange(60, dtype=np.float32).reshape(10, 2, 3)
    with open(tmp_path/'x.npy', 'wb') as f: np.lib.format.write_array(f, X, version=version)
    s = from_npy(tmp_path/'x.npy', tmp_path/'x.fmm', progress=False)
    np.testing.assert_array_equal(s[:], X)

def test_version_3_header_with_utf8_field_names_is_read():
    import io
    b = io.BytesIO()
    np.lib.format.write_array(b, np.zeros(4, dtype=[('größe', '<f4')]), version=(3, 0))
    b.seek(0)
    assert _read_header(b) == ((4,), False, np.dtype([('größe', '<f4')]))

def test_memmap_input_is_read_through_a_map_of_our_own(tmp_path):
    "A read-only np.memmap given as input converts exactly, chunk by chunk, without numpy's private `_mmap`"
    X = np.random.default_rng(0).normal(size=(1000, 16)).astype(np.float32)
    np.save(tmp_path/'x.npy', X)
    m = np.load(tmp_path/'x.npy', mmap_mode='r')
    s = from_arrays(m, tmp_path/'m.fmm', chunk=37, progress=False)
    np.testing.assert_array_equal(s[:], X)
    w = np.load(tmp_path/'x.npy', mmap_mode='r+'); w[3] = 7   # a shared writable map: its unflushed change is seen too
    s = from_arrays(w, tmp_path/'w.fmm', chunk=100, progress=False)
    assert (s[3] == 7).all() and np.array_equal(s[4], X[4])

def test_no_private_attributes_of_numpy_or_plum_in_the_library():
    src = '\n'.join(p.read_text() for p in (ROOT/'fastai_memmap').glob('*.py') if p.name != '_modidx.py')
    for bad in ('._mmap', '_read_array_header', '_resolve_method_with_cache', '_DataLoader__idxs', '_loaders', '._reset('):
        assert bad not in src, bad
