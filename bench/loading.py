#!/usr/bin/env python
"""What a user gets with fastai's defaults: loading threads against no parallelism, and loading hidden behind training.

    .venv/bin/python bench/loading.py            # ~6 min on a 2-core machine; appends nothing, prints a markdown report
    .venv/bin/python bench/loading.py --quick    # ~2 min smoke run (smaller data, fewer repeats)
    .venv/bin/python bench/loading.py --out bench/loading.md

Every figure is measured side by side in one run, configurations interleaved round by round (so a noisy neighbour
slows all of them alike), and the median round is kept:

1. Warm page cache, 12 KiB items (3x32x32 float32), bs 64: `dataloaders(path, bs=64)` with fastai's default
   `num_workers`, then `num_workers=0` and `num_workers=2`, samples/s over a full shuffled training epoch.
2. Cold page cache (every store file evicted with posix_fadvise(DONTNEED) before each epoch): `num_workers=0` and 2.
3. Large items (1 MiB, 256x1024 float32), bs 16, warm: GB/s the default loader delivers, against this machine's
   memcpy bandwidth (numpy copy of 256 MiB, best of 5) and the store's own `take`.
4. Training: `learn.fit(1)` over the large items, bs 64, with a model whose step costs about as much as loading its batch
   (calibrated in the run), torch on one thread (a core left for loading, as on a GPU machine): compute-only (the
   same batches from RAM), load-only (iterating the loader), stock fastai per-item DataBlock with 0 and 2 workers, and
   fastai_memmap with 0 and 2 loading threads; the training phase of the epoch is timed.
"""
import argparse, gc, os, platform, sys, tempfile, time, warnings
from pathlib import Path
import numpy as np

HERE = Path(__file__).resolve().parent

def machine() -> str:
    import torch, fastai
    cpu = next((l.split(':', 1)[1].strip() for l in open('/proc/cpuinfo') if l.startswith('model name')), platform.processor())
    return (f"{cpu}, {os.cpu_count()} cores; Python {platform.python_version()}, torch {torch.__version__}, numpy {np.__version__}, "
            f"fastai {fastai.__version__}")

def memcpy_gbs(mib:int=256) -> float:
    a = np.ones(mib << 18, np.float32); b = np.empty_like(a)
    best = 1e9
    for _ in range(5):
        t = time.perf_counter(); np.copyto(b, a); best = min(best, time.perf_counter() - t)
    return a.nbytes / best / 1e9

def evict(paths):
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try: os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally: os.close(fd)

def store_files(path): return [str(p) for p in Path(path).iterdir() if p.suffix == '.npy']

def make_store(path, shape, n, seed=0):
    from fastai_memmap.all import write_memmap
    rng = np.random.default_rng(seed)
    X = rng.random((n, *shape), dtype=np.float32)
    write_memmap(path, X, meta={'label': rng.integers(0, 10, n)}, progress=False)
    return X

def dblock():
    from fastai.data.all import DataBlock, CategoryBlock, ColReader, RandomSplitter
    from fastai_memmap.all import MemmapBlock, memmap_items
    return DataBlock(blocks=(MemmapBlock, CategoryBlock), get_items=memmap_items, get_y=ColReader('label'),
                     splitter=RandomSplitter(seed=42))

def epoch_rate(dl, cold=False) -> float:
    "Samples/s of one full epoch of `dl` (maps closed and files evicted first when `cold`)"
    if cold:
        dl.items.store.close(); gc.collect()
        evict(store_files(dl.items.store.path))
    n, t = 0, time.perf_counter()
    for x, *_ in dl: n += len(x)
    return n / (time.perf_counter() - t)

def interleaved(fns:dict, rounds:int) -> dict:
    "Median of `rounds` measurements of each of `fns`, one of each per round"
    res = {k: [] for k in fns}
    for _ in range(rounds):
        for k, f in fns.items(): res[k].append(f())
    return {k: float(np.median(v)) for k, v in res.items()}, res

