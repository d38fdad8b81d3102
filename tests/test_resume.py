"""Resuming an interrupted epoch exactly where it stopped (`MemmapDL.state_dict`, `ResumeCallback`).

Real training runs in real processes, killed with SIGKILL. Each run is a process forked from a server that has
imported torch and fastai once (`multiprocessing`'s forkserver), so a run starts in a fraction of a second. It
trains a small model with dropout (CPU, one thread, deterministic algorithms), on batches that get random noise
(torch's global generator), and logs every batch it trains on or validates (item numbers, a checksum of the
input's bytes, targets, loss); item `i` holds `i` in its first feature. The test names a step of training (before
a batch, after an optimizer step, before validation); when the run reaches it, it tells the test and waits, and
the test kills it (`kill -9`). The run started again continues from its checkpoint.

Asserted, for each shuffle mode (full, block-local, by shard, bucketed ragged items, weights, balance), with 0
and 2 loading threads, killed twice at random steps (seeded), then run to the end:
- each run after a kill starts from the latest checkpoint before the kill (not from scratch);
- every batch any run logged equals the uninterrupted run's batch at that place (items, values, loss), and the
  batches that count (each run's up to where the next one took over, then the last run's) are exactly the
  uninterrupted run's, in order;
- the final weights, the recorder (values, smoothed losses, learning rates, schedule) are bitwise those of the
  uninterrupted run; no checkpoint or temporary file is left at the end.
Also: chosen kill points (right after a checkpoint, before validation, at an epoch's start), resumed with and
without loading threads in turn; a crash half-way through writing a checkpoint leaves the previous one usable;
a script with two fits (as `fine_tune`) killed in the second skips the first; under `distrib_ctx` with 2 gloo
processes (torchrun) the resumed run equals the uninterrupted one in each process; 2 processes' checkpoint
resumed by 1 process, and 1 process's by 2, see every remaining sample of the interrupted epoch exactly once;
in this process: the loader states alone (every mode, threads or not, a `break`, a `one_batch` inside an
epoch, size, refusals), how the rest of an epoch is shared out (random cases), the trackers' and training
metrics' state, time-based checkpoints, a fit called again after an interruption, clear errors."""
import contextlib, json, multiprocessing as mp, os, random, shutil, signal, subprocess, sys, time, traceback, zlib
from collections import Counter
from pathlib import Path
import numpy as np, pytest, torch
from torch import nn
import torch.distributed as dist

from fastai.data.all import DataBlock, CategoryBlock, ColReader, ColSplitter
from fastai.learner import Learner
from fastai.callback.core import Callback
from fastai.callback.schedule import fit_one_cycle
from fastai.metrics import accuracy
from fastai.callback.tracker import EarlyStoppingCallback, SaveModelCallback
from fastai.torch_core import get_model
from fasttransform import Transform
from fastai_memmap.all import write_memmap, memmap_items, MemmapBlock, TensorMemmap, ResumeCallback
from fastai_memmap.resume import _layout, _left, _plan

N, N_TRAIN, BS = 330, 290, 16
NB = N_TRAIN // BS   # 18 training batches an epoch (drop_last)
EPOCHS, EVERY = 3, 5


# ----------------------------------------------------------------------------------------- what a run does
class Jitter(Transform):
    "Random noise on the features (not on feature 0, the item number): draws from torch's global generator"
    def encodes(self, x:TensorMemmap): return torch.cat([x[:, :1], x[:, 1:] + 0.05 * torch.randn(x.shape[0], x.shape[1] - 1)], 1)

class Net(nn.Module):
    def __init__(self, h=16):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(3, h), nn.ReLU(), nn.Dropout(0.3), nn.Linear(h, 3))
    def forward(self, x): return self.body(x[:, 1:4])   # feature 0 is the item number

class BatchLog(Callback):
    "Append every batch trained on or validated to a file"
    order = 5
    def __init__(self, fn): self.fn, self.fit_no = fn, -1
    def before_fit(self): self.fit_no += 1
    def before_batch(self): self.t = self.train_iter
    def after_batch(self):
        x = self.xb[0]
        e = dict(f=self.fit_no, p='t' if self.training else 'v', e=self.epoch, i=self.iter, t=self.t, ids=x[:, 0].long().tolist(),
                 x=zlib.crc32(np.ascontiguousarray(x.detach().numpy()).tobytes()), y=self.yb[0].tolist(), loss=float(self.loss.detach()).hex())
        with open(self.fn, 'a') as f: f.write(json.dumps(e) + '\n')

class Control(Callback):
    "Note each training step; at `pause_at`, tell the test (which kills this process there) and wait"
    order = 6
    def __init__(self, conn, pause_at=None, sleep=0.):
        self.conn, self.pause_at, self.sleep, self.fit_no, self.events = conn, pause_at, sleep, -1, []
    def before_fit(self): self.fit_no += 1
    def _at(self, ev):
        msg = (self.fit_no, ev, self.train_iter)
        self.events.append(msg)
        if self.sleep: time.sleep(self.sleep)
        if self.pause_at is None or list(msg) != list(self.pause_at) or int(os.environ.get('RANK', 0)) != 0: return
        if self.conn is not None: self.conn.send(('paused', msg))
        else: print('@paused', flush=True)   # under torchrun: on its standard output
        time.sleep(600)   # until killed
    def before_batch(self):
        if self.training: self._at('b')
    def after_step(self): self._at('s')
    def before_validate(self): self._at('v')

