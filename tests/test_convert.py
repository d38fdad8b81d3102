"Converters: exact round trips on real files, constant memory on a large .npy, parallel reads once each, errors naming the source, the CLI."
import multiprocessing, os, subprocess, sys, time, zipfile
from collections import Counter
from pathlib import Path
import numpy as np, pandas as pd, pytest
import fastai_memmap.convert as convert
from fastai_memmap.convert import *
from fastai_memmap.errors import *
from fastai_memmap.store import MemmapStore
from fastai_memmap import cli

def _eq(a, b):
    assert a.dtype == b.dtype and a.shape == b.shape, (a.dtype, a.shape, b.dtype, b.shape)
    np.testing.assert_array_equal(a, b)

# --- .npy, .npz and arrays

@pytest.mark.parametrize('dtype', ['float32', 'float16', 'int64', 'uint8', 'bool', 'complex64', '>f8'])
def test_npy_round_trip(tmp_path, dtype):
    rng = np.random.default_rng(0)
    X = (rng.standard_normal((503, 3, 7)) * 100).astype(dtype)
    np.save(tmp_path/'x.npy', X)
    s = from_npy(tmp_path/'x.npy', tmp_path/'x.fmm', chunk=50, shard_size=5000, progress=False)   # many chunks, many shards
    assert s.n_shards > 1 and len(s) == 503
    _eq(s[:], X.astype(X.dtype.newbyteorder('=')))
    assert s.dtype == X.dtype.newbyteorder('=')   # stored in native byte order
    s.verify(progress=False)

def test_npy_fortran_order_and_scalars(tmp_path):
    X = np.asfortranarray(np.arange(60, dtype=np.int32).reshape(20, 3))
    np.save(tmp_path/'f.npy', X)
    _eq(from_npy(tmp_path/'f.npy', tmp_path/'f.fmm', chunk=7, progress=False)[:], np.ascontiguousarray(X))
    np.save(tmp_path/'v.npy', np.arange(10.))   # 1-D: scalar items
    s = from_npy(tmp_path/'v.npy', tmp_path/'v.fmm', progress=False)
    assert s.item_shape == () and s[3] == 3.0

def test_npy_concat_glob_list_and_source(tmp_path):
    X = np.arange(1000 * 4, dtype=np.float32).reshape(1000, 4)
    cuts = [0, 100, 550, 1000]
    for k in range(3): np.save(tmp_path/f'p{k}.npy', X[cuts[k]:cuts[k + 1]])
    s = from_npy(str(tmp_path/'p*.npy'), tmp_path/'g.fmm', source_col='src', chunk=64, progress=False,
                 meta={'y': np.arange(1000) % 5})
    _eq(s[:], X)
    assert s.meta_columns == ['src', 'y']
    assert [Path(f).name for f in s.column('src')[[0, 99, 100, 549, 550, 999]]] == ['p0.npy'] * 2 + ['p1.npy'] * 2 + ['p2.npy'] * 2
    _eq(s.column('y'), np.arange(1000) % 5)
    s2 = from_npy([tmp_path/'p2.npy', tmp_path/'p0.npy'], tmp_path/'l.fmm', progress=False)   # a list keeps its order
    _eq(s2[:], np.concatenate([X[550:], X[:100]]))
    np.save(tmp_path/'q.npy', np.zeros((5, 3), np.float32))
    with pytest.raises(IncompatibleDataError, match=r'q\.npy has item shape \(3,\)'): from_npy([tmp_path/'p0.npy', tmp_path/'q.npy'], tmp_path/'bad.fmm')
    np.save(tmp_path/'d.npy', np.zeros((5, 4), np.float64))
    with pytest.raises(IncompatibleDataError, match='dtype='): from_npy([tmp_path/'p0.npy', tmp_path/'d.npy'], tmp_path/'bad.fmm')
    s3 = from_npy([tmp_path/'p0.npy', tmp_path/'d.npy'], tmp_path/'d.fmm', dtype='float64', progress=False)
    _eq(s3[:100], X[:100].astype(np.float64))
    assert not (tmp_path/'bad.fmm').exists()

