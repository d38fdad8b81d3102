"""A model-based test of the store: hypothesis runs random sequences of create / append / replace / combine / compact /
explicit commit / exception inside `with` / SIGKILL of a writer process / reopen / read against a plain in-memory model
of what the store must hold, and checks after every step that the store equals the model's last commit exactly (items,
shapes, metadata values and dtypes), that `verify()` passes, that the lock is free, and that a reader opened earlier still
reads what it read then.

Real files (on tmpfs where there is one: fsync costs nothing there, and durability against power loss is not what this
models), real processes killed with SIGKILL, no mocks.

`test_store_matches_its_model` runs in CI (a few hundred sequences, derandomized). `test_store_matches_its_model_long`
runs thousands more; it is marked slow and runs only when selected explicitly (`pytest -m slow tests/test_stateful.py`),
since CI runs every test, slow ones included.
"""
import json, os, shutil, signal, subprocess, sys, time
from pathlib import Path
from subprocess import PIPE
import numpy as np, pytest
from hypothesis import HealthCheck, settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule, run_state_machine_as_test
from conftest import Lines
from fastai_memmap.errors import *
from fastai_memmap.format import MANIFEST, manifest_files
from fastai_memmap.store import MemmapStore
from fastai_memmap.write import MemmapWriter, combine_stores, write_memmap

ROOT = Path(__file__).resolve().parents[1]

# Deterministic data, shared (as source) with the writer processes
GEN = r'''
import numpy as np
KINDS = ('i8', 'i4', 'u8', 'u8big')
def items(seed, n): return (np.random.default_rng(seed).standard_normal((n, 2, 3)) * 100).astype(np.float32)
def meta(seed, n, start, kind):
    rng = np.random.default_rng(seed + 1)
    s = np.array([f'{seed}:{i}' * int(rng.integers(1, 3)) for i in range(n)])
    if kind == 'i8': ids = rng.integers(-5, 6, n).astype(np.int64)
    elif kind == 'i4': ids = rng.integers(-5, 6, n).astype(np.int32)
    elif kind == 'u8': ids = rng.integers(0, 6, n).astype(np.uint64)
    else: ids = np.uint64(2**63) + rng.integers(0, 6, n).astype(np.uint64)
    return {'y': np.arange(start, start + n, dtype=np.int64), 's': s, 'id': ids}
'''
exec(GEN)

# --- the model

class Model:
    "What the store must hold: items, and each metadata column's values and dtype"
    def __init__(self, X, cols): self.X, self.cols = X, cols
    def copy(self): return Model(self.X.copy(), {c: v.copy() for c, v in self.cols.items()})
    def __len__(self): return len(self.X)

def _fits(vals:list, dt) -> bool:
    info = np.iinfo(dt)
    return all(info.min <= v <= info.max for v in vals)

def merge_ids(C, old:list, d, new:list):
    """The documented rule for an append to an integer column: numpy's promotion of the committed dtype `C` and the new
    values' dtype `d` if it holds every value exactly, else `C`, else `d`, else int64, else uint64, each only if the
    committed values need no conversion (numpy promotes `C` to it) and every value fits; None: refused (MetadataError)"""
    C, d = np.dtype(C), np.dtype(d)
    for M in (np.result_type(C, d), C, d, np.dtype('<i8'), np.dtype('<u8')):
        if M.kind not in 'iu' or np.result_type(C, M) != M: continue
        if _fits(old, M) and _fits(new, M): return M
    return None

def appended(m:Model, X, cols):
    "The model after appending `X` with `cols`, or None if the append must be refused"
    ids = merge_ids(m.cols['id'].dtype, m.cols['id'].tolist(), cols['id'].dtype, cols['id'].tolist())
    if ids is None: return None
    return Model(np.concatenate([m.X, X]), {'y': np.concatenate([m.cols['y'], cols['y']]),
                                            's': np.concatenate([m.cols['s'], cols['s']]),
                                            'id': np.array(m.cols['id'].tolist() + cols['id'].tolist(), dtype=ids)})

