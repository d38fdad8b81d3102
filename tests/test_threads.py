"""Loading threads on the batch path: the same batches as `num_workers=0` for every way of reading an epoch, and
threads that stop when an epoch is abandoned (break, an exception in training, Ctrl-C).

Each comparison builds two loaders over the same store, one with 2 loading threads and one with none, gives both
the same random generator, and compares every batch of two epochs exactly (types, dtypes, shapes, values, and
the `lengths` of padded ragged batches)."""
import os, random, signal, subprocess, sys, textwrap, threading, time, warnings
from pathlib import Path
import numpy as np, pytest, torch
from torch import nn

from fastai.data.all import DataBlock, CategoryBlock, ColReader, RandomSplitter, IndexSplitter
from fastai.learner import Learner
from fastai.callback.core import Callback
from fastai_memmap.all import (write_memmap, memmap_items, MemmapBlock, MemmapStore, TensorMemmap, write_sparse, sparse_items,
                               SparseBlock)

_BEFORE = set()

def loading_threads():
    "Loading threads started since this module's tests began (other tests' abandoned epochs may still hold theirs)"
    return [t for t in threading.enumerate() if t.name.startswith('fastai_memmap_') and t not in _BEFORE]

@pytest.fixture(autouse=True)
def _threads_before():
    _BEFORE.clear(); _BEFORE.update(threading.enumerate())

def same_batches(dl2, dl0, epochs=2):
    "Every batch of `epochs` epochs of `dl2` (threads) equals `dl0`'s (none), given the same random generator"
    assert dl2.fake_l.num_workers == 2 and dl0.fake_l.num_workers == 0 and dl2._plan() and dl0._plan()
    dl2.rng, dl0.rng = random.Random(11), random.Random(11)
    n = 0
    for _ in range(epochs):
        b2, b0 = list(dl2), list(dl0)
        assert len(b2) == len(b0) == len(dl0) > 1
        for u, v in zip(b2, b0):
            assert len(u) == len(v)
            for s, t in zip(u, v):
                assert type(s) is type(t) and s.dtype == t.dtype and s.shape == t.shape, (type(s), type(t), s.shape, t.shape)
                assert torch.equal(s.to_dense() if s.layout != torch.strided else s, t.to_dense() if t.layout != torch.strided else t)
                ls, lt = getattr(s, 'lengths', None), getattr(t, 'lengths', None)
                assert (ls is None) == (lt is None) and (ls is None or torch.equal(ls, lt))
            n += 1
    return n

def labelled(path, n=300, shape=(3, 5), shard_size=1 << 30, **meta):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(n, *shape)).astype(np.float32)
    y = rng.integers(0, 4, n)
    write_memmap(path, X, meta={'label': y, 'w': rng.random(n), **meta}, shard_size=shard_size, progress=False)
    return X, y

def pair(path, items=memmap_items, blk=MemmapBlock, splitter=None, **kw):
    db = DataBlock(blocks=(blk, CategoryBlock), get_items=items, get_y=ColReader('label'), splitter=splitter or RandomSplitter(seed=0))
    return db.dataloaders(path, num_workers=2, **kw), db.dataloaders(path, num_workers=0, **kw)

CASES = {
    'full shuffle': dict(bs=16),
    'block-local shuffle': dict(bs=16, shuffle_block=20, shuffle_window=3),
    'weights': dict(bs=16, weights='w'),
    'balance': dict(bs=16, balance='label'),
    'bs 1, no drop_last': dict(bs=1),
}

@pytest.mark.parametrize('case', list(CASES))
def test_threads_give_the_same_batches(tmp_path, case):
    labelled(tmp_path/'s.fmm')
    d2, d0 = pair(tmp_path/'s.fmm', **CASES[case])
    assert same_batches(d2.train, d0.train, epochs=1 if case.startswith('bs 1') else 2) > 0
    assert same_batches(d2.valid, d0.valid, epochs=1) > 0   # sequential, not shuffled

def test_shard_shuffle_and_many_shards(tmp_path):
    labelled(tmp_path/'s.fmm', shard_size=15 * 4 * 20)   # 15 shards
    assert MemmapStore(tmp_path/'s.fmm').n_shards == 15
    d2, d0 = pair(tmp_path/'s.fmm', bs=16, shuffle_block='shard', shuffle_window=2)
    same_batches(d2.train, d0.train)