def test_npz_data_and_meta(tmp_path):
    rng = np.random.default_rng(1)
    X = rng.random((300, 2, 5)).astype(np.float32)
    y, names = rng.integers(0, 4, 300), np.array([f'n{i}' for i in range(300)])
    tag, rec = np.array([b'p', b'q', b'r'] * 100), np.zeros(300, [('a', 'i4'), ('b', 'f4')])   # bytes: decoded; records: left out
    np.savez_compressed(tmp_path/'a.npz', x=X[:200], y=y[:200], name=names[:200], classes=np.arange(4), onehot=np.eye(4)[y[:200]],
                        tag=tag[:200], rec=rec[:200])
    np.savez(tmp_path/'b.npz', x=X[200:], y=y[200:], name=names[200:], classes=np.arange(4), onehot=np.eye(4)[y[200:]],
             tag=tag[200:], rec=rec[200:])
    np.savez(tmp_path/'ab.npz', a=X, b=X)
    with pytest.raises(IncompatibleDataError, match='key='): from_npy(tmp_path/'ab.npz', tmp_path/'z.fmm')   # which one?
    with pytest.warns(UserWarning, match=r'a \(300, 2, 5\) float32 left out'):
        _eq(from_npy(tmp_path/'ab.npz', tmp_path/'ab.fmm', key='b', progress=False)[:], X)
    with pytest.warns(UserWarning, match='classes.*rec'):   # x, not onehot: 'x' is the conventional name
        s = from_npy([tmp_path/'a.npz', tmp_path/'b.npz'], tmp_path/'z.fmm', chunk=17, progress=False)
    _eq(s[:], X)
    assert s.meta_columns == ['y', 'name', 'tag']
    _eq(s.column('y'), y)
    assert s.column('tag').tolist() == ['p', 'q', 'r'] * 100
    assert s.column('name').tolist() == names.tolist()
    np.savez(tmp_path/'plain.npz', X)   # arr_0 only
    _eq(from_npy(tmp_path/'plain.npz', tmp_path/'p.fmm', progress=False)[:], X)
    np.save(tmp_path/'x.npy', X)
    with pytest.raises(IncompatibleDataError, match='either .npy files or .npz'): from_npy([tmp_path/'plain.npz', tmp_path/'x.npy'], tmp_path/'m.fmm')

def test_from_arrays(tmp_path):
    X = np.arange(24, dtype=np.int16).reshape(6, 2, 2)
    _eq(from_arrays(X, tmp_path/'a.fmm', progress=False)[:], X)
    with pytest.warns(UserWarning, match='vocab'):
        s = from_arrays({'data': X, 'label': list('abcabc'), 'vocab': ['a', 'b', 'c']}, tmp_path/'d.fmm', chunk=4, progress=False)
    assert s.meta['label'].tolist() == list('abcabc')
    np.save(tmp_path/'m.npy', X)
    _eq(from_arrays(np.load(tmp_path/'m.npy', mmap_mode='r'), tmp_path/'m.fmm', chunk=2, progress=False)[:], X)
    c = np.load(tmp_path/'m.npy', mmap_mode='c'); c[0] = -1   # a copy-on-write map: its pages must not be dropped
    _eq(from_arrays(c, tmp_path/'c.fmm', chunk=2, progress=False)[0], np.full((2, 2), -1, np.int16))
    assert (c[0] == -1).all()
    with pytest.raises(IncompatibleDataError, match='write_memmap'): from_arrays([X[0], X[1]], tmp_path/'l.fmm')
    with pytest.raises(MetadataError, match='6 items'): from_arrays(X, tmp_path/'e.fmm', meta={'y': [1, 2]})
    assert not (tmp_path/'e.fmm').exists()

