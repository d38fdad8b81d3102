"""The index out of core: a MemmapBlock DataBlock keeps its splits, subsets and targets as arrays (no per-item
Python objects), with exactly fastai's own splits; metadata columns are views of the store's files; fastai's
per-item machinery is not run per item. Memory and time at 1M-100M items are in bench/index.py."""
import sys, gc
import numpy as np, pandas as pd, pytest, torch

from fastai.data.all import (DataBlock, CategoryBlock, ColReader, RandomSplitter, IndexSplitter, ColSplitter, MaskSplitter,
                             TrainTestSplitter, FuncSplitter, TransformBlock)
from fastai_memmap.all import write_memmap, memmap_items, MemmapBlock, MemmapStore, StratifiedSplitter
from fastai_memmap.patches import SplitIdxs

N = 3000

@pytest.fixture(scope='module')
def store(tmp_path_factory):
    p = tmp_path_factory.mktemp('idx')/'s.fmm'
    rng = np.random.default_rng(0)
    X = rng.normal(size=(N, 3)).astype(np.float32)
    meta = dict(label=rng.integers(0, 5, N), is_valid=np.arange(N) % 7 == 0, fold=np.arange(N) % 4)
    write_memmap(p, X, meta=meta, progress=False)
    return p, X, pd.DataFrame(meta)

SPLITTERS = {
    'random': lambda: RandomSplitter(seed=7),
    'random-unseeded': lambda: RandomSplitter(0.3),
    'index': lambda: IndexSplitter([5, 3, 2999, 17]),
    'col': lambda: ColSplitter('is_valid'),
    'col-on': lambda: ColSplitter('fold', on=2),
    'col-on-list': lambda: ColSplitter('fold', on=[0, 3]),
    'mask': lambda: MaskSplitter(np.arange(N) % 5 == 1),
    'train-test': lambda: TrainTestSplitter(0.25, random_state=3),
    'stratified': lambda: StratifiedSplitter('label', seed=1),
    'func (per item)': lambda: FuncSplitter(lambda o: o['fold'] == 1),
}

@pytest.mark.parametrize('name', list(SPLITTERS))
def test_splits_are_int64_arrays_and_fastais_own(store, name):
    p, X, meta = store
    db = DataBlock(blocks=(MemmapBlock, CategoryBlock), get_items=memmap_items, get_y=ColReader('label'), splitter=SPLITTERS[name]())
    torch.manual_seed(0)
    dsets = db.datasets(p)
    got = dsets.splits
    assert all(type(s) is SplitIdxs and s.dtype == np.int64 for s in got), [type(s) for s in got]
    # fastai's own splitter, on the same items as a plain DataFrame (FuncSplitter iterates rows of our item list)
    torch.manual_seed(0)
    want = SPLITTERS[name]()(memmap_items(p) if name.startswith('func') else memmap_items(p)._plain())
    assert [list(map(int, w)) for w in want] == [g.tolist() for g in got]
    # subsets are the split's rows, and the input and target lists share them (one copy)
    tr = dsets.train
    assert (tr.items.store_idxs == got[0]).all() and tr.tls[0].items is tr.tls[1].items

def test_other_datablocks_keep_fastais_lists(store):
    "A DataBlock that is not a MemmapBlock one gets fastai's own splits (Python lists), untouched"
    p, X, meta = store
    db = DataBlock(blocks=(TransformBlock(), CategoryBlock), get_y=lambda i: int(meta.label[i]), splitter=RandomSplitter(seed=7))
    dsets = db.datasets(range(N))
    assert all(isinstance(s, list) for s in dsets.splits)

def test_loaders_hold_arrays_not_python_objects(store):
    p, X, meta = store
    db = DataBlock(blocks=(MemmapBlock, CategoryBlock), get_items=memmap_items, get_y=ColReader('label'), splitter=RandomSplitter(seed=7))
    gc.collect()
    b0 = sys.getallocatedblocks()
    dls = db.dataloaders(p, bs=64, num_workers=0)
    xb, yb = dls.one_batch()
    gc.collect()
    grown = sys.getallocatedblocks() - b0
    assert grown < N, grown   # per-item Python objects would add several per item
    dl = dls.train
    assert dl._gidx.dtype == np.int64 and np.shares_memory(dl._gidx, dl.items.index.to_numpy())   # a view of the subset's index
    assert dl._tfns[0].codes.dtype == np.uint8   # 5 classes: one byte per item
    assert isinstance(dl.get_idxs(), np.ndarray)