def test_ragged_padding_and_bucketing(tmp_path):
    rng = np.random.default_rng(1)
    items = [rng.normal(size=(2, int(k))).astype(np.float32) for k in rng.integers(1, 40, 200)]
    write_memmap(tmp_path/'r.fmm', items, meta={'label': rng.integers(0, 3, 200)}, progress=False)
    d2, d0 = pair(tmp_path/'r.fmm', bs=8, bucket=4, pad_value=-1)
    same_batches(d2.train, d0.train)
    same_batches(d2.valid, d0.valid, epochs=1)

@pytest.mark.parametrize('dense', [True, False])
def test_sparse_batches(tmp_path, dense):
    import scipy.sparse as sp
    X = sp.random(200, 50, density=0.1, format='csr', random_state=0, dtype=np.float32)
    write_sparse(tmp_path/'sp.fmm', X, meta={'label': np.arange(200) % 2}, progress=False)
    d2, d0 = pair(tmp_path/'sp.fmm', items=sparse_items, blk=SparseBlock(dense=dense), bs=16)
    same_batches(d2.train, d0.train)

def test_test_dl_get_preds_and_export(tmp_path):
    X, y = labelled(tmp_path/'s.fmm')
    write_memmap(tmp_path/'new.fmm', X[:70], meta={'label': y[:70], 'w': np.ones(70)}, progress=False)
    d2, d0 = pair(tmp_path/'s.fmm', bs=16)
    t2, t0 = d2.test_dl(memmap_items(tmp_path/'new.fmm')), d0.test_dl(memmap_items(tmp_path/'new.fmm'))
    assert t2.fake_l.num_workers == 2 and t0.fake_l.num_workers == 0
    same_batches(t2, t0, epochs=1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(15, 4))
    l2, l0 = Learner(d2, model), Learner(d0, model)
    for kw in (dict(), dict(dl=t2), dict(with_input=True, with_decoded=True)):
        r2 = l2.get_preds(**kw)
        r0 = l0.get_preds(**{**kw, 'dl': t0} if 'dl' in kw else kw)
        for a, b in zip(r2, r0): assert (a is None and b is None) or torch.equal(a, b)
    l2.export(tmp_path/'m.pkl')
    from fastai.learner import load_learner
    l3 = load_learner(tmp_path/'m.pkl')
    assert type(l3.dls.valid).__name__ == 'MemmapDL' and l3.dls.valid.fake_l.num_workers == 2
    p3, _ = l3.get_preds(dl=l3.dls.test_dl(memmap_items(tmp_path/'new.fmm')))
    assert torch.equal(p3, l0.get_preds(dl=t0)[0])

# -------------------------------------------------------------------------------- clean shutdown
def test_break_stops_the_threads_and_the_next_epoch_is_whole(tmp_path):
    labelled(tmp_path/'s.fmm', n=40000)   # 2000 batches of 16 small items, read in groups of 64 batches: 32 reads
    dls, _ = pair(tmp_path/'s.fmm', bs=16, prefetch_factor=2)   # 2 reads ahead per thread: the threads are still at work
    dl = dls.train
    for i, b in enumerate(dl):
        if i == 0: assert 1 <= len(loading_threads()) <= 2
        if i == 2: break
    assert loading_threads() == []
    it = iter(dl); next(it); del it   # an iterator dropped after one batch
    assert loading_threads() == []
    assert sum(len(x) for x, _ in dl) == len(dl) * 16   # a whole new epoch

class Boom(Exception): pass

class Fail(Callback):
    "Raise in the training step of batch 3"
    def after_batch(self):
        if self.training and self.iter == 3: raise Boom('a failing training step')

