"Remote stores against a real S3 API (moto's server on loopback): write, read through a bounded cache, train, corruption, sharing, append, staging."
import json, logging, os, signal, subprocess, sys, textwrap, threading, time, zlib
from pathlib import Path
import numpy as np, pytest, torch
from torch import nn

pytest.importorskip('s3fs')
pytest.importorskip('moto.server')
from fastai.data.block import DataBlock, CategoryBlock
from fastai.data.transforms import ColReader, RandomSplitter
from fastai.learner import Learner
from fastai.callback.progress import ProgressCallback   # patches Learner.no_bar
from fastai.losses import CrossEntropyLossFlat
from fastai_memmap.errors import *
from fastai_memmap.format import MANIFEST, manifest_files
from fastai_memmap.store import MemmapStore
from fastai_memmap.write import write_memmap
from fastai_memmap.data import memmap_items, MemmapBlock
from fastai_memmap.remote import *

from conftest import BUCKET

def _data(n, d=256):
    "Items whose values say where they are: item i holds i*d .. i*d+d-1 (mod 2**20), as float32"
    return ((np.arange(n * d, dtype=np.int64) % (1 << 20)).astype(np.float32)).reshape(n, d)

def _keys(client, prefix):
    return sorted(o['Key'].rsplit('/', 1)[-1] for o in client.list_objects_v2(Bucket=BUCKET, Prefix=prefix + '/').get('Contents', []))

# --- writing and reading

def test_write_then_read(s3, tmp_path):
    X, y = _data(500), np.arange(500) % 7
    w = write_memmap(f's3://{BUCKET}/rw.fmm', X, meta={'label': y, 'name': [f'i{i}' for i in range(500)]}, shard_size=128_000, progress=False)
    assert isinstance(w, RemoteStore) and w.n_shards == 4
    assert _keys(s3, 'rw.fmm') == sorted([MANIFEST] + [e['file'] for e in manifest_files(w.manifest)])
    s = MemmapStore(f's3://{BUCKET}/rw.fmm', cache_dir=tmp_path)   # endpoint and credentials from the environment
    assert isinstance(s, RemoteStore) and s.stats['downloads'] == 0
    np.testing.assert_array_equal(s[:], X)
    np.testing.assert_array_equal(s[[499, 3, 250]], X[[499, 3, 250]])
    assert s.meta['label'].tolist() == y.tolist() and s.meta['name'][42] == 'i42'
    assert s.cache_path.parent == tmp_path and s.cache_bytes == s.nbytes
    s.verify(progress=False)
    # ragged items, and a store opened from its pickle
    seqs = [np.arange(n, dtype=np.int16) for n in (3, 0, 7, 1)]
    r = write_memmap(f's3://{BUCKET}/ragged.fmm', seqs, progress=False)
    import pickle
    r2 = pickle.loads(pickle.dumps(MemmapStore(f's3://{BUCKET}/ragged.fmm', cache_dir=tmp_path)))
    for a, b in zip(seqs, r2[[0, 1, 2, 3]]): np.testing.assert_array_equal(a, b)

def test_append_and_replace(s3, tmp_path):
    url = f's3://{BUCKET}/app.fmm'
    X = _data(300)
    write_memmap(url, X[:100], meta={'label': np.zeros(100, int)}, shard_size=40_000, progress=False)
    before = MemmapStore(url, cache_dir=tmp_path/'a')       # a reader opened before the appends
    with pytest.raises(StoreExistsError): write_memmap(url, X)
    write_memmap(url, X[100:250], meta={'label': np.ones(150, int)}, mode='a', shard_size=40_000, progress=False)
    s = write_memmap(url, X[250:], meta={'label': np.full(50, 2)}, mode='a', shard_size=40_000, progress=False)
    with pytest.raises(IncompatibleDataError): write_memmap(url, X[:5, :10], meta={'label': np.zeros(5, int)}, mode='a', progress=False)
    s = MemmapStore(url, cache_dir=tmp_path/'b')
    assert len(s) == 300 and s.n_shards == 3 + 4 + 2
    np.testing.assert_array_equal(s[:], X)
    assert np.bincount(s.meta['label']).tolist() == [100, 150, 50]
    assert len(before) == 100
    np.testing.assert_array_equal(before[:], X[:100])       # its commit is still there, unchanged
    old = set(_keys(s3, 'app.fmm'))
    r = write_memmap(url, X[:10], meta={'label': np.zeros(10, int)}, mode='w', progress=False)
    assert set(_keys(s3, 'app.fmm')) == {MANIFEST} | {e['file'] for e in manifest_files(r.manifest)}
    assert not (set(_keys(s3, 'app.fmm')) - {MANIFEST}) & old   # the replaced files are gone
    np.testing.assert_array_equal(MemmapStore(url, cache_dir=tmp_path/'c')[:], X[:10])

