"""fastai distributed training (`learn.distrib_ctx()`, `DistributedDL`) with MemmapBlock loaders on CPU with gloo.

A real two-process run (`torchrun --standalone --nproc_per_node 2`) fits a small model; every rank records the
store items of each batch it reads (item i holds i in its first feature) and its store reads. Asserted:
- training items (160 = 2 ranks x 5 batches x 16, drop_last): per epoch the ranks' items are disjoint and
  together are every training item; the store is read whole batches at a time (small batches: several
  consecutive ones in one `store.take`), never per item;
- validation items (33, uneven): 17 per rank, the union is every item, and the only item read twice is
  fastai's padding: the first item of the epoch's order, appended to the last rank's piece;
- both ranks end with the same weights and losses, and the model learned (accuracy > 0.9);
- a shuffled, uneven loader with 2 loading threads per rank: per epoch each rank reads ceil(n/2) items cut
  into batches (`drop_last` drops each rank's own last partial batch), both ranks read the same number of
  batches, `len()` is that number, items read twice are only the padding, and all items are covered when
  `drop_last` is off.
Then, in this process (a gloo group of one): `rank_idxs` is fastai's own split rule, and loaders that are not
on the batch path keep fastai's `DistributedDL` iteration (which now runs on CPU for them)."""
import json, os, subprocess, sys, textwrap
from pathlib import Path
import numpy as np, pytest, torch
import torch.distributed as dist

pytest.importorskip('accelerate')   # fastai.distributed cannot be imported without it
from fastai_memmap.distrib import rank_idxs, comm_device
from fastai.data.load import DataLoader
from fastai.data.all import DataBlock, CategoryBlock, ColReader, ColSplitter
from fastai.distributed import DistributedDL
from fastai_memmap.write import write_memmap
from fastai_memmap.data import MemmapBlock, memmap_items

N, N_TRAIN = 193, 160
SCRIPT = '''
N, N_TRAIN = 193, 160
import json, os, sys, numpy as np, torch
from torch import nn
from fastai.data.all import DataBlock, CategoryBlock, ColReader, ColSplitter, RandomSplitter
from fastai.learner import Learner
from fastai.callback.core import Callback
from fastai.metrics import accuracy
from fastai.distributed import DistributedDL
from fastai_memmap.data import MemmapBlock, memmap_items
import fastai_memmap.distrib

path, out = sys.argv[1], sys.argv[2]
rank = int(os.environ['RANK'])
reads = []
class Record(Callback):
    order = 100
    def before_epoch(self): self.ep = {'train': [], 'valid': []}; epochs.append(self.ep); reads.clear()
    def before_batch(self): self.ep['train' if self.training else 'valid'].append(self.xb[0][:, 0].long().tolist())
    def after_epoch(self): self.ep['reads'] = list(reads)
class Net(nn.Module):
    def __init__(self): super().__init__(); self.bn, self.lin = nn.BatchNorm1d(3), nn.Linear(3, 2)
    def forward(self, x): return self.lin(self.bn(x[:, 1:]))

epochs = []
dls = DataBlock(blocks=(MemmapBlock, CategoryBlock), get_items=memmap_items, get_y=ColReader('label'),
                splitter=ColSplitter('is_valid')).dataloaders(path, bs=16, num_workers=0)
store = dls.train.items.store
take = store.take
store.take = lambda idxs, out=None: (reads.append(len(idxs)), take(idxs, out))[1]
learn = Learner(dls, Net(), loss_func=nn.CrossEntropyLoss(), metrics=accuracy, cbs=Record())
with learn.distrib_ctx():
    learn.fit(3, 0.1)
    losses = [[float(v) for v in r] for r in learn.recorder.values]
    learn.remove_cb(Record)
    inps, preds, targs = learn.get_preds(with_input=True)   # gathered from both ranks, fastai's padding removed
res = dict(pred_ids=inps[:, 0].long().tolist(), preds=preds.argmax(1).tolist(), targs=targs.tolist(), epochs=epochs, losses=losses,
           weight=learn.model.lin.weight.tolist(), bn=type(learn.model.bn).__name__, model=type(learn.model).__name__)

# a shuffled, uneven split read by persistent workers, with and without drop_last
dls2 = DataBlock(blocks=(MemmapBlock, CategoryBlock), get_items=memmap_items, get_y=ColReader('label'),
                 splitter=RandomSplitter(0.2, seed=0)).dataloaders(path, bs=16, num_workers=2)
for name, dl in [('drop', dls2.train), ('nodrop', dls2.train.new(drop_last=False))]:
    ddl = DistributedDL(dl)
    res[name] = dict(n=dl.n, len=len(ddl), items=dl.items.store_idxs.tolist(), fastai_len=DistributedDL._fastai_len(ddl),
                     epochs=[[x[:, 0].long().tolist() for x, y in ddl] for _ in range(2)])

# loading threads and none: the same pieces of the same epochs
import random
d2, d0 = dls2.train, dls2.train.new(num_workers=0)
d2.rng, d0.rng = random.Random(5), random.Random(5)
e2 = [[x[:, 0].long().tolist() for x, y in DistributedDL(d2)] for _ in range(2)]
e0 = [[x[:, 0].long().tolist() for x, y in DistributedDL(d0)] for _ in range(2)]
res['threads'] = dict(equal=e2 == e0, batches=len(e2[0]), workers=(d2.fake_l.num_workers, d0.fake_l.num_workers))

# an unsigned store (uint16 values >= 2**15, which a signed view would turn negative) through the threads of each rank
from fastai_memmap.write import write_memmap
U = ((40000 + np.arange(N * 4)) % 65536).astype(np.uint16).reshape(N, 4)   # item i starts at 40000 + 4 i
write_memmap(f'{out}/u16_{rank}.fmm', U, meta={'label': np.arange(N) % 2, 'is_valid': np.arange(N) >= N_TRAIN}, progress=False)
udls = DataBlock(blocks=(MemmapBlock, CategoryBlock), get_items=memmap_items, get_y=ColReader('label'),
                 splitter=ColSplitter('is_valid')).dataloaders(f'{out}/u16_{rank}.fmm', bs=16, num_workers=2)
xs = [x for x, y in DistributedDL(udls.train)]
ids = np.concatenate([(x[:, 0].numpy().astype(np.int64) - 40000) // 4 for x in xs])
res['u16'] = dict(dtypes=sorted({str(x.dtype) for x in xs}), exact=bool(np.array_equal(np.concatenate([x.numpy() for x in xs]), U[ids])),
                  n=len(ids), min=int(min(x.numpy().min() for x in xs)))
json.dump(res, open(f'{out}/rank{rank}.json', 'w'))
torch.distributed.barrier()   # every process done with its collectives before any tears gloo down
torch.distributed.destroy_process_group()
'''