def differs(s, m:Model) -> str:
    "'' if store `s` holds exactly model `m`, else what differs"
    if len(s) != len(m): return f"length {len(s)} != {len(m)}"
    x = s[:]
    if x.dtype != m.X.dtype or x.shape != m.X.shape or not np.array_equal(x, m.X): return "items differ"
    if sorted(s.meta_columns) != sorted(m.cols): return f"columns {s.meta_columns}"
    for c, v in m.cols.items():
        got = s.column(c)
        if got.dtype != v.dtype: return f"column {c!r} has dtype {got.dtype}, the model {v.dtype}"
        if got.tolist() != v.tolist(): return f"column {c!r} differs"
    return ''

# --- writer processes to kill: a zygote forks one per job

ZYGOTE = GEN + r'''
import json, os, sys
from fastai_memmap.store import MemmapStore
from fastai_memmap.write import write_memmap
def say(msg): os.write(1, (msg + '\n').encode())
say('ready')
while line := sys.stdin.readline():
    job = json.loads(line)
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            if job['what'] == 'append':
                write_memmap(job['path'], items(job['seed'], job['n']), meta=meta(job['seed'], job['n'], job['start'], job['kind']),
                             mode='a', shard_size=job['shard_size'], progress=False)
            else: MemmapStore(job['path']).compact(shard_size=job['shard_size'], retain=job['retain'], progress=False)
            say('done')
        except BaseException as e: say('error ' + type(e).__name__); code = 3
        finally: os._exit(code)
    say(f'pid {pid}')
    sys.stdin.readline()
    os.waitpid(pid, 0)
    say('reaped')
'''

class Zygote:
    def __init__(self):
        env = {**os.environ, 'PYTHONPATH': str(ROOT) + os.pathsep + os.environ.get('PYTHONPATH', '')}
        self.p = subprocess.Popen([sys.executable, '-c', ZYGOTE], stdin=PIPE, stdout=PIPE, env=env)
        self.line = Lines(self.p, 'the writer process')
        assert self.line(120) == 'ready'

    def kill_after(self, job:dict, delay:float) -> str:
        "Run `job` in a fresh process and SIGKILL it `delay` seconds after it starts: 'killed', 'done' or 'error <name>'"
        self.p.stdin.write(json.dumps(job).encode() + b'\n'); self.p.stdin.flush()
        end = None
        while not (line := self.line()).startswith('pid '): end = line   # the child may report before the zygote does
        pid = int(line[4:])
        if end is None and self.line.ready(delay): end = self.line()   # it finished first
        if end is None: os.kill(pid, signal.SIGKILL)
        self.p.stdin.write(b'reap\n'); self.p.stdin.flush()
        while (line := self.line()) != 'reaped': end = end or line
        return end or 'killed'

    def close(self):
        try: self.p.stdin.close(); self.p.wait(timeout=10)
        except Exception: self.p.kill(); self.p.wait()

# --- the machine

def _lock_free(path) -> bool:
    import fcntl
    fd = os.open(Path(path)/'.lock', os.O_RDWR | os.O_CREAT, 0o644)
    try: fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB); return True
    except BlockingIOError: return False
    finally: os.close(fd)