def test_corrupted_shard(s3, tmp_path):
    url = f's3://{BUCKET}/bad.fmm'
    X = _data(400)
    w = write_memmap(url, X, shard_size=100_000, progress=False)
    e = w.manifest['shards'][2]['data']
    key = f'bad.fmm/{e["file"]}'
    good = s3.get_object(Bucket=BUCKET, Key=key)['Body'].read()
    b = bytearray(good); b[len(b) // 2] ^= 0xFF
    s3.put_object(Bucket=BUCKET, Key=key, Body=bytes(b))            # same size, one byte changed
    s = MemmapStore(url, cache_dir=tmp_path/'1')
    np.testing.assert_array_equal(s[:100], X[:100])                 # other shards read fine
    with pytest.raises(ChecksumError, match=e['file']): s[250]
    assert not (s.cache_path/e['file']).exists() and not list(s.cache_path.glob('*.part'))
    s3.put_object(Bucket=BUCKET, Key=key, Body=good[:-100])         # truncated
    with pytest.raises(ChecksumError, match=e['file']): MemmapStore(url, cache_dir=tmp_path/'2')[250]
    s3.delete_object(Bucket=BUCKET, Key=key)                        # missing
    with pytest.raises(CorruptStoreError, match='missing'): MemmapStore(url, cache_dir=tmp_path/'3')[250]
    s3.put_object(Bucket=BUCKET, Key='bad.fmm/manifest.json', Body=b'{"format": "fastai_memmap", "version": 1')
    with pytest.raises(CorruptStoreError, match='not valid JSON'): MemmapStore(url, cache_dir=tmp_path/'4')

# --- the cache under a DataLoader

class _Watch:
    """Sample a cache directory's total size every millisecond in a thread, and check every complete file it sees.
    Each sample is taken under the cache's directory lock (where every reservation, eviction and rename happens), so it
    is a consistent snapshot, and counts each file once (by inode)."""
    def __init__(self, path, entries):
        self.path, self.entries, self.max, self.bad, self.samples = Path(path), entries, 0, [], 0
        self.stop = threading.Event()
        self.t = threading.Thread(target=self.run, daemon=True)
    def run(self):
        from fastai_memmap.remote import _flock
        while not self.stop.is_set():
            sizes = {}
            if self.path.is_dir():
                with _flock(self.path/'.lock'):
                    for d in os.scandir(self.path):
                        try:
                            if d.name.startswith('.') or not d.is_file(): continue
                            st = d.stat()
                        except FileNotFoundError: continue
                        sizes[st.st_ino] = st.st_size
                        e = self.entries.get(d.name)
                        if e is not None and st.st_size != e['bytes']: self.bad.append((d.name, st.st_size))   # partial, under a real name
            self.max, self.samples = max(self.max, sum(sizes.values())), self.samples + 1
            time.sleep(0.001)
    def __enter__(self): self.t.start(); return self
    def __exit__(self, *_): self.stop.set(); self.t.join()

class _Gets(logging.Handler):
    "Count the server's GET requests for keys containing `what` (moto logs one line per request through werkzeug)"
    def __init__(self, what):
        super().__init__(); self.what, self.n = what, 0
    def emit(self, rec):
        msg = rec.getMessage()
        if 'GET /' in msg and self.what in msg: self.n += 1   # (206 responses are logged in colour: no quote before GET)
    def __enter__(self):
        lg = logging.getLogger('werkzeug')
        self.saved = lg.level, lg.propagate
        lg.setLevel(logging.INFO); lg.propagate = False; lg.addHandler(self)
        return self
    def __exit__(self, *_):
        lg = logging.getLogger('werkzeug')
        lg.removeHandler(self); lg.setLevel(self.saved[0]); lg.propagate = self.saved[1]

def _sorted_split(items):
    "A random split, each part in store order: validation then reads shard after shard (a random order would touch every shard in every batch)"
    return [sorted(s) for s in RandomSplitter(seed=42)(items)]

def test_train_with_cache_smaller_than_store(s3, tmp_path):
    url = f's3://{BUCKET}/train.fmm'
    rng = np.random.default_rng(0)
    N, D = 4000, 3 * 16 * 16
    y = rng.integers(0, 3, N)
    X = (rng.standard_normal((N, 3, 16, 16)) + y[:, None, None, None]).astype(np.float32)
    w = write_memmap(url, X, meta={'label': y}, shard_size=1 << 20, progress=False)   # 12 MiB in 12 shards
    shard = max(s['data']['bytes'] for s in w.manifest['shards'])
    limit = 4 * shard
    assert w.nbytes > 2.5 * limit
    store = MemmapStore(url, cache_dir=tmp_path, cache_limit=limit, prefetch=1)
    entries = {e['file']: e for e in manifest_files(store.manifest)}
    dblock = DataBlock(blocks=(MemmapBlock, CategoryBlock), get_items=memmap_items, get_y=ColReader('label'),
                       splitter=_sorted_split)
    dls = dblock.dataloaders(store, bs=64, num_workers=2, shuffle_block='shard', shuffle_window=1)
    learn = Learner(dls, nn.Sequential(nn.Flatten(), nn.Linear(D, 3)), loss_func=CrossEntropyLossFlat())
    with _Watch(store.cache_path, entries) as watch, _Gets('train.fmm/data-') as gets, learn.no_bar(), learn.no_logging():
        learn.fit(1, lr=1e-2)
    # the validation set, read in order by the loading threads, is exactly the data
    with _Watch(store.cache_path, entries) as watch2:
        xs = torch.cat([x for x, _ in dls.valid])
    np.testing.assert_array_equal(xs.numpy(), X[dls.valid.dataset.items.store_idxs])
    # shard-window shuffle: each shard is downloaded about once per pass (a training epoch and a validation pass)
    assert w.n_shards <= gets.n <= 3 * w.n_shards, (gets.n, w.n_shards)
    assert watch.samples > 100 and watch2.samples > 10
    assert watch.max <= limit and watch2.max <= limit, (watch.max, watch2.max, limit, shard)   # (the promise is limit + one shard)
    assert not watch.bad and not watch2.bad
    assert watch.max > 2 * shard   # the cache was used, and filled
    assert store.cache_bytes <= limit
    losses = learn.recorder.values[-1]
    assert all(np.isfinite(losses))

# --- processes sharing one cache

_CHILD = textwrap.dedent('''
    import json, os, sys, time, numpy as np
    from fastai_memmap.store import MemmapStore
    import fastai_memmap.remote
    url, cache, limit, go, seed = sys.argv[1:6]
    s = MemmapStore(url, cache_dir=cache, cache_limit=None if limit == 'None' else int(limit), prefetch=0)
    while not os.path.exists(go): time.sleep(0.002)
    rng, ok = np.random.default_rng(int(seed)), True
    for rep in range(2):
        for k in rng.permutation(s.n_shards):
            a, b = int(s._starts[k]), int(s._starts[k + 1])
            want = ((np.arange(a * 256, b * 256, dtype=np.int64) % (1 << 20)).astype(np.float32)).reshape(-1, 256)
            ok = ok and np.array_equal(s[a:b], want)
            s.close()   # map it again next time: the file may have been evicted and fetched again meanwhile
    print(json.dumps(dict(ok=bool(ok), **s.stats)))
''')

def _run_children(url, cache, limit, n, tmp):
    go = tmp/f'go-{limit}'
    env = {**os.environ, 'PYTHONPATH': str(Path(__file__).resolve().parent.parent)}
    procs = [subprocess.Popen([sys.executable, '-c', _CHILD, url, str(cache), str(limit), str(go), str(i)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(n)]
    time.sleep(0.2)
    go.touch()
    out = [p.communicate(timeout=120) for p in procs]
    for p, (o, e) in zip(procs, out): assert p.returncode == 0, e[-3000:]
    return [json.loads(o.strip().splitlines()[-1]) for o, _ in out]

def test_processes_share_cache(s3, tmp_path):
    url = f's3://{BUCKET}/shared.fmm'
    w = write_memmap(url, _data(3000), shard_size=400_000, progress=False)   # 8 shards of ~400 KB
    entries = {e['file']: e for e in manifest_files(w.manifest)}
    shard = max(e['bytes'] for e in entries.values())
    # no limit: four processes read everything twice, and each file is downloaded exactly once between them
    res = _run_children(url, tmp_path/'c1', None, 4, tmp_path)
    assert all(r['ok'] for r in res)
    assert sum(r['downloads'] for r in res) == w.n_shards, res
    # a cache of 2 shards: files are evicted and fetched again while other processes read them; never a partial file
    cache = tmp_path/'c2'
    store = MemmapStore(url, cache_dir=cache, cache_limit=2 * shard)
    with _Watch(store.cache_path, entries) as watch:
        res = _run_children(url, cache, 2 * shard, 3, tmp_path)
    assert all(r['ok'] for r in res), res
    assert sum(r['evictions'] for r in res) > 0 and sum(r['downloads'] for r in res) > w.n_shards
    assert not watch.bad and watch.max <= 2 * shard, (watch.bad, watch.max)

# --- staging

def test_stage_resumes_and_verifies(s3, tmp_path):
    url = f's3://{BUCKET}/stage.fmm'
    X = _data(2000)
    w = write_memmap(url, X, meta={'label': np.arange(2000) % 5}, shard_size=200_000, progress=False)
    files = manifest_files(w.manifest)
    dst = tmp_path/'local.fmm'
    s = stage(url, dst, progress=False)
    assert s.staged == dict(kept=0, fetched=len(files), bytes=w.nbytes)
    np.testing.assert_array_equal(s[:], X)
    assert stage(url, dst, progress=False).staged['fetched'] == 0      # complete: nothing to do
    with open(dst/files[1]['file'], 'r+b') as f: f.truncate(10)        # damaged after the copy completed
    with pytest.raises(CorruptStoreError): MemmapStore(dst)
    assert stage(url, dst, progress=False).staged['fetched'] == 1
    # as if interrupted and damaged: no manifest, a file missing, one truncated, one changed in place, a stale .part
    (dst/MANIFEST).unlink()
    (dst/files[0]['file']).unlink()
    with open(dst/files[3]['file'], 'r+b') as f: f.truncate(100)
    p = dst/files[5]['file']; b = bytearray(p.read_bytes()); b[-3] ^= 1; p.write_bytes(bytes(b))
    (dst/(files[7]['file'] + '.part')).write_bytes(b'half')
    with pytest.raises(StoreNotFoundError): MemmapStore(dst)              # not a store until the copy completes
    s = stage(url, dst, progress=False)
    assert (s.staged['kept'], s.staged['fetched']) == (len(files) - 3, 3)
    assert not list(dst.glob('*.part'))
    s.verify(progress=False)
    np.testing.assert_array_equal(s[:], X)
    assert s.meta['label'].tolist() == (np.arange(2000) % 5).tolist()
    # a copy killed midway (SIGKILL) resumes from what it had
    dst2 = tmp_path/'killed.fmm'
    code = f"from fastai_memmap.remote import stage; stage({url!r}, {str(dst2)!r}, workers=1, progress=False)"
    p = subprocess.Popen([sys.executable, '-c', code], env={**os.environ, 'PYTHONPATH': str(Path(__file__).resolve().parent.parent)})
    t0 = time.time()
    while time.time() - t0 < 60 and p.poll() is None and len(list(dst2.glob('*.npy'))) < 3: time.sleep(0.002)
    p.send_signal(signal.SIGKILL); p.wait()
    had, complete = len(list(dst2.glob('*.npy'))), (dst2/MANIFEST).exists()
    s = stage(url, dst2, progress=False)
    assert s.staged['kept'] >= had and s.staged['kept'] + s.staged['fetched'] == len(files)   # every renamed file was complete
    assert complete or s.staged['fetched'] > 0
    s.verify(progress=False)
    np.testing.assert_array_equal(s[:], X)