def _die_in_save(n:int):
    "Make this process's n-th checkpoint write die (SIGKILL) after writing half of the file"
    real, count = torch.save, [0]
    def save(obj, f, *args, **kwargs):
        if not hasattr(f, 'write') or not str(getattr(f, 'name', '')).endswith('.tmp'): return real(obj, f, *args, **kwargs)
        count[0] += 1
        if count[0] < n: return real(obj, f, *args, **kwargs)
        import io
        buf = io.BytesIO(); real(obj, buf, *args, **kwargs)
        f.write(buf.getvalue()[:len(buf.getvalue()) // 2]); f.flush(); os.fsync(f.fileno())
        os.kill(os.getpid(), signal.SIGKILL)
    torch.save = save

def train(cfg:dict, conn=None):
    "One training run as `cfg` says; `conn`: the test's end of a pipe for lockstep control"
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    rank = int(os.environ.get('RANK', 0))
    random.seed(0); np.random.seed(0); torch.manual_seed(0)
    out = Path(cfg['out']); out.mkdir(parents=True, exist_ok=True)
    (out/f'pid{rank}').write_text(str(os.getpid()))
    if cfg.get('die_in_save'): _die_in_save(cfg['die_in_save'])
    dls = DataBlock(blocks=(MemmapBlock(batch_tfms=Jitter()), CategoryBlock), get_items=memmap_items, get_y=ColReader('label'),
                    splitter=ColSplitter('is_valid')).dataloaders(cfg['store'], bs=BS, num_workers=cfg['nw'], **cfg['dl'])
    ctl = Control(conn, cfg.get('pause_at'), cfg.get('sleep', 0.))
    learn = Learner(dls, Net(), loss_func=nn.CrossEntropyLoss(), metrics=accuracy, path=cfg['path'], cbs=[BatchLog(out/f'log{rank}.jsonl'), ctl])
    rcb = ResumeCallback(every=cfg.get('every', EVERY), every_secs=cfg.get('every_secs'), verbose=False)
    with learn.distrib_ctx() if cfg.get('ddp') else contextlib.nullcontext(), learn.no_bar(), learn.no_logging():
        for n_epoch in cfg.get('fits', [EPOCHS]):
            if cfg.get('one_cycle', True): learn.fit_one_cycle(n_epoch, 1e-2, cbs=rcb)
            else: learn.fit(n_epoch, 3e-3, cbs=rcb)
    rec = learn.recorder
    hexs = lambda vs: [None if v is None else float(v).hex() for v in vs]
    json.dump(dict(values=[hexs(v) for v in rec.values], losses=hexs(rec.losses), lrs=hexs(rec.lrs), iters=list(rec.iters),
                   hps={k: hexs(v) for k, v in getattr(rec, 'hps', {}).items()}), open(out/f'rec{rank}.json', 'w'))
    torch.save(get_model(learn.model).state_dict(), out/f'final{rank}.pth')
    return ctl.events

def _child(cfg, conn):
    try: events = train(cfg, conn)
    except BaseException: conn.send(('error', traceback.format_exc())); raise
    conn.send(('done', events))


# ----------------------------------------------------------------------------------------- running runs
_CTX = []

def _ctx():
    "A forkserver whose processes have imported this module (torch, fastai) already"
    if not _CTX:
        ctx = mp.get_context('forkserver')
        ctx.set_forkserver_preload(['torch', 'torch._inductor', 'fastai.learner', 'fastai_memmap.all', __name__])   # (torch.use_deterministic_algorithms imports torch._inductor)
        from multiprocessing import forkserver
        old = os.environ.get('PYTHONPATH')   # Python 3.11's forkserver ignores sys.path: it must find this module on its own
        os.environ['PYTHONPATH'] = os.pathsep.join([str(Path(__file__).parent)] + ([old] if old else []))
        try: forkserver.ensure_running()
        finally:
            if old is None: del os.environ['PYTHONPATH']
            else: os.environ['PYTHONPATH'] = old
        _CTX.append(ctx)
    return _CTX[0]

def run(cfg:dict, kill=None, timeout=180) -> tuple:
    "Run `train(cfg)` in a new process, killing it (SIGKILL) when it reports event `kill`: (killed, exit code, its events)"
    ctx = _ctx()
    here, there = ctx.Pipe()
    p = ctx.Process(target=_child, args=({**cfg, 'pause_at': kill}, there))
    p.start(); there.close()
    killed, events = False, None
    try:
        if not here.poll(timeout): raise TimeoutError(f"no word from the run for {timeout} s: {cfg}")
        try: msg = here.recv()
        except EOFError: msg = ('died',)   # a kill inside the run
        if msg[0] == 'error': raise AssertionError(f"the run failed:\n{msg[1]}")
        if msg[0] == 'paused':
            assert tuple(msg[1]) == tuple(kill)
            os.kill(p.pid, signal.SIGKILL); killed = True
        if msg[0] == 'done': events = [tuple(e) for e in msg[1]]
    finally:
        p.join(timeout)
        if p.is_alive(): p.kill(); p.join()
        here.close()
    return killed, p.exitcode, events

def read_log(out, rank=0) -> list:
    fn = Path(out)/f'log{rank}.jsonl'
    return [json.loads(l) for l in fn.read_text().splitlines()] if fn.exists() else []

def tkey(e): return (e['f'], e['t'])

def same_weights(a, b) -> bool:
    sa, sb = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)

def expected_start(kill, n_epoch=EPOCHS, every=EVERY, nb=NB) -> tuple:
    "Where a run killed at event `kill` is taken up again: the training batch after the latest checkpoint before it"
    f, ev, t = kill
    marks = set(range(every, t + 1, every)) | {(e + 1) * nb for e in range(n_epoch - 1) if (e + 1) * nb < t or ((e + 1) * nb == t and ev != 'v')}
    return (f, max(marks)) if marks else (0, 0)

def check_chain(ref_out, outs, kills, n_epoch=EPOCHS):
    "The runs in `outs` (killed at `kills`, then completed) trained exactly as the uninterrupted run in `ref_out`"
    ref = read_log(ref_out)
    ref_t = {tkey(e): e for e in ref if e['p'] == 't'}
    ref_v = {(e['f'], e['e'], e['i']): e for e in ref if e['p'] == 'v'}
    logs = [read_log(o) for o in outs]
    for log in logs:   # every batch any run made is the uninterrupted run's batch at that place
        for e in log:
            if e['p'] == 't': assert e == ref_t[tkey(e)], (e, ref_t.get(tkey(e)))
            else: assert e == ref_v[(e['f'], e['e'], e['i'])]
    starts = [min((tkey(e) for e in log if e['p'] == 't'), default=None) for log in logs]
    for j, kill in enumerate(kills):   # each run after a kill started from the latest checkpoint before it
        want = expected_start(kill, n_epoch)
        assert starts[j + 1] == want or (starts[j + 1] is None and want == max(ref_t)), (kill, starts[j + 1], want)
    seq = []   # the batches that count: each run's up to where the next one took over, then the last run's
    for j, log in enumerate(logs):
        cut = starts[j + 1] if j + 1 < len(logs) and starts[j + 1] is not None else (99, 0)
        seq += [tkey(e) for e in log if e['p'] == 't' and tkey(e) < cut]
    assert seq == [tkey(e) for e in ref if e['p'] == 't']
    assert same_weights(Path(ref_out)/'final0.pth', Path(outs[-1])/'final0.pth')
    assert json.loads((Path(outs[-1])/'rec0.json').read_text()) == json.loads((Path(ref_out)/'rec0.json').read_text())

def chain(cfg:dict, kills:list, tmp:Path, vary=None) -> list:
    "Run `cfg` (changed by `vary(j)` in run `j`) killed at each of `kills` in turn (each run after the first resumes), then to the end"
    outs = []
    for j, kill in enumerate(list(kills) + [None]):
        outs.append(tmp/f'run{j}')
        killed, code, _ = run({**cfg, **(vary(j) if vary else {}), 'out': str(outs[-1])}, kill)
        assert killed == (kill is not None), f"run {j} was not killed at {kill}"
        assert code == (-signal.SIGKILL if killed else 0), code
    ck = Path(cfg['path'])/'models'
    assert not ck.exists() or list(ck.iterdir()) == [], list(ck.iterdir())   # no checkpoint, no temporary file left
    return outs

def pick_kills(events:list, n:int, seed:str) -> list:
    "`n` random events of a run, in order, after its first"
    rng = random.Random(zlib.crc32(seed.encode()))
    return [events[i] for i in sorted(rng.sample(range(1, len(events) - 1), n))]


# ----------------------------------------------------------------------------------------- stores
@pytest.fixture(scope='module')
def stores(tmp_path_factory):
    tmp = tmp_path_factory.mktemp('stores')
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(N, 3)).astype(np.float32)
    label = (feats[:, 0] > 0).astype(int) + (feats[:, 1] > 1)
    meta = {'label': label, 'w': rng.random(N), 'is_valid': np.arange(N) >= N_TRAIN}
    X = np.concatenate([np.arange(N, dtype=np.float32)[:, None], feats], 1)
    write_memmap(tmp/'s.fmm', X, meta=meta, shard_size=40 * X[0].nbytes, progress=False)   # 9 shards
    lens = rng.integers(4, 12, N)
    ragged = [np.concatenate([[i], feats[i], rng.normal(size=k - 4)]).astype(np.float32) for i, k in enumerate(lens)]
    write_memmap(tmp/'r.fmm', ragged, meta=meta, progress=False)
    return dict(fixed=str(tmp/'s.fmm'), ragged=str(tmp/'r.fmm'))