class StoreMachine(RuleBasedStateMachine):
    zygote, base, stats = None, None, None   # set by the test

    def __init__(self):
        super().__init__()
        self.dir = Path(self.base)/f'm{time.monotonic_ns()}'
        self.dir.mkdir()
        self.p, self.model, self.reader, self.snapshot, self.seed = self.dir/'s.fmm', None, None, None, 0

    def teardown(self): shutil.rmtree(self.dir, ignore_errors=True)

    def _count(self, what): self.stats[what] = self.stats.get(what, 0) + 1

    def _next(self, n, kind):
        self.seed += 1
        start = len(self.model) if self.model is not None else 0
        return items(self.seed, n), meta(self.seed, n, start, kind)

    def _forget_reader(self):
        "After a replace (or a compaction that keeps no old files) a reader opened before may fail: that is not promised"
        self.reader = self.snapshot = None

    # --- writes
    @rule(n=st.integers(1, 6), kind=st.sampled_from(KINDS), shard_size=st.sampled_from([24, 48, 1 << 20]))
    def create(self, n, kind, shard_size):
        X, cols = self._next(n, kind)
        mode = 'x' if self.model is None else 'w'
        cols['y'] = np.arange(n, dtype=np.int64)
        write_memmap(self.p, X, meta=cols, mode=mode, shard_size=shard_size, progress=False)
        self.model = Model(X, cols)
        self._forget_reader(); self._count(f'create ({mode})')

    @precondition(lambda self: self.model is not None)
    @rule(n=st.integers(1, 5), kind=st.sampled_from(KINDS), shard_size=st.sampled_from([24, 48, 1 << 20]), compact=st.booleans())
    def append(self, n, kind, shard_size, compact):
        X, cols = self._next(n, kind)
        want = appended(self.model, X, cols)
        if want is None:
            with pytest.raises(MetadataError, match='no single dtype'):
                write_memmap(self.p, X, meta=cols, mode='a', shard_size=shard_size, compact=compact, progress=False)
            self._count('append refused')
        else:
            write_memmap(self.p, X, meta=cols, mode='a', shard_size=shard_size, compact=compact, progress=False)
            self.model = want
            self._count('append')

    @precondition(lambda self: self.model is not None)
    @rule(n=st.integers(1, 4), kind=st.sampled_from(KINDS), after=st.sampled_from(['nothing', 'raise', 'add', 'another writer']))
    def commit_inside_with(self, n, kind, after):
        "An explicit commit inside `with`, then: the block ends; an exception; more items (refused); another writer appends"
        X, cols = self._next(n, kind)
        want = appended(self.model, X, cols)
        try:
            with MemmapWriter(self.p, 'a', shard_size=48) as w:
                for i in range(n): w.add(X[i], **{c: v[i] for c, v in cols.items()})
                w.commit()
                if after == 'raise': raise KeyError('after the commit')
                if after == 'add':
                    with pytest.raises(StoreError, match='commits at most once'): w.add(X[0], **{c: v[0] for c, v in cols.items()})
                if after == 'another writer':   # the lock is free after the commit: another writer appends before the block ends
                    self.model = want
                    X2, cols2 = self._next(2, 'i8')
                    cols2['id'] = cols2['id'].astype(want.cols['id'].dtype)
                    write_memmap(self.p, X2, meta=cols2, mode='a', progress=False)
                    want = appended(want, X2, cols2)
        except KeyError: assert after == 'raise'
        except MetadataError: assert want is None; self._count('commit inside with refused'); return
        assert want is not None, "an append the model refuses was committed"
        self.model = want
        self._count(f'commit inside with, then {after}')

    @precondition(lambda self: self.model is not None)
    @rule(n=st.integers(1, 4), kind=st.sampled_from(KINDS))
    def exception_inside_with(self, n, kind):
        X, cols = self._next(n, kind)
        with pytest.raises(ZeroDivisionError):
            with MemmapWriter(self.p, 'a', shard_size=24) as w:
                for i in range(n): w.add(X[i], **{c: v[i] for c, v in cols.items()})
                1 / 0
        self._count('exception inside with')

    @precondition(lambda self: self.model is not None)
    @rule(n=st.integers(1, 4))
    def combine(self, n):
        "Combine the store with another into the store itself (mode='w'): the store is a source of its own replacement"
        kind = {'i': 'i8', 'u': 'u8'}[self.model.cols['id'].dtype.kind]
        X, cols = self._next(n, kind)
        cols['id'] = cols['id'].astype(self.model.cols['id'].dtype)
        q = self.dir/'q.fmm'
        write_memmap(q, X, meta=cols, mode='w', progress=False)
        combine_stores(self.p, [self.p, q], mode='w')
        want = appended(self.model, X, cols)
        assert want is not None and want.cols['id'].dtype == self.model.cols['id'].dtype
        self.model = want
        self._forget_reader(); self._count('combine')

    @precondition(lambda self: self.model is not None)
    @rule(shard_size=st.sampled_from([48, 400, 1 << 20]), retain=st.sampled_from([0, 3600]))
    def compact(self, shard_size, retain):
        before = MemmapStore(self.p).n_shards
        s = MemmapStore(self.p).compact(shard_size=shard_size, retain=retain, progress=False)
        assert s.n_shards <= before
        if retain == 0: self._forget_reader()
        self._count('compact')

    @precondition(lambda self: self.model is not None)
    @rule(n=st.integers(1, 8), kind=st.sampled_from(KINDS), delay=st.floats(0, 0.04))
    def sigkill_append(self, n, kind, delay):
        X, cols = self._next(n, kind)
        want = appended(self.model, X, cols)
        end = self.zygote.kill_after(dict(what='append', path=str(self.p), seed=self.seed, n=n, start=len(self.model),
                                          kind=kind, shard_size=24), delay)
        s = MemmapStore(self.p)
        if want is not None and not differs(s, want): self.model, outcome = want, 'after'
        else:
            assert not differs(s, self.model), differs(s, self.model)
            outcome = 'before'
        if want is None: assert end != 'done' and outcome == 'before'
        if end == 'done': assert outcome == 'after'
        self._count(f'SIGKILL append: {end} -> {outcome}')

    @precondition(lambda self: self.model is not None)
    @rule(shard_size=st.sampled_from([48, 1 << 20]), delay=st.floats(0, 0.04))
    def sigkill_compact(self, shard_size, delay):
        end = self.zygote.kill_after(dict(what='compact', path=str(self.p), shard_size=shard_size, retain=3600), delay)
        self._count(f'SIGKILL compact: {end}')

    # --- reads
    @precondition(lambda self: self.model is not None)
    @rule()
    def reopen(self):
        "A reader opened now, kept: later steps must not change what it reads (appends and compactions keep its files)"
        self.reader, self.snapshot = MemmapStore(self.p), self.model.copy()
        self._count('reopen')

    @precondition(lambda self: self.model is not None)
    @rule(where=st.lists(st.floats(-1, 1, exclude_max=True), max_size=10))
    def read(self, where):
        n = len(self.model)   # may depend on where a SIGKILL landed: the draws must not
        idx = [int(np.floor(f * n)) for f in where]
        s = MemmapStore(self.p)
        np.testing.assert_array_equal(s[idx], self.model.X[idx] if idx else self.model.X[:0])
        if idx: np.testing.assert_array_equal(s[idx[0]], self.model.X[idx[0]])
        self._count('read')

    # --- after every step
    @invariant()
    def store_equals_model(self):
        if self.model is None:
            assert not (self.p/MANIFEST).exists()
            return
        s = MemmapStore(self.p).verify(progress=False)
        assert not (d := differs(s, self.model)), d
        assert _lock_free(self.p), "the store is still locked"
        if self.reader is not None: assert not (d := differs(self.reader, self.snapshot)), f"an earlier reader: {d}"