def test_modes(tmp_path):
    X = np.arange(40, dtype=np.float32).reshape(10, 4)
    np.save(tmp_path/'x.npy', X)
    from_npy(tmp_path/'x.npy', tmp_path/'s.fmm', progress=False)
    with pytest.raises(StoreExistsError): from_npy(tmp_path/'x.npy', tmp_path/'s.fmm')
    _eq(from_npy(tmp_path/'x.npy', tmp_path/'s.fmm', mode='a', progress=False)[:], np.concatenate([X, X]))
    _eq(from_npy(tmp_path/'x.npy', tmp_path/'s.fmm', mode='w', progress=False)[:], X)
    with pytest.raises(IncompatibleDataError): from_arrays(np.zeros((3, 5), np.float32), tmp_path/'s.fmm', mode='a')
    from_arrays({'x': X, 'y': np.arange(10)}, tmp_path/'m.fmm', progress=False)
    with pytest.raises(MetadataError, match=r"columns \['y'\] but the append gives \[\]"): from_npy(tmp_path/'x.npy', tmp_path/'m.fmm', mode='a')
    assert len(MemmapStore(tmp_path/'s.fmm')) == 10 and len(MemmapStore(tmp_path/'m.fmm')) == 10   # failed appends change nothing

# --- constant memory

_RSS_SCRIPT = r'''
import re, sys, numpy as np
from fastai_memmap.convert import from_npy
def kib(key): return int(re.search(key + r':\s+(\d+)', open('/proc/self/status').read()).group(1))
with open('/proc/self/clear_refs', 'w') as f: f.write('5')   # reset the peak (VmHWM) to the current RSS
r0 = kib('VmRSS')
s = from_npy(sys.argv[1], sys.argv[2], progress=False)
print(r0, kib('VmHWM'), len(s))
'''