MODES = {
    'full': dict(dl={}),
    'block': dict(dl=dict(shuffle_block=20, shuffle_window=3), one_cycle=False),
    'shard': dict(dl=dict(shuffle_block='shard', shuffle_window=2)),
    'bucket': dict(dl=dict(bucket=4), store='ragged', one_cycle=False),
    'weights': dict(dl=dict(weights='w')),
    'balance': dict(dl=dict(balance='label')),
}

def mode_cfg(stores, mode, nw, path) -> dict:
    m = MODES[mode]
    return dict(store=stores[m.get('store', 'fixed')], dl=m['dl'], one_cycle=m.get('one_cycle', True), nw=nw, path=str(path))

_REFS = {}

def reference(stores, mode, tmp_path_factory) -> tuple:
    "The uninterrupted run of `mode` (once per module): its output folder and its events"
    if mode not in _REFS:
        tmp = tmp_path_factory.mktemp(f'ref_{mode}')
        killed, code, events = run({**mode_cfg(stores, mode, 0, tmp/'learn'), 'out': str(tmp/'out')})
        assert code == 0 and not killed
        assert not (tmp/'learn'/'models'/'resume.pth').exists()   # removed at the end
        _REFS[mode] = (tmp/'out', events)
    return _REFS[mode]



# ----------------------------------------------------------------------------------------- killed and resumed
@pytest.mark.parametrize('nw', [0, 2])
@pytest.mark.parametrize('mode', list(MODES))
def test_killed_twice_and_resumed_equals_uninterrupted(stores, mode, nw, tmp_path, tmp_path_factory):
    ref_out, events = reference(stores, mode, tmp_path_factory)
    assert len([e for e in events if e[1] == 'b']) == EPOCHS * NB
    kills = pick_kills(events, 2, seed=f'{mode}{nw}')
    outs = chain(mode_cfg(stores, mode, nw, tmp_path/'learn'), kills, tmp_path)
    check_chain(ref_out, outs, kills)