def test_exception_in_training_stops_the_threads(tmp_path):
    labelled(tmp_path/'s.fmm', n=2000)
    dls, _ = pair(tmp_path/'s.fmm', bs=16)
    learn = Learner(dls, nn.Sequential(nn.Flatten(), nn.Linear(15, 4)), cbs=Fail())
    try:
        with learn.no_bar(), learn.no_logging(): learn.fit(1)
    except Boom: pass
    import gc; gc.collect()   # the exception (and its frames, which hold the epoch) is gone
    assert loading_threads() == []
    learn.remove_cb(Fail)
    with learn.no_bar(), learn.no_logging(): learn.fit(1)   # training starts afresh
    assert len(learn.recorder.losses) == len(dls.train)

def test_error_in_a_loading_thread_reaches_the_training_loop(tmp_path):
    labelled(tmp_path/'s.fmm', n=10000)   # 500 batches of 16 small items, read in groups of 64 batches: 8 reads
    dls, _ = pair(tmp_path/'s.fmm', bs=16)
    store = dls.train.items.store
    take = store.take
    calls = []
    def failing(idxs, out=None):
        calls.append(1)
        if len(calls) == 5: raise OSError('disk went away')
        return take(idxs, out)
    store.take = failing
    with pytest.raises(OSError, match='disk went away'): list(dls.train)
    assert loading_threads() == []
    del store.take
    assert len(list(dls.train)) == len(dls.train)

SIGINT_SCRIPT = '''
import sys, time, numpy as np
from fastai.data.all import DataBlock, CategoryBlock, ColReader, RandomSplitter
from fastai_memmap.all import memmap_items, MemmapBlock
dls = DataBlock(blocks=(MemmapBlock, CategoryBlock), get_items=memmap_items, get_y=ColReader('label'),
                splitter=RandomSplitter(seed=0)).dataloaders(sys.argv[1], bs=16, num_workers=2)
try:
    while True:
        for b in dls.train:
            print('batch', flush=True); time.sleep(0.05)   # a slow training step
except KeyboardInterrupt:
    import threading
    print('interrupted; loading threads left:', sum(t.name.startswith('fastai_memmap') for t in threading.enumerate()), flush=True)
'''

def test_ctrl_c_interrupts_training_and_stops_the_threads(tmp_path):
    labelled(tmp_path/'s.fmm', n=2000)
    f = tmp_path/'train.py'; f.write_text(SIGINT_SCRIPT)
    p = subprocess.Popen([sys.executable, str(f), str(tmp_path/'s.fmm')], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(5): assert p.stdout.readline().startswith('batch')   # training is under way
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=30)
    finally: p.kill()
    assert p.returncode == 0, err[-2000:]
    assert 'interrupted; loading threads left: 0' in out, (out[-500:], err[-2000:])

def test_small_batches_are_read_without_threads(tmp_path, monkeypatch):
    "With the default `thread_min_bytes` (384 KiB), an epoch of small batches reads in the consumer's thread, one of large batches in loading threads; both as without threads"
    from fastai_memmap.data import MemmapDL, _threads
    monkeypatch.setattr(MemmapDL, 'thread_min_bytes', 384 << 10)   # the default (the test session sets 0)
    def readers(dl):
        names, read = [], dl._read
        dl._read = lambda idx: (names.append(threading.current_thread().name), read(idx))[1]
        try: batches = list(dl)
        finally: del dl._read
        return {n.startswith('fastai_memmap_') for n in names}, batches
    for shape, bs, threaded in (((4,), 64, False), ((256, 64), 16, True)):   # 1 KiB and 1 MiB batches
        X = np.random.default_rng(0).random((160, *shape), dtype=np.float32)
        write_memmap(tmp_path/f'{shape}.fmm', X, meta={'label': np.arange(160) % 3}, progress=False)
        db = DataBlock(blocks=(MemmapBlock, CategoryBlock), get_items=memmap_items, get_y=ColReader('label'), splitter=RandomSplitter(seed=0))
        dl2, dl0 = (db.dataloaders(tmp_path/f'{shape}.fmm', bs=bs, num_workers=nw).train.new(shuffle=False) for nw in (2, 0))   # 8 batches
        assert dl2._plan() and dl2._loading_threads(2) == (_threads(2) if threaded else 0)
        who, b2 = readers(dl2)
        assert (True in who) == threaded, (shape, who)
        for u, v in zip(b2, list(dl0)): assert torch.equal(u[0], v[0]) and torch.equal(u[1], v[1])
