"""fastai_memmap with real fastai: worker processes under every start method, the batch path against fastai's
per-item path, export/load_learner in a fresh process, pickle and export sizes, every dtype, ragged items,
flat-memory streaming writes, errors on bad input, splitters, test sets, predictions and pictures.

Everything runs on real files in `tmp_path`, real worker processes and real training: no mocks."""
import os, pickle, shutil, subprocess, sys, textwrap, warnings
from pathlib import Path

os.environ.setdefault('MPLBACKEND', 'Agg')
import matplotlib
matplotlib.use('Agg', force=True)
import matplotlib.pyplot as plt
import numpy as np, pandas as pd, pytest, torch
from torch import nn

from fastai.data.all import (DataBlock, CategoryBlock, MultiCategoryBlock, RegressionBlock, ColReader, Pipeline,
                             RandomSplitter, IndexSplitter, ColSplitter, FuncSplitter)
from fastai.learner import Learner
from fastai.torch_core import TensorCategory, TensorMultiCategory
from fastai.callback.training import ShortEpochCallback

from fastai_memmap.errors import (StoreError, StoreExistsError, IncompatibleDataError, MetadataError, StoreIndexError)
from fastai_memmap.store import MemmapStore
from fastai_memmap.write import write_memmap
from fastai_memmap.data import MemmapBlock, MemmapDL, TensorMemmap, memmap_items

ROOT = Path(__file__).resolve().parent.parent
CLASSES = np.array(['a', 'b', 'c'])

# ---------------------------------------------------------------------------------------------------- helpers
def run_script(tmp_path, code, *args, timeout=150, name='script.py'):
    "Run `code` as a script file in a fresh Python process (a file, so that spawn/forkserver workers can import it)"
    f = tmp_path/name
    f.write_text(textwrap.dedent(code))
    env = {**os.environ, 'MPLBACKEND': 'Agg', 'PYTHONWARNINGS': 'ignore', 'OMP_NUM_THREADS': '1'}
    r = subprocess.run([sys.executable, str(f), *map(str, args)], capture_output=True, text=True, timeout=timeout,
                       cwd=ROOT, env=env)
    assert r.returncode == 0, f"script failed (rc={r.returncode}):\n{r.stdout[-4000:]}\n{r.stderr[-6000:]}"
    return r.stdout

def ident_store(path, n, item_shape=(2, 4), **kw):
    "A float32 store whose item i holds i*1000 + 0, 1, 2, ... (so every item says which it is), with label/num/fold/tags columns"
    k = int(np.prod(item_shape))
    X = (np.arange(n)[:, None] * 1000 + np.arange(k)).astype(np.float32).reshape(n, *item_shape)
    meta = dict(label=CLASSES[np.arange(n) % 3], num=(np.arange(n) % 4) * 10, target=np.linspace(-1, 1, n),
                fold=np.arange(n) % 5, is_valid=np.arange(n) % 4 == 0,
                tags=np.array(['x;y', 'y', 'x;z', 'z'])[np.arange(n) % 4])
    return write_memmap(path, X, meta=meta, progress=False, **kw), X