@pytest.mark.skipif(not os.path.exists('/proc/self/clear_refs'), reason='measures peak RSS through Linux /proc')
def test_npy_streams_in_constant_memory(tmp_path):
    n, d = 80_000, 1024   # 80,000 x 1,024 float32: 328 MB
    a = np.lib.format.open_memmap(tmp_path/'big.npy', 'w+', np.float32, (n, d))
    for lo in range(0, n, 10_000): a[lo:lo + 10_000] = np.arange(lo, lo + 10_000, dtype=np.float32)[:, None] + np.arange(d, dtype=np.float32) / d
    a.flush(); del a
    size = os.path.getsize(tmp_path/'big.npy')
    t = time.perf_counter()
    r = subprocess.run([sys.executable, '-c', _RSS_SCRIPT, str(tmp_path/'big.npy'), str(tmp_path/'big.fmm')], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    r0, r1, ln = map(int, r.stdout.split())
    grew = (r1 - r0) * 1024
    print(f"\n.npy of {size / 2**20:.0f} MiB converted in {time.perf_counter() - t:.1f}s; RSS {r0 / 1024:.0f} MiB after imports, peak "
          f"{r1 / 1024:.0f} MiB while converting (+{grew / 2**20:.0f} MiB)")
    assert ln == n and grew < 160 * 2**20 and grew < size / 2
    s, src = MemmapStore(tmp_path/'big.fmm'), np.load(tmp_path/'big.npy', mmap_mode='r')
    for lo in range(0, n, 20_000): np.testing.assert_array_equal(s[lo:lo + 20_000], src[lo:lo + 20_000])
    assert s.dtype == np.float32 and s.item_shape == (d,)

# --- folders of .npy

def _pets(root, shapes=((3, 4),)):
    rng, out = np.random.default_rng(2), {}
    for i in range(15):
        cls = ['cat', 'dog', 'eel'][i % 3]
        (root/cls).mkdir(parents=True, exist_ok=True)
        a = rng.integers(0, 1000, shapes[i % len(shapes)]).astype(np.int32)
        np.save(root/cls/f'{i:02d}.npy', a)
        out[f'{cls}/{i:02d}.npy'] = (a, cls)
    return out

def test_folder_labels_from_folders(tmp_path):
    ref = _pets(tmp_path/'pets')
    s = from_npy_folder(tmp_path/'pets', tmp_path/'p.fmm', progress=False)
    files = sorted(ref)
    assert not s.ragged and s.item_shape == (3, 4)
    assert s.meta['file'].tolist() == files and s.meta['label'].tolist() == [ref[f][1] for f in files]
    _eq(s[:], np.stack([ref[f][0] for f in files]))
    s = from_npy_folder(tmp_path/'pets', tmp_path/'n.fmm', labels=None, source_col=None, pattern='dog/*.npy', progress=False)
    assert len(s) == 5 and s.meta_columns == []
    with pytest.raises(MetadataError, match='labels=None'):
        np.save(tmp_path/'pets'/'loose.npy', np.zeros((3, 4), np.int32)); from_npy_folder(tmp_path/'pets', tmp_path/'q.fmm')
    s = from_npy_folder(tmp_path/'pets', tmp_path/'p.fmm', pattern='*/*.npy', mode='a', progress=False)   # append: same columns
    assert len(s) == 30 and s.meta['file'].tolist() == files * 2

def test_folder_ragged_is_automatic(tmp_path):
    ref = _pets(tmp_path/'r', shapes=((2, 3), (2, 5), (2, 1)))
    s = from_npy_folder(tmp_path/'r', tmp_path/'r.fmm', n_jobs=2, progress=False)
    assert s.ragged
    for i, f in enumerate(sorted(ref)): _eq(s[i], ref[f][0])
    _eq(s.shapes[:3], np.array([ref[f][0].shape for f in sorted(ref)[:3]]))

def test_folder_labels_from_csv(tmp_path):
    ref = _pets(tmp_path/'pets')
    order = ['eel/14.npy', 'cat/00.npy', 'dog/07.npy', 'cat/03.npy']
    df = pd.DataFrame({'path': order, 'label': ['e', 'c', 'd', 'c'], 'score': [0.5, 1.5, 2.5, 3.5], 'fold': [0, 1, 0, 1]})
    df.to_csv(tmp_path/'pets'/'labels.csv', index=False)
    s = from_npy_folder(tmp_path/'pets', tmp_path/'c.fmm', labels='labels.csv', n_jobs=2, progress=False)   # relative to the folder
    assert s.meta_columns == ['label', 'score', 'fold', 'file']
    assert s.meta.drop(columns='file').to_dict('list') == df.drop(columns='path').to_dict('list')
    assert s.meta['file'].tolist() == order and s.column('fold').dtype == np.int64
    _eq(s[:], np.stack([ref[f][0] for f in order]))
    s = from_npy_folder(tmp_path/'pets', tmp_path/'c2.fmm', labels=df, fn_col='path', label_col='label', source_col=None, progress=False)
    assert s.meta.to_dict('list') == {'label': ['e', 'c', 'd', 'c']}
    from fastai.data.transforms import ColReader   # what fastai users will read the labels with
    assert ColReader('label')(s.meta.iloc[0]) == 'e'
    bad = pd.DataFrame({'path': ['cat/00.npy', 'cat/99.npy'], 'label': ['c', 'c']})
    with pytest.raises(ReadError, match=r'cat/99\.npy'): from_npy_folder(tmp_path/'pets', tmp_path/'b.fmm', labels=bad, progress=False)
    with pytest.raises(MetadataError, match='no file name column'): from_npy_folder(tmp_path/'pets', tmp_path/'b.fmm', labels=df, fn_col='fname')
    assert not (tmp_path/'b.fmm').exists()

# --- parallel reads: each file once, and faster

def _log_read(path):
    with open(os.environ['FMM_TEST_LOG'] + f'.{os.getpid()}', 'a') as f: f.write(f'{path}\n')

def read_counted(path):
    "A read_fn that logs each read to a per-process file"
    _log_read(path)
    return np.load(path), {'stem': Path(path).stem}

def read_cpu_bound(path):
    "A read_fn that spends ~25 ms of CPU per file, as decoding or feature extraction would"
    _log_read(path)
    a = np.load(path)
    t, acc = time.process_time(), 0
    while time.process_time() - t < 0.025: acc += sum(range(1000))
    return a * 2

def _reads(log):
    logs = sorted(log.parent.glob(log.name + '.*'))
    return Counter(l for p in logs for l in p.read_text().split()), {int(p.suffix[1:]) for p in logs}

def test_from_files_parallel_reads_each_once(tmp_path, monkeypatch):
    log = tmp_path/'log'
    monkeypatch.setenv('FMM_TEST_LOG', str(log))
    files = []
    for i in range(40):
        np.save(tmp_path/f'f{i:02d}.npy', np.full((2, 3), i, np.int64)); files.append(tmp_path/f'f{i:02d}.npy')
    s = from_files(files, tmp_path/'s.fmm', read_fn=read_counted, n_jobs=2, progress=False)
    counts, pids = _reads(log)
    assert counts == Counter(str(f) for f in files) and os.getpid() not in pids   # each file once, in the worker processes
    _eq(s[:, 0, 0], np.arange(40))
    assert s.meta['stem'].tolist() == [f.stem for f in files] and s.meta['file'].tolist() == [str(f) for f in files]

@pytest.mark.skipif(multiprocessing.get_context().get_start_method() != 'fork', reason='counts reads through a patch that forked workers inherit')
def test_folder_parallel_reads_each_once(tmp_path, monkeypatch):
    log = tmp_path/'log'
    monkeypatch.setenv('FMM_TEST_LOG', str(log))
    orig = convert._load_npy
    monkeypatch.setattr(convert, '_load_npy', lambda p: (_log_read(p), orig(p))[1])   # inherited by the forked workers
    ref = _pets(tmp_path/'pets')
    s = from_npy_folder(tmp_path/'pets', tmp_path/'p.fmm', n_jobs=2, progress=False)
    counts, pids = _reads(log)
    assert counts == Counter(str(tmp_path/'pets'/f) for f in ref) and os.getpid() not in pids
    _eq(s[:], np.stack([ref[f][0] for f in sorted(ref)]))

def test_parallel_is_faster_for_cpu_bound_reads(tmp_path, monkeypatch):
    monkeypatch.setenv('FMM_TEST_LOG', str(tmp_path/'log'))
    files = []
    for i in range(48):
        np.save(tmp_path/f'f{i:02d}.npy', np.full(8, i, np.float32)); files.append(tmp_path/f'f{i:02d}.npy')
    times, stores = {}, {}
    for n_jobs in (1, 2):
        t = time.perf_counter()
        stores[n_jobs] = from_files(files, tmp_path/f'j{n_jobs}.fmm', read_fn=read_cpu_bound, n_jobs=n_jobs, progress=False)
        times[n_jobs] = time.perf_counter() - t
    print(f"\nfrom_files, 48 files, ~25 ms CPU each, {os.cpu_count()} CPUs: n_jobs=1 {times[1]:.2f}s, n_jobs=2 {times[2]:.2f}s "
          f"({times[1] / times[2]:.2f}x)")
    _eq(stores[1][:], stores[2][:])
    _eq(stores[2][:, 0], np.arange(48, dtype=np.float32) * 2)

def test_read_fn_must_reach_workers(tmp_path):
    with pytest.raises(ValueError, match='top level'): from_files(['a'], tmp_path/'x.fmm', read_fn=lambda p: np.zeros(1), n_jobs=2)

# --- errors name the source

def test_corrupt_files_are_named(tmp_path):
    (tmp_path/'bad.npy').write_bytes(b'\x93NUMPY\x01\x00garbage')
    with pytest.raises(ReadError, match=r'bad\.npy'): from_npy(tmp_path/'bad.npy', tmp_path/'a.fmm')
    np.save(tmp_path/'short.npy', np.zeros((100, 10)))
    with open(tmp_path/'short.npy', 'r+b') as f: f.truncate(2000)
    with pytest.raises(ReadError, match=r'short\.npy'): from_npy(tmp_path/'short.npy', tmp_path/'a.fmm')
    (tmp_path/'text.npy').write_text('hello')
    with pytest.raises(ReadError, match=r'text\.npy is neither'): from_npy(tmp_path/'text.npy', tmp_path/'a.fmm')
    with pytest.raises(ReadError, match=r'missing\.npy: no such file'): from_npy(tmp_path/'missing.npy', tmp_path/'a.fmm')
    with pytest.raises(ReadError, match='no file matches'): from_npy(str(tmp_path/'none*.npy'), tmp_path/'a.fmm')
    # an .npz whose compressed member is damaged: found while streaming; nothing is committed
    np.savez_compressed(tmp_path/'z.npz', x=np.random.default_rng(0).random((2000, 50)))
    raw = bytearray((tmp_path/'z.npz').read_bytes())
    with zipfile.ZipFile(tmp_path/'z.npz') as z: off = z.getinfo('x.npy').header_offset
    raw[off + 20_000: off + 20_100] = b'\0' * 100
    (tmp_path/'z.npz').write_bytes(bytes(raw))
    with pytest.raises(ReadError, match=r"z\.npz: reading array 'x'"): from_npy(tmp_path/'z.npz', tmp_path/'a.fmm', chunk=100, progress=False)
    assert not (tmp_path/'a.fmm').exists()

def test_corrupt_file_in_folder_and_files(tmp_path):
    _pets(tmp_path/'pets')
    (tmp_path/'pets'/'dog'/'07.npy').write_bytes(b'\x93NUMPY\x01\x00\x10\x00{broken header}\n')
    with pytest.raises(ReadError, match=r"dog/07\.npy"): from_npy_folder(tmp_path/'pets', tmp_path/'a.fmm', n_jobs=2, progress=False)
    assert not (tmp_path/'a.fmm').exists()
    with pytest.warns(UserWarning, match=r'dog/07\.npy'):
        s = from_npy_folder(tmp_path/'pets', tmp_path/'a.fmm', on_error='skip', progress=False)
    assert len(s) == 14 and 'dog/07.npy' not in s.meta['file'].tolist() and [src for _, src, _ in s.skipped] == ['dog/07.npy']
    assert (s.meta['label'] == s.meta['file'].str.split('/').str[0]).all()   # labels stay with their items
    files = sorted((tmp_path/'pets').glob('*/*.npy'))
    with pytest.raises(ReadError, match=r'07\.npy'): from_files(files, tmp_path/'b.fmm', read_fn=np.load, n_jobs=2, progress=False)

# --- HDF5

def test_hdf5_round_trip(tmp_path):
    h5py = pytest.importorskip('h5py')
    rng = np.random.default_rng(3)
    X = rng.integers(-500, 500, (1000, 4, 6)).astype(np.int16)
    y = rng.integers(0, 10, 1000)
    with h5py.File(tmp_path/'d.h5', 'w') as f:
        f.create_dataset('grp/images', data=X, chunks=(37, 4, 6), compression='gzip')
        f.create_dataset('label', data=y)
        f.create_dataset('grp/name', data=np.array([f'item{i}' for i in range(1000)], dtype=object), dtype=h5py.string_dtype())
        f.create_dataset('fixed', data=np.array([b'a', b'b'] * 500))
        f.create_dataset('weight', data=rng.random(1000).astype(np.float32))
        f.create_dataset('other', data=np.arange(7))   # not one value per item: not metadata
        f.create_dataset('pairs', data=np.zeros((1000, 2)))
    with pytest.warns(UserWarning, match=r'other \(7,\).*pairs \(1000, 2\)'):
        s = from_hdf5(tmp_path/'d.h5', 'grp/images', tmp_path/'a.fmm', shard_size=10_000, progress=False)
    _eq(s[:], X)
    assert sorted(s.meta_columns) == ['fixed', 'grp/name', 'label', 'weight']
    _eq(s.column('label'), y)
    assert s.column('grp/name')[[0, 999]].tolist() == ['item0', 'item999'] and s.column('fixed')[:3].tolist() == ['a', 'b', 'a']
    assert s.column('weight').dtype == np.float32
    s = from_hdf5(tmp_path/'d.h5', '/grp/images', tmp_path/'b.fmm', meta_datasets={'y': 'label'}, chunk=100, progress=False)
    assert s.meta_columns == ['y'] and s.n_shards == 1
    _eq(s[:], X)
    s = from_hdf5(tmp_path/'d.h5', 'grp/images', tmp_path/'b.fmm', meta_datasets={'y': 'label'}, mode='a', progress=False)
    assert len(s) == 2000
    with pytest.raises(IncompatibleDataError, match='dataset='): from_hdf5(tmp_path/'d.h5', None, tmp_path/'c.fmm')
    with pytest.raises(ReadError, match="no dataset 'nope'"): from_hdf5(tmp_path/'d.h5', 'nope', tmp_path/'c.fmm')
    with pytest.raises(MetadataError, match='other'): from_hdf5(tmp_path/'d.h5', 'grp/images', tmp_path/'c.fmm', meta_datasets=['other'])
    (tmp_path/'bad.h5').write_bytes(b'not hdf5 at all')
    with pytest.raises(ReadError, match=r'bad\.h5'): from_hdf5(tmp_path/'bad.h5', 'x', tmp_path/'c.fmm')
    assert not (tmp_path/'c.fmm').exists()

def test_hdf5_damaged_chunk_is_named(tmp_path):
    h5py = pytest.importorskip('h5py')
    X = np.random.default_rng(4).random((1000, 64))
    with h5py.File(tmp_path/'d.h5', 'w') as f: f.create_dataset('x', data=X, chunks=(100, 64), compression='gzip')
    with h5py.File(tmp_path/'d.h5') as f: off, size = f['x'].id.get_chunk_info(5).byte_offset, f['x'].id.get_chunk_info(5).size
    raw = bytearray((tmp_path/'d.h5').read_bytes())
    raw[off:off + size] = b'\xff' * size   # chunk 5 (rows 500..599) no longer inflates
    (tmp_path/'d.h5').write_bytes(bytes(raw))
    with pytest.raises(ReadError, match=r'd\.h5:/x: reading rows 500\.\.599 failed'):
        from_hdf5(tmp_path/'d.h5', 'x', tmp_path/'a.fmm', chunk=100, progress=False)
    assert not (tmp_path/'a.fmm').exists()

def test_hdf5_needs_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, 'h5py', None)   # as if h5py were not installed
    with pytest.raises(ImportError, match=r'pip install fastai_memmap\[hdf5\]'): from_hdf5(tmp_path/'d.h5', 'x', tmp_path/'a.fmm')

