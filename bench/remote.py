#!/usr/bin/env python
"""Remote-store throughput: one epoch of a MemmapBlock DataLoaders over a local store, and over the same store served
by S3 (moto's server, in its own process on 127.0.0.1) through a cold cache and then a warm one, in the same run.

    .venv/bin/python bench/remote.py                               # 20k items of 3x32x32 float32; prints a markdown table
    .venv/bin/python bench/remote.py --n-items 5000 --num-workers 2 --cache-limit 64   # cache limit in MiB

From other code: `from bench.remote import bench_remote` (or load this file) and call
`bench_remote(n_items, item_shape, ...)`, which returns samples/s per configuration.

What is timed: `for b in dls.train: pass` for one epoch, from `iter()` to the last batch (worker start-up, and in
the cold run every download that is not hidden behind reading, included); samples/s = training samples / that time,
the median of `repeat` epochs, each with a freshly built DataLoaders. 'local' reads the store the script just wrote
(page cache warm; one warm-up epoch first). 'S3 cold' starts each epoch from an empty cache directory; 'S3 warm'
reads through the cache the cold epochs left (every shard present unless --cache-limit evicted some); local and
warm epochs alternate, after the cold ones.
The S3 server is moto's on loopback: no network latency or bandwidth limit, but a Python server (its per-request
and per-byte costs stand in for the network's). Real S3 is ~100-200 MB/s per connection with ~20-50 ms first-byte
latency; the cold-cache number here is an upper bound for one connection's worth of prefetch.
"""
import argparse, json, os, shutil, socket, subprocess, sys, tempfile, time, warnings
from pathlib import Path

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]

