"""The defects of issue "Trust, round two", each with the test that found it (named after its number there), and
the guarantees they break: reads from threads, descriptors, commits, user files, exact metadata.

Real files, real threads and real processes; nothing is mocked."""
import gc, os, subprocess, sys, textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
import numpy as np, pytest

from fastai_memmap.store import MemmapStore
from fastai_memmap.write import write_memmap

ROOT = Path(__file__).resolve().parent.parent

def run_py(code, timeout=300, **env):
    "Run `code` in a fresh Python process; return its stdout (fails the test on a non-zero exit)"
    r = subprocess.run([sys.executable, '-c', textwrap.dedent(code)], capture_output=True, text=True, timeout=timeout,
                       cwd=ROOT, env={**os.environ, **env})
    assert r.returncode == 0, f"rc={r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}"
    return r.stdout

# ------------------------------------------------------------------ 11: reads from threads
def test_defect11_threads_share_the_map_cache(tmp_path):
    "8 threads reading a store of 40 shards through an LRU of 4 maps: every read exact, no KeyError"
    X = np.arange(400 * 6, dtype=np.float32).reshape(400, 2, 3)
    write_memmap(tmp_path/'s.fmm', X, meta={'label': np.arange(400) % 7}, shard_size=X[:10].nbytes, progress=False)
    store = MemmapStore(tmp_path/'s.fmm', max_open=4)
    assert store.n_shards == 40
    def work(seed):
        rng = np.random.default_rng(seed)
        for _ in range(60):
            idx = rng.integers(0, 400, rng.integers(1, 50))
            np.testing.assert_array_equal(store[idx], X[idx])
            i = int(rng.integers(0, 400))
            np.testing.assert_array_equal(store[i], X[i])
            store.close() if rng.random() < 0.02 else None   # a thread dropping every map under the others' feet
        return True
    with ThreadPoolExecutor(8) as ex: assert all(ex.map(work, range(16)))
    assert len(store._fresh()) <= 4

class _Cycle:
    "A reference cycle whose finalizer runs Python code: the garbage collector runs it, and another thread may take over there"
    def __del__(self): sum(range(50))

def test_threads_opening_shards_while_the_collector_runs(tmp_path):
    "Loading threads that open shards in parallel (each open parses a .npy header with `ast`, which CPython 3.11 does not guard between threads) read exactly"
    X = np.arange(200 * 6, dtype=np.float32).reshape(200, 2, 3)
    write_memmap(tmp_path/'s.fmm', X, shard_size=X[:2].nbytes, progress=False)
    store = MemmapStore(tmp_path/'s.fmm', max_open=2)   # almost every read opens a shard
    def work(seed):
        rng = np.random.default_rng(seed)
        for _ in range(1000):
            i = int(rng.integers(0, 200))
            np.testing.assert_array_equal(store[i], X[i])
            c = [_Cycle()]; c.append(c)
        return True
    thresh, switch = gc.get_threshold(), sys.getswitchinterval()
    gc.set_threshold(1); sys.setswitchinterval(1e-6)   # collections, and thread switches, as often as they come (without the lock: fails 3 runs in 4)
    try:
        with ThreadPoolExecutor(8) as ex: assert all(ex.map(work, range(8)))
    finally: gc.set_threshold(*thresh); sys.setswitchinterval(switch)

def test_defect11_dask_threaded_scheduler(tmp_path):
    X = np.random.default_rng(0).normal(size=(300, 4)).astype(np.float32)
    write_memmap(tmp_path/'s.fmm', X, shard_size=X[:7].nbytes, progress=False)
    d = MemmapStore(tmp_path/'s.fmm', max_open=3).to_dask()
    np.testing.assert_allclose(d.sum(axis=0).compute(scheduler='threads', num_workers=8), X.sum(0), rtol=1e-5)

# ------------------------------------------------------------------ descriptors (issue "The index is out of core too")
def test_600_one_item_appends_read_back_under_ulimit_96(tmp_path):
    "A store of 600 shards reads back exactly in a process limited to 96 open files (default max_open from the limit)"
    p = tmp_path/'many.fmm'
    write_memmap(p, np.zeros((1, 3), np.int32), meta={'k': [0]}, progress=False)
    for i in range(1, 600):   # compact=False: keep 600 shards (appends would merge the small tail otherwise)
        write_memmap(p, np.full((1, 3), i, np.int32), meta={'k': [i]}, mode='a', compact=False, progress=False)
    out = run_py(f"""
        import resource, numpy as np
        resource.setrlimit(resource.RLIMIT_NOFILE, (96, 96))
        from fastai_memmap.store import MemmapStore
        s = MemmapStore({str(p)!r})
        assert s.n_shards == 600 and s.max_open == 24, (s.n_shards, s.max_open)
        want = np.repeat(np.arange(600, dtype=np.int32)[:, None], 3, 1)
        assert (s[:] == want).all()
        assert (s[np.random.default_rng(0).permutation(600)] == want[np.random.default_rng(0).permutation(600)]).all()
        assert (s.column('k') == np.arange(600)).all()
        assert all((s[i] == want[i]).all() for i in range(600))
        s.verify(progress=False)
        # descriptors taken by other code: the store closes its own least recently used maps and retries
        s2 = MemmapStore({str(p)!r}, max_open=600)
        assert (s2[:] == want).all()
        print('ok')
    """)
    assert out.strip() == 'ok'

# ================================================================== helpers for the tests below
import errno, fcntl, gc, hashlib, json, random, shutil, signal, stat, threading, time, tracemalloc, warnings, zlib
import pandas as pd
from urllib.parse import quote
import fastai_memmap
from fastai_memmap.errors import *
from fastai_memmap.format import MANIFEST, manifest_files, read_npy_header, npy_header
from fastai_memmap.write import MemmapWriter, combine_stores
from fastai_memmap.sparse import SparseStore, write_sparse
from fastai_memmap.remote import stage, ShardCache, RemoteStore

PKG = str(Path(fastai_memmap.__file__).resolve().parent)

@pytest.fixture
def fast_dir(tmp_path):
    "A fresh directory on tmpfs where there is one (fsync costs nothing there), else under tmp_path"
    if os.path.isdir('/dev/shm') and os.access('/dev/shm', os.W_OK):
        d = Path(f'/dev/shm/fmm-trust-{os.getpid()}-{time.monotonic_ns()}'); d.mkdir()
        yield d
        shutil.rmtree(d, ignore_errors=True)
    else: yield tmp_path

def X_(n, seed=0, shape=(2, 3)):
    return (np.random.default_rng(seed).standard_normal((n, *shape)) * 100).astype(np.float32)