# --- the command line

def _cli(*args):
    "Run the `convert` verb through the CLI if it is registered there, else call fmm_convert directly"
    if 'convert' in getattr(cli, '_VERBS', {}): return cli.main(['convert', *map(str, args)])
    kw, pos, it = {}, [], iter(map(str, args))
    for a in it:
        if a.startswith('--'): kw[a[2:].replace('-', '_')] = next(it)   # as the CLI spells options: --n-jobs
        else: pos.append(a)
    if 'n_jobs' in kw: kw['n_jobs'] = int(kw['n_jobs'])
    return fmm_convert(*pos, **kw)

def test_cli_convert(tmp_path, capsys):
    h5py = pytest.importorskip('h5py')
    X = np.arange(60, dtype=np.float64).reshape(20, 3)
    np.save(tmp_path/'x.npy', X)
    assert _cli(tmp_path/'x.npy', tmp_path/'n.fmm') == 0
    out = capsys.readouterr().out
    assert 'MemmapStore' in out and '20 items of float64 (3,)' in out and len(out.strip().splitlines()) == 1
    _eq(MemmapStore(tmp_path/'n.fmm')[:], X)
    np.savez(tmp_path/'x.npz', feats=X, y=np.arange(20) % 2)
    assert _cli(tmp_path/'x.npz', tmp_path/'z.fmm', '--dataset', 'feats') == 0
    assert MemmapStore(tmp_path/'z.fmm').meta_columns == ['y']
    with h5py.File(tmp_path/'d.hdf5', 'w') as f: f['x'] = X; f['label'] = np.arange(20)
    assert _cli(tmp_path/'d.hdf5', tmp_path/'h.fmm') == 0
    _eq(MemmapStore(tmp_path/'h.fmm')[:], X)
    ref = _pets(tmp_path/'pets')
    assert _cli(tmp_path/'pets', tmp_path/'p.fmm', '--n-jobs', 2) == 0
    s = MemmapStore(tmp_path/'p.fmm')
    assert s.meta['label'].tolist() == [ref[f][1] for f in sorted(ref)]
    assert _cli(tmp_path/'pets', tmp_path/'p.fmm', '--mode', 'w', '--labels', 'none') == 0
    assert MemmapStore(tmp_path/'p.fmm').meta_columns == ['file']
    capsys.readouterr()
    code = _cli(tmp_path/'x.npy', tmp_path/'n.fmm') if 'convert' in getattr(cli, '_VERBS', {}) else None
    if code is not None: assert code == 1 and 'already exists' in capsys.readouterr().err
    else:
        with pytest.raises(StoreExistsError): _cli(tmp_path/'x.npy', tmp_path/'n.fmm')
    assert _cli(tmp_path/'x.npy', tmp_path/'k.fmm', '--kind', 'bogus') == 2
