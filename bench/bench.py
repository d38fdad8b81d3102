#!/usr/bin/env python
"""Throughput benchmark: fastai_memmap's DataLoaders against a hand-written ceiling and the usual alternatives.

One command, from the repository root:

    .venv/bin/python bench/bench.py            # full run (~10-15 min on a 2-core machine)
    .venv/bin/python bench/bench.py --quick    # ~2 min smoke run: fewer configurations, smaller data
    .venv/bin/python bench/bench.py --profile  # also print a cProfile of one MemmapDL epoch

Every method reads the SAME data (the store's own `.npy` shard where it can, an HDF5 copy and one `.npy` per item
otherwise) and iterates the SAME training split (RandomSplitter(seed=42), 80%), shuffled, with drop_last.
Throughput is measured from the first to the last batch of one full epoch (so worker start-up is left out of it and
reported separately as the time to the first batch of epochs 1 and 2). See bench/README.md.
"""
import argparse, ctypes, gc, json, mmap, os, platform, shutil, subprocess, sys, tempfile, threading, time, warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

# --------------------------------------------------------------------------------------------------------------------
# Machine description and /proc helpers (no heavy imports: also used by the build child)

def _read(p):
    try: return Path(p).read_text()
    except OSError: return ''

def rss_mib(pid='self'):
    for l in _read(f'/proc/{pid}/status').splitlines():
        if l.startswith('VmRSS:'): return int(l.split()[1]) / 1024
    return float('nan')

def hwm_mib(pid='self'):
    for l in _read(f'/proc/{pid}/status').splitlines():
        if l.startswith('VmHWM:'): return int(l.split()[1]) / 1024
    return float('nan')

def pss_kib(pid):
    "(anon+shmem PSS, total PSS) of process `pid` in KiB, from /proc/<pid>/smaps_rollup"
    d = {}
    for l in _read(f'/proc/{pid}/smaps_rollup').splitlines():
        k, _, v = l.partition(':')
        if k in ('Pss', 'Pss_Anon', 'Pss_Shmem'): d[k] = int(v.split()[0])
    return d.get('Pss_Anon', 0) + d.get('Pss_Shmem', 0), d.get('Pss', 0)

def children(pid):
    "Pids of all descendants of `pid` (psutil if installed, else /proc/*/stat ppid)"
    try:
        import psutil
        return [c.pid for c in psutil.Process(pid).children(recursive=True)]
    except ImportError: pass
    except Exception: return []
    par = {}
    for d in os.listdir('/proc'):
        if not d.isdigit(): continue
        s = _read(f'/proc/{d}/stat')
        if s: par.setdefault(int(s[s.rfind(')') + 2:].split()[1]), []).append(int(d))
    out, todo = [], [pid]
    while todo:
        for c in par.get(todo.pop(), []): out.append(c); todo.append(c)
    return out

def machine():
    cpu = next((l.split(':', 1)[1].strip() for l in _read('/proc/cpuinfo').splitlines() if l.startswith('model name')), platform.processor())
    mem = next((int(l.split()[1]) / 1024**2 for l in _read('/proc/meminfo').splitlines() if l.startswith('MemTotal')), float('nan'))
    import numpy, torch, fastai, h5py
    try:
        import fastai_memmap; fm = getattr(fastai_memmap, '__version__', '?')
    except Exception: fm = '?'
    try:   # read-only git queries (no index refresh)
        env = dict(os.environ, GIT_OPTIONAL_LOCKS='0')
        rev = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], cwd=ROOT, capture_output=True, text=True, env=env).stdout.strip()
        dirty = subprocess.run(['git', 'diff', '--quiet', 'HEAD', '--', 'fastai_memmap'], cwd=ROOT, env=env).returncode == 1
        fm += f" (commit {rev}{' + uncommitted changes' if dirty else ''})" if rev else ''
    except OSError: pass
    return (f"CPU: {cpu}, {os.cpu_count()} cores (affinity: {len(os.sched_getaffinity(0))}); RAM: {mem:.1f} GiB; "
            f"kernel {platform.release()}; Python {platform.python_version()}; torch {torch.__version__}; numpy {numpy.__version__}; "
            f"fastai {fastai.__version__}; h5py {h5py.__version__}; fastai_memmap {fm}")