def test_metadata_columns_are_views_of_the_store(store):
    p, X, meta = store
    s = MemmapStore(p)
    items = memmap_items(s)
    col = items['label'].to_numpy()
    assert np.shares_memory(col, s.column('label')) and not s.column('label').flags.writeable
    assert (col == meta.label.to_numpy()).all()
    try: items.loc[0, 'label'] = 99   # pandas copies the column first (copy-on-write), or refuses: never writes the store's file
    except ValueError as e: assert 'read-only' in str(e)
    assert s.column('label')[0] == MemmapStore(p).column('label')[0] == meta.label[0] != 99

def test_vocab_without_per_item_calls(store, monkeypatch):
    "Categorize learns its vocab from the column in one pass: fastai's ColReader is not called per item"
    p, X, meta = store
    calls = []
    orig = ColReader._do_one
    monkeypatch.setattr(ColReader, '_do_one', lambda self, r, c: (calls.append(1), orig(self, r, c))[1])
    db = DataBlock(blocks=(MemmapBlock, CategoryBlock), get_items=memmap_items, get_y=ColReader('label'), splitter=RandomSplitter(seed=7))
    dls = db.dataloaders(p, bs=64, num_workers=0)
    assert dls.vocab == sorted(set(meta.label)) and len(calls) < 10, len(calls)
    for xb, yb in dls.train: pass
    assert len(calls) < 10, len(calls)


@pytest.mark.parametrize('nw', [0, 2])
@pytest.mark.parametrize('target', ['category', 'regression'])
def test_small_batches_read_in_groups_are_the_batches_read_one_by_one(tmp_path, nw, target):
    "Small batches over a store of many shards, read several at a time: every batch (items, targets, types, the last partial one) is the one a batch-at-a-time read gives; fewer store reads"
    from fastai.data.all import RegressionBlock
    from fastai_memmap.data import TensorMemmap
    n = 1003
    X = np.arange(n * 3, dtype=np.float32).reshape(n, 3)   # item i holds 3i, 3i+1, 3i+2
    p = tmp_path/'s.fmm'
    write_memmap(p, X, meta=dict(label=np.arange(n) % 5, value=np.arange(n) / 7.0), shard_size=X[:100].nbytes, progress=False)
    assert MemmapStore(p).n_shards == 11
    blk, col = (CategoryBlock, 'label') if target == 'category' else (RegressionBlock, 'value')
    dls = DataBlock(blocks=(MemmapBlock, blk), get_items=memmap_items, get_y=ColReader(col),
                    splitter=RandomSplitter(seed=1)).dataloaders(p, bs=8, num_workers=nw)
    store = dls.train.items.store
    reads, take = [], store.take
    store.take = lambda idxs, out=None: (reads.append(len(idxs)), take(idxs, out))[1]
    for dl in (dls.train.new(drop_last=False), dls.valid):
        dl._plan()
        assert dl._group_size() == 64   # 8 items of 12 bytes a batch: 64 batches a read
        one = dl.new(); one._plan(); one._group_size = lambda: 1
        dl.rng.seed(5); one.rng.seed(5)
        reads.clear(); grouped = list(dl); n_grouped = len(reads)
        reads.clear(); single = list(one)
        assert len(grouped) == len(single) == len(dl) and n_grouped == -(-len(dl) // 64) and len(reads) == len(dl)
        for g, s in zip(grouped, single):
            assert [type(t) for t in g] == [type(t) for t in s] and type(g[0]) is TensorMemmap
            assert all(torch.equal(a, b) for a, b in zip(g, s))
        assert len(grouped[-1][0]) == len(dl.dataset) % 8 or len(dl.dataset) % 8 == 0   # the last, partial batch
        items = torch.cat([g[0][:, 0] for g in grouped]).long() // 3
        assert sorted(items.tolist()) == sorted(dl.items.store_idxs.tolist())   # every item once