def test_random_kill_points_spread(stores, tmp_path_factory):
    "The random kill points above fall before batches and after optimizer steps, in every epoch"
    _, events = reference(stores, 'full', tmp_path_factory)
    kills = [k for mode in MODES for nw in (0, 2) for k in pick_kills(events, 2, seed=f'{mode}{nw}')]
    assert len(kills) == 24 and {'b', 's'} <= {k[1] for k in kills}
    assert {min(k[2] // NB, EPOCHS - 1) for k in kills} == set(range(EPOCHS))

def test_kill_at_chosen_points(stores, tmp_path, tmp_path_factory):
    "Killed right after a checkpoint, before validation, at an epoch's start (after its checkpoint), just after an epoch began; resumed with and without loading threads in turn"
    ref_out, events = reference(stores, 'full', tmp_path_factory)
    kills = [(0, 'b', 2 * EVERY), (0, 'v', 2 * NB), (0, 'b', 2 * NB), (0, 's', 2 * NB + 3)]
    assert all(k in events for k in kills)
    assert [expected_start(k)[1] for k in kills] == [10, 35, 36, 36]
    outs = chain(mode_cfg(stores, 'full', 2, tmp_path/'learn'), kills, tmp_path, vary=lambda j: dict(nw=2 * (j % 2)))
    check_chain(ref_out, outs, kills)

def test_crash_while_writing_a_checkpoint_keeps_the_previous_one(stores, tmp_path, tmp_path_factory):
    ref_out, _ = reference(stores, 'full', tmp_path_factory)
    cfg = mode_cfg(stores, 'full', 2, tmp_path/'learn')
    killed, code, _ = run({**cfg, 'out': str(tmp_path/'run0'), 'die_in_save': 3})   # dies half-way through writing its 3rd checkpoint
    assert not killed and code == -signal.SIGKILL
    assert max(e['t'] for e in read_log(tmp_path/'run0') if e['p'] == 't') == 3 * EVERY - 1   # after the batch it writes it after
    models = tmp_path/'learn'/'models'
    tmps = [p for p in models.iterdir() if p.name.endswith('.tmp')]
    assert len(tmps) == 1 and tmps[0].stat().st_size > 0   # the half-written file
    with pytest.raises(Exception): torch.load(tmps[0], weights_only=True)
    ck = torch.load(models/'resume.pth', weights_only=True)   # the previous checkpoint, whole
    assert ck['fit']['train_iter'] == 2 * EVERY
    killed, code, _ = run({**cfg, 'out': str(tmp_path/'run1')})
    assert code == 0
    assert list(models.iterdir()) == []   # the half-written file removed too
    check_chain(ref_out, [tmp_path/'run0', tmp_path/'run1'], [(0, 's', 3 * EVERY - 1)])

def test_second_fit_killed_skips_the_first(stores, tmp_path):
    "Two fits in one script (as fine_tune), killed in the second: the script run again skips the first, resumes the second"
    cfg = {**mode_cfg(stores, 'full', 0, tmp_path/'ref'), 'fits': [1, 2]}
    killed, code, events = run({**cfg, 'out': str(tmp_path/'ref_out')})
    assert code == 0 and events[0][0] == 0 and events[-1][0] == 1
    kill = (1, 's', NB + 3)
    outs = chain({**cfg, 'path': str(tmp_path/'learn')}, [kill], tmp_path)
    assert {e['f'] for e in read_log(outs[1])} == {1}   # nothing of the first fit again
    check_chain(tmp_path/'ref_out', outs, [kill], n_epoch=2)


# ----------------------------------------------------------------------------------------- distributed (torchrun, gloo)
DDP_SCRIPT = '''
import json, sys, torch
sys.path.insert(0, {tests!r})
import test_resume
for cfg in json.loads(sys.argv[1]): test_resume.train(cfg)   # one after the other, in the same processes and process group
torch.distributed.barrier()   # every process done with its collectives before any tears gloo down
torch.distributed.destroy_process_group()
'''
NB2 = N_TRAIN // 2 // BS   # training batches each of 2 processes reads an epoch: 9 (144 of its 145 items)

def torchrun(cfgs:list, tmp:Path, nproc=2, timeout=300) -> tuple:
    "Run `train(cfg)` for each of `cfgs` in turn in `nproc` processes; SIGKILL process 0 when it pauses at a `pause_at`: (exit code, stderr)"
    script = tmp/'ddp_train.py'
    script.write_text(DDP_SCRIPT.format(tests=str(Path(__file__).parent)))
    errf = tmp/f"{Path(cfgs[0]['out']).name}.err"
    env = {**os.environ, 'PYTHONWARNINGS': 'ignore', 'OMP_NUM_THREADS': '1'}
    with open(errf, 'w') as err:
        p = subprocess.Popen([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', str(nproc), str(script),
                              json.dumps([{**c, 'ddp': True} for c in cfgs])], stdout=subprocess.PIPE, stderr=err, text=True, env=env)
        try:
            for line in p.stdout:
                if line.strip() == '@paused':
                    for c in cfgs:
                        if c.get('pause_at') and (Path(c['out'])/'pid0').exists(): os.kill(int((Path(c['out'])/'pid0').read_text()), signal.SIGKILL)
            p.wait(timeout=timeout)
        finally:
            if p.poll() is None: p.kill(); p.wait()
    return p.returncode, errf.read_text()

def _items(log, epoch, before=None) -> list:
    "Items of the training batches of `epoch` in `log` (those before training batch `before`)"
    return [i for e in log if e['p'] == 't' and e['e'] == epoch and (before is None or e['t'] < before) for i in e['ids']]

@pytest.fixture(scope='module')
def ddp(stores, tmp_path_factory):
    "Runs with 2 processes (torchrun, gloo) and 1: uninterrupted, killed, resumed with as many processes and with the other number"
    pytest.importorskip('accelerate')
    tmp = tmp_path_factory.mktemp('ddp')
    base = dict(store=stores['fixed'], dl={}, one_cycle=True, nw=2, every=4, every_secs=3600)   # every_secs: process 0 decides, every batch
    rng = random.Random(13)
    r = dict(tmp=tmp, kill2=rng.randint(13, 17), kill1=rng.randint(21, 34))   # in epoch 1, after its first mid-epoch checkpoint
    rc, err = torchrun([{**base, 'path': str(tmp/'k2'), 'out': str(tmp/'k2_out'), 'pause_at': [0, 'b', r['kill2']]}], tmp)
    assert rc != 0 and (tmp/'k2_out'/'log1.jsonl').exists(), "2 processes trained, and process 0 was killed\n" + err[-3000:]
    ck = tmp/'k2'/'models'/'resume.pth'
    r['ck2'] = torch.load(ck, weights_only=True)
    (tmp/'k21'/'models').mkdir(parents=True)
    shutil.copy(ck, tmp/'k21'/'models'/'resume.pth')
    killed, code, _ = run({**base, 'path': str(tmp/'k21'), 'out': str(tmp/'r21_out')})   # 2 processes' checkpoint resumed by 1
    assert code == 0
    r['ref1_out'] = reference(stores, 'full', tmp_path_factory)[0]   # 1 process, uninterrupted (every 5 batches, no threads: the same run)
    killed, code, _ = run({**base, 'path': str(tmp/'k1'), 'out': str(tmp/'k1_out')}, kill=(0, 'b', r['kill1']))
    assert killed
    r['ck1'] = torch.load(tmp/'k1'/'models'/'resume.pth', weights_only=True)
    rc, err = torchrun([{**base, 'path': str(tmp/'ref2'), 'out': str(tmp/'ref2_out')},   # 2 processes, uninterrupted
                        {**base, 'path': str(tmp/'k2'), 'out': str(tmp/'r2_out')},   # the killed run resumed by 2 processes
                        {**base, 'path': str(tmp/'k1'), 'out': str(tmp/'r12_out')}], tmp)   # 1 process's checkpoint resumed by 2
    assert rc == 0, err[-4000:]
    for d in 'k2', 'k21', 'k1': assert list((tmp/d/'models').iterdir()) == []   # completed: no checkpoint left
    return r

def test_ddp_killed_and_resumed_equals_uninterrupted(ddp):
    tmp, T = ddp['tmp'], ddp['ck2']['fit']['train_iter']
    assert ddp['ck2']['world_size'] == 2 and len(ddp['ck2']['ranks']) == 2 and ddp['ck2']['fit']['mid']
    assert T == max(c for c in range(4, ddp['kill2'] + 1, 4))   # the latest checkpoint before process 0 was killed
    for rank in range(2):
        ref, cut, res = (read_log(tmp/f'{d}_out', rank) for d in ('ref2', 'k2', 'r2'))
        ref_t = {tkey(e): e for e in ref if e['p'] == 't'}
        for e in cut + res:
            if e['p'] == 't': assert e == ref_t[tkey(e)]
        assert min(tkey(e) for e in res if e['p'] == 't') == (0, T)
        seq = [e for e in cut if e['p'] == 't' and e['t'] < T] + [e for e in res if e['p'] == 't']
        assert seq == [e for e in ref if e['p'] == 't']   # each process its own part, batch for batch
        assert [e for e in res if e['p'] == 'v'] == [e for e in ref if e['p'] == 'v' and e['e'] >= T // NB2]
        assert same_weights(tmp/'ref2_out'/f'final{rank}.pth', tmp/'r2_out'/f'final{rank}.pth')
        assert json.loads((tmp/'r2_out'/f'rec{rank}.json').read_text()) == json.loads((tmp/'ref2_out'/f'rec{rank}.json').read_text())
    a, b = (_items(read_log(tmp/'ref2_out', k), 0) for k in range(2))
    assert len(a) == len(b) == NB2 * BS and not set(a) & set(b)   # two disjoint parts

def test_ddp_2_to_1_process_sees_each_remaining_sample_once(ddp):
    tmp, T = ddp['tmp'], ddp['ck2']['fit']['train_iter']
    e, k = divmod(T, NB2)
    assert k > 0   # in the middle of an epoch
    ref = [i for rank in range(2) for i in _items(read_log(tmp/'ref2_out', rank), e)]   # what the interrupted epoch was to read
    before = [i for rank in range(2) for i in _items(read_log(tmp/'k2_out', rank), e, before=T)]
    res = read_log(tmp/'r21_out')
    after = _items(res, e)
    assert len(before) == 2 * k * BS
    assert Counter(before + after) == Counter(ref) and len(set(before + after)) == len(ref) == 2 * NB2 * BS
    batches = [x for x in res if x['p'] == 't' and x['e'] == e]
    assert [x['i'] for x in batches] == list(range(k, k + len(batches)))   # learn.iter goes on from where it was
    assert [len(x['ids']) for x in batches] == [BS] * (len(after) // BS) + ([len(after) % BS] if len(after) % BS else [])
    for later in range(e + 1, EPOCHS):   # then whole epochs of one process
        items = _items(res, later)
        assert len(items) == NB * BS and len(set(items)) == len(items)
    assert (tmp/'r21_out'/'final0.pth').exists()

def test_ddp_1_to_2_processes_see_each_remaining_sample_once(ddp):
    tmp, T = ddp['tmp'], ddp['ck1']['fit']['train_iter']
    e, k = divmod(T, NB)
    assert k > 0 and ddp['ck1']['world_size'] == 1
    ref = _items(read_log(ddp['ref1_out']), e)
    before = _items(read_log(tmp/'k1_out'), e, before=T)
    logs = [read_log(tmp/'r12_out', rank) for rank in range(2)]
    after = [_items(log, e) for log in logs]
    assert Counter(before + after[0] + after[1]) == Counter(ref) and len(set(ref)) == len(ref) == NB * BS
    nb = [len([x for x in log if x['p'] == 't' and x['e'] == e]) for log in logs]
    assert nb[0] == nb[1] > 0   # as many batches in each process
    assert max(len(x['ids']) for log in logs for x in log if x['p'] == 't') <= BS
    for later in range(e + 1, EPOCHS):   # then whole epochs of two processes
        a, b = (_items(log, later) for log in logs)
        assert len(a) == len(b) == NB2 * BS and not set(a) & set(b)
    for rank in range(2): assert (tmp/'r12_out'/f'final{rank}.pth').exists()
    assert same_weights(tmp/'r12_out'/'final0.pth', tmp/'r12_out'/'final1.pth')   # one model


# ----------------------------------------------------------------------------------------- loader states alone (in this process)
def loaders(store, seed=0, **kw):
    random.seed(seed)   # each loader's generator is seeded from Python's
    return DataBlock(blocks=(MemmapBlock, CategoryBlock), get_items=memmap_items, get_y=ColReader('label'),
                     splitter=ColSplitter('is_valid')).dataloaders(store, bs=BS, **kw)

def batches(it) -> list: return [(x[:, 0].long().tolist(), x.clone(), y.clone()) for x, y in it]

def same(a, b) -> bool: return len(a) == len(b) and all(i == j and torch.equal(x, u) and torch.equal(y, v) for (i, x, y), (j, u, v) in zip(a, b))

@pytest.mark.parametrize('nw', [0, 2])
@pytest.mark.parametrize('mode', list(MODES))
def test_loader_state_continues_the_epoch(stores, mode, nw):
    m = MODES[mode]
    dl = loaders(stores[m.get('store', 'fixed')], 1, num_workers=nw, **m['dl']).train
    list(dl)   # an epoch first: the state is not the loader's first
    it = iter(dl)
    head = batches(next(it) for _ in range(5))
    st = dl.state_dict()
    assert st['epoch']['done'] == [[1, 5]]
    import io
    buf = io.BytesIO(); torch.save(st, buf)
    st = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
    rest, nxt = batches(it), batches(dl)
    assert len(head) + len(rest) == len(dl) == NB
    dl2 = loaders(stores[m.get('store', 'fixed')], 2, num_workers=nw, **m['dl']).train
    assert not same(batches(dl2)[:3], head[:3]) or mode == 'bucket'   # another generator: other epochs
    dl2.load_state_dict(st)
    assert len(dl2) == NB
    assert same(batches(dl2), rest)
    assert same(batches(dl2), nxt)
    assert dl2.state_dict()['rng'] == dl.state_dict()['rng'] and dl2.state_dict()['epoch'] is None

def test_loader_state_between_epochs_and_after_a_break(stores):
    dl = loaders(stores['fixed']).train
    for i, b in enumerate(dl):
        if i == 3: break   # an abandoned epoch is over
    st = dl.state_dict()
    assert st['epoch'] is None
    nxt = batches(dl)
    dl2 = loaders(stores['fixed'], 5).train
    dl2.load_state_dict(st)
    assert same(batches(dl2), nxt)

def test_one_batch_inside_an_epoch_leaves_its_place(stores):
    dl = loaders(stores['fixed']).train
    it = iter(dl)
    for _ in range(4): next(it)
    dl.one_batch()
    st = dl.state_dict()
    assert st['epoch']['done'] == [[1, 4]]
    rest, nxt = batches(it), batches(dl)
    dl2 = loaders(stores['fixed'], 5).train
    dl2.load_state_dict(st)
    assert same(batches(dl2), rest) and same(batches(dl2), nxt)   # the generator as one_batch left it

def test_loader_state_is_small_and_plain(stores):
    def walk(o):
        if isinstance(o, dict): return all(walk(v) for v in o.values())
        if isinstance(o, (list, tuple)): return all(walk(v) for v in o)
        return o is None or type(o) in (bool, int, float, str)
    for dl in loaders(stores['fixed']).loaders:
        it = iter(dl); next(it)
        st = dl.state_dict()
        assert walk(st)   # no array: its size does not grow with the epoch
        import io
        buf = io.BytesIO(); torch.save(st, buf)
        assert len(buf.getvalue()) < 12_000
        del it

def test_loader_state_refused_where_it_would_resume_wrong(stores):
    dls = loaders(stores['fixed'])
    it = iter(dls.train); next(it)
    st = dls.train.state_dict()
    with pytest.raises(ValueError, match='saved by a loader over other items'): dls.valid.load_state_dict(st)
    with pytest.raises(ValueError, match='saved by a loader over other items'): loaders(stores['ragged']).train.load_state_dict(st)
    with pytest.raises(ValueError, match=r"shuffle_block=None \(saved\) vs 'shard'"): loaders(stores['fixed'], shuffle_block='shard').train.load_state_dict(st)
    with pytest.raises(ValueError, match='not a MemmapDL state'): dls.train.load_state_dict({'epoch': None})
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')   # the per-item path's warning (once per process)
        slow = DataBlock(blocks=(MemmapBlock, CategoryBlock), get_items=memmap_items, get_y=ColReader('label'), item_tfms=Transform(lambda o: o),
                         splitter=ColSplitter('is_valid')).dataloaders(stores['fixed'], bs=BS).train
        assert not slow._plan()
    with pytest.raises(ValueError, match='only the batch path can resume'): slow.load_state_dict(st)
    sit = iter(slow); next(sit)
    with pytest.raises(ValueError, match="per-item path"): slow.state_dict()


# ----------------------------------------------------------------------------------------- sharing out the rest of an epoch
def read_parts(n:int, parts:list, bs:int, drop_last:bool) -> tuple:
    "Positions an epoch of `n` positions reads in `parts` (`[processes, batches each]`, the last part read to its end): (real, repeats)"
    real, repeats, done = [], [], []
    for j, (P, k) in enumerate(parts):
        base, m, first, done = _plan(done, n, P, bs, drop_last) if done else (None, n, True, [[P, 0]])
        assert done[-1] == [P, 0]
        lay = _layout(m, P, bs, drop_last, first)
        assert len({len(r) for r in lay}) == 1   # as many batches in every process
        assert all(0 < len(b) <= bs for r in lay for b in r)
        pos = np.arange(m) if base is None else base
        for r in lay:
            for b in r[:None if j == len(parts) - 1 else k]:
                real += pos[b[b < m]].tolist()
                repeats += pos[b[b >= m] % m].tolist()
                if not first: assert (b < m).all() or bs == 1 or m < P   # repeats in a later part only when unavoidable
        done[-1][1] = k
    return real, repeats

@pytest.mark.parametrize('seed', range(60))
def test_rest_of_an_epoch_is_read_once(seed):
    rng = random.Random(seed)
    n, bs, drop_last = rng.randint(0, 300), rng.choice([1, 2, 7, 16]), rng.random() < 0.5
    Ps = [rng.randint(1, 4)]
    for _ in range(rng.randint(1, 3)): Ps.append(rng.choice([p for p in range(1, 5) if p != Ps[-1]]))
    parts = [[P, rng.randint(0, 2 + n // (P * bs))] for P in Ps]
    want, _ = read_parts(n, parts[:1], bs, drop_last)   # what the epoch's first part reads, uninterrupted
    real, repeats = read_parts(n, parts, bs, drop_last)
    assert sorted(real) == sorted(set(want))   # each position it was to read, once
    assert set(repeats) <= set(range(n))

def test_rest_of_an_epoch_examples():
    # 2 processes read 1 batch of 4 each, of 18 positions; then 1 process reads what is left, in batches of 4
    assert read_parts(18, [[2, 1], [1, 0]], 4, False)[0] == [0, 1, 2, 3, 9, 10, 11, 12] + [4, 5, 6, 7, 8, 13, 14, 15, 16, 17]
    base, m, first, done = _plan([[2, 1]], 18, 1, 4, False)
    assert (base.tolist(), first, done) == ([4, 5, 6, 7, 8, 13, 14, 15, 16, 17], False, [[2, 1], [1, 0]])
    assert [len(b) for b in _layout(m, 1, 4, False, first)[0]] == [4, 4, 2]
    assert [[len(b) for b in r] for r in _layout(m, 3, 4, False, first)] == [[4], [3], [3]]
    # drop_last: what the uninterrupted epoch would have dropped stays dropped
    assert sorted(read_parts(10, [[1, 1], [2, 0]], 4, True)[0]) == list(range(8))


# ----------------------------------------------------------------------------------------- the callback in this process
class Stop(Exception): pass

class StopAt(Callback):
    "Raise (as a Ctrl-C would) before training batch `at`"
    def __init__(self, at): self.at = at
    def before_batch(self):
        if self.training and self.train_iter == self.at: raise Stop('stopped')

class Slow(Callback):
    "Take 0.15 s after every 4th training batch"
    def after_batch(self):
        if self.training and self.train_iter % 4 == 0: time.sleep(0.15)

class Trackers(Callback):
    "The trackers' state as each epoch's training begins"
    def before_fit(self): self.states = []
    def before_train(self): self.states.append((self.epoch, self.learn.save_model.best, self.learn.early_stopping.wait))

class Saved(Callback):
    "The training batch of the checkpoint on disk after each batch (runs after ResumeCallback)"
    order = 2000
    def before_fit(self): self.at = []
    def after_batch(self):
        p = self.learn.path/self.learn.model_dir/'resume.pth'
        if self.training: self.at.append(torch.load(p, weights_only=True)['fit']['train_iter'] if p.exists() else None)

def learner(stores, tmp, seed=0, **kw):
    from fastai.callback.tracker import EarlyStoppingCallback, SaveModelCallback
    random.seed(seed); np.random.seed(seed); torch.manual_seed(seed)
    learn = Learner(loaders(stores['fixed'], seed), Net(), loss_func=nn.CrossEntropyLoss(), metrics=accuracy, path=tmp,
                    cbs=[SaveModelCallback(fname='best'), EarlyStoppingCallback(patience=2, min_delta=0.05), Trackers()], **kw)
    learn.recorder.train_metrics = True
    return learn

def test_trackers_training_metrics_and_time_based_checkpoints(stores, tmp_path):
    torch.set_num_threads(1)
    whole = learner(stores, tmp_path/'whole')
    with whole.no_bar(), whole.no_logging(): whole.fit_one_cycle(EPOCHS, 1e-2)
    learn = learner(stores, tmp_path/'cut')
    learn.add_cbs([StopAt(NB + 11), Slow(), Saved()])
    with learn.no_bar(), learn.no_logging(), pytest.raises(Stop):
        learn.fit_one_cycle(EPOCHS, 1e-2, cbs=ResumeCallback(every=None, every_secs=0.1))
    saved = set(t for t in learn.saved.at if t is not None)
    assert set(range(4, NB + 11, 4)) <= saved and len(saved) <= NB + 11 - 8   # once 0.1 s had passed: after the slow batches, not every batch
    ck = torch.load(tmp_path/'cut'/'models'/'resume.pth', weights_only=True)
    assert ck['fit']['mid'] and ck['ranks'][0]['cbs']['early_stopping']['wait'] == learn.early_stopping.wait
    again = learner(stores, tmp_path/'cut', seed=1)
    with again.no_bar(), again.no_logging(): again.fit_one_cycle(EPOCHS, 1e-2, cbs=ResumeCallback(every=None, every_secs=0.1))
    for a, b in zip(again.model.parameters(), whole.model.parameters()): assert torch.equal(a, b)
    assert again.recorder.metric_names[1:3] == ['train_loss', 'train_accuracy']
    assert again.recorder.values == whole.recorder.values   # training accuracy of the interrupted epoch included
    assert again.trackers.states == whole.trackers.states[1:] and whole.trackers.states[1][1] < 1   # the best so far went on (not inf)
    assert (again.save_model.best, again.early_stopping.wait) == (whole.save_model.best, whole.early_stopping.wait)
    assert not (tmp_path/'cut'/'models'/'resume.pth').exists()

def test_clear_errors(stores, tmp_path):
    torch.set_num_threads(1)
    learn = learner(stores, tmp_path)
    learn.add_cb(StopAt(7))
    with learn.no_bar(), learn.no_logging(), pytest.raises(Stop): learn.fit(2, 1e-3, cbs=ResumeCallback(every=5))
    p = tmp_path/'models'/'resume.pth'
    good = p.read_bytes()
    def fit(learn=None, n=2, **kw):
        learn = learn or learner(stores, tmp_path)
        with learn.no_bar(), learn.no_logging(): learn.fit(n, 1e-3, cbs=ResumeCallback(), **kw)
    with pytest.raises(ValueError, match='a fit of 2 epochs; this one has 3'): fit(n=3)
    other = learner(stores, tmp_path); other.model = Net(h=5)
    with pytest.raises(ValueError, match='saved from another model'): fit(other)
    with pytest.raises(ValueError, match='saved by a loader over other items'):
        fit(Learner(loaders(stores['ragged']), Net(), loss_func=nn.CrossEntropyLoss(), metrics=accuracy, path=tmp_path,
                    cbs=[SaveModelCallback(fname='best'), EarlyStoppingCallback(patience=2, min_delta=0.05)]))
    p.write_bytes(good[:len(good) // 2])
    with pytest.raises(ValueError, match='cannot be read as a checkpoint'): fit()
    class Evil:
        def __reduce__(self): return (os.system, (f'touch {tmp_path}/owned',))
    torch.save({'format': 'fastai_memmap.ResumeCallback', 'evil': Evil()}, p)
    with pytest.raises(ValueError, match='cannot be read as a checkpoint'): fit()
    assert not (tmp_path/'owned').exists()   # nothing of it ran: checkpoints are read with weights_only=True
    torch.save({'model': {}}, p)
    with pytest.raises(ValueError, match='not a ResumeCallback checkpoint'): fit()

def test_fit_called_again_after_an_interruption_continues(stores, tmp_path):
    "In a notebook: a fit interrupted (Ctrl-C), then called again on the same Learner (and the same callback), continues"
    torch.set_num_threads(1)
    whole = learner(stores, tmp_path/'whole')
    with whole.no_bar(), whole.no_logging(): whole.fit(EPOCHS, 1e-3)
    learn = learner(stores, tmp_path/'cut')
    learn.add_cbs([ResumeCallback(every=3), StopAt(NB + 4), Seen()])
    with learn.no_bar(), learn.no_logging(), pytest.raises(Stop): learn.fit(EPOCHS, 1e-3)
    learn.remove_cb(StopAt)
    with learn.no_bar(), learn.no_logging(): learn.fit(EPOCHS, 1e-3)
    assert learn.seen.t[0] == NB + 3   # from the checkpoint after batch NB + 2
    for a, b in zip(learn.model.parameters(), whole.model.parameters()): assert torch.equal(a, b)
    assert learn.recorder.values == whole.recorder.values
    assert not (tmp_path/'cut'/'models'/'resume.pth').exists()

class Seen(Callback):
    "The training batches of the last fit"
    def before_fit(self): self.t = []
    def before_batch(self):
        if self.training: self.t.append(self.train_iter)
