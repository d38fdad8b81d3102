"Sparse stores: round trips, equivalence with dense storage, fastai training, workers, export, disk use."
import pickle, warnings
import numpy as np, pytest, scipy.sparse as sp, torch
from torch import nn
from fastai.data.block import DataBlock, CategoryBlock
from fastai.data.transforms import ColReader, RandomSplitter
from fastai.learner import Learner, load_learner
from fastai.callback.progress import ProgressCallback   # patches Learner.no_bar
from fastai.losses import CrossEntropyLossFlat
from fastai.metrics import accuracy
from fasttransform import Transform
from fastai_memmap.errors import *
from fastai_memmap.write import write_memmap
from fastai_memmap.data import memmap_items, MemmapBlock, TensorMemmap
from fastai_memmap.sparse import *

N, D = 1200, 500

@pytest.fixture(scope='module')
def data(tmp_path_factory):
    tmp = tmp_path_factory.mktemp('sparse')
    X = sp.random(N, D, density=0.01, format='csr', dtype=np.float32, random_state=1)
    y = np.where(np.asarray(X[:, :D // 2].sum(1)).ravel() > np.asarray(X[:, D // 2:].sum(1)).ravel(), 'a', 'b')
    s = write_sparse(tmp/'s.fmm', X, meta={'label': y}, progress=False)
    d = write_memmap(tmp/'d.fmm', X.toarray(), meta={'label': y}, progress=False)
    return tmp, X, y, s, d

def _dls(path, blk, items=sparse_items, **kw):
    # no loading threads unless asked (test_two_workers)
    kw.setdefault('num_workers', 0)
    return DataBlock(blocks=(blk, CategoryBlock), get_items=items, get_y=ColReader('label'),
                     splitter=RandomSplitter(seed=42)).dataloaders(path, bs=64, **kw)

def _batches(dl): return [(x.clone(), y.clone()) for x, y in dl]

# --- the store

@pytest.mark.parametrize('fmt', ['csr', 'csc', 'coo'])
def test_scipy_formats_round_trip(tmp_path, fmt):
    rng = np.random.default_rng(0)
    r, c = rng.integers(0, 50, 300), rng.integers(0, 40, 300)
    X = sp.coo_matrix((rng.random(300), (r, c)), shape=(50, 40))   # duplicates: summed, as scipy does
    s = write_sparse(tmp_path/'x.fmm', X.asformat(fmt))
    np.testing.assert_allclose(s[:], X.toarray())
    assert (abs(s.to_scipy() - X.tocsr())).max() < 1e-12
    assert s.nnz == X.tocsr().nnz and s.dtype == np.float64 and s.index_dtype == np.int32
    indptr, ind, val = s.take_csr([3, 0, 3])
    ref = X.tocsr()[[3, 0, 3]]; ref.sum_duplicates()
    np.testing.assert_array_equal(indptr, ref.indptr); np.testing.assert_array_equal(ind, ref.indices)
    np.testing.assert_allclose(val, ref.data)
    np.testing.assert_allclose(s[-1], X.toarray()[-1])
    s.verify(progress=False)

def test_pairs_binary_and_errors(tmp_path):
    s = write_sparse(tmp_path/'p.fmm', [(np.array([4, 1, 4]), np.array([1., 2., 3.])), ([], [])], dim=6, dtype='float32')
    np.testing.assert_array_equal(s[0], [0, 2, 0, 0, 4, 0])   # duplicate index 4: summed
    assert s.dtype == np.float32 and not s.binary
    b = write_sparse(tmp_path/'b.fmm', (np.array(ix) for ix in [[2, 2, 0], [], [5]]), dim=6, dtype='uint8')
    assert b.binary and b.dtype == np.uint8 and b.nnz == 3
    np.testing.assert_array_equal(b[:], [[1, 0, 1, 0, 0, 0], [0] * 6, [0, 0, 0, 0, 0, 1]])
    v = write_sparse(tmp_path/'v.fmm', sp.eye(3, format='csr') * 2, values=False)
    assert v.binary and (v[:] == np.eye(3)).all()
    with pytest.raises(IncompatibleDataError, match='give dim'): write_sparse(tmp_path/'e1.fmm', [[1]])
    with pytest.raises(IncompatibleDataError, match='outside'): write_sparse(tmp_path/'e2.fmm', [[1], [-1]], dim=3)
    with pytest.raises(IncompatibleDataError, match='values of shape'): write_sparse(tmp_path/'e3.fmm', [([1, 2], [1.])], dim=3)
    with pytest.raises(IncompatibleDataError, match='one form'): write_sparse(tmp_path/'e4.fmm', [[1], ([1], [1.])], dim=3)
    with pytest.raises(IncompatibleDataError, match='dtype'): write_sparse(tmp_path/'e5.fmm', [([1], np.ones(1, 'f4')), ([1], np.ones(1))], dim=3)
    with pytest.raises(ValueError, match='mode'): write_sparse(tmp_path/'p.fmm', [[1]], dim=3, mode='a')
    assert not any((tmp_path/f'e{i}.fmm').exists() for i in range(1, 6))   # failed writes leave nothing behind
    with pytest.raises(StoreNotFoundError, match='dense store'): SparseStore(write_memmap(tmp_path/'d.fmm', np.ones((2, 2))).path)
    with pytest.raises(StoreExistsError, match='dense'): write_sparse(tmp_path/'d.fmm', [[1]], dim=3, mode='w')

def test_replace_is_atomic(tmp_path):
    write_sparse(tmp_path/'r.fmm', [[0]], dim=2, meta={'k': [7]})
    with pytest.raises(IncompatibleDataError): write_sparse(tmp_path/'r.fmm', ([0] if i < 5 else [9] for i in range(10)), dim=2, mode='w')
    s = SparseStore(tmp_path/'r.fmm')
    assert len(s) == 1 and s.meta['k'].tolist() == [7]
    subs = lambda: sorted(p.name.split('-')[0] for p in (tmp_path/'r.fmm').iterdir() if p.is_dir())
    assert subs() == ['indices']   # binary: no values; the failed write's sub-stores are gone
    s2 = write_sparse(tmp_path/'r.fmm', [([1], [2.]), ([0], [3.])], dim=2, mode='w')
    assert len(s2) == 2 and subs() == ['indices', 'values'] and s2[1].tolist() == [3, 0]

def test_empty_items_sharding_and_int64(tmp_path):
    rows = [([], []), ([], [])] + [(np.arange(i % 7), np.full(i % 7, i, np.float32)) for i in range(300)]
    s = write_sparse(tmp_path/'sh.fmm', rows, dim=8, shard_size=256)
    assert s.n_shards > 5 and s.indices.n_shards == s.values.n_shards
    assert [x['length'] for x in s.indices.manifest['shards']] == [x['length'] for x in s.values.manifest['shards']]
    dense = np.zeros((302, 8), np.float32)
    for i, (ix, v) in enumerate(rows): dense[i, ix] = v
    idx = np.random.default_rng(0).permutation(302)
    np.testing.assert_array_equal(s[idx], dense[idx])
    np.testing.assert_array_equal(s.read_batch(idx).to_dense().numpy(), dense[idx])
    s.verify(progress=False)
    big = write_sparse(tmp_path/'big.fmm', [([2**31 + 5, 3], [1., 2.])], dim=2**31 + 10)
    assert big.index_dtype == np.int64
    x = big.read_batch(np.array([0])).coalesce()
    assert x.shape == (1, 2**31 + 10) and x.indices()[1].tolist() == [3, 2**31 + 5]

def test_matrix_items(tmp_path):
    mats = [sp.random(3, 5, density=0.3, random_state=i, format='coo') for i in range(6)]
    s = write_sparse(tmp_path/'m.fmm', mats)
    ref = np.stack([m.toarray() for m in mats])
    np.testing.assert_allclose(s[:], ref)
    np.testing.assert_allclose(s.read_batch(np.array([4, 1])).to_dense().numpy(), ref[[4, 1]])
    flat = write_sparse(tmp_path/'f.fmm', sp.csr_matrix(ref.reshape(6, 15)), dim=(3, 5))
    np.testing.assert_allclose(flat[2], ref[2])
    coords = write_sparse(tmp_path/'c.fmm', [(np.array([[0, 2], [4, 1]]), np.array([1., 2.]))], dim=(3, 5))
    assert coords[0][0, 4] == 1 and coords[0][2, 1] == 2

def test_pickle_and_disk_saving(data):
    tmp, X, y, s, d = data
    p = pickle.dumps(s)
    assert len(p) < 4000
    np.testing.assert_array_equal(pickle.loads(p)[7], X[7].toarray()[0])
    ratio = s.nbytes / d.nbytes   # a 1%-dense float32 matrix with a label column
    assert ratio < 0.04, ratio
    assert s.nbytes == sum(f.stat().st_size for f in s.path.rglob('*.npy')) + (s.path/'sparse.json').stat().st_size
    assert 'non-zero' in repr(s)

# --- fastai

def test_same_batches_as_dense_store(data):
    tmp, X, y, s, d = data
    sd, dd = _dls(tmp/'s.fmm', SparseBlock), _dls(tmp/'d.fmm', MemmapBlock, memmap_items)
    for dl_s, dl_d in ((sd.valid, dd.valid), (sd.train.new(shuffle=False), dd.train.new(shuffle=False))):
        bs, bd = _batches(dl_s), _batches(dl_d)
        assert len(bs) == len(bd) > 0
        for (xs, ys), (xd, yd) in zip(bs, bd):
            assert type(xs) is TensorSparseItems and xs.shape[1:] == (D,)
            assert torch.equal(xs, xd) and torch.equal(ys, yd)
    class Same(Transform):
        def encodes(self, x:TensorMemmap): return x
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')   # MemmapDL warns that item transforms take the per-item path
        slow = _dls(tmp/'s.fmm', SparseBlock, item_tfms=Same())
        for (xs, ys), (xd, yd) in zip(_batches(slow.valid), _batches(dd.valid)):
            assert type(xs) is TensorSparseItems and torch.equal(xs, xd) and torch.equal(ys, yd)
        xps = _dls(tmp/'s.fmm', SparseBlock(dense=False, layout='csr'), item_tfms=Same()).valid.one_batch()[0]
        assert xps.layout == torch.sparse_csr and torch.equal(xps.to_dense(), _batches(dd.valid)[0][0].as_subclass(torch.Tensor))

def test_sparse_batches_to_model(data):
    tmp, X, y, s, d = data
    dd = _dls(tmp/'d.fmm', MemmapBlock, memmap_items)
    for layout, want in (('coo', torch.sparse_coo), ('csr', torch.sparse_csr)):
        sd = _dls(tmp/'s.fmm', SparseBlock(dense=False, layout=layout))
        for (xs, ys), (xd, yd) in zip(sd.valid, dd.valid):
            assert xs.layout == want and torch.equal(xs.to_dense(), xd.as_subclass(torch.Tensor)) and torch.equal(ys, yd)
    b = sd.valid.one_batch()
    assert type(sd.valid.decode(b)[0]) is TensorSparseItems   # show_batch decodes to dense

@pytest.mark.parametrize('dense', [True, False])
def test_fit_one_epoch(data, dense):
    tmp, X, y, s, d = data
    dls = _dls(tmp/'s.fmm', SparseBlock(dense=dense))
    torch.manual_seed(0)
    learn = Learner(dls, nn.Linear(D, 2), loss_func=CrossEntropyLossFlat(), metrics=accuracy)
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 0.1)
    trn, val, acc = learn.recorder.values[-1]
    assert np.isfinite(trn) and np.isfinite(val) and acc > 0.65, learn.recorder.values

def test_two_workers(data):
    tmp, X, y, s, d = data
    ref = _batches(_dls(tmp/'s.fmm', SparseBlock).valid)
    for blk in (SparseBlock, SparseBlock(dense=False)):
        dls = _dls(tmp/'s.fmm', blk, num_workers=2)
        got = _batches(dls.valid)
        assert len(got) == len(ref)
        for (xw, yw), (xr, yr) in zip(got, ref):
            assert torch.equal(xw.to_dense() if xw.layout != torch.strided else xw, xr.as_subclass(torch.Tensor)) and torch.equal(yw, yr)
        assert sum(len(yb) for _, yb in dls.train) == len(dls.train) * 64   # a shuffled epoch through the workers

def test_export_load_learner(data, tmp_path):
    tmp, X, y, s, d = data
    dls = _dls(tmp/'s.fmm', SparseBlock)
    learn = Learner(dls, nn.Linear(D, 2), loss_func=CrossEntropyLossFlat())
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 0.1)
    learn.export(tmp_path/'export.pkl')
    assert (tmp_path/'export.pkl').stat().st_size < 200_000   # no data in the pickle
    learn2 = load_learner(tmp_path/'export.pkl')
    dl, dl2 = learn.dls.test_dl(sparse_items(tmp/'s.fmm')), learn2.dls.test_dl(sparse_items(tmp/'s.fmm'))
    with learn.no_bar(), learn2.no_bar():
        p, _ = learn.get_preds(dl=dl); p2, _ = learn2.get_preds(dl=dl2)
    assert p.shape == (N, 2) and torch.allclose(p, p2)

def test_from_dense_arrays_and_stores(tmp_path):
    A = np.zeros((30, 2, 4), np.float32); A[::3, 1, 2] = 5; A[1, 0, 0] = -1
    s = write_sparse(tmp_path/'a.fmm', A)
    assert s.item_shape == (2, 4) and s.nnz == 11
    np.testing.assert_array_equal(s[:], A)
    dense = write_memmap(tmp_path/'d.fmm', A.reshape(30, 8))
    s2 = write_sparse(tmp_path/'b.fmm', dense, dim=(2, 4))   # a dense store is converted chunk by chunk
    np.testing.assert_array_equal(s2[:], A)

def test_damage_is_reported(tmp_path):
    import json
    s = write_sparse(tmp_path/'x.fmm', [([1, 3], [1., 2.]), ([0], [3.])], dim=4)
    j = tmp_path/'x.fmm'/'sparse.json'
    info = json.loads(j.read_text())
    j.write_text(json.dumps({**info, 'nnz': 4}))
    with pytest.raises(CorruptStoreError, match='non-zeros'): SparseStore(tmp_path/'x.fmm').verify(progress=False)
    j.write_text(json.dumps({**info, 'values': '../../etc'}))
    with pytest.raises(CorruptStoreError, match='sub-store name'): SparseStore(tmp_path/'x.fmm')
    j.write_text(json.dumps({**info, 'version': 2}))
    with pytest.raises(FormatVersionError): SparseStore(tmp_path/'x.fmm')
    j.write_text(json.dumps({**info, 'index_dtype': '<i8'}))
    with pytest.raises(CorruptStoreError, match='indices sub-store'): SparseStore(tmp_path/'x.fmm')
    j.write_text(json.dumps(info))
    vals = next((tmp_path/'x.fmm').glob('values-*'))
    data = next(vals.glob('data-*.npy')); b = bytearray(data.read_bytes()); b[-1] ^= 0xFF; data.write_bytes(bytes(b))
    with pytest.raises(ChecksumError): SparseStore(tmp_path/'x.fmm').verify(progress=False)