def _tree(root) -> dict:
    "name -> sha256 of every file under `root` (and 'dir' / 'link:target')"
    out = {}
    for d, dirs, files in os.walk(root):
        for name in dirs + files:
            p = Path(d)/name
            rel = str(p.relative_to(root))
            out[rel] = 'link:' + os.readlink(p) if p.is_symlink() else 'dir' if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out

def _clean(path):
    "The store directory holds exactly its manifest's files, those it retains for older readers, the manifest and the lock"
    m = json.loads((Path(path)/MANIFEST).read_text())
    want = {e['file'] for e in manifest_files(m)} | {r['file'] for r in m.get('retired', [])} | {MANIFEST, '.lock'}
    have = set(os.listdir(path))
    assert have <= want | {'.stage-checked.json'} and want - {'.lock'} <= have, (sorted(have - want), sorted(want - have))

def _holds(s, X, meta):
    np.testing.assert_array_equal(s[:], X)
    assert s[:].dtype == X.dtype
    for c, v in meta.items():
        got = s.column(c)
        assert got.dtype == np.asarray(v).dtype, (c, got.dtype, np.asarray(v).dtype)
        np.testing.assert_array_equal(got, v)

def _lock_free(path):
    "The writer lock of `path` can be taken now (raises `StoreLockedError` if not)"
    fd = os.open(Path(path)/'.lock', os.O_RDWR | os.O_CREAT, 0o644)
    try: fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError: raise StoreLockedError(f"{path} is still locked") from None
    finally: os.close(fd)

# ================================================================== 1, 2: a commit inside `with`
@pytest.mark.parametrize('mode', ['x', 'a', 'w'])
def test_defect1_exception_after_an_explicit_commit_keeps_it(tmp_path, mode):
    "An exception in a `with MemmapWriter` block after `commit()` undoes nothing: the commit stands, its files stay"
    p, old, new = tmp_path/'s.fmm', X_(4, 1), X_(3, 2)
    if mode != 'x': write_memmap(p, old, meta={'y': np.arange(4)}, progress=False)
    with pytest.raises(RuntimeError, match='after the commit'):
        with MemmapWriter(p, mode) as w:
            for i, x in enumerate(new): w.add(x, y=10 + i)
            w.commit()
            raise RuntimeError('an error after the commit')
    s = MemmapStore(p).verify(progress=False)
    _holds(s, np.concatenate([old, new]) if mode == 'a' else new,
           {'y': np.r_[np.arange(4) if mode == 'a' else [], [10, 11, 12]].astype(np.int64)})
    _lock_free(p)

APPEND_ONE = '''
import sys, numpy as np
from fastai_memmap.write import write_memmap
write_memmap(sys.argv[1], np.full((1, 2, 3), 7, np.float32), meta={'y': [77]}, mode='a', progress=False)
'''