def start_moto(port:int=None):
    "Start moto's S3 server in a child process on 127.0.0.1; return `(process, endpoint_url)`"
    port = port or _free_port()
    exe = Path(sys.executable).parent/'moto_server'
    cmd = [str(exe)] if exe.exists() else [sys.executable, '-m', 'moto.server']
    p = subprocess.Popen(cmd + ['-H', '127.0.0.1', '-p', str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = time.time()
    while time.time() - t0 < 30:
        with socket.socket() as s:
            if s.connect_ex(('127.0.0.1', port)) == 0: return p, f'http://127.0.0.1:{port}'
        if p.poll() is not None: raise RuntimeError(f"moto_server exited with {p.returncode}")
        time.sleep(0.05)
    p.kill(); raise RuntimeError("moto_server did not start in 30 s")

def _epoch(store, bs, num_workers, shuffle_block, shuffle_window) -> tuple:
    "`(samples/s, seconds)` of one epoch of `dls.train` over `store`, built afresh"
    import numpy as np
    from fastai.data.block import DataBlock, CategoryBlock
    from fastai.data.transforms import ColReader, RandomSplitter
    from fastai_memmap.data import memmap_items, MemmapBlock
    dls = DataBlock(blocks=(MemmapBlock, CategoryBlock), get_items=memmap_items, get_y=ColReader('label'),
                    splitter=RandomSplitter(seed=42)).dataloaders(store, bs=bs, num_workers=num_workers, shuffle_block=shuffle_block,
                                                                   shuffle_window=shuffle_window)
    dl = dls.train
    n, t0 = 0, time.perf_counter()
    for x, y in dl: n += len(x)
    dt = time.perf_counter() - t0
    return n / dt, dt

def bench_remote(
    n_items:int=20_000,  # Items in the store
    item_shape=(3, 32, 32),  # Shape of each float32 item
    bs:int=64,  # Batch size
    num_workers:int=0,  # DataLoader worker processes
    shard_size:int=16 << 20,  # Bytes per shard (1 GiB in production; smaller here so that the store has several)
    cache_limit:int=None,  # Bytes the cache may hold (None: no limit, so the warm epoch downloads nothing)
    prefetch:int=2,  # Shards downloaded ahead of the reader
    shuffle_block='shard',  # `MemmapDL`'s block shuffle ('shard': whole shards in random order)
    shuffle_window:int=2,  # Shards whose items are mixed together (keep it below the cache's size in shards)
    tmp=None,  # Directory for the local store and the cache (default: a new temporary directory, removed at the end)
    endpoint:str=None,  # An S3 endpoint to use instead of starting moto (the bucket `fmm-bench` is created there)
    repeat:int=3,  # Epochs per configuration; the median is reported
) -> dict:
    "Samples/s of one epoch over a local store, the same store on S3 with a cold cache, and with a warm cache"
    import numpy as np
    from fastai_memmap.store import MemmapStore
    from fastai_memmap.write import write_memmap
    from fastai_memmap.format import MANIFEST, manifest_files
    import fastai_memmap.remote   # registers URLs with MemmapStore
    own_tmp = tmp is None
    tmp = Path(tempfile.mkdtemp(prefix='fmm-bench-remote-') if own_tmp else tmp)
    server = None
    saved = {k: os.environ.get(k) for k in ('AWS_ACCESS_KEY_ID', 'AWS_SECRET_ACCESS_KEY', 'AWS_DEFAULT_REGION', 'AWS_ENDPOINT_URL')}
    try:
        if endpoint is None:
            server, endpoint = start_moto()
            os.environ.update(AWS_ACCESS_KEY_ID='bench', AWS_SECRET_ACCESS_KEY='bench', AWS_DEFAULT_REGION='us-east-1')
        os.environ['AWS_ENDPOINT_URL'] = endpoint
        rng = np.random.default_rng(0)
        y = rng.integers(0, 10, n_items)
        local = tmp/'local.fmm'
        X = rng.random((n_items, *item_shape), dtype=np.float32)
        write_memmap(local, X, meta={'label': y}, shard_size=shard_size, progress=False)
        del X
        # the same store, byte for byte, on S3: shard files first, the manifest last
        from fastai_memmap.remote import remote_fs
        url = 's3://fmm-bench/train.fmm'
        fs, root = remote_fs(url)
        if not fs.exists('fmm-bench'): fs.mkdir('fmm-bench')
        t0 = time.perf_counter()
        m = MemmapStore(local).manifest
        files = [e['file'] for e in manifest_files(m)]
        fs.put([str(local/f) for f in files], [f'{root}/{f}' for f in files])
        fs.put_file(str(local/MANIFEST), f'{root}/{MANIFEST}')
        upload_s = time.perf_counter() - t0
        res = dict(n_items=n_items, item_shape=tuple(item_shape), bs=bs, num_workers=num_workers, n_shards=len(m['shards']),
                   store_mib=sum(e['bytes'] for e in manifest_files(m)) / 2**20, upload_s=upload_s)
        run = lambda store: _epoch(store, bs, num_workers, shuffle_block, shuffle_window)
        med = lambda runs: sorted(runs)[len(runs) // 2]
        run(MemmapStore(local))   # warm-up: first-call costs of torch and fastai in this process, page cache
        cold = []
        for i in range(repeat):   # each cold run starts from an empty cache directory
            shutil.rmtree(tmp/'cache', ignore_errors=True)
            open_t = time.perf_counter()
            remote = MemmapStore(url, cache_dir=tmp/'cache', cache_limit=cache_limit, prefetch=prefetch)
            res['open_s'] = time.perf_counter() - open_t
            cold.append(run(remote))
        res['s3_cold'], res['s3_cold_s'] = med(cold)
        res['cache_mib'] = remote.cache_bytes / 2**20
        loc, warm = [], []
        for i in range(repeat):   # local and warm alternate, so that both see the same machine
            loc.append(run(MemmapStore(local)))
            warm.append(run(MemmapStore(url, cache_dir=tmp/'cache', cache_limit=cache_limit, prefetch=prefetch)))
        (res['local'], res['local_s']), (res['s3_warm'], res['s3_warm_s']) = med(loc), med(warm)
        return res
    finally:
        for k, v in saved.items():
            if v is None: os.environ.pop(k, None)
            else: os.environ[k] = v
        if server is not None: server.terminate(); server.wait()
        if own_tmp: shutil.rmtree(tmp, ignore_errors=True)

def table(rows:list) -> str:
    "A markdown table of `bench_remote` results"
    out = ['| items | item shape | store | shards | workers | local samples/s | S3 cold samples/s | S3 warm samples/s | cold / local | warm / local |',
           '|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|']
    for r in rows:
        out.append(f"| {r['n_items']:,} | {'x'.join(map(str, r['item_shape']))} | {r['store_mib']:.0f} MiB | {r['n_shards']} | {r['num_workers']} | "
                   f"{r['local']:,.0f} | {r['s3_cold']:,.0f} | {r['s3_warm']:,.0f} | {r['s3_cold'] / r['local']:.2f} | {r['s3_warm'] / r['local']:.2f} |")
    return '\n'.join(out)

if __name__ == '__main__':
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--n-items', type=int, default=20_000)
    ap.add_argument('--item-shape', default='3,32,32')
    ap.add_argument('--bs', type=int, default=64)
    ap.add_argument('--num-workers', default='0,2', help='comma-separated: one run per value')
    ap.add_argument('--shard-mib', type=float, default=16)
    ap.add_argument('--cache-limit', type=float, default=None, help='MiB (default: no limit)')
    ap.add_argument('--prefetch', type=int, default=2)
    ap.add_argument('--shuffle-window', type=int, default=2)
    ap.add_argument('--repeat', type=int, default=3, help='epochs per configuration (median reported)')
    ap.add_argument('--json', action='store_true', help='also print the raw results as JSON')
    a = ap.parse_args()
    warnings.filterwarnings('ignore')
    shape = tuple(int(s) for s in a.item_shape.split(','))
    rows = []
    for nw in (int(s) for s in a.num_workers.split(',')):
        rows.append(bench_remote(a.n_items, shape, bs=a.bs, num_workers=nw, shard_size=int(a.shard_mib * 2**20),
                                 cache_limit=None if a.cache_limit is None else int(a.cache_limit * 2**20), prefetch=a.prefetch,
                                 shuffle_window=a.shuffle_window, repeat=a.repeat))
    print(table(rows))
    r = rows[0]
    print(f"\nS3 = moto_server on 127.0.0.1 (separate process); upload {r['upload_s']:.1f} s, open {r['open_s'] * 1e3:.0f} ms, "
          f"cache after the cold epoch {r['cache_mib']:.0f} MiB; bs {a.bs}, shuffle_block='shard', shuffle_window {a.shuffle_window}, prefetch {a.prefetch}, "
          f"cache limit {'none' if a.cache_limit is None else f'{a.cache_limit:g} MiB'}; {os.cpu_count()} cores.")
    if a.json: print(json.dumps(rows, indent=1))