# --- the tests

@pytest.fixture(scope='module')
def zygote():
    z = Zygote()
    yield z
    z.close()

@pytest.fixture
def base(tmp_path):
    if os.path.isdir('/dev/shm') and os.access('/dev/shm', os.W_OK):
        d = Path(f'/dev/shm/fmm-stateful-{os.getpid()}-{time.monotonic_ns()}'); d.mkdir()
        yield d
        shutil.rmtree(d, ignore_errors=True)
    else: yield tmp_path

def _run(zygote, base, examples, steps, derandomize):
    StoreMachine.zygote, StoreMachine.base, StoreMachine.stats = zygote, base, {}
    t0 = time.monotonic()
    run_state_machine_as_test(StoreMachine, settings=settings(
        max_examples=examples, stateful_step_count=steps, deadline=None, derandomize=derandomize, database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much]))
    return StoreMachine.stats, time.monotonic() - t0

def test_store_matches_its_model(zygote, base):
    "600 random sequences of up to 15 steps (about a minute here): the store equals its model after every step"
    n = int(os.environ.get('FMM_STATEFUL_EXAMPLES', 600))
    stats, secs = _run(zygote, base, n, 15, True)
    import warnings
    warnings.warn(f"stateful: {n} sequences in {secs:.0f} s; steps: " + ', '.join(f'{k}: {v}' for k, v in sorted(stats.items())))
    steps = sum(stats.values())
    assert steps > 2000 or n < 600, stats
    for k in ('append', 'append refused', 'commit inside with, then raise', 'commit inside with, then another writer', 'exception inside with',
              'combine', 'compact', 'reopen', 'read'):
        assert stats.get(k), (k, stats)
    assert any(k.startswith('SIGKILL append: killed -> before') for k in stats), stats

@pytest.mark.slow
def test_store_matches_its_model_long(zygote, base, request):
    "3,000 random sequences of up to 25 steps (run it explicitly: pytest -m slow tests/test_stateful.py)"
    if 'slow' not in (request.config.getoption('markexpr') or '') or 'not slow' in request.config.getoption('markexpr'):
        pytest.skip("long: select it with -m slow")
    stats, secs = _run(zygote, base, 3000, 25, False)
    print(f"stateful (long): 3000 sequences in {secs:.0f} s; {stats}")