def test_defect2_the_end_of_a_with_block_after_commit_commits_nothing(tmp_path):
    "After commit() the lock is released; another process's append in between survives the end of the block and the next writer"
    p = tmp_path/'s.fmm'
    write_memmap(p, X_(2), meta={'y': [0, 1]}, progress=False)
    with MemmapWriter(p, 'a') as w:
        w.add(X_(1, 5)[0], y=2)
        w.commit()
        r = subprocess.run([sys.executable, '-c', APPEND_ONE, str(p)], capture_output=True, text=True, cwd=ROOT, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
    s = MemmapStore(p).verify(progress=False)
    assert s.column('y').tolist() == [0, 1, 2, 77], s.column('y')
    s = write_memmap(p, X_(1, 6), meta={'y': [3]}, mode='a', progress=False)   # the next writer keeps every committed file
    assert s.verify(progress=False).column('y').tolist() == [0, 1, 2, 77, 3]
    _clean(p)

def test_defect2_a_writer_commits_at_most_once(tmp_path):
    p = tmp_path/'s.fmm'
    with MemmapWriter(p) as w:
        w.add(X_(1)[0], y=0)
        s1 = w.commit()
        with pytest.raises(StoreError, match='commits at most once'): w.add(X_(1)[0], y=1)
        with pytest.raises(StoreError, match='commits at most once'): w.add_many(X_(2))
        assert w.commit() is s1                # a second commit() commits nothing
    assert len(MemmapStore(p)) == 1
    w = MemmapWriter(p, 'a'); w.add(X_(1)[0], y=1); w.abort()
    with pytest.raises(StoreError, match='aborted'): w.commit()
    assert len(MemmapStore(p)) == 1
    _lock_free(p)

# ================================================================== 3: an interrupt or an fsync error at every point of every commit
class _Inject:
    """A profile function that raises `exc` at the `k`-th event (a call, a return, a C call or its return) in fastai_memmap's own
    code, as a signal handler raising KeyboardInterrupt does between two bytecodes; `only`: count only calls of that C function."""
    def __init__(self, k=None, exc=None, only=None):
        self.k, self.exc, self.only, self.n, self.commits = k, exc, only, 0, []
    def __call__(self, frame, event, arg):
        code = frame.f_code
        if not code.co_filename.startswith(PKG): return
        if self.only is not None and not (event == 'c_call' and arg is self.only): return
        # A `with` block's normal exit calls `__exit__` with no signal check between the block's last call and it: a real
        # interrupt lands inside the block (and `__exit__` runs) or after `__exit__`, never in between (a profile function
        # raising there would leave, say, a lock held, which no signal can do)
        if event == 'c_call' and getattr(arg, '__name__', None) == '__exit__': return
        self.n += 1
        if event == 'c_call' and arg is os.replace: self.commits.append(self.n)   # renames: the last one is the commit
        if self.n == self.k:
            sys.setprofile(None)
            raise self.exc()   # a fresh exception each time: a kept traceback would keep the interrupted writer alive

def _profiled(prof, fn):
    sys.setprofile(prof)
    try: return fn()
    finally: sys.setprofile(None)

A3, B3 = X_(10, 31), X_(4, 32)
SP_A = [(np.array([1, 3]), np.array([1., 2.])), (np.array([0]), np.array([5.]))]
SP_B = [(np.array([2]), np.array([7.]))] * 3

def _dense(s): return np.stack([s[i] for i in range(len(s))])

def _setup3(name, d, build=True):
    "`(path, kind, run, states)` for commit path `name` with its stores in `d` (written there first if `build`)"
    p, W = d/'s.fmm', lambda p, X, y, **kw: write_memmap(p, X, meta={'y': np.asarray(y, np.int64)}, progress=False, **kw)
    A, yA, B, yB = A3, np.arange(10), B3, np.arange(10, 14)
    before, appended = (A, {'y': yA}), (np.concatenate([A, B]), {'y': np.r_[yA, yB]})
    if name in ('append', 'with', 'replace'):
        if build: W(p, A, yA, shard_size=48)
        if name == 'append': run = lambda: W(p, B, yB, mode='a', shard_size=48)
        elif name == 'replace': run = lambda: W(p, B, yB, mode='w', shard_size=48)
        else:
            def run():
                with MemmapWriter(p, 'a', shard_size=48) as w:
                    for x, y in zip(B, yB): w.add(x, y=y)
                    w.commit()
        return p, 'dense', run, {'before': before, 'after': (B, {'y': yB}) if name == 'replace' else appended}
    if name == 'tail':   # nine small shards at the end: the append merges them in its own commit
        if build:
            W(p, A[:2], yA[:2])
            for a in range(2, 10): W(p, A[a:a + 1], yA[a:a + 1], mode='a', compact=False)
        return p, 'dense', lambda: W(p, B, yB, mode='a'), {'before': before, 'after': appended}
    if name == 'compact':
        if build:
            W(p, A[:2], yA[:2])
            for a in range(2, 10, 2): W(p, A[a:a + 2], yA[a:a + 2], mode='a', compact=False)
        return p, 'dense', lambda: MemmapStore(p).compact(retain=0, progress=False), {'before': before}
    if name == 'combine':
        if build: W(d/'a.fmm', A, yA, shard_size=48); W(d/'b.fmm', B, yB); W(p, B[:1], yB[:1])
        return p, 'dense', lambda: combine_stores(p, [d/'a.fmm', d/'b.fmm'], mode='w'), {'before': (B[:1], {'y': yB[:1]}), 'after': appended}
    if name == 'sparse':
        if build: write_sparse(p, SP_A, dim=4, progress=False)
        return p, 'sparse', lambda: write_sparse(p, SP_B, dim=4, mode='w', progress=False), {'before': SP_A, 'after': SP_B}
    if name == 'stage':
        if build: W(d/'src.fmm', A, yA, shard_size=48); W(d/'old.fmm', B, yB); stage(d/'old.fmm', p, progress=False)
        return p, 'dense', lambda: stage(d/'src.fmm', p, progress=False), {'before': (B, {'y': yB}), 'after': before}
    raise ValueError(name)

def _outcome3(p, kind, states) -> str:
    "Which state the store at `p` holds (verified), or fail"
    if kind == 'sparse':
        s = SparseStore(p).verify(progress=False)
        got = _dense(s)
        for k, items in states.items():
            want = np.zeros((len(items), 4)); [want[i].__setitem__(ix, v) for i, (ix, v) in enumerate(items)]
            if got.shape == want.shape and np.array_equal(got, want): return k
        raise AssertionError(f"{p} holds neither state: {got}")
    s = MemmapStore(p).verify(progress=False)
    for k, (X, meta) in states.items():
        if len(s) == len(X) and np.array_equal(s[:], X) and all(np.array_equal(s.column(c), v) and s.column(c).dtype == v.dtype for c, v in meta.items()):
            return k
    raise AssertionError(f"{p} holds neither state ({len(s)} items)")

def _after3(p, kind):
    "The lock is free, and a next write succeeds and leaves the directory clean"
    try: _lock_free(p)
    except StoreLockedError:   # a writer whose release was itself interrupted unlocks when it is collected
        gc.collect(); _lock_free(p)
    if kind == 'sparse': write_sparse(p, SP_A, dim=4, mode='w', progress=False); return
    write_memmap(p, X_(1, 33), meta={'y': np.array([99])}, mode='a', progress=False).verify(progress=False)
    _clean(p)

def _points(n, commits, full):
    "Event numbers to interrupt at: all (`full`), else the final commit's first 60 (the rename and the fsync after it), every 12th later, 10 before"
    if full: return list(range(1, n + 1))
    c = commits[-1]
    ks = set(range(c - 15, min(n, c + 60) + 1)) | set(range(c, n + 1, 12)) | set(np.linspace(1, c, 10, dtype=int).tolist())
    for c0 in commits[:-1]: ks |= set(range(c0, c0 + 6))   # around the earlier renames (sub-stores of a sparse store, staged files)
    return sorted(k for k in ks if 1 <= k <= n)

NAMES3 = ['append', 'with', 'replace', 'tail', 'compact', 'combine', 'sparse', 'stage']

def _scan3(name, d, full):
    "Interrupt commit path `name` at many points (every point if `full`) and fail its fsyncs one by one; return the outcomes"
    base, work = d/'base', d/'work'
    base.mkdir(); _setup3(name, base)
    def fresh():
        if work.exists(): shutil.rmtree(work)
        shutil.copytree(base, work, symlinks=True)
        return _setup3(name, work, build=False)
    outcomes = {}
    for exc, only in [(lambda: KeyboardInterrupt('injected'), None), (lambda: OSError(errno.EIO, 'injected fsync error'), os.fsync)]:
        count = _Inject(only=only)
        p, kind, run, states = fresh()
        _profiled(count, run)
        ks = range(1, count.n + 1) if only is not None else _points(count.n, count.commits, full)
        for k in ks:
            p, kind, run, states = fresh()
            try: _profiled(_Inject(k, exc, only), run); got = 'returned'
            except (KeyboardInterrupt, OSError): got = 'raised'
            o = _outcome3(p, kind, states)
            if got == 'returned': assert o == ('after' if 'after' in states else 'before'), (k, o)
            key = f"{'fsync EIO' if only else 'interrupt'} {got} -> {o}"
            outcomes[key] = outcomes.get(key, 0) + 1
            _after3(p, kind)
    return outcomes

COUNTS3 = {}

@pytest.mark.parametrize('name', NAMES3)
def test_defect3_interrupt_or_fsync_error_at_any_point_of_a_commit(fast_dir, name):
    """KeyboardInterrupt raised at every point of the commit (and a sample before it) and an EIO from each fsync in turn:
    the store opens, verifies and holds the commit before or the one after, never a mix or a loss; the lock is free; the
    next write succeeds and leaves no debris. Before the fix, an interrupt in the directory fsync after the rename deleted
    the files the new manifest names."""
    out = _scan3(name, fast_dir, full=False)
    COUNTS3[name] = out
    assert any(k.endswith('-> after') for k in out) or name == 'compact', out    # some interrupts landed after the rename
    assert any('raised -> after' in k for k in out) or name == 'compact', out   # ... and were raised, the commit standing

@pytest.mark.slow
@pytest.mark.parametrize('name', NAMES3)
def test_defect3_interrupt_at_every_point_slow(fast_dir, name, request):
    "Every point of every commit path (~1,500-3,500 each, about a minute each): run it explicitly with -m slow (CI runs every test)"
    expr = request.config.getoption('markexpr') or ''
    if 'slow' not in expr or 'not slow' in expr: pytest.skip("long: select it with -m slow")
    _scan3(name, fast_dir, full=True)

SIGINT_LOOP = r"""
import gc, signal, sys, numpy as np
from fastai_memmap.errors import StoreLockedError
from fastai_memmap.store import MemmapStore
from fastai_memmap.write import write_memmap
armed = False
def interrupt(sig, frame):   # Python's own behaviour (KeyboardInterrupt between two bytecodes), while an append runs
    global armed
    if armed: armed = False; raise KeyboardInterrupt
signal.signal(signal.SIGINT, interrupt)
p, want = sys.argv[1], int(sys.argv[2])
write_memmap(p, np.zeros((1, 3), np.float32), meta={'y': [0]}, progress=False)
n, interrupts = 1, 0
print('ready', flush=True)
while interrupts < want:
    try:
        armed = True
        write_memmap(p, np.full((1, 3), n, np.float32), meta={'y': [n]}, mode='a', progress=False)
        armed = False
    except KeyboardInterrupt: interrupts += 1
    except StoreLockedError:   # a writer whose release an interrupt cut short unlocks when it is collected
        armed = False; gc.collect(); continue
    s = MemmapStore(p).verify(progress=False)
    assert len(s) in (n, n + 1), (len(s), n)
    assert (s.column('y') == np.arange(len(s))).all() and (s[:, 0] == np.arange(len(s))).all()
    n = len(s)
signal.signal(signal.SIGINT, signal.SIG_IGN)   # the signals still on their way
print('ok', interrupts, n, flush=True)
"""

def test_defect3_real_sigint_at_random_moments(fast_dir):
    "Real SIGINTs every few milliseconds into a process appending in a loop: after each, the store opens, verifies and holds every commit"
    p = subprocess.Popen([sys.executable, '-c', SIGINT_LOOP, str(fast_dir/'s.fmm'), '300'], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, cwd=ROOT)
    try:
        assert p.stdout.readline().strip() == 'ready', p.stderr.read()
        rng, t0 = random.Random(3), time.monotonic()
        while p.poll() is None and time.monotonic() - t0 < 240:
            time.sleep(rng.uniform(0, 0.012))
            try: p.send_signal(signal.SIGINT)
            except ProcessLookupError: break
        out, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None: p.kill()
    assert p.returncode == 0 and out.startswith('ok'), err[-4000:]
    interrupts, n = map(int, out.split()[1:3])
    assert interrupts >= 300 and n > 20, out

# ================================================================== 4: your own files in the target directory
def test_defect4_user_files_in_the_directory_are_never_deleted(tmp_path):
    "Files named like `data-train.npy` or `meta-labels.npy` are yours: a directory holding them is not a store, and a store keeps them"
    d = tmp_path/'mine'; d.mkdir()
    np.save(d/'data-train.npy', X_(3)); np.save(d/'meta-labels.npy', np.arange(3)); np.save(d/'index-notes-00001.npy', np.arange(2))
    before = _tree(d)
    for mode in ('x', 'w', 'a'):
        with pytest.raises(StoreExistsError, match='not a fastai_memmap store'): write_memmap(d, X_(2), mode=mode, progress=False)
        assert _tree(d) == before
    p = tmp_path/'s.fmm'
    write_memmap(p, X_(2), meta={'y': [0, 1]}, progress=False)
    for f in before: shutil.copy(d/f, p/f)
    mine = {f: h for f, h in _tree(p).items() if f in before}
    write_memmap(p, X_(1, 1), meta={'y': [2]}, mode='a', progress=False)
    write_memmap(p, X_(2, 2), meta={'y': [3, 4]}, mode='w', progress=False)
    for i in range(9): write_memmap(p, X_(1, 3 + i), meta={'y': [5 + i]}, mode='a', progress=False)   # the tail is compacted too
    MemmapStore(p).compact(retain=0, progress=False).verify(progress=False)
    assert {f: h for f, h in _tree(p).items() if f in before} == mine

# ================================================================== 5, 6: metadata merges are exact or refused
BIG = np.array([2**63 + 1], np.uint64)

def test_defect5_int64_with_uint64_is_exact_or_refused(tmp_path):
    "int64 + uint64 never goes through float64: the values are kept exactly in one integer dtype, or MetadataError commits nothing"
    p = tmp_path/'a.fmm'
    write_memmap(p, X_(2), meta={'id': np.array([-1, 5])}, progress=False)
    tree = _tree(p)
    with pytest.raises(MetadataError, match='uint64 if none is negative'): write_memmap(p, X_(1), meta={'id': BIG}, mode='a', progress=False)
    assert _tree(p) == tree
    s = write_memmap(p, X_(1), meta={'id': np.array([7], np.uint64)}, mode='a', progress=False)   # fits int64: kept exact
    assert s.column('id').dtype == np.int64 and s.column('id').tolist() == [-1, 5, 7]
    # one write whose chunks differ: Python ints give int64, then uint64 beyond int64's range
    vals = [1, 2, 2**63 + 1]
    s = write_memmap(tmp_path/'r.fmm', vals, read_fn=lambda v: (np.zeros(3, np.float32), {'id': v}), shard_size=12, progress=False)
    assert s.n_shards == 3 and s.column('id').dtype == np.uint64 and s.column('id').tolist() == vals
    s.verify(progress=False)
    with pytest.raises(MetadataError, match='no single dtype'):
        write_memmap(tmp_path/'r2.fmm', [-1, 2**63 + 1], read_fn=lambda v: (np.zeros(3, np.float32), {'id': v}), shard_size=12, progress=False)
    assert not (tmp_path/'r2.fmm').exists()
    # combine_stores
    a = write_memmap(tmp_path/'ca.fmm', X_(1), meta={'id': np.array([-1])}, progress=False)
    b = write_memmap(tmp_path/'cb.fmm', X_(1), meta={'id': BIG}, progress=False)
    with pytest.raises(MetadataError, match='no single dtype'): combine_stores(tmp_path/'c.fmm', [a, b])
    assert not (tmp_path/'c.fmm').exists()
    a2 = write_memmap(tmp_path/'ca2.fmm', X_(1), meta={'id': np.array([3])}, progress=False)
    tree = _tree(a2.path)
    c = combine_stores(tmp_path/'c2.fmm', [a2, b]).verify(progress=False)
    assert c.column('id').dtype == np.uint64 and c.column('id').tolist() == [3, 2**63 + 1]
    assert _tree(a2.path) == tree and MemmapStore(a2.path).verify(progress=False).column('id').dtype == np.int64   # its linked file was not rewritten in place

def test_defect6_datetime_units_merge_exactly_or_are_refused(tmp_path):
    "A datetime64[D] column given [ns] values keeps every date (the year 3000 never reads back as 1830)"
    p = tmp_path/'d.fmm'
    days = np.array(['3000-01-01', '2020-05-01'], 'M8[D]')
    write_memmap(p, X_(2), meta={'t': days}, progress=False)
    tree = _tree(p)
    with pytest.raises(MetadataError, match='1678 to 2262'):
        write_memmap(p, X_(1), meta={'t': np.array(['2020-01-01T00:00:00.5'], 'M8[ns]')}, mode='a', progress=False)
    assert _tree(p) == tree
    s = write_memmap(p, X_(1), meta={'t': np.array(['2021-01-01'], 'M8[ns]')}, mode='a', progress=False)   # whole days: stored as days
    assert s.column('t').dtype == np.dtype('M8[D]')
    np.testing.assert_array_equal(s.column('t'), np.array(['3000-01-01', '2020-05-01', '2021-01-01'], 'M8[D]'))
    q = tmp_path/'e.fmm'   # the finer unit, when every value fits it
    write_memmap(q, X_(1), meta={'t': np.array(['2020-01-01'], 'M8[D]')}, progress=False)
    s = write_memmap(q, X_(1), meta={'t': np.array(['2020-01-01T00:00:00.5'], 'M8[ns]')}, mode='a', progress=False).verify(progress=False)
    np.testing.assert_array_equal(s.column('t'), np.array(['2020-01-01', '2020-01-01T00:00:00.5'], 'M8[ns]'))

# ================================================================== 7: staging again repairs a damaged copy
def test_defect7_stage_again_repairs_a_copy_damaged_in_place(tmp_path):
    X = X_(40)
    src = write_memmap(tmp_path/'src.fmm', X, meta={'y': np.arange(40)}, shard_size=120, progress=False)
    dst = tmp_path/'dst.fmm'
    c = stage(src.path, dst, progress=False)
    assert c.staged['fetched'] == len(manifest_files(src.manifest))
    assert stage(src.path, dst, progress=False).staged['fetched'] == 0      # complete and unchanged: nothing fetched
    f = dst/src.manifest['shards'][2]['data']['file']
    b = bytearray(f.read_bytes()); b[-3] ^= 0x40; f.write_bytes(bytes(b))  # same size, other bytes
    assert stage(src.path, dst, verify=False, progress=False).staged['fetched'] == 0   # sizes only, as documented
    c = stage(src.path, dst, progress=False)
    assert c.staged['fetched'] == 1
    c.verify(progress=False)
    np.testing.assert_array_equal(c[:], X)

# ================================================================== 9, 10: conversions and mixed values
def test_defect9_lossy_dtype_conversions_are_refused(tmp_path):
    "dtype= converts values that keep their meaning; wrap-around and overflow are refused unless casting='same_kind' asks for them"
    with pytest.raises(IncompatibleDataError, match='item 1 holds 300'): write_memmap(tmp_path/'a.fmm', np.array([[1], [300]]), dtype='int8', progress=False)
    with pytest.raises(IncompatibleDataError, match='inf'): write_memmap(tmp_path/'a.fmm', np.array([[1e40]]), dtype='float32', progress=False)
    with pytest.raises(IncompatibleDataError, match='item 2 holds 300'):
        write_memmap(tmp_path/'a.fmm', (np.array([v]) for v in (1, 2, 300)), dtype='int8', progress=False)
    with pytest.raises(IncompatibleDataError, match='holds -129'):
        with MemmapWriter(tmp_path/'a.fmm', dtype='int8') as w: w.add(np.array([-129], np.int16))
    assert not (tmp_path/'a.fmm').exists()
    s = write_memmap(tmp_path/'b.fmm', np.array([[0.1], [1e-50]]), dtype='float32', progress=False)   # rounding is what float32 means
    np.testing.assert_array_equal(s[:], np.array([[0.1], [0]], np.float32))
    s = write_memmap(tmp_path/'c.fmm', np.array([[300]]), dtype='int8', casting='same_kind', progress=False)   # asked for explicitly
    assert s[0].tolist() == [44]

def test_defect10_mixed_metadata_values_are_refused(tmp_path):
    "A metadata list mixing strings and numbers is refused as an object array of them is (numpy would make them all strings)"
    for meta in ({'label': ['a', 1, 2.5]}, {'label': np.array(['a', 1, 2.5], dtype=object)}, {'label': pd.Series(['a', 1, 2.5])}):
        with pytest.raises(MetadataError, match='mixes strings|mixed types'): write_memmap(tmp_path/'a.fmm', X_(3), meta=meta, progress=False)
    with pytest.raises(MetadataError, match='mixes strings'):
        with MemmapWriter(tmp_path/'a.fmm') as w:
            w.add(X_(1)[0], label='a'); w.add(X_(1)[0], label=1)
    assert not (tmp_path/'a.fmm').exists()
    assert write_memmap(tmp_path/'b.fmm', X_(3), meta={'label': ['a', 'b', 'c']}, progress=False).column('label').tolist() == ['a', 'b', 'c']

# ================================================================== 12: planted symlinks
def test_defect12_planted_symlinks_are_never_followed(tmp_path):
    "Symlinks planted at manifest.json.tmp, .lock or a .part name make no writer (or stage) write or create a file outside the store"
    victim = tmp_path/'victim.txt'; victim.write_text('keep me')
    p = tmp_path/'s.fmm'
    write_memmap(p, X_(2), meta={'y': [0, 1]}, progress=False)
    with MemmapWriter(p, 'a') as w:   # planted while a writer works (a writer removes stale temporary files when it starts)
        w.add(X_(1)[0], y=2)
        os.symlink(victim, p/'manifest.json.tmp')
    assert victim.read_text() == 'keep me'
    assert MemmapStore(p).verify(progress=False).column('y').tolist() == [0, 1, 2]
    (p/'.lock').unlink(); os.symlink(tmp_path/'elsewhere.lock', p/'.lock')
    with pytest.raises(StoreError, match='symbolic link'): write_memmap(p, X_(1), meta={'y': [3]}, mode='a', progress=False)
    assert not (tmp_path/'elsewhere.lock').exists() and len(MemmapStore(p)) == 3
    dst = tmp_path/'dst.fmm'; dst.mkdir()
    os.symlink(victim, dst/'manifest.json.tmp')
    (p/'.lock').unlink()
    s = stage(p, dst, progress=False)
    assert victim.read_text() == 'keep me' and len(s) == 3
    d2 = tmp_path/'d2.fmm'; d2.mkdir(); os.symlink(tmp_path/'elsewhere2.lock', d2/'.lock')
    with pytest.raises(StoreError, match='symbolic link'): stage(p, d2, progress=False)
    assert not (tmp_path/'elsewhere2.lock').exists()

# ================================================================== 13: a killed writer's pool
KILLED_POOL = r'''
import os, sys, time, numpy as np
from fastai_memmap.write import write_memmap
def slow(i):
    open(os.path.join(sys.argv[2], f'w{os.getpid()}'), 'w').close()   # each pool worker says who it is
    time.sleep(0.02)
    return np.full(3, i, np.float32)
write_memmap(sys.argv[1], list(range(100_000)), read_fn=slow, n_jobs=2, progress=False)
'''

def _alive(pid):
    try: return Path(f'/proc/{pid}/stat').read_text().split(') ')[1][0] not in 'ZX'
    except (FileNotFoundError, IndexError): return False

def test_defect13_a_killed_writers_pool_neither_survives_nor_holds_the_lock(tmp_path):
    "SIGKILL of write_memmap(read_fn, n_jobs=2): the store is unlocked within seconds (the workers never held the lock, and die)"
    p, marks = tmp_path/'s.fmm', tmp_path/'marks'
    marks.mkdir()
    proc = subprocess.Popen([sys.executable, '-c', KILLED_POOL, str(p), str(marks)], cwd=ROOT)
    workers = []
    try:
        t0 = time.monotonic()
        while len(workers := [int(f.name[1:]) for f in marks.iterdir()]) < 2:
            assert proc.poll() is None and time.monotonic() - t0 < 120, "the writer's pool did not start"
            time.sleep(0.05)
        with pytest.raises(StoreLockedError): _lock_free(p)   # the writer holds it
        proc.kill(); proc.wait(timeout=30)
        t0 = time.monotonic()
        while True:
            try: _lock_free(p); break
            except StoreLockedError:
                assert time.monotonic() - t0 < 10, f"the store is still locked {time.monotonic() - t0:.0f} s after its writer was killed"
                time.sleep(0.05)
        t0 = time.monotonic()
        while any(_alive(w) for w in workers) and time.monotonic() - t0 < 10: time.sleep(0.05)
        assert not any(_alive(w) for w in workers), "pool workers outlived their killed writer"
        s = write_memmap(p, [np.zeros(3, np.float32)], progress=False)   # nothing was committed; the next writer starts afresh
        assert len(s) == 1
    finally:
        if proc.poll() is None: proc.kill()
        for w in workers:
            try: os.kill(w, signal.SIGKILL)
            except ProcessLookupError: pass

# ================================================================== 14: cleanup after a commit
def test_defect14_cleanup_that_fails_after_a_commit_fails_nothing(tmp_path):
    "A name the post-commit cleanup cannot remove (a directory named like a shard file) neither fails the write nor keeps the lock"
    p = tmp_path/'s.fmm'
    write_memmap(p, X_(3), meta={'y': [0, 1, 2]}, progress=False)
    with MemmapWriter(p, 'w') as w:
        w.add(X_(1, 1)[0], y=9)
        (p/'data-0123456789ab-00000.npy').mkdir()
    assert w.store is not None and w.store.column('y').tolist() == [9]
    assert (p/'data-0123456789ab-00000.npy').is_dir()   # not the store's: left alone
    s = write_memmap(p, X_(1, 2), meta={'y': [10]}, mode='a', progress=False)   # same process: the lock was released
    assert s.verify(progress=False).column('y').tolist() == [9, 10]

# ================================================================== 15: hostile manifests
def test_defect15_hostile_manifests_are_refused_cheaply(tmp_path):
    "Manifests of millions of empty objects or nested thousands deep: CorruptStoreError, little memory, no bare RecursionError"
    p = tmp_path/'s.fmm'
    write_memmap(p, X_(2), progress=False)
    m = json.loads((p/MANIFEST).read_text())
    big = (json.dumps(m)[:-1] + ', "pad": [' + '{},' * 2_000_000 + '{}]}').encode()
    (p/MANIFEST).write_bytes(big)
    tracemalloc.start()
    try:
        with pytest.raises(CorruptStoreError, match='objects and lists'): MemmapStore(p)
        peak = tracemalloc.get_traced_memory()[1]
    finally: tracemalloc.stop()
    assert peak < 5 * len(big), f"opening a {len(big):,}-byte manifest took {peak:,} bytes"   # parsed, it would take ~25 times its size
    deep = ('{"format": ' + '{"a_key_of_some_length": ' * 20_000 + '1' + '}' * 20_001).encode()
    (p/MANIFEST).write_bytes(deep)
    with pytest.raises(CorruptStoreError, match='nested deeper'): MemmapStore(p)
    r = subprocess.run([sys.executable, '-m', 'fastai_memmap.cli', 'info', str(p)], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 1 and 'nested deeper' in r.stderr and 'Traceback' not in r.stderr, r.stderr[-2000:]
    sp = tmp_path/'sp.fmm'
    write_sparse(sp, [([1], [1.0])], dim=3, progress=False)
    (sp/'sparse.json').write_bytes(deep[:500_000] + b'}' * 10)
    with pytest.raises(CorruptStoreError): SparseStore(sp)
    (sp/'sparse.json').write_bytes(('{"format": ' + '{"a_key_of_some_length": ' * 5_000 + '1' + '}' * 5_001).encode())
    with pytest.raises(CorruptStoreError, match='nested deeper'): SparseStore(sp)

# ================================================================== 16, 17: metadata headers
def test_defect16_many_metadata_columns_and_long_headers(tmp_path):
    "450 columns commit and read (np.load reads the file with max_header_size); more than a .npy header holds: MetadataError, nothing written"
    meta = {f'column_number_{i}': np.arange(3) + i for i in range(450)}
    s = write_memmap(tmp_path/'m.fmm', X_(3), meta=meta, progress=False)
    s = MemmapStore(tmp_path/'m.fmm').verify(progress=False)
    assert s.meta.shape == (3, 450) and s.column('column_number_449').tolist() == [449, 450, 451]
    f = tmp_path/'m.fmm'/s.manifest['shards'][0]['meta']['file']
    assert np.load(f, mmap_mode='r', max_header_size=65536)['column_number_7'].tolist() == [7, 8, 9]
    with pytest.raises(MetadataError, match='65,535 bytes'):
        write_memmap(tmp_path/'n.fmm', X_(3), meta={f'column_number_{i}': np.arange(3) for i in range(4000)}, progress=False)
    assert not (tmp_path/'n.fmm').exists()

def test_defect17_column_names_outside_latin1(tmp_path):
    with pytest.raises(MetadataError, match='Latin-1'): write_memmap(tmp_path/'a.fmm', X_(2), meta={'ラベル': [1, 2]}, progress=False)
    with pytest.raises(MetadataError, match='Latin-1'):
        with MemmapWriter(tmp_path/'a.fmm') as w: w.add(X_(1)[0], **{'ラベル': 1})
    assert not (tmp_path/'a.fmm').exists()
    assert write_memmap(tmp_path/'b.fmm', X_(2), meta={'étiquette': [1, 2]}, progress=False).column('étiquette').tolist() == [1, 2]

# ================================================================== 18, 19: crafted shapes, bad symlinks
def _recrc(p, kind, k=0):
    "Record in the manifest the size and CRC-32 that shard `k`'s `kind` file now has (a crafted store passes its checksums)"
    m = json.loads((p/MANIFEST).read_text())
    e = m['shards'][k][kind]
    with open(p/e['file'], 'rb') as f: _, _, h = read_npy_header(f)
    b = (p/e['file']).read_bytes()
    e['bytes'], e['crc32'] = len(b), zlib.crc32(b[h:])
    (p/MANIFEST).write_text(json.dumps(m))

def test_defect18_crafted_shapes_whose_product_wraps(tmp_path):
    "Shapes whose int64 product wraps around are caught by verify() and by reads, as CorruptStoreError"
    p = tmp_path/'r.fmm'
    write_memmap(p, [np.ones((1, 3), np.int16), np.ones((1, 2), np.int16)], progress=False)
    m = json.loads((p/MANIFEST).read_text())
    f = p/m['shards'][0]['index']['file']
    with open(f, 'rb') as fh: _, _, h = read_npy_header(fh)
    idx = np.frombuffer(f.read_bytes()[h:], np.int64).reshape(2, 3).copy()
    idx[1] = [0, 2**32, 2**32]   # 2**64 elements: 0 in int64
    f.write_bytes(f.read_bytes()[:h] + idx.tobytes()); _recrc(p, 'index')
    with pytest.raises(CorruptStoreError, match='outside its data file'): MemmapStore(p).verify(progress=False)
    with pytest.raises(CorruptStoreError, match='outside its data file'): MemmapStore(p)[1]
    with pytest.raises(CorruptStoreError, match='outside its data file'): MemmapStore(p).take_padded([0, 1])
    assert MemmapStore(p)[0].tolist() == [[1, 1, 1]]
    q = tmp_path/'f.fmm'   # a data header whose shape multiplies to 2**64 bytes: 0 in int64
    write_memmap(q, np.zeros((1, 1, 1), np.uint8), progress=False)
    m = json.loads((q/MANIFEST).read_text())
    e = m['shards'][0]['data']
    hdr = npy_header(np.uint8, (2**24, 2**20, 2**20))
    (q/e['file']).write_bytes(hdr)
    m.update(item_shape=[2**20, 2**20], length=2**24); m['shards'][0]['length'] = 2**24
    e['bytes'], e['crc32'] = len(hdr), 0
    (q/MANIFEST).write_text(json.dumps(m))
    with pytest.raises(CorruptStoreError): MemmapStore(q)[0]
    with pytest.raises(CorruptStoreError): MemmapStore(q).verify(progress=False)

def test_defect19_dangling_or_looping_shard_symlinks(tmp_path):
    for how in ('dangling', 'loop'):
        p = tmp_path/f'{how}.fmm'
        s = write_memmap(p, X_(2), progress=False)
        f = p/s.manifest['shards'][0]['data']['file']
        f.unlink()
        os.symlink(p/'missing.npy' if how == 'dangling' else f.name, f)
        with pytest.raises(CorruptStoreError, match='leads to no file'): MemmapStore(p)
        with pytest.raises(CorruptStoreError, match='leads to no file'): s.verify(progress=False)

# ================================================================== 20: clear_cache during a download
def test_defect20_clear_cache_keeps_downloads_in_progress(tmp_path):
    "clear() while a file whose name hashes to lock stripe 0 is downloading: its .part stays, the download completes"
    cache = ShardCache(tmp_path/'cache')
    name = next(n for n in (f'data-{k:012x}-00000.npy' for k in range(100_000)) if zlib.crc32(n.encode()) % 256 == 0)
    content = b'\x93NUMPY' + bytes(range(200))
    e = dict(file=name, bytes=len(content), crc32=zlib.crc32(content))
    started, go, res = threading.Event(), threading.Event(), []
    def download(e, f):
        started.set(); go.wait(30)
        f.write(content); f.flush()
    def fetch():
        try: res.append(cache.fetch(e, download))
        except BaseException as ex: res.append(ex)
    t = threading.Thread(target=fetch); t.start()
    try:
        assert started.wait(30)
        cache.clear()
        assert (cache.path/(name + '.part')).exists(), "clear() deleted a download in progress"
    finally:
        go.set(); t.join(30)
    assert isinstance(res[0], Path) and res[0].read_bytes() == content, res

# ================================================================== 21: a damaged cached copy of a remote shard
from conftest import BUCKET   # the `s3` fixture's bucket

def test_defect21_a_damaged_cached_copy_is_fetched_again(s3, tmp_path):
    "A cached shard damaged on local disk is dropped and downloaded again by verify(); a fresh open then reads right data"
    X = X_(30)
    url = f's3://{BUCKET}/cached.fmm'
    write_memmap(url, X, meta={'y': np.arange(30)}, shard_size=200, progress=False)
    s = MemmapStore(url, cache_dir=tmp_path)
    s.verify(progress=False)
    n = s.stats['downloads']
    e = s.manifest['shards'][1]['data']
    f = s.cache_path/e['file']
    b = bytearray(f.read_bytes()); b[-1] ^= 0x20; f.write_bytes(bytes(b))
    s.close()
    s.verify(progress=False)                       # not the store's fault: fetched again, no error
    assert s.stats['downloads'] == n + 1
    np.testing.assert_array_equal(MemmapStore(url, cache_dir=tmp_path)[:], X)
    h = bytearray(f.read_bytes()); h[9] ^= 0x7f; f.write_bytes(bytes(h))   # a damaged header, found by a read
    np.testing.assert_array_equal(MemmapStore(url, cache_dir=tmp_path)[:], X)

# ================================================================== 22: file:// URLs
def test_defect22_file_urls_are_local_paths(tmp_path, monkeypatch):
    cwd = tmp_path/'cwd'; cwd.mkdir(); monkeypatch.chdir(cwd)
    target = tmp_path/'a dir'/'x.fmm'
    url = 'file://' + quote(str(target))
    s = write_memmap(url, X_(2), meta={'y': [0, 1]}, progress=False)
    assert Path(s.path) == target and (target/MANIFEST).exists()
    write_memmap(url, X_(1), meta={'y': [2]}, mode='a', progress=False)
    with MemmapWriter(url, 'a') as w: w.add(X_(1)[0], y=3)
    assert MemmapStore(target).column('y').tolist() == [0, 1, 2, 3]
    combine_stores('file://' + quote(str(tmp_path/'c.fmm')), [target])
    stage(target, 'file://' + quote(str(tmp_path/'st.fmm')), progress=False)
    assert len(MemmapStore(tmp_path/'c.fmm')) == len(MemmapStore(tmp_path/'st.fmm')) == 4
    assert list(cwd.iterdir()) == [], "something was written under the current directory"
    out = run_py(f"""
        import os, numpy as np
        os.chdir({str(cwd)!r})
        from fastai_memmap.write import write_memmap   # no remote writer registered in this process
        from fastai_memmap.errors import StoreNotFoundError
        try: write_memmap('gs://bucket/x.fmm', np.zeros((1, 2)), progress=False)
        except StoreNotFoundError as e: print('refused:', e)
        print(sorted(os.listdir('.')))
    """)
    assert 'refused:' in out and 'import fastai_memmap.remote' in out and out.strip().endswith('[]'), out

# ================================================================== read-only directories, as an unprivileged user
import contextlib, io, traceback
from fastai_memmap.cli import main as cli_main

def _as_nobody(fn) -> str:
    "Run `fn()` in a forked child as uid/gid 65534 (the interpreter lives where that user may not read: nothing new is imported); return its output"
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(r); os.setgroups([]); os.setgid(65534); os.setuid(65534)
            out, code = fn(), 0
        except BaseException: out = 'ERROR ' + traceback.format_exc()
        finally:
            os.write(w, out.encode()); os._exit(code)
    os.close(w)
    with os.fdopen(r, 'rb') as f: out = f.read().decode()
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, out[-4000:]
    return out

def _ro_checks(p:Path) -> str:
    lines = []
    s = MemmapStore(p).verify(progress=False)
    assert len(s) == 4 and (s[:] == np.arange(24, dtype=np.float32).reshape(4, 2, 3)).all()
    assert not (p/'.lock').exists(), 'a reader created a file'
    tries = {'append': lambda: write_memmap(p, np.zeros((1, 2, 3), np.float32), meta={'y': [9]}, mode='a', progress=False),
             'replace': lambda: write_memmap(p, np.zeros((1, 2, 3), np.float32), meta={'y': [9]}, mode='w', progress=False),
             'create inside': lambda: write_memmap(p/'new.fmm', np.zeros((1, 2)), progress=False),
             'writer': lambda: MemmapWriter(p, 'a'),
             'compact': lambda: s.compact(retain=0, progress=False),
             'combine into': lambda: combine_stores(p/'c.fmm', [p]),
             'sparse inside': lambda: write_sparse(p/'sp.fmm', [([1], [1.0])], dim=3, progress=False),
             'stage into': lambda: stage(p, p/'st.fmm', progress=False)}
    for name, f in tries.items():
        try: f()
        except PermissionError as e: lines.append(f"{name}: refused, {'says so' if 'not writable by this user' in str(e) else str(e)}")
        else: lines.append(f'{name}: WROTE')
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()): rc = cli_main(['compact', str(p)])
    lines.append(f"cli compact: rc {rc}, {'says so' if 'not writable by this user' in err.getvalue() else err.getvalue()}")
    with contextlib.redirect_stdout(io.StringIO()): lines.append(f"cli verify: rc {cli_main(['verify', str(p)])}")
    return '\n'.join(lines)

@pytest.mark.skipif(os.geteuid() != 0, reason='needs root, to drop to an unprivileged user')
def test_read_only_directory_as_an_unprivileged_user(tmp_path):
    "As uid 65534 on a store it may not write: reads, verify and the CLI work and create nothing; every writer is refused, saying why, changing nothing"
    root = Path(f'/tmp/fmm-ro-{os.getpid()}-{time.monotonic_ns()}')
    root.mkdir(mode=0o755)
    try:
        p = root/'s.fmm'
        write_memmap(p, np.arange(24, dtype=np.float32).reshape(4, 2, 3), meta={'y': np.arange(4)}, shard_size=24, progress=False)
        (p/'.lock').unlink()
        for f in p.iterdir(): f.chmod(0o644)
        p.chmod(0o755)
        tree = _tree(p)
        out = _as_nobody(lambda: _ro_checks(p)).splitlines()
        assert len(out) == 10 and all(l.endswith('says so') for l in out[:8]), out
        assert out[8] == 'cli compact: rc 1, says so' and out[9] == 'cli verify: rc 0', out
        assert _tree(p) == tree, "an unprivileged reader or a refused writer changed the store"
    finally: shutil.rmtree(root, ignore_errors=True)

def test_defect15_remote_manifest_bounds(s3, tmp_path):
    "The same bounds for a manifest read from an object store"
    import boto3
    url = f's3://{BUCKET}/hostile.fmm'
    write_memmap(url, X_(2), progress=False)
    deep = ('{"format": ' + '{"a_key_of_some_length": ' * 20_000 + '1' + '}' * 20_001).encode()
    boto3.client('s3').put_object(Bucket=BUCKET, Key='hostile.fmm/manifest.json', Body=deep)
    with pytest.raises(CorruptStoreError, match='nested deeper'): MemmapStore(url, cache_dir=tmp_path)
    boto3.client('s3').put_object(Bucket=BUCKET, Key='hostile.fmm/manifest.json', Body=b'[' + b'{},' * 500_000 + b'{}]')
    with pytest.raises(CorruptStoreError, match='objects and lists'): MemmapStore(url, cache_dir=tmp_path)

# ================================================================== many shards (issue "The index is out of core too")
def test_appends_compact_their_tail(fast_dir):
    "200 one-item appends with the defaults: the shard count stays small, every item and value exact, earlier readers unharmed"
    p = fast_dir/'s.fmm'
    write_memmap(p, X_(1, 0), meta={'k': [0]}, progress=False)
    early = MemmapStore(p)
    for i in range(1, 200): write_memmap(p, X_(1, i), meta={'k': [i]}, mode='a', progress=False)
    s = MemmapStore(p).verify(progress=False)
    assert s.n_shards <= 16, s.n_shards
    np.testing.assert_array_equal(s[:], np.concatenate([X_(1, i) for i in range(200)]))
    assert s.column('k').tolist() == list(range(200))
    assert len(early) == 1 and early[0].tolist() == X_(1, 0)[0].tolist()   # its file was retired, not deleted
    assert set(os.listdir(p)) >= {r['file'] for r in s.manifest.get('retired', [])}
    c = s.compact(retain=0, progress=False)
    assert c.n_shards == 1 and c.column('k').tolist() == list(range(200))
    _clean(p)