def ids_of(x):
    "Store item numbers of a batch of `ident_store` items"
    return (x.reshape(len(x), -1)[:, 0] // 1000).long().numpy()

def assert_batches_equal(bs1, bs2):
    "Same number of batches; in each, same number of parts, same types, dtypes, shapes and values"
    bs1, bs2 = list(bs1), list(bs2)
    assert len(bs1) == len(bs2) > 0
    for i, (b1, b2) in enumerate(zip(bs1, bs2)):
        assert len(b1) == len(b2), i
        for j, (u, v) in enumerate(zip(b1, b2)):
            assert type(u) is type(v), (i, j, type(u), type(v))
            assert u.dtype == v.dtype and u.shape == v.shape, (i, j, u.dtype, v.dtype, u.shape, v.shape)
            assert torch.equal(u.as_subclass(torch.Tensor), v.as_subclass(torch.Tensor)), (i, j)
            lu, lv = getattr(u, 'lengths', None), getattr(v, 'lengths', None)
            assert (lu is None) == (lv is None), (i, j)
            if lu is not None: assert torch.equal(torch.as_tensor(lu), torch.as_tensor(lv)), (i, j)

def per_item(dl):
    "The same loader forced onto fastai's per-item path by an (identity) item transform"
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        return dl.new(after_item=Pipeline([lambda o: o]))

def epoch(dl):
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        return list(dl)

def snapshot(path):
    "Every file of a store directory and its bytes"
    return {p.name: p.read_bytes() for p in sorted(Path(path).iterdir())}

def same_bytes(a, b): return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()

def cat_dblock(splitter=None, y='label', blocks=(MemmapBlock, CategoryBlock), **kw):
    return DataBlock(blocks=blocks, get_items=memmap_items, get_y=ColReader(y, **kw),
                     splitter=splitter or RandomSplitter(valid_pct=0.2, seed=0))

def quiet(learn):
    from fastai.callback.progress import ProgressCallback
    if any(isinstance(c, ProgressCallback) for c in learn.cbs): learn.remove_cb(ProgressCallback)
    return learn

# ---------------------------------------------------------------------------------------------------- 1. workers
# fastai's DataLoader takes no start-method argument (`_FakeLoader.multiprocessing_context` is the `multiprocessing`
# module), so each start method runs in a fresh process that sets it globally before building the loaders.
WORKER_SCRIPT = '''
import multiprocessing, random, sys, threading, warnings
from pathlib import Path
from fasttransform import Transform

class Ident(Transform):
    "An identity item transform (picklable: spawn and forkserver workers import this script)"
    def encodes(self, o): return o

def main(ctx, d):
    import numpy as np, torch
    from fastai.data.all import DataBlock, CategoryBlock, ColReader, RandomSplitter, Pipeline
    from fastai.torch_core import TensorCategory
    from fastai_memmap.write import write_memmap
    from fastai_memmap.data import MemmapBlock, TensorMemmap, memmap_items, _threads
    multiprocessing.set_start_method(ctx, force=True)
    if ctx == 'forkserver': multiprocessing.set_forkserver_preload(['torch', 'fastai_memmap.data'])
    d, n, bs = Path(d), 320, 16
    X = (np.arange(n)[:, None, None] * 1000 + np.arange(8).reshape(2, 4)).astype(np.float32)
    labels = np.array(['a', 'b', 'c'])[np.arange(n) % 3]
    write_memmap(d/'s.fmm', X, meta=dict(label=labels), shard_size=4096, progress=False)   # 20 shards
    db = DataBlock(blocks=(MemmapBlock, CategoryBlock), get_items=memmap_items, get_y=ColReader('label'),
                   splitter=RandomSplitter(valid_pct=0.2, seed=0))
    dls0 = db.dataloaders(d/'s.fmm', bs=bs, num_workers=0)
    dls2 = db.dataloaders(d/'s.fmm', bs=bs, num_workers=2)
    assert len(dls2.train_ds) == 256 and len(dls2.train_ds) % bs == 0   # drop_last drops nothing
    popen = {'fork': 'popen_fork', 'spawn': 'popen_spawn_posix', 'forkserver': 'popen_forkserver'}[ctx]

    def check(b0, b2, name):
        assert len(b0) == len(b2) > 0, (name, len(b0), len(b2))
        for i, (u0, u2) in enumerate(zip(b0, b2)):
            assert len(u0) == len(u2) == 2
            assert type(u0[0]) is type(u2[0]) is TensorMemmap and type(u0[1]) is type(u2[1]) is TensorCategory, (name, i)
            for s, t in zip(u0, u2): assert s.dtype == t.dtype and s.shape == t.shape and torch.equal(s, t), (name, i)
        ids = np.concatenate([(x[:, 0, 0] // 1000).long().numpy() for x, _ in b2])
        ys = np.concatenate([y.numpy() for _, y in b2])
        assert (np.array(dls2.vocab)[ys] == labels[ids]).all(), name   # labels belong to their items
        return ids

    def epoch_with(dl, processes):
        "An epoch of `dl`, checking who loads: two threads of this process, or worker processes started by `ctx`"
        store, names = dl.items.store, []
        take = store.take
        store.take = lambda idxs, out=None: (names.append(threading.current_thread().name), take(idxs, out))[1]
        try:
            it = iter(dl); res = [next(it)]
            kids = multiprocessing.active_children()
            res += list(it)
        finally: del store.take
        if processes: assert len(kids) >= 2 and all(type(p._popen).__module__.endswith(popen) for p in kids), kids
        else:   # threads of this process: `_threads(2)` loading threads, and the consumer's own, which loads a batch rather than wait
            threads = {f'fastai_memmap_{k}' for k in range(_threads(2))}
            assert kids == [] and threads <= set(names) <= threads | {threading.current_thread().name}, (kids, set(names))
        return res

    # valid loader (not shuffled): 2 threads == no threads, in order
    b0, b2 = list(dls0.valid), epoch_with(dls2.valid, processes=False)
    ids = check(b0, b2, 'valid')
    assert (ids == dls2.valid_ds.items.index.to_numpy()).all()
    print('valid ok', len(b2))

    # train loader, shuffled with the same seed: same batches, same order; each epoch every item exactly once
    tr0, tr2 = dls0.train, dls2.train
    assert tr2.shuffle and tr2.fake_l.num_workers == 2
    tr0.rng, tr2.rng = random.Random(7), random.Random(7)
    train_ids = np.sort(dls2.train_ds.items.index.to_numpy())
    orders = []
    for ep in range(2):
        b0, b2 = list(tr0), epoch_with(tr2, processes=False)
        ids = check(b0, b2, f'train epoch {ep}')
        assert len(ids) == len(train_ids) and (np.sort(ids) == train_ids).all(), (ep, len(ids), len(set(ids)))
        orders.append(ids)
    assert not (orders[0] == orders[1]).all()            # a new order each epoch
    assert not (orders[0] == train_ids).all()            # and a shuffled one
    print('train ok', len(orders[0]))

    # fastai's per-item path (an item transform) keeps worker processes, started by `ctx`: same batches as in-process
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        p0, p2 = (dl.new(after_item=Pipeline([Ident()])) for dl in (dls0.train, dls2.train))
    p0.rng, p2.rng = random.Random(3), random.Random(3)
    assert not p2._plan()
    check(list(p0), epoch_with(p2, processes=True), 'per-item path')
    print('done', ctx)

if __name__ == '__main__': main(sys.argv[1], sys.argv[2])
'''

@pytest.mark.parametrize('ctx', ['fork', pytest.param('spawn', marks=pytest.mark.slow), 'forkserver'])
def test_workers_match_no_workers(tmp_path, ctx):
    out = run_script(tmp_path, WORKER_SCRIPT, ctx, tmp_path, timeout=240)
    assert f'done {ctx}' in out, out

# ---------------------------------------------------------------------------------------------------- 2. fast path == per-item path
TARGETS = {
    'str-category': (dict(y='label'), TensorCategory, True),
    'int-category': (dict(y='num'), TensorCategory, True),
    'regression': (dict(y='target', blocks=(MemmapBlock, RegressionBlock)), None, True),
    'multicategory': (dict(y='tags', label_delim=';', blocks=(MemmapBlock, MultiCategoryBlock)), TensorMultiCategory, False),
}

@pytest.mark.parametrize('kind', list(TARGETS))
def test_fast_path_equals_per_item_path(tmp_path, kind):
    kw, ytype, vectorised = TARGETS[kind]
    ident_store(tmp_path/'s.fmm', 203, shard_size=1000)
    dls = cat_dblock(**kw).dataloaders(tmp_path/'s.fmm', num_workers=0, bs=16)
    for dl in (dls.train.new(shuffle=False, drop_last=False), dls.valid):
        fast = epoch(dl)
        assert dl._plan(), "the batch path should be taken"
        assert (dl._tfns[0] is not None) == vectorised, dl._tfns   # targets vectorised or computed per item; x read in one go
        slow_dl = per_item(dl)
        slow = epoch(slow_dl)
        assert not slow_dl._plan()
        assert_batches_equal(fast, slow)
        assert type(fast[0][0]) is TensorMemmap
        if ytype is not None: assert type(fast[0][1]) is ytype
        else: assert fast[0][1].dtype == torch.float32
        ids = np.concatenate([ids_of(b[0]) for b in fast])
        assert (ids == dl.dataset.items.index.to_numpy()).all()
    # decoded targets are the metadata values
    x, y = dls.valid.one_batch()
    dec = dls.valid.decode_batch((x, y), max_n=3)
    col = {'str-category': 'label', 'int-category': 'num', 'regression': 'target', 'multicategory': 'tags'}[kind]
    meta = MemmapStore(tmp_path/'s.fmm').meta
    for (xi, yi), i in zip(dec, ids_of(x)[:3]):
        want = meta[col][i]
        if kind == 'multicategory': assert sorted(yi) == sorted(want.split(';'))
        elif kind == 'regression': assert float(yi) == pytest.approx(want, rel=1e-6)
        else: assert str(yi) == str(want)   # fastai decodes a category as a str subclass

def test_fast_path_equals_per_item_two_targets(tmp_path):
    "Two targets, one vectorised and one not, with the x read in one go"
    ident_store(tmp_path/'s.fmm', 100)
    db = DataBlock(blocks=(MemmapBlock, CategoryBlock, RegressionBlock), n_inp=1, get_items=memmap_items,
                   getters=[None, ColReader('label'), lambda o: float(o['num']) / 2], splitter=RandomSplitter(seed=1))
    dls = db.dataloaders(tmp_path/'s.fmm', num_workers=0, bs=8)
    for dl in (dls.train.new(shuffle=False, drop_last=False), dls.valid):
        fast = epoch(dl)
        assert dl._plan() and dl._tfns[0] is not None and dl._tfns[1] is None
        assert_batches_equal(fast, epoch(per_item(dl)))

def test_fast_path_equals_per_item_ragged(tmp_path):
    rng = np.random.default_rng(0)
    items = [np.full((2, int(k)), i, np.float32) for i, k in enumerate(rng.integers(1, 30, 90))]
    write_memmap(tmp_path/'r.fmm', items, meta={'label': CLASSES[np.arange(90) % 3]}, shard_size=512, progress=False)
    dls = cat_dblock().dataloaders(tmp_path/'r.fmm', num_workers=0, bs=8, pad_value=-1)
    for dl in (dls.train.new(shuffle=False, drop_last=False), dls.valid):
        fast = epoch(dl)
        assert dl._plan()
        assert_batches_equal(fast, epoch(per_item(dl)))
        for x, y in fast:
            ids = x[:, 0, 0].long().numpy()
            assert (x.lengths.numpy() == np.array([items[i].shape for i in ids])).all()
            for row, i in zip(x, ids):
                k = items[i].shape[1]
                assert (row[:, :k].numpy() == items[i]).all() and (row[:, k:] == -1).all()

# ---------------------------------------------------------------------------------------------------- 3. export / load_learner
def tiny_learner(dls, n_in, n_out=3):
    torch.manual_seed(0)
    return quiet(Learner(dls, nn.Sequential(nn.Flatten(), nn.Linear(n_in, 8), nn.ReLU(), nn.Linear(8, n_out))))

PREDICT_SCRIPT = '''
import json, sys, numpy as np, torch
from fastai.learner import load_learner
from fastai_memmap.data import TensorMemmap, memmap_items
export, other, d = sys.argv[1:4]
learn = load_learner(export)
assert len(learn.dls.train_ds) == 0 and len(learn.dls.valid_ds) == 0
want = json.load(open(f'{d}/want.json'))
items = memmap_items(other)
for i, lab, probs in zip(want['idx'], want['labels'], np.load(f'{d}/probs.npy')):
    for o in (items.iloc[i], TensorMemmap(items.store[i])):
        dec, code, p = learn.predict(o)
        assert dec == lab, (i, dec, lab)
        assert np.allclose(p.numpy(), probs, rtol=0, atol=1e-6), (i, p, probs)
print('predict ok')
'''

def test_export_load_learner_predict_in_fresh_process(tmp_path):
    X = np.random.default_rng(1).normal(size=(96, 2, 4)).astype(np.float32)
    write_memmap(tmp_path/'train2.fmm', X, meta={'label': CLASSES[np.arange(96) % 3]}, progress=False)
    write_memmap(tmp_path/'other.fmm', X, progress=False)    # the same arrays in a store with no metadata
    dls = cat_dblock().dataloaders(tmp_path/'train2.fmm', num_workers=0, bs=16)
    learn = tiny_learner(dls, 8)
    learn.fit(1, 1e-2)
    learn.export(tmp_path/'export.pkl')
    items, idx = memmap_items(tmp_path/'train2.fmm'), [0, 5, 17, 95]
    labels, probs = [], []
    for i in idx:
        dec, code, p = learn.predict(items.iloc[i])
        dec2, code2, p2 = learn.predict(TensorMemmap(X[i]))
        assert dec2 == dec and torch.allclose(p, p2, atol=1e-7)
        labels.append(str(dec)); probs.append(p.numpy())
    import json
    (tmp_path/'want.json').write_text(json.dumps(dict(idx=idx, labels=labels)))
    np.save(tmp_path/'probs.npy', np.stack(probs))
    shutil.move(tmp_path/'train2.fmm', tmp_path/'moved.fmm')   # the exported learner must not need its training store
    out = run_script(tmp_path, PREDICT_SCRIPT, tmp_path/'export.pkl', tmp_path/'other.fmm', tmp_path, timeout=120)
    assert 'predict ok' in out

# ---------------------------------------------------------------------------------------------------- 4. sizes
def small_store(path, n):
    X = np.zeros((n, 4), np.float32); X[:, 0] = np.arange(n)
    return write_memmap(path, X, meta={'label': CLASSES[np.arange(n) % 3]}, progress=False)

def test_pickled_store_is_small_and_constant(tmp_path):
    s1, s2 = small_store(tmp_path/'a.fmm', 1_000), small_store(tmp_path/'b.fmm', 200_000)
    _ = s2.meta, s2[np.arange(1000)], s2.column('label')   # caches filled: they must not be pickled
    p1, p2 = pickle.dumps(s1), pickle.dumps(s2)
    assert len(p1) < 4096 and len(p2) < 4096, (len(p1), len(p2))
    assert abs(len(p2) - len(p1)) < 64, (len(p1), len(p2))
    s3 = pickle.loads(p2)
    assert len(s3) == 200_000 and same_bytes(s3[[5, 199_999]], s2[[5, 199_999]])
    assert (s3.column('label') == s2.column('label')).all()
    items = memmap_items(s2)
    assert len(pickle.dumps(items.iloc[:0])) < 8192
    assert len(pickle.dumps(items.iloc[123])) < 8192

def export_size(tmp_path, store_path, name, epochs=True):
    dls = cat_dblock().dataloaders(store_path, num_workers=0, bs=64)
    learn = tiny_learner(dls, int(np.prod(MemmapStore(store_path).item_shape)))
    if epochs: learn.fit(1, 1e-3, cbs=ShortEpochCallback(pct=2.5 / len(dls.train)))   # a couple of batches
    list(dls.valid)   # a full pass over the valid set, so loader state is filled
    learn.export(tmp_path/name)
    return (tmp_path/name).stat().st_size, (tmp_path/name).read_bytes(), learn

def test_export_size_does_not_grow_with_items(tmp_path):
    s1 = small_store(tmp_path/'a.fmm', 1_000)
    s2 = small_store(tmp_path/'b.fmm', 200_000)
    n1, _, _ = export_size(tmp_path, s1.path, 'e1.pkl')
    n2, raw, _ = export_size(tmp_path, s2.path, 'e2.pkl')
    assert abs(n2 - n1) < 10_000, (n1, n2)
    assert n2 < 200_000 * 4, n2      # far below even one float per item
    # no array data: two stored items' bytes are nowhere in the file (they are in the store)
    rows = s2[100_000:100_002].tobytes()
    assert rows in (s2.path/s2.manifest['shards'][0]['data']['file']).read_bytes()
    assert rows not in raw

@pytest.mark.slow
def test_export_of_200mb_store_is_model_sized(tmp_path):
    n = 25_000
    def items():
        for i in range(n): yield np.full((2, 1000), i, np.float32)
    write_memmap(tmp_path/'big.fmm', items(), meta={'label': CLASSES[np.arange(n) % 3]}, shard_size=64 << 20, progress=False)
    store = MemmapStore(tmp_path/'big.fmm')
    assert store.nbytes > 190e6
    size, raw, learn = export_size(tmp_path, store.path, 'big.pkl')
    torch.save(learn.model, tmp_path/'model.pth')
    model_size = (tmp_path/'model.pth').stat().st_size    # ~64 KB of weights
    assert size < model_size + 60_000, (size, model_size)
    assert np.full(4, 24_321, np.float32).tobytes() not in raw
    shutil.rmtree(tmp_path/'big.fmm')

# ---------------------------------------------------------------------------------------------------- 5. dtypes
def dtype_values(dt, n, shape):
    "Values covering the dtype's range and special values"
    dt = np.dtype(dt)
    rng = np.random.default_rng(dt.num)
    size = n * int(np.prod(shape))
    if dt.kind == 'b': a = rng.integers(0, 2, size).astype(bool)
    elif dt.kind in 'iu':
        ii = np.iinfo(dt)
        a = rng.integers(ii.min, ii.max, size, dtype=dt, endpoint=True)
        a[:4] = [ii.min, ii.max, 0, 1]
    else:
        real = np.finfo(dt).dtype if dt.kind == 'c' else dt
        fi = np.finfo(real)
        r = rng.normal(size=size).astype(real) * 100
        r[:8] = [np.nan, np.inf, -np.inf, -0.0, fi.max, fi.min, fi.tiny, fi.eps]
        a = r if dt.kind == 'f' else r + 1j * rng.normal(size=size).astype(real)[::-1]
        a = a.astype(dt)
    return a.reshape(n, *shape)

DTYPES = ['float16', 'float32', 'float64', 'int8', 'int16', 'int32', 'int64', 'uint8', 'uint16', 'uint32', 'uint64',
          'bool', 'complex64', 'complex128']
if np.dtype(np.longdouble).itemsize > 8: DTYPES += ['longdouble', 'clongdouble']

@pytest.mark.parametrize('dt', DTYPES)
def test_every_dtype_round_trips(tmp_path, dt):
    n, shape = 50, (3, 2)
    X = dtype_values(dt, n, shape)
    labels = CLASSES[np.arange(n) % 3]
    s = write_memmap(tmp_path/'s.fmm', X, meta={'label': labels}, shard_size=7 * X[0].nbytes, progress=False)  # 8 shards
    assert s.n_shards == 8 and s.dtype == X.dtype and s.item_shape == shape
    s = MemmapStore(tmp_path/'s.fmm')   # reopened from disk
    for i in (0, 1, 6, 7, 49, -1, -50): assert same_bytes(s[i], X[i]), i
    for sl in (slice(None), slice(3, 30, 4), slice(None, None, -1), slice(45, 5, -7), slice(60, 70)):
        assert same_bytes(s[sl], X[sl]), sl
    idx = np.random.default_rng(0).integers(-n, n, 200)   # random order, duplicates, negative indices
    assert same_bytes(s[list(idx)], X[idx]) and same_bytes(s[idx], X[idx])
    mask = np.random.default_rng(1).random(n) < 0.5
    assert same_bytes(s[mask], X[mask])
    assert same_bytes(np.stack(list(s)), X)
    # from a stream of items, too
    s2 = write_memmap(tmp_path/'g.fmm', iter(list(X)), shard_size=5 * X[0].nbytes, progress=False)
    assert same_bytes(s2[:], X)
    if dt in ('longdouble', 'clongdouble'): return    # torch has no such dtype
    # through a MemmapBlock DataLoader: the batch holds the very values
    dls = cat_dblock().dataloaders(tmp_path/'s.fmm', num_workers=0, bs=16)
    for dl in (dls.train.new(shuffle=False, drop_last=False), dls.valid):
        got = torch.cat([x.as_subclass(torch.Tensor) for x, y in epoch(dl)])
        want = torch.from_numpy(X[dl.dataset.items.index.to_numpy()])
        assert got.dtype == want.dtype and got.numpy().tobytes() == want.numpy().tobytes()
    x, y = dls.train.one_batch()
    assert type(x) is TensorMemmap and x.dtype == torch.from_numpy(X[:1]).dtype and x.shape == (16, *shape)

def test_big_endian_data_round_trips_through_dataloader(tmp_path):
    X = np.arange(60, dtype='>f4').reshape(20, 3)     # e.g. from FITS or a big-endian HDF5 dataset
    s = write_memmap(tmp_path/'be.fmm', X, meta={'label': CLASSES[np.arange(20) % 3]}, progress=False)
    assert (s[:] == X).all()
    dls = cat_dblock().dataloaders(tmp_path/'be.fmm', num_workers=0, bs=4)
    got = torch.cat([x.as_subclass(torch.Tensor) for x, y in epoch(dls.valid)])
    assert (got.numpy() == X[dls.valid_ds.items.index.to_numpy()]).all()

def batches_through_workers(tmp_path, dt):
    "Every valid batch of a `dt` store read by 2 worker processes (fastai's default on a multi-core machine)"
    X = dtype_values(dt, 40, (3, 2))
    write_memmap(tmp_path/f'{dt}.fmm', X, meta={'label': CLASSES[np.arange(40) % 3]}, progress=False)
    dls = cat_dblock().dataloaders(tmp_path/f'{dt}.fmm', bs=8, num_workers=2)
    got = torch.cat([x.as_subclass(torch.Tensor) for x, y in epoch(dls.valid)])
    want = torch.from_numpy(X[dls.valid_ds.items.index.to_numpy()])
    assert got.dtype == want.dtype and got.numpy().tobytes() == want.numpy().tobytes(), dt

def test_dtypes_through_worker_processes(tmp_path):
    for dt in ['float16', 'float64', 'int8', 'int64', 'uint8', 'bool', 'complex64']: batches_through_workers(tmp_path, dt)

def test_unsigned_dtypes_through_worker_processes(tmp_path):
    for dt in ['uint16', 'uint32', 'uint64']: batches_through_workers(tmp_path, dt)

# ---------------------------------------------------------------------------------------------------- 6. ragged
def test_ragged_round_trips_and_appends(tmp_path):
    rng = np.random.default_rng(3)
    shapes = [(int(a), int(b)) for a, b in rng.integers(0, 7, (40, 2))] + [(0, 0), (1, 1), (6, 0)]
    items = [rng.integers(-1000, 1000, s).astype(np.int16) for s in shapes]
    assert len({a.shape for a in items}) > 1
    s = write_memmap(tmp_path/'r.fmm', items, meta={'k': np.arange(len(items))}, shard_size=64, progress=False)
    assert s.ragged and s.item_ndim == 2 and s.item_shape is None and s.n_shards > 3 and len(s) == len(items)
    assert (s.shapes == np.array(shapes)).all()
    for i in list(range(len(items))) + [-1, -len(items)]: assert same_bytes(s[i], items[i]), i
    idx = rng.integers(-len(items), len(items), 100)
    for got, i in zip(s[list(idx)], idx): assert same_bytes(got, items[i])
    for got, i in zip(s[np.arange(len(items))[::-3]], np.arange(len(items))[::-3]): assert same_bytes(got, items[i])
    for got, want in zip(s[5:30:4], items[5:30:4]): assert same_bytes(got, want)
    arr, lens = s.take_padded(np.array([3, 0, 3]), pad_value=7)
    assert (lens == np.array([shapes[3], shapes[0], shapes[3]])).all()
    assert arr.shape == (3, *np.max([shapes[3], shapes[0]], 0))
    # append: a list of varying shapes, then a stream, then one shape only: all stay ragged
    more = [rng.integers(-9, 9, (int(a), 3)).astype(np.int16) for a in (1, 4, 2)]
    write_memmap(tmp_path/'r.fmm', more, mode='a', meta={'k': [100, 101, 102]}, progress=False)
    write_memmap(tmp_path/'r.fmm', iter([np.ones((2, 9), np.int16)]), mode='a', meta={'k': [103]}, progress=False)
    write_memmap(tmp_path/'r.fmm', [np.zeros((5, 5), np.int16)] * 2, mode='a', meta={'k': [104, 105]}, progress=False)
    s = MemmapStore(tmp_path/'r.fmm')
    allit = items + more + [np.ones((2, 9), np.int16)] + [np.zeros((5, 5), np.int16)] * 2
    assert len(s) == len(allit) and s.ragged
    assert (s.shapes == np.array([a.shape for a in allit])).all()
    for i, a in enumerate(allit): assert same_bytes(s[i], a), i
    assert list(s.column('k')) == list(range(len(items))) + list(range(100, 106))
    # appending a different number of dimensions fails and leaves the store as it was
    before = snapshot(tmp_path/'r.fmm')
    with pytest.raises(IncompatibleDataError, match='dimensions'):
        write_memmap(tmp_path/'r.fmm', [np.zeros(3, np.int16)], mode='a', meta={'k': [1]}, progress=False)
    assert snapshot(tmp_path/'r.fmm') == before

# ---------------------------------------------------------------------------------------------------- 7. flat memory
STREAM_SCRIPT = '''
import resource, sys, time, numpy as np
from fastai_memmap.write import write_memmap
from fastai_memmap.store import MemmapStore
def make_item(i): return np.full(1 << 18, i, np.float32), {'k': i}
def peak_mb():
    "This process's peak RSS. ru_maxrss survives execve (it would report the parent's RSS), VmHWM does not"
    try: return int(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1]) / 1024
    except (OSError, StopIteration): return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
d, n = sys.argv[1], int(sys.argv[2])
write_memmap(d + '/warm.fmm', iter([np.zeros(10, np.float32)] * 3), progress=False)   # code paths loaded
base = peak_mb()
assert base < 400, base   # this process's own peak, not one inherited from the parent
def items():
    for i in range(n): yield np.full(1 << 18, i, np.float32)   # 1 MiB each, made on the fly
t = time.time()
s = write_memmap(d + '/big.fmm', items(), meta=None, shard_size=32 << 20, progress=False)
peak = peak_mb()
assert len(s) == n and s.nbytes >= n << 20 and s.n_shards >= n // 32, (len(s), s.nbytes, s.n_shards)
for i in (0, 31, 32, n // 2, n - 1): assert s[i].shape == (1 << 18,) and (s[i] == i).all(), i
print(f'RSS {base:.0f} MB -> {peak:.0f} MB for {n} MiB in {time.time() - t:.1f} s')
# the same through read_fn in 2 worker processes, with a metadata value per item
t = time.time()
s = write_memmap(d + '/big2.fmm', range(n // 2), read_fn=make_item, n_jobs=2, shard_size=32 << 20, progress=False)
peak2 = peak_mb()
assert len(s) == n // 2 and (s.column('k') == np.arange(n // 2)).all() and (s[n // 4] == n // 4).all()
print(f'read_fn: RSS {base:.0f} MB -> {peak2:.0f} MB for {n // 2} MiB in {time.time() - t:.1f} s')
print('GROWTH', max(peak, peak2) - base)
'''

@pytest.mark.slow
def test_stream_write_has_flat_memory(tmp_path):
    n = 600   # MiB
    out = run_script(tmp_path, STREAM_SCRIPT, tmp_path, n, timeout=120)
    print(out)
    growth = float(out.split('GROWTH')[1])
    shutil.rmtree(tmp_path/'big.fmm'); shutil.rmtree(tmp_path/'big2.fmm')
    assert growth < 250, out

# ---------------------------------------------------------------------------------------------------- 8. bad input
@pytest.fixture
def existing(tmp_path):
    X = np.arange(30, dtype=np.int32).reshape(10, 3)
    write_memmap(tmp_path/'s.fmm', X, meta={'label': CLASSES[np.arange(10) % 3], 'w': np.linspace(0, 1, 10)}, progress=False)
    return tmp_path/'s.fmm', X, snapshot(tmp_path/'s.fmm')

BAD = {
    'string array, append': (dict(data=np.array(['ab', 'cd', 'ef']), mode='a'), IncompatibleDataError, r'dtype.*<U2'),
    'string array, replace': (dict(data=np.array(['ab', 'cd']), mode='w'), IncompatibleDataError, r'dtype.*<U2'),
    'object array, replace': (dict(data=np.array([np.zeros(3), np.zeros(2)], dtype=object), mode='w'),
                              IncompatibleDataError, r'dtype object'),
    'object array, append': (dict(data=np.array([{}, 1], dtype=object), mode='a'), IncompatibleDataError, r'dtype object'),
    'list of strings, replace': (dict(data=['abc', 'def'], mode='w'), IncompatibleDataError, r'dtype <U3'),
    'shape, append': (dict(data=np.zeros((2, 4), np.int32), mode='a', meta={'label': ['a', 'b'], 'w': [0., 1.]}),
                      IncompatibleDataError, r'\(4,\).*\(3,\)'),
    'ndim, append stream': (dict(data=iter([np.zeros((1, 3), np.int32)]), mode='a', meta={'label': ['a'], 'w': [0.]}),
                            IncompatibleDataError, r'2 dimensions'),
    'dtype, append stream': (dict(data=iter([np.zeros(3, np.float64)]), mode='a', meta={'label': ['a'], 'w': [0.]}),
                             IncompatibleDataError, r'float64.*int32'),
    'meta length, append': (dict(data=np.zeros((2, 3), np.int32), mode='a', meta={'label': ['a'], 'w': [0., 1.]}),
                            MetadataError, r"'label' has 1 values but data has 2"),
    'meta length, replace': (dict(data=np.zeros((2, 3), np.int32), mode='w', meta={'label': ['a', 'b', 'c']}),
                             MetadataError, r"'label' has 3 values but data has 2"),
    'meta length, stream replace': (dict(data=iter([np.zeros(3, np.int32)] * 4), mode='w', meta={'label': ['a', 'b']}),
                                    MetadataError, r"more items \(4\).*\(2\)"),
    'meta columns, append': (dict(data=np.zeros((2, 3), np.int32), mode='a', meta={'label': ['a', 'b']}),
                             MetadataError, r"columns"),
    'exists, mode x': (dict(data=np.zeros((2, 3), np.int32), mode='x'), StoreExistsError, r"already exists.*mode='a'"),
}

@pytest.mark.parametrize('case', list(BAD))
def test_bad_input_raises_and_leaves_store_untouched(existing, case):
    path, X, before = existing
    kw, err, msg = BAD[case]
    with pytest.raises(err, match=msg) as e:
        write_memmap(path, progress=False, **kw)
    assert isinstance(e.value, StoreError)
    assert snapshot(path) == before
    s = MemmapStore(path)
    assert same_bytes(s[:], X) and s.verify(progress=False) is s

def test_bad_input_on_a_new_path_leaves_nothing(tmp_path):
    for data in (np.array(['a', 'b']), np.array([None, 1], dtype=object)):
        with pytest.raises(IncompatibleDataError): write_memmap(tmp_path/'new.fmm', data, progress=False)
        assert not (tmp_path/'new.fmm').exists()
    with pytest.raises(MetadataError, match="'y' has 1 values"):
        write_memmap(tmp_path/'new.fmm', np.zeros((3, 2)), meta={'y': [1]}, progress=False)
    assert not (tmp_path/'new.fmm').exists()
    with pytest.raises(IncompatibleDataError, match='item 2'):
        write_memmap(tmp_path/'new.fmm', iter([np.zeros(2), np.zeros(2), np.zeros(3)]), progress=False)
    assert not (tmp_path/'new.fmm').exists()
    # an existing directory that is not a store, and a file, are refused in every mode and left alone
    (tmp_path/'other').mkdir(); (tmp_path/'other'/'notes.txt').write_text('mine')
    (tmp_path/'afile').write_text('mine')
    for mode in 'xwa':
        with pytest.raises(StoreExistsError, match='not a fastai_memmap store'):
            write_memmap(tmp_path/'other', np.zeros((2, 2)), mode=mode, progress=False)
        with pytest.raises(StoreExistsError, match='is a file'):
            write_memmap(tmp_path/'afile', np.zeros((2, 2)), mode=mode, progress=False)
    assert snapshot(tmp_path/'other') == {'notes.txt': b'mine'} and (tmp_path/'afile').read_text() == 'mine'

def test_index_out_of_range(existing):
    path, X, before = existing
    s = MemmapStore(path)
    for bad, shown in [(10, '10'), (-11, '-11'), ([0, 3, 12], '12'), (np.array([-20, 1]), '-20'), (np.int64(10), '10')]:
        with pytest.raises(StoreIndexError, match=rf'index {shown} is out of range.*10 items') as e: s[bad]
        assert isinstance(e.value, IndexError) and isinstance(e.value, StoreError)
    with pytest.raises(StoreIndexError, match='boolean mask'): s[np.ones(3, bool)]
    with pytest.raises(StoreIndexError): s[1.5]
    items = memmap_items(s)
    with pytest.raises(IndexError): items.iloc[10]
    assert snapshot(path) == before

@pytest.mark.parametrize('data', [np.array([[2**40, 1, 2]], np.int64), np.array([[1e300, 0.5, 1.0]])],
                         ids=['int64-into-int32', 'float64-into-float32'])
def test_append_array_of_other_dtype_is_refused(existing, data):
    path, X, before = existing
    if data.dtype.kind == 'f':   # a float32 store for the float case
        path = path.parent/'f.fmm'
        write_memmap(path, X.astype(np.float32), progress=False)
        before = snapshot(path)
    with pytest.raises(IncompatibleDataError, match=str(data.dtype)):
        write_memmap(path, data, mode='a', progress=False, **({} if data.dtype.kind == 'f' else
                                                              {'meta': {'label': ['a'], 'w': [0.]}}))
    assert snapshot(path) == before

# ---------------------------------------------------------------------------------------------------- 9. splitters, test sets, predictions, pictures
def valid_ids(dls):
    ids = np.concatenate([ids_of(x) for x, y in epoch(dls.valid)])
    assert (ids == dls.valid_ds.items.index.to_numpy()).all()
    tr = np.concatenate([ids_of(x) for x, y in epoch(dls.train.new(shuffle=False, drop_last=False))])
    assert len(set(tr) & set(ids)) == 0 and len(tr) + len(ids) == len(dls.train_ds) + len(dls.valid_ds)
    return ids

def test_splitters(tmp_path):
    n = 150
    ident_store(tmp_path/'s.fmm', n)
    def dls_for(splitter): return cat_dblock(splitter).dataloaders(tmp_path/'s.fmm', num_workers=0, bs=16)
    ids = valid_ids(dls_for(RandomSplitter(valid_pct=0.2, seed=3)))
    assert len(ids) == 30
    assert (np.sort(ids) == np.sort(valid_ids(dls_for(RandomSplitter(valid_pct=0.2, seed=3))))).all()   # seeded
    vidx = [7, 3, 140, 99, 0]
    assert list(valid_ids(dls_for(IndexSplitter(vidx)))) == vidx
    assert (np.sort(valid_ids(dls_for(ColSplitter('is_valid')))) == np.arange(0, n, 4)).all()
    assert (np.sort(valid_ids(dls_for(ColSplitter('fold', on=2)))) == np.arange(2, n, 5)).all()
    assert (np.sort(valid_ids(dls_for(FuncSplitter(lambda o: o['num'] == 30 and o.name < 100)))) == np.arange(3, 100, 4)).all()

@pytest.fixture
def trained(tmp_path):
    ident_store(tmp_path/'s.fmm', 160)
    X = np.random.default_rng(0).normal(size=(160, 2, 4)).astype(np.float32)
    write_memmap(tmp_path/'r.fmm', X, meta={'label': CLASSES[np.arange(160) % 3]}, progress=False)
    dls = cat_dblock().dataloaders(tmp_path/'r.fmm', num_workers=0, bs=16)
    learn = tiny_learner(dls, 8)
    learn.fit(1, 1e-2)
    learn.model.eval()
    return learn, X

def model_probs(learn, x):
    with torch.no_grad(): return torch.softmax(learn.model(torch.as_tensor(x)), 1)

def test_test_dl_and_get_preds(tmp_path, trained):
    learn, X = trained
    other = np.random.default_rng(5).normal(size=(37, 2, 4)).astype(np.float32)
    write_memmap(tmp_path/'other.fmm', other, shard_size=200, progress=False)   # no metadata, several shards
    tdl = learn.dls.test_dl(memmap_items(tmp_path/'other.fmm'))
    assert isinstance(tdl, MemmapDL) and len(tdl.dataset) == 37
    preds, targs = learn.get_preds(dl=tdl)
    assert targs is None and preds.shape == (37, 3)
    assert torch.allclose(preds, model_probs(learn, other), atol=1e-6)
    # valid set, in its order
    vi = learn.dls.valid_ds.items.index.to_numpy()
    preds, targs = learn.get_preds(reorder=True)
    assert torch.allclose(preds, model_probs(learn, X[vi]), atol=1e-6)
    assert (np.array(learn.dls.vocab)[targs.numpy()] == CLASSES[vi % 3]).all()
    # with inputs and decoded predictions
    inp, preds2, targs2, dec = learn.get_preds(with_input=True, with_decoded=True)
    assert (inp.numpy() == X[vi]).all() and torch.equal(preds2, preds) and torch.equal(dec, preds.argmax(1))
    # the train set, unshuffled by get_preds
    ti = learn.dls.train_ds.items.index.to_numpy()
    preds, targs = learn.get_preds(ds_idx=0)
    assert torch.allclose(preds, model_probs(learn, X[ti]), atol=1e-6)

def test_get_preds_reorder_on_a_shuffled_loader(trained):
    learn, X = trained
    vi = learn.dls.valid_ds.items.index.to_numpy()
    preds, targs = learn.get_preds(dl=learn.dls.valid.new(shuffle=True), reorder=True)
    assert torch.allclose(preds, model_probs(learn, X[vi]), atol=1e-6)
    assert (np.array(learn.dls.vocab)[targs.numpy()] == CLASSES[vi % 3]).all()

@pytest.mark.parametrize('shape', [(40,), (2, 30), (12, 12), (3, 10, 10), (4, 6, 6), (2, 3, 5, 5)],
                         ids=['1d', '2d-series', '2d-image', '3d-rgb', '3d-channels', '4d-volume'])
def test_show_batch_and_show_results(tmp_path, shape):
    n = 40
    X = np.random.default_rng(0).normal(size=(n, *shape)).astype(np.float32)
    write_memmap(tmp_path/'s.fmm', X, meta={'label': CLASSES[np.arange(n) % 3]}, progress=False)
    dls = cat_dblock().dataloaders(tmp_path/'s.fmm', num_workers=0, bs=8)
    plt.close('all')
    dls.show_batch(max_n=4)
    plt.gcf().savefig(tmp_path/'batch.png')
    plt.close('all')
    learn = tiny_learner(dls, int(np.prod(shape)))
    learn.show_results(max_n=4)
    plt.gcf().savefig(tmp_path/'results.png')
    plt.close('all')
    for f in ('batch.png', 'results.png'):
        data = (tmp_path/f).read_bytes()
        assert data[:8] == b'\x89PNG\r\n\x1a\n' and len(data) > 2000, f

def test_show_batch_ragged(tmp_path):
    items = [np.random.default_rng(i).normal(size=(2, 5 + 3 * i)).astype(np.float32) for i in range(24)]
    write_memmap(tmp_path/'r.fmm', items, meta={'label': CLASSES[np.arange(24) % 3]}, progress=False)
    dls = cat_dblock().dataloaders(tmp_path/'r.fmm', num_workers=0, bs=8)
    plt.close('all')
    dls.show_batch(max_n=4)
    plt.gcf().savefig(tmp_path/'ragged.png')
    plt.close('all')
    assert (tmp_path/'ragged.png').read_bytes()[:4] == b'\x89PNG'