# ------------------------------------------------------------------------------------------------------ training
class _Timer:
    "A callback timing the training phase of each epoch"
    def __new__(cls):
        from fastai.callback.core import Callback
        class T(Callback):
            order = 99
            def before_train(self): self.t = time.perf_counter()
            def after_train(self): self.learn.train_s = time.perf_counter() - self.t
        return T()

def model(width:int):
    from torch import nn
    return nn.Sequential(nn.AvgPool1d(32), nn.Conv1d(256, width, 3), nn.ReLU(), nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(width, 10))

def fit_s(dls, width, seed=0) -> float:
    import torch
    from fastai.learner import Learner
    from fastai.losses import CrossEntropyLossFlat
    torch.manual_seed(seed)
    learn = Learner(dls, model(width), loss_func=CrossEntropyLossFlat(), cbs=_Timer())
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3)
    return learn.train_s

def cached_dls(dl):
    "DataLoaders that hand out `dl`'s batches from RAM (compute-only epochs); a tiny validation set"
    from fastai.data.load import DataLoader
    from fastai.data.core import DataLoaders
    batches = [tuple(t.clone() for t in b) for b in dl]
    return DataLoaders(DataLoader(batches, bs=None), DataLoader(batches[:1], bs=None))

def stock_dls(X, labels, bs, nw):
    "fastai's own per-item DataBlock over the same array (one memmapped row per item)"
    import torch
    from fastai.data.all import DataBlock, CategoryBlock, TransformBlock, RandomSplitter
    tb = TransformBlock(type_tfms=lambda i: torch.from_numpy(np.array(X[i])))
    return DataBlock(blocks=(tb, CategoryBlock), get_y=lambda i: int(labels[i]), splitter=RandomSplitter(seed=42)
                     ).dataloaders(range(len(X)), bs=bs, num_workers=nw, device='cpu')