@pytest.fixture(scope='module')
def store_path(tmp_path_factory):
    tmp = tmp_path_factory.mktemp('distrib')
    sign = np.where(np.arange(N) % 2, 1., -1.)
    X = np.stack([np.arange(N), sign, sign * 0.5, np.random.default_rng(0).normal(size=N)], 1).astype(np.float32)
    write_memmap(tmp/'s.fmm', X, meta={'label': np.arange(N) % 2, 'is_valid': np.arange(N) >= N_TRAIN}, progress=False)
    return tmp/'s.fmm'


@pytest.fixture(scope='module')
def ranks(store_path, tmp_path_factory):
    out = tmp_path_factory.mktemp('ranks')
    (out/'train.py').write_text(SCRIPT)
    env = {**os.environ, 'PYTHONWARNINGS': 'ignore', 'MPLBACKEND': 'Agg'}
    r = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2',
                        str(out/'train.py'), str(store_path), str(out)], capture_output=True, text=True, timeout=240, env=env)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-6000:]
    return [json.loads((out/f'rank{k}.json').read_text()) for k in range(2)]


def test_fit_ranks_read_disjoint_halves_whole_batches_at_a_time(ranks):
    assert len(ranks[0]['epochs']) == 3
    for e0, e1 in zip(ranks[0]['epochs'], ranks[1]['epochs']):
        t0, t1 = sum(e0['train'], []), sum(e1['train'], [])
        assert len(t0) == len(t1) == 80 and len(set(t0)) == 80
        assert not set(t0) & set(t1)
        assert set(t0) | set(t1) == set(range(N_TRAIN))
        v0, v1 = sum(e0['valid'], []), sum(e1['valid'], [])
        assert (v0, v1) == (list(range(160, 177)), list(range(177, 193)) + [160])   # unshuffled: consecutive pieces + padding
        for e in (e0, e1):   # the batch path: each store read is one or more whole consecutive batches (of 16 small items: a group)
            ends = np.cumsum([len(b) for b in e['train']]).tolist() + (80 + np.cumsum([len(b) for b in e['valid']])).tolist()
            assert 0 < len(e['reads']) < len(ends) and set(np.cumsum(e['reads']).tolist()) <= set(ends) and sum(e['reads']) == ends[-1]
    assert ranks[0]['epochs'][0]['train'] != ranks[0]['epochs'][1]['train']   # shuffled anew each epoch