# --------------------------------------------------------------------------------------------------------------------
# Page cache control

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype, _libc.mmap.argtypes = ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
PAGE = mmap.PAGESIZE

def resident_fraction(paths, max_files=400):
    "Fraction of the pages of `paths` (a sample of at most `max_files`) that are in the page cache (mincore)"
    paths = list(paths)
    if len(paths) > max_files: paths = paths[::len(paths) // max_files + 1]
    tot = res = 0
    for p in paths:
        size = os.path.getsize(p)
        if not size: continue
        fd = os.open(p, os.O_RDONLY)
        try:
            addr = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
            if addr in (None, ctypes.c_void_p(-1).value): continue
            n = (size + PAGE - 1) // PAGE
            vec = (ctypes.c_ubyte * n)()
            if _libc.mincore(addr, size, vec) == 0:
                tot += n
                res += sum(v & 1 for v in bytes(vec))
            _libc.munmap(addr, size)
        finally: os.close(fd)
    return res / tot if tot else 0.0

def evict(paths):
    "Drop `paths` from the page cache (pages still mapped by a live process cannot be dropped)"
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally: os.close(fd)

def warm(paths):
    "Read `paths` fully so they are in the page cache"
    for p in paths:
        with open(p, 'rb', buffering=0) as f:
            while f.read(16 << 20): pass

def files_under(d):
    return sorted(str(p) for p in Path(d).rglob('*') if p.is_file())

# --------------------------------------------------------------------------------------------------------------------
# Memory sampler: sum of PSS of this process and its worker children, sampled in a thread

class MemSampler:
    """Peak of (sum of PSS over this process and its worker children) minus this process's PSS at creation.
    Sampled only at a few points the caller picks (reading smaps_rollup of a process that maps torch costs ~10 ms and
    takes its mmap lock, so a sampling thread would distort the timings); the caller leaves the sampling time out."""
    def __init__(self):
        self.me = os.getpid()
        self.base = pss_kib(self.me)
        self.peak = self.base

    def sample(self):
        t = time.perf_counter()
        a = tt = 0
        for p in [self.me] + children(self.me):
            pa, pt = pss_kib(p)
            a += pa; tt += pt
        self.peak = (max(self.peak[0], a), max(self.peak[1], tt))
        return time.perf_counter() - t

    def result(self): return (self.peak[0] - self.base[0]) / 1024, (self.peak[1] - self.base[1]) / 1024

# --------------------------------------------------------------------------------------------------------------------
# Child mode: time DataBlock.dataloaders over a big store of tiny items, in a fresh process (clean RSS numbers)

def build_child(path):
    import warnings; warnings.filterwarnings('ignore')
    import torch
    from fastai.data.all import DataBlock, CategoryBlock, ColReader, RandomSplitter
    from fastai_memmap.all import MemmapBlock, memmap_items
    gc.collect()
    r0 = rss_mib()
    t = time.perf_counter()
    dls = DataBlock(blocks=(MemmapBlock, CategoryBlock), get_items=memmap_items, get_y=ColReader('label'),
                    splitter=RandomSplitter(seed=42)).dataloaders(path, bs=64, num_workers=0, device=torch.device('cpu'))
    build = time.perf_counter() - t
    r1, hwm = rss_mib(), hwm_mib()
    t = time.perf_counter()
    b = next(iter(dls.train))
    first = time.perf_counter() - t
    print(json.dumps(dict(build_s=build, first_batch_s=first, rss_before=r0, rss_after=r1, hwm=hwm, n_train=len(dls.train_ds))))

# --------------------------------------------------------------------------------------------------------------------
# Methods under test. Module level so that forked workers find them (Python < 3.14 forks by default on Linux).

import numpy as np

class _Lazy:
    "Per-process lazily opened handle (never pickled open)"
    def __init__(self): self.h, self.pid = None, None
    def get(self, opener):
        if self.pid != os.getpid(): self.h, self.pid = opener(), os.getpid()
        return self.h
    def drop(self):
        h, self.h, self.pid = self.h, None, None
        if h is not None and hasattr(h, 'close'): h.close()

def _torch():
    import torch
    return torch

class BatchDS:
    "The ceiling: __getitem__ takes a list of (train-position) indices, sorts them, one fancy index on the array"
    def __init__(self, path, labels, idx, arr=None): self.path, self.labels, self.idx, self.arr, self.h = path, labels, idx, arr, _Lazy()
    def __len__(self): return len(self.idx)
    def __getitem__(self, pos):
        torch = _torch()
        a = self.arr if self.arr is not None else self.h.get(lambda: np.load(self.path, mmap_mode='r'))
        i = np.sort(self.idx[np.asarray(pos, dtype=np.int64)])
        return torch.from_numpy(a[i]), torch.from_numpy(self.labels[i])

class H5DS:
    "h5py, one item per __getitem__, file opened lazily in each process"
    def __init__(self, path, labels, idx): self.path, self.labels, self.idx, self.h = path, labels, idx, _Lazy()
    def __len__(self): return len(self.idx)
    def __getitem__(self, pos):
        import h5py
        torch = _torch()
        ds = self.h.get(lambda: h5py.File(self.path, 'r'))['x']
        i = int(self.idx[pos])
        return torch.from_numpy(ds[i]), int(self.labels[i])

class NpyDS:
    "One .npy file per item, np.load per item"
    def __init__(self, d, labels, idx): self.d, self.labels, self.idx = d, labels, idx
    def __len__(self): return len(self.idx)
    def __getitem__(self, pos):
        torch = _torch()
        i = int(self.idx[pos])
        return torch.from_numpy(np.load(f'{self.d}/{i}.npy')), int(self.labels[i])

# stock fastai per-item: a type transform that reads one row of the memmap by index
STOCK = dict(path=None, labels=None, h=_Lazy())
def stock_read(i):
    torch = _torch()
    return torch.from_numpy(np.array(STOCK['h'].get(lambda: np.load(STOCK['path'], mmap_mode='r'))[i]))
def stock_label(i): return STOCK['labels'][i]

# --------------------------------------------------------------------------------------------------------------------

def run_epochs(dl, n_batches):
    "Epoch 1 in full (first-to-last-batch throughput), then the time to the first batch of epoch 2"
    ms = MemSampler()
    at = {1, max(1, n_batches // 2), max(1, n_batches - 1)}   # PSS sample points (batch numbers); the last one is below
    paused = 0.0
    t0 = time.perf_counter()
    n = nb = 0
    t_first = t_last = None
    it = iter(dl)
    for b in it:
        now = time.perf_counter()
        k = len(b[0])
        if t_first is None: t_first, n_first = now, k
        t_last = now - paused
        n += k; nb += 1
        if nb in at: paused += ms.sample()
    t_end = time.perf_counter() - paused
    ms.sample()
    del it, b
    gc.collect()
    t = time.perf_counter()
    it = iter(dl)
    next(it)
    ep2 = time.perf_counter() - t
    ms.sample()
    if hasattr(it, 'close'): it.close()
    del it
    gc.collect()
    mem = ms.result()
    steady = (n - n_first) / (t_last - t_first) if nb > 1 and t_last > t_first else float('nan')
    return dict(sps=steady, sps_wall=n / (t_end - t0), n=n, nb=nb, ttfb1=t_first - t0, ttfb2=ep2, epoch_s=t_end - t0,
                pss_anon=mem[0], pss_tot=mem[1])

def fmt_int(x): return '—' if x is None or x != x else f'{x:,.0f}'
def fmt_f(x, d=2): return '—' if x is None or x != x else f'{x:.{d}f}'
def fmt_ms(x): return '—' if x is None or x != x else (f'{x*1e3:.0f}' if x >= 0.01 else f'{x*1e3:.1f}')


class Bench:
    def __init__(self, args):
        self.args, self.rows, self.notes = args, [], []
        self.tmp = Path(tempfile.mkdtemp(prefix='fmm_bench_', dir=args.tmp))
        self.log = print

    # ---- data -------------------------------------------------------------------------------------------------------
    def make_data(self, name, shape, n, npy_cap, npy_bytes_cap):
        from fastai_memmap.all import write_memmap
        from fastai.data.all import RandomSplitter
        import h5py
        d = self.tmp/name
        d.mkdir()
        rng = np.random.default_rng(0)
        labels = rng.integers(0, 10, n).astype(np.int64)
        t = time.perf_counter()
        X = rng.random((n, *shape), dtype=np.float32)
        store = write_memmap(d/'data.fmm', X, meta={'label': labels}, progress=False, shard_size=4 << 30)
        assert store.n_shards == 1
        shard = str(d/'data.fmm'/store.manifest['shards'][0]['data']['file'])
        with h5py.File(d/'data.h5', 'w') as f: f.create_dataset('x', data=X)
        train = np.asarray(RandomSplitter(seed=42)(range(n))[0], dtype=np.int64)
        per = X[0].nbytes
        k = int(min(len(train), npy_cap, max(1, npy_bytes_cap // per)))
        npy_idx = np.sort(train[:k])
        (d/'npy').mkdir()
        for i in npy_idx: np.save(d/'npy'/f'{i}.npy', X[i])
        del X
        os.sync()
        self.log(f"  [{name}] {n:,} items of float32 {shape} ({per:,} B each, {n*per/2**20:.0f} MiB); store+h5+{k:,} npy files "
                 f"written in {time.perf_counter()-t:.1f}s")
        return dict(dir=d, store=str(d/'data.fmm'), shard=shard, h5=str(d/'data.h5'), npy=str(d/'npy'), labels=labels,
                    train=train, npy_idx=npy_idx, n=n, per=per)

    # ---- loaders ----------------------------------------------------------------------------------------------------
    def loaders(self, D, bs, nw, cache, stock_dls):
        "(method name, factory -> (loader, build_s, cleanup), files to warm/evict, residency files)"
        import torch
        from torch.utils.data import DataLoader, BatchSampler, RandomSampler
        from fastai.data.all import DataBlock, CategoryBlock, ColReader, RandomSplitter
        from fastai_memmap.all import MemmapBlock, memmap_items
        cpu = torch.device('cpu')
        store_files = files_under(D['store'])
        def lib():
            t = time.perf_counter()
            dls = DataBlock(blocks=(MemmapBlock, CategoryBlock), get_items=memmap_items, get_y=ColReader('label'),
                            splitter=RandomSplitter(seed=42)).dataloaders(D['store'], bs=bs, num_workers=nw, device=cpu)
            dl = dls.train
            return dl, time.perf_counter() - t, getattr(dl, 'shutdown_workers', lambda: None)   # persistent workers, if any
        def batched(arr=None):
            def f():
                ds = BatchDS(D['shard'], D['labels'], D['train'], arr)
                dl = DataLoader(ds, sampler=BatchSampler(RandomSampler(ds), bs, drop_last=True), batch_size=None, num_workers=nw)
                return dl, 0.0, ds.h.drop
            return f
        def stock():
            STOCK['h'].drop()
            return stock_dls.train.new(bs=bs, num_workers=nw), None, STOCK['h'].drop
        def h5():
            ds = H5DS(D['h5'], D['labels'], D['train'])
            return DataLoader(ds, batch_size=bs, shuffle=True, drop_last=True, num_workers=nw), 0.0, ds.h.drop
        def npy():
            ds = NpyDS(D['npy'], D['labels'], D['npy_idx'])
            return DataLoader(ds, batch_size=bs, shuffle=True, drop_last=True, num_workers=nw), 0.0, lambda: None
        npy_files = [f"{D['npy']}/{i}.npy" for i in D['npy_idx']]
        ms = [('ceiling: torch BatchSampler + sorted fancy index', batched(), [D['shard']]),
              ('fastai_memmap DataBlock', lib, store_files),
              ('fastai stock per-item DataBlock', stock, [D['shard']]),
              ('h5py per item (torch)', h5, [D['h5']]),
              (f"one .npy per item (torch){'' if len(D['npy_idx']) == len(D['train']) else ' *'}", npy, npy_files)]
        def ram():
            ds = BatchDS(None, D['labels'], D['train'], np.load(D['shard']))   # the shard read into memory (not timed)
            dl = DataLoader(ds, sampler=BatchSampler(RandomSampler(ds), bs, drop_last=True), batch_size=None, num_workers=nw)
            return dl, 0.0, lambda: setattr(ds, 'arr', None)
        if cache == 'warm': ms.insert(1, ('data in RAM (torch BatchSampler)', ram, []))
        return ms

    def run_config(self, size, D, bs, nw, cache, stock_dls, methods=None):
        self.log(f"  {size} bs={bs} workers={nw} {cache}")
        ceiling = None
        for name, factory, files in self.loaders(D, bs, nw, cache, stock_dls):
            if methods and not any(m in name for m in methods): continue
            runs = []
            for rep in range(self.args.repeat):   # short epochs are repeated (fresh loader each time); the median is kept
                dl, build_s, cleanup = factory()
                gc.collect()
                res_note = ''
                if cache == 'cold':
                    evict(files)
                    rf = resident_fraction([f for f in files if f.endswith('.npy') or f.endswith('.h5')])
                    if rf > 0.02: res_note = f' ({rf:.0%} still cached after evict)'
                else: warm(files)
                with warnings.catch_warnings():
                    warnings.simplefilter('ignore')
                    r = run_epochs(dl, len(dl))
                cleanup()
                del dl
                gc.collect()
                r.update(build_s=build_s, note=res_note)
                runs.append(r)
                if r['epoch_s'] > self.args.repeat_below: break
            r = sorted(runs, key=lambda o: o['sps'])[len(runs) // 2]
            r['reps'], res_note = len(runs), r['note']
            if name.startswith('ceiling'): ceiling = r['sps']
            r.update(size=size, bs=bs, nw=nw, cache=cache, method=name + res_note,
                     ratio=r['sps'] / ceiling if ceiling else float('nan'), items=D['per'])
            self.rows.append(r)
            self.log(f"    {name:52s} {fmt_int(r['sps']):>12} /s  x{fmt_f(r['ratio'])}  ttfb1 {fmt_ms(r['ttfb1'])} ms  "
                     f"ep2 {fmt_ms(r['ttfb2'])} ms  ΔPSS anon {fmt_f(r['pss_anon'],1)} MiB{res_note}")

    def stock_dls(self, D, stock_fn=None):
        import torch
        from fastai.data.all import DataBlock, CategoryBlock, TransformBlock, RandomSplitter
        STOCK.update(path=D['shard'], labels=D['labels']); STOCK['h'].drop()
        t = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            dls = DataBlock(blocks=(TransformBlock(type_tfms=stock_read), CategoryBlock), get_y=stock_label,
                            splitter=RandomSplitter(seed=42)).dataloaders(range(D['n']), bs=64, num_workers=0, device=torch.device('cpu'))
        b = time.perf_counter() - t
        assert len(dls.train_ds) == len(D['train'])
        self.log(f"    (stock fastai DataLoaders over {D['n']:,} items built in {b:.1f}s; reused with .new(bs, num_workers))")
        self.stock_build = getattr(self, 'stock_build', {}); self.stock_build[D['n']] = b
        return dls

    # ---- tiny-item DataLoaders build ----------------------------------------------------------------------------------
    def build_bench(self, counts):
        from fastai_memmap.all import write_memmap
        out = []
        for n in counts:
            p = self.tmp/f'tiny_{n}.fmm'
            t = time.perf_counter()
            rng = np.random.default_rng(1)
            X = rng.integers(0, 255, (n, 4), dtype=np.uint8)
            write_memmap(p, X, meta={'label': rng.integers(0, 10, n).astype(np.uint8)}, progress=False)
            del X
            w = time.perf_counter() - t
            try:
                cp = subprocess.run([sys.executable, str(Path(__file__).resolve()), '--_build-child', str(p)], capture_output=True,
                                    text=True, timeout=self.args.build_timeout)
                r = json.loads(cp.stdout.strip().splitlines()[-1]) if cp.returncode == 0 else dict(error=cp.stderr.strip().splitlines()[-1:])
            except subprocess.TimeoutExpired: r = dict(error=f'timed out after {self.args.build_timeout}s')
            r.update(n=n, write_s=w)
            out.append(r)
            shutil.rmtree(p, ignore_errors=True)
            self.log(f"  DataLoaders over {n:,} tiny items: {r}")
        self.build_rows = out

    # ---- report -----------------------------------------------------------------------------------------------------
    def table(self):
        L = ["| size | bs | workers | cache | method | samples/s (first→last batch) | × ceiling | samples/s incl. start-up | "
             "epoch-1 first batch ms | epoch-2 first batch ms | peak ΔPSS anon+shmem MiB | peak ΔPSS total MiB | items timed | runs |",
             "|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in self.rows:
            L.append(f"| {r['size']} | {r['bs']} | {r['nw']} | {r['cache']} | {r['method']} | {fmt_int(r['sps'])} | {fmt_f(r['ratio'])} | "
                     f"{fmt_int(r['sps_wall'])} | {fmt_ms(r['ttfb1'])} | {fmt_ms(r['ttfb2'])} | {fmt_f(r['pss_anon'],1)} | "
                     f"{fmt_f(r['pss_tot'],1)} | {r['n']:,} | {r['reps']} |")
        return '\n'.join(L)

    def build_table(self):
        L = ["| items (4 B each) | store write s | DataBlock.dataloaders s | first batch s | main RSS growth, retained MiB | main RSS growth, peak MiB | error |",
             "|---:|---:|---:|---:|---:|---:|---|"]
        for r in getattr(self, 'build_rows', []):
            L.append(f"| {r['n']:,} | {fmt_f(r['write_s'])} | {fmt_f(r.get('build_s'))} | {fmt_f(r.get('first_batch_s'), 3)} | "
                     f"{fmt_f(r.get('rss_after', float('nan')) - r.get('rss_before', float('nan')), 0)} | "
                     f"{fmt_f(r.get('hwm', float('nan')) - r.get('rss_before', float('nan')), 0)} | {r.get('error', '')} |")
        return '\n'.join(L)

    def find(self, size, bs, nw, cache, prefix):
        for r in self.rows:
            if (r['size'], r['bs'], r['nw'], r['cache']) == (size, bs, nw, cache) and r['method'].startswith(prefix): return r
        return None

    def targets(self):
        lib, ceil, stock = 'fastai_memmap', 'ceiling', 'fastai stock'
        out = []
        def add(name, ok, detail): out.append(f"- {'PASS' if ok else 'FAIL' if ok is not None else 'N/A '} {name}: {detail}")
        a, c, s = self.find('medium', 64, 0, 'warm', lib), self.find('medium', 64, 0, 'warm', ceil), self.find('medium', 64, 0, 'warm', stock)
        if a and c: add('warm 12 KB bs64 workers=0 ≥ 0.8× ceiling', a['sps'] >= 0.8 * c['sps'], f"{a['sps']:,.0f} vs ceiling {c['sps']:,.0f} /s = {a['sps']/c['sps']:.2f}×")
        else: add('warm 12 KB bs64 workers=0 ≥ 0.8× ceiling', None, 'not measured')
        if a and s: add('warm 12 KB bs64 workers=0 ≥ 30× stock per-item fastai', a['sps'] >= 30 * s['sps'], f"{a['sps']:,.0f} vs stock {s['sps']:,.0f} /s = {a['sps']/s['sps']:.1f}×")
        else: add('warm 12 KB bs64 workers=0 ≥ 30× stock per-item fastai', None, 'not measured')
        a, c = self.find('medium', 256, 0, 'warm', lib), self.find('medium', 256, 0, 'warm', ceil)
        if a and c: add('warm 12 KB bs256 workers=0 ≥ 0.9× ceiling', a['sps'] >= 0.9 * c['sps'], f"{a['sps']:,.0f} vs ceiling {c['sps']:,.0f} /s = {a['sps']/c['sps']:.2f}×")
        else: add('warm 12 KB bs256 workers=0 ≥ 0.9× ceiling', None, 'not measured')
        for size in ('medium', 'large', 'small'):
            a0, a2 = self.find(size, 64, 0, 'cold', lib), self.find(size, 64, 2, 'cold', lib)
            name = f'{size} bs64 cold: workers=2 faster than workers=0' + ('' if size == 'medium' else ' (informational)')
            if a0 and a2:
                add(name, a2['sps'] > a0['sps'], f"first→last {a2['sps']:,.0f} vs {a0['sps']:,.0f} /s; incl. start-up {a2['sps_wall']:,.0f} vs {a0['sps_wall']:,.0f} /s")
            elif size == 'medium': add(name, None, 'not measured')
        for nw in (0, 2):
            a, s = self.find('medium', 64, nw, 'warm', lib), self.find('medium', 64, nw, 'warm', stock)
            name = f'epoch-2 first batch ≥ 5× sooner than stock fastai (12 KB bs64 warm workers={nw})'
            if a and s: add(name, s['ttfb2'] >= 5 * a['ttfb2'], f"{a['ttfb2']*1e3:.1f} ms vs stock {s['ttfb2']*1e3:.1f} ms = {s['ttfb2']/a['ttfb2']:.1f}×")
            else: add(name, None, 'not measured')
        big = [r for r in getattr(self, 'build_rows', []) if r['n'] >= 10_000_000]
        if big:
            r = big[0]
            add('DataLoaders over 10M items < 10 s', r.get('build_s', 1e9) < 10, f"{fmt_f(r.get('build_s'))} s {r.get('error', '')}")
        else: add('DataLoaders over 10M items < 10 s', None, 'not measured (quick mode builds over 1M only)')
        return '\n'.join(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--quick', action='store_true', help='~2 min smoke run: fewer configurations, smaller data')
    ap.add_argument('--profile', action='store_true', help='also print a cProfile of one MemmapDL epoch (12 KB, bs 64, warm, no workers)')
    ap.add_argument('--tmp', default=None, help='parent directory for the temporary data (default: the system temp dir)')
    ap.add_argument('--out', default=str(HERE/'results.md'), help='where to save the markdown results')
    ap.add_argument('--repeat', type=int, default=3, help='measure an epoch up to this many times (fresh loader each) and keep the median...')
    ap.add_argument('--repeat-below', type=float, default=1.0, help='...but only when the epoch took less than this many seconds')
    ap.add_argument('--build-timeout', type=int, default=180, help='seconds allowed for DataLoaders over the 1M/10M item stores')
    ap.add_argument('--_build-child', dest='build_child', default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.build_child: return build_child(args.build_child)

    warnings.filterwarnings('ignore')
    import torch
    torch.set_num_threads(1)   # the loaders are single-threaded copies; keep torch's own thread pool out of the way
    quick = args.quick
    if quick:
        sizes = dict(small=((64,), 50_000), medium=((3, 32, 32), 10_000), large=((256, 1024), 200))
        grid = {'small': [(64, 0, 'warm')],
                'medium': [(64, 0, 'warm'), (256, 0, 'warm'), (64, 2, 'warm'), (64, 0, 'cold'), (64, 2, 'cold')],
                'large': [(64, 0, 'warm')]}
        npy_cap, npy_bytes_cap, build_counts = 10_000, 128 << 20, [1_000_000]
    else:
        sizes = dict(small=((64,), 250_000), medium=((3, 32, 32), 20_000), large=((256, 1024), 600))
        grid = {k: [(bs, nw, c) for bs in ((64, 256) if k == 'medium' else (64,)) for c in ('warm', 'cold') for nw in (0, 2)] for k in sizes}
        npy_cap, npy_bytes_cap, build_counts = 40_000, 512 << 20, [1_000_000, 10_000_000]

    B = Bench(args)
    desc = machine()
    print(desc, flush=True)
    t_all = time.perf_counter()
    try:
        for size, (shape, n) in sizes.items():
            D = B.make_data(size, shape, n, npy_cap, npy_bytes_cap)
            sd = B.stock_dls(D)
            for bs, nw, cache in grid[size]:
                B.run_config(size, D, bs, nw, cache, sd)
                sys.stdout.flush()
            if args.profile and size == 'medium': profile_epoch(D)
            del sd; gc.collect()
            shutil.rmtree(D['dir'], ignore_errors=True)
        B.build_bench(build_counts)
    finally:
        shutil.rmtree(B.tmp, ignore_errors=True)
    total = time.perf_counter() - t_all
    stock_b = ', '.join(f"{n:,} items: {s:.1f}s" for n, s in getattr(B, 'stock_build', {}).items())
    md = [f"# fastai_memmap benchmark ({'quick' if quick else 'full'} run, {time.strftime('%Y-%m-%d %H:%M')}, {total/60:.1f} min)", '',
          f"Machine: {desc}", '',
          "Throughput: samples/s from the first to the last batch of one full shuffled epoch of the training split "
          "(80%, RandomSplitter(seed=42), drop_last); × ceiling: ratio to the torch BatchSampler + sorted fancy index "
          "loader on the same store shard in the same configuration. Start-up is shown separately (first batch of epochs 1 and 2; "
          "fastai and torch, without persistent workers, start new workers each epoch). Cold: every file the method reads was "
          "evicted with posix_fadvise(DONTNEED) just before the epoch. Peak ΔPSS: largest sum of PSS over the main process and "
          "its worker processes during the epoch, minus the main process's PSS before it (anon+shmem: memory the loader itself "
          "holds; total: also the page-cache pages it has mapped). Item sizes: small = 64 float32 (256 B), medium = 3×32×32 "
          "float32 (12 KiB), large = 256×1024 float32 (1 MiB). runs: an epoch shorter than 1 s is measured up to 3 times, each "
          "with a fresh loader (and a fresh eviction when cold), and the run with the median throughput is shown. `*`: one .npy per item only for a capped subset of the training "
          "items (see 'items timed').", '',
          f"Stock fastai DataLoaders build time (per-item DataBlock over range(N)): {stock_b}", '',
          B.table(), '', '## DataLoaders over many tiny items (fresh process each)', '', B.build_table(), '',
          '## Targets', '', B.targets(), '']
    text = '\n'.join(md)
    print('\n' + text)
    Path(args.out).write_text(text)
    print(f"(saved to {args.out})")


def profile_epoch(D):
    "cProfile of one MemmapDL epoch, and a per-batch time split"
    import cProfile, pstats, io, torch
    from fastai.data.all import DataBlock, CategoryBlock, ColReader, RandomSplitter
    from fastai_memmap.all import MemmapBlock, memmap_items, MemmapStore
    dls = DataBlock(blocks=(MemmapBlock, CategoryBlock), get_items=memmap_items, get_y=ColReader('label'),
                    splitter=RandomSplitter(seed=42)).dataloaders(D['store'], bs=64, num_workers=0, device=torch.device('cpu'))
    dl = dls.train
    for _ in dl: pass
    pr = cProfile.Profile()
    pr.enable()
    for _ in dl: pass
    pr.disable()
    s = io.StringIO()
    pstats.Stats(pr, stream=s).sort_stats('tottime').print_stats(25)
    print('\n### cProfile of one MemmapDL epoch (medium, bs 64, warm, workers=0), by tottime\n', s.getvalue())
    s = io.StringIO()
    pstats.Stats(pr, stream=s).sort_stats('cumulative').print_stats(30)
    print('\n### ... by cumulative\n', s.getvalue())
    # per-batch split: take() alone vs the whole DataLoader
    st = MemmapStore(D['store'])
    idx = np.asarray(D['train'])
    nb = len(idx) // 64
    perm = np.random.default_rng(0).permutation(idx)[:nb * 64].reshape(nb, 64)
    t = time.perf_counter()
    for b in perm: st.take(b)
    take = (time.perf_counter() - t) / nb
    t = time.perf_counter()
    for _ in dl: pass
    full = (time.perf_counter() - t) / len(dl)
    print(f"per batch: store.take {take*1e6:.0f} µs; whole MemmapDL batch {full*1e6:.0f} µs; fastai/glue overhead {(full-take)*1e6:.0f} µs")


if __name__ == '__main__':
    main()