def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--quick', action='store_true')
    ap.add_argument('--out', default=None, help='also write the report to this file')
    a = ap.parse_args()
    warnings.filterwarnings('ignore')
    import torch
    from fastai.data.core import DataLoaders
    from fastai.data.load import DataLoader
    from fastai_memmap.all import MemmapStore
    torch.set_num_threads(1)
    rounds = 3 if a.quick else 7
    tmp = Path(tempfile.mkdtemp(prefix='fmm_loading_'))
    out = [f"# Loading with fastai's defaults ({'quick' if a.quick else 'full'} run, {time.strftime('%Y-%m-%d %H:%M')})", '',
           f"Machine: {machine()}. fastai's default `num_workers` here: {min(16, os.cpu_count())}.", '']
    def log(s=''): print(s, flush=True); out.append(s)

    # 1, 2: 12 KiB items
    n = 10_000 if a.quick else 20_000
    make_store(tmp/'m.fmm', (3, 32, 32), n); gc.collect()
    db = dblock()
    dls = {'`dataloaders(path, bs=64)` (defaults)': db.dataloaders(tmp/'m.fmm', bs=64, device='cpu'),
           '`num_workers=0`': db.dataloaders(tmp/'m.fmm', bs=64, device='cpu', num_workers=0),
           '`num_workers=1`': db.dataloaders(tmp/'m.fmm', bs=64, device='cpu', num_workers=1),
           '`num_workers=2`': db.dataloaders(tmp/'m.fmm', bs=64, device='cpu', num_workers=2)}
    for d in dls.values(): epoch_rate(d.train)   # warm: every page read once
    warm, _ = interleaved({k: (lambda d=d: epoch_rate(d.train)) for k, d in dls.items()}, rounds)
    base = warm['`num_workers=0`']
    log(f"## 12 KiB items, bs 64, warm page cache ({n:,} items, median of {rounds} interleaved rounds)"); log()
    log('| loader | samples/s | × `num_workers=0` |'); log('|---|---:|---:|')
    for k, v in warm.items(): log(f'| {k} | {v:,.0f} | {v / base:.2f} |')
    cold, _ = interleaved({k: (lambda d=dls[k]: epoch_rate(d.train, cold=True)) for k in dls}, max(3, rounds // 2))
    log(); log('## 12 KiB items, bs 64, cold page cache (files evicted before each epoch)'); log()
    log('| loader | samples/s | × `num_workers=0` |'); log('|---|---:|---:|')
    for k, v in cold.items(): log(f'| {k} | {v:,.0f} | {v / cold["`num_workers=0`"]:.2f} |')
    del dls; gc.collect()

    # 3: 1 MiB items
    nl = 600 if a.quick else 2400
    X = make_store(tmp/'l.fmm', (256, 1024), nl, seed=1)
    labels = MemmapStore(tmp/'l.fmm').column('label')
    def large(bs): return {k: db.dataloaders(tmp/'l.fmm', bs=bs, device='cpu', **kw) for k, kw in
                           (('defaults', {}), ('num_workers=0', dict(num_workers=0)), ('num_workers=1', dict(num_workers=1)), ('num_workers=2', dict(num_workers=2)))}
    ldls = large(16)
    for d in ldls.values(): epoch_rate(d.train)
    st = ldls['defaults'].train.items.store
    idx = [np.sort(b) for b in np.array_split(np.random.default_rng(0).permutation(nl), nl // 16)]
    def take_rate():
        t = time.perf_counter()
        for b in idx: st.take(b)
        return nl / (time.perf_counter() - t)
    rates, _ = interleaved({**{k: (lambda d=d: epoch_rate(d.train)) for k, d in ldls.items()}, 'store.take': take_rate}, rounds)
    mc = memcpy_gbs()
    log(); log(f"## 1 MiB items (256x1024 float32), bs 16, warm ({nl} items)"); log()
    log(f'memcpy on this machine: {mc:.1f} GB/s'); log()
    log('| reader | GB/s | × memcpy |'); log('|---|---:|---:|')
    for k, v in rates.items():
        gbs = v * 2**20 / 1e9
        log(f'| {k} | {gbs:.1f} | {gbs / mc:.2f} |')

    # 4: training, at bs 64 (at bs 16 fastai's own work per step, ~6 ms here, is 4x the batch's load)
    tbs = 64
    ldls = large(tbs)
    mdl = ldls['num_workers=0']
    n_train = len(mdl.train_ds) // tbs * tbs
    load_s = n_train / np.median([epoch_rate(mdl.train) for _ in range(3)])
    cdls = cached_dls(mdl.train)
    width = 1
    while True:   # widen the model until a compute-only epoch costs about what loading one does
        c = fit_s(cdls, width)
        if c >= 0.9 * load_s or width >= 4096: break
        width = int(width * max(1.25, min(4, 0.95 * load_s / c)))
    comp = {'compute only (batches from RAM)': lambda: fit_s(cdls, width),
            'load only (iterating the loader, 0 workers)': lambda: n_train / epoch_rate(mdl.train),
            'fastai stock per-item, 0 workers': lambda: fit_s(stock_dls(X, labels, tbs, 0), width),
            'fastai stock per-item, 2 workers': lambda: fit_s(stock_dls(X, labels, tbs, 2), width),
            'fastai_memmap, `num_workers=0`': lambda: fit_s(ldls['num_workers=0'], width),
            'fastai_memmap, `num_workers=1`': lambda: fit_s(ldls['num_workers=1'], width),
            'fastai_memmap, `num_workers=2`': lambda: fit_s(ldls['num_workers=2'], width),
            'fastai_memmap, defaults': lambda: fit_s(ldls['defaults'], width)}
    t, _ = interleaved(comp, rounds)
    c, l = t['compute only (batches from RAM)'], t['load only (iterating the loader, 0 workers)']
    log(); log(f"## Training: `learn.fit(1)` over the 1 MiB items, bs {tbs}, a 1-D CNN of width {width} on one torch thread"); log()
    log('| epoch (training phase) | seconds | × max(compute, load) | × (compute + load) |'); log('|---|---:|---:|---:|')
    for k, v in t.items(): log(f'| {k} | {v:.2f} | {v / max(c, l):.2f} | {v / (c + l):.2f} |')
    import shutil; shutil.rmtree(tmp, ignore_errors=True)
    if a.out: Path(a.out).write_text('\n'.join(out) + '\n')

if __name__ == '__main__': main()