def test_fit_trains_one_model(ranks):
    r0, r1 = ranks
    assert r0['weight'] == r1['weight']   # gradients were averaged: one model
    assert r0['losses'] == r1['losses']
    assert r0['losses'][-1][0] < r0['losses'][0][0]
    assert r0['losses'][-1][2] > 0.9, r0['losses']
    assert r0['model'] == 'Net'   # unwrapped from DistributedDataParallel after fit
    # get_preds gathers every validation item once (the padding removed), but in fastai's gather order: batch by
    # batch, each batch the ranks' batches in rank order; not in dataset order once a rank reads more than one batch
    pieces = [list(range(160, 177)), list(range(177, 193)) + [160]]
    order = [i for j in range(0, 17, 16) for p in pieces for i in p[j:j + 16]][:N - N_TRAIN]
    assert order == list(range(160, 176)) + list(range(177, 193)) + [176]
    assert r0['pred_ids'] == r1['pred_ids'] == order
    assert r0['targs'] == [i % 2 for i in order]
    assert np.mean(np.array(r0['preds']) == r0['targs']) > 0.9
    assert r0['bn'] == 'BatchNorm1d'   # not converted to SyncBatchNorm, which cannot run on CPU


@pytest.mark.parametrize('name', ['drop', 'nodrop'])
def test_shuffled_uneven_split_with_persistent_workers(ranks, name):
    r0, r1 = ranks[0][name], ranks[1][name]
    n, bs, P = r0['n'], 16, 2
    per = -(-n // P)
    assert n % P == 1   # uneven: one item of padding
    nb = per // bs if name == 'drop' else -(-per // bs)
    assert r0['len'] == r1['len'] == nb
    items = set(r0['items'])
    for ep in range(2):
        b0, b1 = r0['epochs'][ep], r1['epochs'][ep]
        assert len(b0) == len(b1) == nb   # the same number of batches in every rank (DDP needs it)
        a, b = sum(b0, []), sum(b1, [])
        assert len(a) == len(b) == (nb * bs if name == 'drop' else per)
        assert set(a) | set(b) <= items
        assert len(set(a) & set(b)) <= P * per - n
        if name == 'nodrop': assert set(a) | set(b) == items
    assert r0['epochs'][0] != r0['epochs'][1]
    if name == 'drop':   # fastai's own count (kept for other loaders) is one batch too many here: 155 items -> 5, 4 read
        assert (n, r0['fastai_len'], r0['len']) == (155, 5, 4)


@pytest.fixture(scope='module')
def group(tmp_path_factory):
    "A gloo process group of one process, for DistributedDLs that pretend to be rank r of P"
    dist.init_process_group('gloo', init_method=f"file://{tmp_path_factory.mktemp('pg')}/pg", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_rank_idxs_is_fastais_rule(group):
    assert comm_device() == torch.device('cpu')
    for n in (1, 7, 10, 16, 33):
        for P in (1, 2, 3, 4, 8):
            dl = DataLoader(list(range(n)), bs=4)
            for r in range(P):
                ddl = DistributedDL(dl, rank=r, world_size=P)
                ddl._broadcast = lambda t, rank: list(t)   # fastai's own moves the order to CUDA; one process has it already
                assert ddl.get_idxs() == rank_idxs(np.arange(n), r, P).tolist()


def test_len_and_reads_in_process(group, store_path):
    for bs, drop in ((16, False), (16, True), (7, True), (50, False)):
        dls = DataBlock(blocks=(MemmapBlock, CategoryBlock), get_items=memmap_items, get_y=ColReader('label'),
                        splitter=ColSplitter('is_valid')).dataloaders(store_path, bs=bs, num_workers=0)
        dl = dls.train.new(drop_last=drop, shuffle=False)
        for P in (2, 3):
            got = []
            for r in range(P):
                batches = [x[:, 0].long().tolist() for x, y in DistributedDL(dl, rank=r, world_size=P)]
                assert len(batches) == len(DistributedDL(dl, rank=r, world_size=P))
                assert all(len(b) == bs for b in batches[:-1])
                got += sum(batches, [])
            if not drop: assert set(got) == set(range(N_TRAIN)) and len(got) == P * -(-N_TRAIN // P)


def test_per_item_loaders_keep_fastais_path(group, store_path):
    from fasttransform import Transform
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        dls = DataBlock(blocks=(MemmapBlock, CategoryBlock), get_items=memmap_items, get_y=ColReader('label'),
                        item_tfms=Transform(lambda o: o), splitter=ColSplitter('is_valid')).dataloaders(store_path, bs=16, num_workers=0)
    pieces = [sum([x[:, 0].long().tolist() for x, y in DistributedDL(dls.valid, rank=r, world_size=2)], []) for r in range(2)]
    assert pieces == [list(range(160, 177)), list(range(177, 193)) + [160]]


def test_threads_read_the_same_pieces_as_no_threads(ranks):
    for r in ranks: assert r['threads'] == dict(equal=True, batches=4, workers=[2, 0])

def test_unsigned_store_through_threads_of_two_ranks(ranks):
    "uint16 values >= 2**15 reach each rank as uint16, exactly (worker processes once handed them back signed)"
    for r in ranks: assert r['u16']['dtypes'] == ['torch.uint16'] and r['u16']['exact'] and r['u16']['n'] == 80 and r['u16']['min'] >= 2**15
