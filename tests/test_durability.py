"""Durability: the store never loses or silently corrupts data.

Real files in tmp_path and real processes, no mocks: writers SIGKILLed at random points of create / replace / append,
compactions SIGKILLed as their files appear, around their commit and while they remove retired files (readers that
opened the store before keep reading it),
every file of a store truncated, extended and bit-flipped, a table of bad inputs that must each raise their own
error and change nothing, a property-based fuzz of the manifest reader, a full disk (RLIMIT_FSIZE), a read-only
store, one writer against many readers, and the CLI's `verify` / `info`.

Library bugs found here have regression tests named `test_bug_*`. The broad tests also exempt a known bug's exact
signature only while a probe shows the bug is present (none is, now), so a regression fails both.
"""
import errno, hashlib, io, json, os, random, shutil, signal, subprocess, sys, time, tracemalloc, warnings
from collections import Counter
from pathlib import Path
from subprocess import PIPE
import numpy as np, pandas as pd, pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from conftest import Lines
from fastai_memmap.errors import *
from fastai_memmap.format import MANIFEST, manifest_files, read_npy_header, validate_manifest
from fastai_memmap.store import MemmapStore
from fastai_memmap.write import MemmapWriter, write_memmap

PY = sys.executable
COUNTS = Counter()   # kill points, corruptions and bad inputs tried, reported by the last test

# Deterministic items and metadata, shared (as source) by this module and the helper processes it starts.
GEN_SRC = r'''
import numpy as np
def make_items(seed, n, ragged, dtype='float32'):
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal((int(rng.integers(1, 4)), 3) if ragged else (2, 3)) * 100).astype(dtype) for _ in range(n)]
def make_meta(seed, start, n):
    return {'y': np.arange(start, start + n, dtype=np.int64), 's': np.array([f'{seed}-{i}' for i in range(start, start + n)])}
'''
exec(GEN_SRC)

def _env():
    "Environment for helper processes: this checkout's package first, no progress bars"
    env = dict(os.environ)
    env['PYTHONPATH'] = str(Path(__file__).resolve().parents[1]) + os.pathsep + env.get('PYTHONPATH', '')
    return env

# --- helpers: state of a store

def _tree(root) -> dict:
    "Every file, directory and symlink under `root`: relative name -> sha256 / 'dir' / link target"
    root, out = Path(root), {}
    if not root.exists(): return out
    for d, dirs, files in os.walk(root):
        for name in dirs + files:
            p = Path(d)/name
            rel = str(p.relative_to(root))
            if p.is_symlink(): out[rel] = 'link:' + os.readlink(p)
            elif p.is_dir(): out[rel] = 'dir'
            else: out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out

def _concat_meta(*metas):
    return {c: np.concatenate([m[c] for m in metas]) for c in metas[0]}

def _state(items, meta): return (list(items), meta)

def _diff(s: MemmapStore, exp) -> str:
    "'' if store `s` holds exactly `exp` (items, meta columns), else what differs"
    items, meta = exp
    if len(s) != len(items): return f"length {len(s)} != {len(items)}"
    for i, (a, b) in enumerate(zip(s, items)):
        if a.dtype != b.dtype or a.shape != b.shape or not np.array_equal(a, b): return f"item {i} differs"
    if sorted(s.meta_columns) != sorted(meta): return f"meta columns {s.meta_columns} != {sorted(meta)}"
    for c, v in meta.items():
        got = s.column(c)
        if len(got) != len(v) or not np.array_equal(got, v): return f"meta column {c!r} differs"
    return ''

def _clean_names(path) -> tuple:
    "(names in the store dir, names a clean store holds: its manifest's files, those it retains for older readers, the manifest and the lock)"
    m = json.loads((Path(path)/MANIFEST).read_text())
    return set(os.listdir(path)), {e['file'] for e in manifest_files(m)} | {r['file'] for r in m.get('retired', [])} | {MANIFEST, '.lock'}

def _assert_clean(path):
    have, want = _clean_names(path)
    assert have == want, f"left over after a successful write: {sorted(have - want)}; missing: {sorted(want - have)}"

def _outcome(path, candidates: dict) -> str:
    "Which of `candidates` (label -> (items, meta), or None for 'no store') the store at `path` holds; fails if none"
    try: s = MemmapStore(path)
    except StoreNotFoundError:
        assert any(v is None for v in candidates.values()), f"{path}: the store vanished"
        return next(k for k, v in candidates.items() if v is None)
    s.verify(progress=False)
    diffs = {}
    for k, v in candidates.items():
        if v is None: continue
        if not (d := _diff(s, v)): return k
        diffs[k] = d
    raise AssertionError(f"{path} holds neither the commit before nor the one after the write: {diffs}")

# --- 1. crash safety: writers SIGKILLed at random points

# A process that imports the library once and forks one child per write job, so each kill point costs milliseconds.
# The child reports each item its source yields ('item i') and the source's end ('end'); the test kills it with
# SIGKILL at the chosen point, then tells the zygote to reap it.
ZYGOTE = GEN_SRC + r'''
import json, os, sys, time
from fastai_memmap.write import write_memmap
def say(msg): os.write(1, (msg + '\n').encode())
def run(job):
    if 'compact' in job:   # a compaction: nothing streams, it starts now
        from fastai_memmap.store import MemmapStore
        say('end')
        MemmapStore(job['path']).compact(shard_size=job['compact'], retain=job['retain'], progress=False)
        return
    items = make_items(job['seed'], job['n'], job['ragged'], job['dtype'])
    def source():
        for i, x in enumerate(items):
            say(f'item {i}')
            time.sleep(job['sleep'])
            yield x
        say('end')
    write_memmap(job['path'], source(), meta=make_meta(job['seed'], job['start'], job['n']), mode=job['mode'],
                 ragged=job['ragged'], shard_size=job['shard_size'], progress=False)
say('ready')
while line := sys.stdin.readline():
    job = json.loads(line)
    pid = os.fork()
    if pid == 0:
        code = 0
        try: run(job); say('done')
        except BaseException as e: say('error ' + repr(e).replace('\n', ' ')); code = 3
        finally: os._exit(code)
    say(f'pid {pid}')
    sys.stdin.readline()          # 'reap': the test has killed the child, or seen it finish
    _, status = os.waitpid(pid, 0)
    say(f'exit {status}')
'''

class Zygote:
    def __init__(self):
        self.p = subprocess.Popen([PY, '-c', ZYGOTE], stdin=PIPE, stdout=PIPE, env=_env())
        self._line = Lines(self.p, 'the write job')
        assert self._line(120) == 'ready'

    def _send(self, s):
        self.p.stdin.write(s.encode() + b'\n'); self.p.stdin.flush()

    def run(self, job, kill=None) -> dict:
        """Run write `job` in a fresh child; `kill`: None (let it finish) or (phase, k, delay): SIGKILL the child `delay`
        seconds after its pid is known ('init'), its source yielded item k ('items'), or its source ended ('commit')"""
        self._send(json.dumps(job))
        pid, seen, ended, done, err, t = None, -1, None, None, None, {}
        t0 = time.monotonic()
        def due():
            if kill is None or pid is None: return False
            phase, k, _ = kill
            return phase == 'init' or (phase == 'items' and seen >= k) or (phase == 'commit' and ended is not None)
        while not due() and done is None and err is None:
            line = self._line()
            if line.startswith('pid '): pid = int(line[4:])
            elif line.startswith('item '): seen = int(line[5:])
            elif line == 'end': ended = time.monotonic() - t0
            elif line == 'done': done = time.monotonic() - t0
            elif line.startswith('error '): err = line
        killed = False
        if kill is not None and done is None and err is None:
            if kill[2] > 0: time.sleep(kill[2])
            os.kill(pid, signal.SIGKILL)   # the child is alive or a zombie (it is reaped only on our 'reap')
            killed = True
        while pid is None:
            line = self._line()
            if line.startswith('pid '): pid = int(line[4:])
        self._send('reap')
        while not (line := self._line()).startswith('exit '):
            if line == 'done' and done is None: done = time.monotonic() - t0
            elif line.startswith('error '): err = line
            elif line == 'end' and ended is None: ended = time.monotonic() - t0
        status = int(line[5:])
        assert err is None, f"the write job failed by itself: {err}"
        if os.WIFSIGNALED(status): assert os.WTERMSIG(status) == signal.SIGKILL and killed
        else: assert os.WEXITSTATUS(status) == 0, status
        return dict(killed=os.WIFSIGNALED(status), ended=ended, done=done)

    def close(self):
        try: self.p.stdin.close(); self.p.wait(timeout=10)
        except Exception: self.p.kill(); self.p.wait()

@pytest.fixture(scope='module')
def zygote(tmp_path_factory):
    z = Zygote()
    # calibrate: how long the commit phase (source exhausted -> write_memmap returned) takes here
    tmp = tmp_path_factory.mktemp('calib')
    ts = []
    for i in range(3):
        r = z.run(dict(path=str(tmp/f'c{i}.fmm'), mode='x', seed=i, start=0, n=30, ragged=True, dtype='float32',
                       shard_size=60, sleep=0.0005))
        ts.append(r['done'] - r['ended'])
    z.commit_s = max(0.002, float(np.median(ts)))
    yield z
    z.close()

JOB = dict(n=30, shard_size=60, sleep=0.0005)   # ~3 items a shard: ~10 shards, each data + index/meta files, fsynced

def _plan(rng, n, commit_s):
    "A kill point: during the writer's start (lock, cleanup), while items stream into shards, or around the commit"
    r = rng.random()
    if r < 0.15: return ('init', 0, float(rng.uniform(0, 0.004)))
    if r < 0.65: return ('items', int(rng.integers(1, n)), float(rng.uniform(0, 0.002)))
    return ('commit', n, float(rng.uniform(0, 1.5 * commit_s)))

def _after_kill(path, phase, outcome, before_label, stats):
    "Bookkeeping shared by the kill tests: a kill while items streamed must have left partial (unreferenced) files"
    stats[f'{phase}->{outcome}'] += 1
    if phase == 'items' and outcome == before_label and Path(path).exists():
        names = set(os.listdir(path))
        ref = _clean_names(path)[1] if (Path(path)/MANIFEST).exists() else {'.lock'}
        assert names - ref - {MANIFEST + '.tmp'}, f"a kill mid-write left no partial shard file in {path}: did it land mid-write?"
        stats['partial files seen'] += 1

def _kill_params(fast, slow):
    return [pytest.param(fast, id=f'{fast}kills'), pytest.param(slow, id=f'{slow}kills', marks=pytest.mark.slow)]

@pytest.mark.parametrize('n_kills', _kill_params(5, 20))
def test_kill_create(zygote, tmp_path, n_kills):
    "mode='x' killed anywhere: no store or the whole store; a later create (or append) succeeds and leaves no debris"
    rng, stats = np.random.default_rng(1000 + n_kills), Counter()
    for i in range(n_kills):
        path, seed = tmp_path/f'c{i}.fmm', 10_000 * n_kills + i
        after = _state(make_items(seed, JOB['n'], True), make_meta(seed, 0, JOB['n']))
        phase, k, delay = plan = _plan(rng, JOB['n'], zygote.commit_s)
        zygote.run(dict(JOB, path=str(path), mode='x', seed=seed, start=0, ragged=True, dtype='float32'), kill=plan)
        outcome = _outcome(path, {'before': None, 'after': after})
        _after_kill(path, phase, outcome, 'before', stats)
        more = _state(make_items(seed + 1, 3, True), make_meta(seed + 1, 0 if outcome == 'before' else JOB['n'], 3))
        s = write_memmap(path, more[0], meta=more[1], mode='x' if outcome == 'before' else 'a', ragged=True, progress=False)
        exp = more if outcome == 'before' else _state(after[0] + more[0], _concat_meta(after[1], more[1]))
        assert not _diff(s, exp), _diff(s, exp)
        s.verify(progress=False)
        _assert_clean(path)
    COUNTS['kill points (create)'] += n_kills
    for k, v in stats.items(): COUNTS[f'kill outcome {k}'] += v
    assert sum(v for k, v in stats.items() if '->' in k) == n_kills, stats

@pytest.mark.parametrize('n_kills', _kill_params(5, 24))
def test_kill_append(zygote, tmp_path, n_kills):
    "mode='a' killed anywhere: the store holds the last commit exactly (never part of an append); later writes clean up"
    rng, stats = np.random.default_rng(2000 + n_kills), Counter()
    path = tmp_path/'a.fmm'
    state = _state(make_items(1, 4, False), make_meta(1, 0, 4))
    write_memmap(path, state[0], meta=state[1], shard_size=60, progress=False)
    for i in range(n_kills):
        seed, start = 20_000 * n_kills + i, len(state[0])
        new = _state(make_items(seed, JOB['n'], False), make_meta(seed, start, JOB['n']))
        after = _state(state[0] + new[0], _concat_meta(state[1], new[1]))
        phase, k, delay = plan = _plan(rng, JOB['n'], zygote.commit_s)
        zygote.run(dict(JOB, path=str(path), mode='a', seed=seed, start=start, ragged=False, dtype='float32'), kill=plan)
        outcome = _outcome(path, {'before': state, 'after': after})
        _after_kill(path, phase, outcome, 'before', stats)
        state = state if outcome == 'before' else after
        # a later write succeeds and removes what the killed one left
        more = _state(make_items(seed + 1, 2, False), make_meta(seed + 1, len(state[0]), 2))
        s = write_memmap(path, more[0], meta=more[1], mode='a', progress=False)
        state = _state(state[0] + more[0], _concat_meta(state[1], more[1]))
        assert not _diff(s, state), _diff(s, state)
        s.verify(progress=False)
        _assert_clean(path)
    COUNTS['kill points (append)'] += n_kills
    for k, v in stats.items(): COUNTS[f'kill outcome {k}'] += v
    assert sum(v for k, v in stats.items() if '->' in k) == n_kills, stats

@pytest.mark.parametrize('n_kills', _kill_params(3, 8))
def test_kill_replace(zygote, tmp_path, n_kills):
    "mode='w' killed anywhere: the old store or the new one, whole; the old store's files go once the new one is in"
    rng, stats = np.random.default_rng(3000 + n_kills), Counter()
    path = tmp_path/'w.fmm'
    state, ragged, dtype = _state(make_items(2, 5, False), make_meta(2, 0, 5)), False, 'float32'
    write_memmap(path, state[0], meta=state[1], shard_size=60, progress=False)
    for i in range(n_kills):
        seed = 30_000 * n_kills + i
        new_ragged, new_dtype = i % 2 == 0, ['int16', 'float32', 'float64'][i % 3]
        after = _state(make_items(seed, JOB['n'], new_ragged, new_dtype), make_meta(seed, 0, JOB['n']))
        phase, k, delay = plan = _plan(rng, JOB['n'], zygote.commit_s)
        zygote.run(dict(JOB, path=str(path), mode='w', seed=seed, start=0, ragged=new_ragged, dtype=new_dtype), kill=plan)
        outcome = _outcome(path, {'before': state, 'after': after})
        _after_kill(path, phase, outcome, 'before', stats)
        if outcome == 'after': state, ragged, dtype = after, new_ragged, new_dtype
        more = _state(make_items(seed + 1, 1, ragged, dtype), make_meta(seed + 1, len(state[0]), 1))
        s = write_memmap(path, more[0], meta=more[1], mode='a', progress=False)
        state = _state(state[0] + more[0], _concat_meta(state[1], more[1]))
        assert not _diff(s, state), _diff(s, state)
        _assert_clean(path)
    COUNTS['kill points (replace)'] += n_kills
    for k, v in stats.items(): COUNTS[f'kill outcome {k}'] += v
    assert sum(v for k, v in stats.items() if '->' in k) == n_kills, stats

# --- 1b. compaction killed: at new files, at the temporary manifest, after the rename, while retired files go

def _watch_kill(z, job, when) -> bool:
    """Run compaction `job` in a fresh child of the zygote and SIGKILL it at `when`: ('new', k) the k-th new file appears,
    ('tmp', s) s seconds after the temporary manifest appears, ('renamed', 0) the manifest was replaced, ('gone', k) k of the old files were
    removed (all seen by polling the directory in a tight loop), or ('delay', s) seconds after it started. Returns whether
    the child was killed (rather than finishing first)."""
    path = Path(job['path'])
    before, ino = set(os.listdir(path)), os.stat(path/MANIFEST).st_ino
    z._send(json.dumps(job))
    pid, done, t0 = None, False, None
    while pid is None:
        line = z._line()
        if line.startswith('pid '): pid, t0 = int(line[4:]), time.monotonic()
    def due():
        names = set(os.listdir(path))
        if when[0] == 'new': return len(names - before - {MANIFEST + '.tmp'}) >= when[1]
        if when[0] == 'tmp': return MANIFEST + '.tmp' in names and (time.sleep(when[1]) or True)
        if when[0] == 'renamed':
            try: return os.stat(path/MANIFEST).st_ino != ino
            except FileNotFoundError: return False
        if when[0] == 'gone': return len(before - names) >= when[1]
        return time.monotonic() - t0 >= when[1]
    killed = False
    while not done:
        if due():
            os.kill(pid, signal.SIGKILL); killed = True
            break
        z._line.pump()   # never block: the directory is watched
        while z._line.has_line:
            line = z._line()
            if line == 'done': done = True
            assert not line.startswith('error '), line
    z._send('reap')
    while not (line := z._line()).startswith('exit '):
        assert not line.startswith('error '), line
        if line == 'done': killed = False   # it finished before the kill landed
    return killed and not done

def _compaction_points(rng, n, n_new, n_old, secs):
    """`n` kill points over a compaction: 0-2.5 ms after the temporary manifest appears (its fsync, the rename, the directory's
    fsync), the rename seen, old files removed, new files spread out, random times"""
    fixed = [('tmp', d / 1000) for d in (0, 0.3, 0.6, 1, 1.5, 2.5)] + [('renamed', 0), ('gone', 1), ('gone', n_old)]
    m = max(0, n - len(fixed) - n // 4)
    news = [('new', k) for k in range(1, n_new + 1)]
    pts = fixed + news[::max(1, -(-len(news) // max(1, m)))][:m]
    return pts + [('delay', float(rng.uniform(0, 3 * secs))) for _ in range(n - len(pts))]

@pytest.mark.parametrize('n_kills', _kill_params(16, 60))
def test_kill_compaction(zygote, tmp_path, n_kills):
    """compact() killed at every stage: the store holds its items exactly, compacted or not, never a mix; readers that
    opened it before (with shards mapped or not) read the same items; a later append succeeds and leaves no debris"""
    rng, stats = np.random.default_rng(4000 + n_kills), Counter()
    template, size = tmp_path/'template.fmm', 1200
    exp = _state(make_items(7, 90, True), make_meta(7, 0, 90))
    write_memmap(template, exp[0], meta=exp[1], ragged=True, shard_size=60, progress=False)
    cal = tmp_path/'cal.fmm'; shutil.copytree(template, cal)   # what a compaction does here, and how long it takes
    t0 = time.monotonic(); c = MemmapStore(cal).compact(shard_size=size, retain=0, progress=False); secs = time.monotonic() - t0
    n0, n1 = MemmapStore(template).n_shards, c.n_shards
    assert n1 < n0 / 4, (n0, n1)
    pts = _compaction_points(rng, n_kills, len(manifest_files(c.manifest)), len(manifest_files(MemmapStore(template).manifest)), secs)
    for i, when in enumerate(pts):
        path = tmp_path/f'c{i}.fmm'
        shutil.copytree(template, path)
        retain = 0 if when[0] == 'gone' or i % 4 == 3 else 3600
        mapped, unmapped = MemmapStore(path), MemmapStore(path)
        mapped[:]; mapped.column('y'); mapped.column('s')   # every file mapped (or read) before the compaction
        killed = _watch_kill(zygote, dict(path=str(path), compact=size, retain=retain), when)
        s = MemmapStore(path).verify(progress=False)
        assert not _diff(s, exp), _diff(s, exp)
        assert s.n_shards in (n0, n1), s.n_shards
        outcome = 'before' if s.n_shards == n0 else 'after'
        if outcome == 'before': assert s.manifest['shards'] == mapped.manifest['shards']
        stats[f"{when[0]}{'' if killed else ' (finished first)'}->{outcome}"] += 1
        assert not _diff(mapped, exp), "a reader with its maps open lost data"
        if retain or outcome == 'before': assert not _diff(unmapped, exp), "a reader opened before the compaction lost data"
        more = _state(make_items(8 + i, 2, True), make_meta(8 + i, 90, 2))
        s2 = write_memmap(path, more[0], meta=more[1], mode='a', progress=False)
        assert not _diff(s2, _state(exp[0] + more[0], _concat_meta(exp[1], more[1])))
        s2.verify(progress=False)
        _assert_clean(path)
        if retain: assert not _diff(unmapped, exp), "a later append took files an earlier reader needs"
        shutil.rmtree(path)
    killed = {k: v for k, v in stats.items() if 'finished' not in k}
    COUNTS['kill points (compaction)'] += sum(killed.values())
    for k, v in stats.items(): COUNTS[f'kill outcome compaction {k}'] += v
    assert any(k.endswith('->before') for k in killed), stats
    if n_kills >= 60: assert any(k.endswith('->after') for k in killed), stats   # a kill after the rename (timing: the long run)

# --- 2. corruption: every kind of file truncated, extended, bit-flipped

def _probe_tokenize_bug() -> bool:
    "True while a damaged .npy header can make `read_npy_header` raise tokenize.TokenError (not ValueError)"
    from fastai_memmap.format import npy_header
    h = bytearray(npy_header('<f4', (15,), 128)); h[8] ^= 0x40   # header length byte: the dict text is cut short
    try: read_npy_header(io.BytesIO(bytes(h) + b'\0' * 64))
    except ValueError: return False
    except Exception as e: return type(e).__name__ == 'TokenError'
    return False

def _probe_dtype_syntax_bug() -> bool:
    "True while `validate_manifest` lets numpy's SyntaxError for dtype strings like ',f4' escape"
    m = dict(format='fastai_memmap', version=1, dtype=',f4', item_ndim=1, item_shape=[2], length=0, meta=[], shards=[])
    try: validate_manifest(m)
    except StoreError: return False
    except SyntaxError: return True
    return False

def _probe_item_shape_bug() -> bool:
    "True while `validate_manifest` accepts an item_shape no array can have"
    m = dict(format='fastai_memmap', version=1, dtype='<f4', item_ndim=1, item_shape=[10**30], length=0, meta=[], shards=[])
    try: validate_manifest(m); return True
    except StoreError: return False

BUG_TOKENIZE, BUG_DTYPE_SYNTAX, BUG_ITEM_SHAPE = _probe_tokenize_bug(), _probe_dtype_syntax_bug(), _probe_item_shape_bug()

def _probe_meta_dtype_bug(path) -> bool:
    "True while a meta shard whose header changes a column's dtype ('<i8' -> '>i8') is read without complaint"
    d = Path(path).parent/'probe.fmm'
    shutil.copytree(path, d)
    m = json.loads((d/MANIFEST).read_text())
    f = d/m['shards'][0]['meta']['file']
    b = f.read_bytes(); f.write_bytes(b.replace(b"'<i8'", b"'>i8'", 1))
    try: MemmapStore(d).verify(progress=False).column('y'); return True
    except StoreError: return False
    finally: shutil.rmtree(d)

@pytest.fixture(scope='module')
def stores(tmp_path_factory):
    "Template stores: ragged with metadata (data, index and meta files), fixed with metadata; several shards each"
    tmp = tmp_path_factory.mktemp('tpl')
    out = {}
    for name, ragged in [('ragged', True), ('fixed', False)]:
        items, meta = make_items(7, 9, ragged), make_meta(7, 0, 9)
        write_memmap(tmp/f'{name}.fmm', items, meta=meta, ragged=ragged, shard_size=60, progress=False)
        out[name] = (tmp/f'{name}.fmm', _state(items, meta))
    out['bug_meta_dtype'] = _probe_meta_dtype_bug(out['fixed'][0])
    return out

def _copy(stores, name, dst):
    src, exp = stores[name]
    shutil.copytree(src, dst)
    return dst, exp

def _target(path, kind) -> Path:
    "The file of `kind` ('data', 'index', 'meta' or 'manifest') of the store's second shard"
    if kind == 'manifest': return path/MANIFEST
    return path/json.loads((path/MANIFEST).read_text())['shards'][1][kind]['file']

def _header_len(f: Path) -> int:
    b = f.read_bytes()
    return b.index(b'\n', 10) + 1

def _try(path, exp, kind, fname) -> tuple:
    "Open, verify and read the store: ('caught', error) if a StoreError, ('same', None) if it holds `exp`, else what went wrong"
    try:
        s = MemmapStore(path)
        s.verify(progress=False)
        d = _diff(s, exp)
        if not s.ragged: s[:]
        s.shapes, s.meta
    except StoreError as e:
        if kind != 'manifest':
            assert fname in str(e), f"the error does not name the damaged file {fname}: {e}"
        return 'caught', e
    except Exception as e: return 'other', e
    return ('same', None) if not d else ('wrong', d)

def _meta_dtype_changed(orig: bytes, new: bytes) -> bool:
    "Both headers parse, with the same column names, but some column's dtype differs"
    try: (s1, d1, _), (s2, d2, _) = read_npy_header(io.BytesIO(orig)), read_npy_header(io.BytesIO(new))
    except Exception: return False
    return s1 == s2 and d1.names == d2.names and d1 != d2

def _known(outcome, err, kind, stores, orig=None, new=None) -> bool:
    "Whether a failure is the signature of a known (xfail-pinned) bug that is still present"
    if outcome == 'other' and type(err).__name__ == 'TokenError' and kind != 'manifest': return BUG_TOKENIZE
    if outcome == 'other' and isinstance(err, SyntaxError) and kind == 'manifest': return BUG_DTYPE_SYNTAX
    if outcome in ('wrong', 'other') and kind == 'meta' and _meta_dtype_changed(orig, new): return stores['bug_meta_dtype']
    return False

@pytest.mark.parametrize('name,kind', [('ragged', 'data'), ('ragged', 'index'), ('ragged', 'meta'), ('ragged', 'manifest'),
                                       ('fixed', 'data'), ('fixed', 'meta'), ('fixed', 'manifest')])
def test_truncate_and_extend(stores, tmp_path, name, kind):
    "A file cut short or grown is refused on open (shards: size against the manifest; the manifest: JSON and schema)"
    path, exp = _copy(stores, name, tmp_path/'s.fmm')
    f = _target(path, kind)
    orig = f.read_bytes()
    hl = len(orig) // 2 if kind == 'manifest' else _header_len(f)
    cuts = sorted({0, 1, hl - 1, hl, hl + 1, len(orig) // 2, len(orig) - 1} - {len(orig)})
    grows = [b'\0', b'\x00' * 4096, bytes(random.Random(0).randrange(256) for _ in range(100)), orig[-8:]]
    tried = 0
    for new in [orig[:c] for c in cuts] + [orig + g for g in grows]:
        f.write_bytes(new)
        with pytest.raises(StoreError) as ei: MemmapStore(path)
        assert isinstance(ei.value, CorruptStoreError), ei.value
        assert (f.name if kind != 'manifest' else MANIFEST) in str(ei.value), ei.value
        tried += 1
    if kind == 'manifest':   # trailing whitespace is still the same JSON: accepted, and the same store
        f.write_bytes(orig + b'\n  \n')
        assert _try(path, exp, kind, f.name)[0] == 'same'
    f.write_bytes(orig)
    assert _try(path, exp, kind, f.name)[0] == 'same'
    COUNTS['corruptions (truncate/extend)'] += tried

@pytest.mark.parametrize('name,kind', [('ragged', 'data'), ('ragged', 'index'), ('ragged', 'meta'), ('fixed', 'data'), ('fixed', 'meta')])
def test_payload_bit_flips(stores, tmp_path, name, kind):
    "One flipped bit anywhere in a shard's payload: the store opens (reads go straight to the map) but verify raises ChecksumError naming the file"
    path, exp = _copy(stores, name, tmp_path/'s.fmm')
    f = _target(path, kind)
    orig, hl = f.read_bytes(), _header_len(f)
    bits = range(hl * 8, len(orig) * 8)
    rng = random.Random(f'{name}{kind}')
    picks = sorted(set(rng.sample(bits, min(40, len(bits)))) | {bits[0], bits[-1]})
    for bit in picks:
        b = bytearray(orig); b[bit // 8] ^= 1 << (bit % 8); f.write_bytes(b)
        s = MemmapStore(path)
        with pytest.raises(ChecksumError, match=f.name): s.verify(progress=False)
    f.write_bytes(orig)
    MemmapStore(path).verify(progress=False)
    COUNTS['corruptions (payload bit flips)'] += len(picks)

@pytest.mark.filterwarnings('ignore::DeprecationWarning')   # flipped descrs such as '<a8' use deprecated aliases
@pytest.mark.parametrize('name,kind', [('ragged', 'data'), ('ragged', 'index'), ('ragged', 'meta'), ('ragged', 'manifest'),
                                       ('fixed', 'data'), ('fixed', 'meta'), ('fixed', 'manifest')])
def test_header_bit_flips(stores, tmp_path, name, kind):
    """Every bit of a shard's .npy header (the manifest: every bit of its first 200 bytes and 600 more)
    flipped in turn: opening, verifying and reading either raise a StoreError (naming the shard file) or give back
    exactly the original store (a flip to an equivalent spelling, e.g. '<f4' -> '|f4'), never different data."""
    path, exp = _copy(stores, name, tmp_path/'s.fmm')
    f = _target(path, kind)
    orig = f.read_bytes()
    if kind == 'manifest':
        rng = random.Random(name)
        bits = list(range(min(200, len(orig)) * 8)) + rng.sample(range(200 * 8, len(orig) * 8), min(600, len(orig) * 8 - 1600))
    else:   # the dict text, a sample of its space padding, and the final newline
        hl = _header_len(f)
        text_end = orig.index(b'}', 10) + 1
        bits = list(range(text_end * 8)) + list(range(text_end * 8, text_end * 8 + 16)) + list(range((hl - 1) * 8, hl * 8))
    outcomes, bad, known = Counter(), [], Counter()
    for bit in bits:
        b = bytearray(orig); b[bit // 8] ^= 1 << (bit % 8); f.write_bytes(b)
        outcome, err = _try(path, exp, kind, f.name)
        outcomes[outcome] += 1
        if outcome in ('other', 'wrong'):
            if _known(outcome, err, kind, stores, orig, bytes(b)): known[f'{outcome}: {type(err).__name__ if outcome == "other" else err}'] += 1
            else: bad.append((bit, outcome, repr(err), bytes(b[max(0, bit // 8 - 12):bit // 8 + 8])))
    f.write_bytes(orig)
    COUNTS['corruptions (header/manifest bit flips)'] += len(bits)
    assert not bad, f"{len(bad)} of {len(bits)} flips of {f.name} were not caught: {bad[:5]} (outcomes {dict(outcomes)})"
    assert outcomes['same'] <= 0.05 * len(bits), dict(outcomes)   # only a few flips spell the same header another way
    for k, v in known.items(): COUNTS[f'known-bug outcomes ({k.split(":")[0]})'] += v

def test_bug_header_tokenize_error(stores, tmp_path):
    path, exp = _copy(stores, 'fixed', tmp_path/'s.fmm')
    f = _target(path, 'data')
    b = bytearray(f.read_bytes()); b[8] ^= 0x40   # the header-length byte: the header's dict text is cut short
    f.write_bytes(b)
    with pytest.raises(CorruptStoreError, match=f.name): MemmapStore(path).verify(progress=False)

@pytest.mark.parametrize('new', [b"'>i8'", b"'<m8'"])
def test_bug_meta_header_dtype_unchecked(stores, tmp_path, new):
    path, exp = _copy(stores, 'fixed', tmp_path/'s.fmm')
    f = _target(path, 'meta')
    f.write_bytes(f.read_bytes().replace(b"'<i8'", new, 1))
    with pytest.raises(CorruptStoreError, match=f.name):
        s = MemmapStore(path).verify(progress=False)
        s.column('y')

@pytest.mark.parametrize('where', ['dtype', 'meta'])
def test_bug_manifest_dtype_syntax_error(stores, tmp_path, where):
    path, exp = _copy(stores, 'fixed', tmp_path/'s.fmm')
    m = json.loads((path/MANIFEST).read_text())
    if where == 'dtype': m['dtype'] = ',f4'
    else: m['meta'][0][1] = ',i8'
    (path/MANIFEST).write_text(json.dumps(m))
    with pytest.raises(CorruptStoreError, match='dtype'): MemmapStore(path)

# --- 3. bad inputs: each raises its own error, naming the problem, and changes nothing

def _setup_manifest(fn):
    "A setup step that edits the manifest of store P with `fn(m, P)`"
    def setup(root):
        p = root/'fixed.fmm'
        m = json.loads((p/MANIFEST).read_text())
        fn(m, p)
        (p/MANIFEST).write_text(json.dumps(m))
    return setup

def _m_set(**kw):
    return _setup_manifest(lambda m, p: m.update(kw))

def _shard0(key, **kw):
    return _setup_manifest(lambda m, p: m['shards'][0][key].update(kw))

def _symlink_out(root):
    p = root/'fixed.fmm'
    f = p/json.loads((p/MANIFEST).read_text())['shards'][0]['data']['file']
    outside = root/'outside.npy'
    shutil.copy(f, outside)
    f.unlink(); f.symlink_to(outside)

def _replace_file_by_dir(root):
    p = root/'fixed.fmm'
    f = p/json.loads((p/MANIFEST).read_text())['shards'][0]['data']['file']
    f.unlink(); f.mkdir()

def _delete_shard_file(root):
    p = root/'fixed.fmm'
    (p/json.loads((p/MANIFEST).read_text())['shards'][0]['meta']['file']).unlink()

def _dup_names(m, p):
    m['shards'][1]['data']['file'] = m['shards'][0]['data']['file']

def _consistent_huge(m, p):
    m['shards'][0]['length'] += 2**47; m['length'] += 2**47

def _bad_source(n_good):
    def gen():
        for i in range(n_good): yield np.zeros((2, 3), np.float32) + i
        yield np.zeros((2, 4), np.float32)
    return gen()

F32 = lambda *shape: np.zeros(shape, np.float32)
META2 = {'y': np.arange(2), 's': np.array(['a', 'b'])}
OPEN = lambda r: MemmapStore(r/'fixed.fmm')
FIXED = lambda r: MemmapStore(r/'fixed.fmm')
RAGGED = lambda r: MemmapStore(r/'ragged.fmm')
NEW = lambda r: r/'new.fmm'
W = lambda path, data, **kw: write_memmap(path, data, progress=False, **kw)

# (id, setup(root) or None, action(root), error class, message regex)
BAD = [
    # data
    ('object array', None, lambda r: W(NEW(r), np.array([[1, 'a']], dtype=object)), IncompatibleDataError, 'dtype object'),
    ('string array', None, lambda r: W(NEW(r), np.array([['a', 'b']])), IncompatibleDataError, 'not a number array'),
    ('0-d array', None, lambda r: W(NEW(r), np.array(3.0)), IncompatibleDataError, '0-d'),
    ('structured array', None, lambda r: W(NEW(r), np.zeros(3, [('a', 'i4')])), IncompatibleDataError, 'not a number array'),
    ('ragged list, ragged=False', None, lambda r: W(NEW(r), [F32(3), F32(4)], ragged=False), IncompatibleDataError, 'ragged=True'),
    ('ragged=True with an array', None, lambda r: W(NEW(r), F32(3, 2), ragged=True), IncompatibleDataError, 'ragged=True needs a list'),
    ('list of object items', None, lambda r: W(NEW(r), [np.array([None, 1])]), IncompatibleDataError, 'dtype object'),
    ('no items', None, lambda r: W(NEW(r), iter([])), IncompatibleDataError, 'no items were added'),
    ('dict as data', None, lambda r: W(NEW(r), {'a': F32(2)}), IncompatibleDataError, 'not dict'),
    ('str as data', None, lambda r: W(NEW(r), 'data.npy'), IncompatibleDataError, 'not str'),
    ('string dtype=', None, lambda r: W(NEW(r), F32(2, 3), dtype='U3'), IncompatibleDataError, 'cannot hold'),
    ('lossy dtype=', None, lambda r: W(NEW(r), np.zeros((2, 3)), dtype='int8'), IncompatibleDataError, 'without loss'),
    ('append: item shape', None, lambda r: W(r/'fixed.fmm', F32(2, 2, 4), meta=META2, mode='a'), IncompatibleDataError, r'item shape \(2, 4\)'),
    ('append: item ndim', None, lambda r: W(r/'fixed.fmm', F32(2, 2, 3, 1), meta=META2, mode='a'), IncompatibleDataError, '3 dimensions'),
    ('append: item dtype (list)', None, lambda r: W(r/'fixed.fmm', [np.zeros((2, 3))] * 2, meta=META2, mode='a'), IncompatibleDataError, 'float64 but the store holds float32'),
    ('append: explicit dtype=', None, lambda r: W(r/'fixed.fmm', F32(2, 2, 3), meta=META2, mode='a', dtype='float64'), IncompatibleDataError, 'dtype=float64'),
    ('append: float64 array into float32 store', None, lambda r: W(r/'fixed.fmm', np.full((2, 2, 3), 1 + 2**-30), meta=META2, mode='a'), IncompatibleDataError, 'float64 but the store holds float32'),
    ('append: ragged item ndim', None, lambda r: W(r/'ragged.fmm', [np.zeros(3, np.float32)], meta={'y': [0], 's': ['a']}, mode='a'), IncompatibleDataError, '1 dimensions'),
    ('append: bad item after many shards', None, lambda r: W(r/'plain.fmm', _bad_source(40), mode='a', shard_size=24), IncompatibleDataError, r'item 40 has item shape \(2, 4\)'),
    # metadata
    ('meta column wrong length', None, lambda r: W(NEW(r), F32(3, 2), meta={'y': [1, 2]}), MetadataError, "'y' has 2 values but data has 3"),
    ('meta column short for a stream', None, lambda r: W(NEW(r), iter([F32(2)] * 3), meta={'y': [1, 2]}), MetadataError, 'more items'),
    ('meta object column, mixed types', None, lambda r: W(NEW(r), F32(3, 2), meta={'y': np.array([1, 'a', 2.0], dtype=object)}), MetadataError, 'mixed types'),
    ('meta object Series, mixed types', None, lambda r: W(NEW(r), F32(3, 2), meta=pd.DataFrame({'y': pd.Series([1, 'a', 2.0], dtype=object)})), MetadataError, 'mixed types'),
    ('meta NaN in int column', None, lambda r: W(NEW(r), F32(3, 2), meta=pd.DataFrame({'y': pd.array([1, None, 3], dtype='Int64')})), MetadataError, 'missing values'),
    ('meta None in str column', None, lambda r: W(NEW(r), F32(3, 2), meta=pd.DataFrame({'y': ['a', None, 'c']})), MetadataError, 'missing values'),
    ('meta non-str column name', None, lambda r: W(NEW(r), F32(3, 2), meta={1: [1, 2, 3]}), MetadataError, 'non-empty strings; got 1'),
    ('meta empty column name', None, lambda r: W(NEW(r), F32(3, 2), meta={'': [1, 2, 3]}), MetadataError, 'non-empty strings'),
    ('meta 2-D column', None, lambda r: W(NEW(r), F32(3, 2), meta={'y': np.zeros((3, 2))}), MetadataError, 'must be 1-D'),
    ('meta as a list', None, lambda r: W(NEW(r), F32(3, 2), meta=[1, 2, 3]), MetadataError, 'not list'),
    ('meta bytes column', None, lambda r: W(NEW(r), F32(3, 2), meta={'y': [b'a', b'b', b'c']}), MetadataError, "dtype\\('S1'\\)"),
    ('meta dict values', None, lambda r: W(NEW(r), F32(3, 2), meta={'y': [{}, {}, {}]}), MetadataError, 'Python objects'),
    ('append: missing meta columns', None, lambda r: W(r/'fixed.fmm', F32(2, 2, 3), mode='a'), MetadataError, r"columns \['s', 'y'\] but the append gives \[\]"),
    ('append: extra meta column', None, lambda r: W(r/'fixed.fmm', F32(2, 2, 3), meta={**META2, 'z': [1, 2]}, mode='a'), MetadataError, "'z'"),
    ('append: meta wrong length', None, lambda r: W(r/'fixed.fmm', F32(3, 2, 3), meta=META2, mode='a'), MetadataError, '2 values but data has 3'),
    pytest.param('append: str into int meta column', None, lambda r: W(r/'fixed.fmm', F32(2, 2, 3), meta={'y': ['a', 'b'], 's': ['a', 'b']}, mode='a'),
                 MetadataError, "'y' holds int"),
    # modes and paths
    ("mode='x' on an existing store", None, lambda r: W(r/'fixed.fmm', F32(2, 2, 3), meta=META2, mode='x'), StoreExistsError, 'already exists'),
    ("mode='q'", None, lambda r: W(r/'fixed.fmm', F32(2, 2, 3), mode='q'), ValueError, "mode must be 'x'"),
    ("mode='q' on a new path", None, lambda r: W(NEW(r), F32(2, 2, 3), mode='q'), ValueError, "mode must be 'x'"),
    ('shard_size=0', None, lambda r: W(NEW(r), F32(2, 3), shard_size=0), ValueError, 'shard_size'),
    ('open a path that is a file', lambda r: (r/'file').write_text('x'), lambda r: MemmapStore(r/'file'), StoreNotFoundError, 'is a file'),
    ('write to a path that is a file', lambda r: (r/'file').write_text('x'), lambda r: W(r/'file', F32(2, 3)), StoreExistsError, 'is a file'),
    ('write to a dir with foreign files', lambda r: ((r/'d').mkdir(), (r/'d'/'notes.txt').write_text('x')), lambda r: W(r/'d', F32(2, 3)), StoreExistsError, 'notes.txt'),
    ('open a dir with foreign files', lambda r: ((r/'d').mkdir(), (r/'d'/'notes.txt').write_text('x')), lambda r: MemmapStore(r/'d'), StoreNotFoundError, 'no manifest.json'),
    ('open a missing path', None, lambda r: MemmapStore(r/'missing.fmm'), StoreNotFoundError, 'no fastai_memmap store'),
    # indices
    ('index out of range', None, lambda r: FIXED(r)[9], StoreIndexError, 'index 9 is out of range'),
    ('negative index out of range', None, lambda r: FIXED(r)[-10], StoreIndexError, 'index -10 is out of range'),
    ('index array out of range', None, lambda r: FIXED(r)[[0, 3, 12]], StoreIndexError, 'index 12'),
    ('float index array', None, lambda r: FIXED(r)[np.array([0.0, 1.0])], StoreIndexError, 'got float64'),
    ('float index', None, lambda r: FIXED(r)[1.0], StoreIndexError, 'got float64'),
    ('2-D index array', None, lambda r: FIXED(r)[np.zeros((2, 2), int)], StoreIndexError, r'shape \(2, 2\)'),
    ('bool mask of wrong length', None, lambda r: FIXED(r)[np.ones(8, bool)], StoreIndexError, r'one entry per item \(9\)'),
    ('str index', None, lambda r: FIXED(r)['a'], StoreIndexError, 'got <U1'),
    ('ragged store, two indices', None, lambda r: RAGGED(r)[[0, 1], 0], StoreIndexError, 'ragged store takes one index'),
    ('ragged store, index out of range', None, lambda r: RAGGED(r)[-10], StoreIndexError, 'out of range'),
    # manifests
    ('manifest: absurd length', _m_set(length=2**60), OPEN, CorruptStoreError, 'length'),
    ('manifest: absurd length, consistent', _setup_manifest(_consistent_huge), lambda r: OPEN(r)[0], CorruptStoreError, 'manifest expects'),
    ("manifest: shard file name with '..'", _shard0('data', file='../data-abc-00000.npy'), OPEN, CorruptStoreError, 'not a shard file name'),
    ('manifest: absolute shard path', _shard0('data', file='/etc/passwd'), OPEN, CorruptStoreError, 'not a shard file name'),
    ('manifest: foreign file name', _shard0('data', file='data.npy'), OPEN, CorruptStoreError, 'not a shard file name'),
    ('shard file: symlink leaving the store', _symlink_out, OPEN, CorruptStoreError, 'symlink that leaves the store'),
    ('shard file: a directory', _replace_file_by_dir, OPEN, CorruptStoreError, 'not a regular file'),
    ('shard file: missing', _delete_shard_file, OPEN, CorruptStoreError, 'is missing'),
    ('manifest: unknown format version', _m_set(version=2), OPEN, FormatVersionError, 'format version 2'),
    ('manifest: version as a string', _m_set(version='1'), OPEN, CorruptStoreError, 'version is missing'),
    ('manifest: other format', _m_set(format='zarr'), OPEN, CorruptStoreError, 'not a fastai_memmap manifest'),
    ('manifest: missing keys', _setup_manifest(lambda m, p: m.pop('meta')), OPEN, CorruptStoreError, r"lacks the keys \['meta'\]"),
    ('manifest: duplicate file names', _setup_manifest(_dup_names), OPEN, CorruptStoreError, 'used twice'),
    ('manifest: negative bytes', _shard0('data', bytes=-1), OPEN, CorruptStoreError, 'invalid bytes'),
    ('manifest: bytes as a float', _shard0('data', bytes=176.0), OPEN, CorruptStoreError, 'invalid bytes'),
    ('manifest: crc32 as a string', _shard0('meta', crc32='0'), OPEN, CorruptStoreError, 'invalid crc32'),
    ('manifest: object dtype', _m_set(dtype='|O'), OPEN, CorruptStoreError, 'dtype'),
    ('manifest: item_ndim 33', _m_set(item_ndim=33), OPEN, CorruptStoreError, 'item_ndim'),
    ('manifest: item_shape vs item_ndim', _m_set(item_shape=[2, 3, 1]), OPEN, CorruptStoreError, 'item_shape'),
    ('manifest: lengths do not add up', _m_set(length=8), OPEN, CorruptStoreError, 'hold 9 items but its length is 8'),
    ('manifest: meta column twice', _setup_manifest(lambda m, p: m['meta'].append(m['meta'][0])), OPEN, CorruptStoreError, 'twice'),
    ('manifest: shard with an extra key', _setup_manifest(lambda m, p: m['shards'][0].update(index=m['shards'][0]['data'])), OPEN, CorruptStoreError, 'exactly the keys'),
    ('manifest: not JSON', lambda r: (r/'fixed.fmm'/MANIFEST).write_text('{"format": '), OPEN, CorruptStoreError, 'not valid JSON'),
    ('manifest: a JSON list', lambda r: (r/'fixed.fmm'/MANIFEST).write_text('[]'), OPEN, CorruptStoreError, 'not a fastai_memmap manifest'),
    pytest.param('manifest: a directory', lambda r: ((r/'fixed.fmm'/MANIFEST).unlink(), (r/'fixed.fmm'/MANIFEST).mkdir()), OPEN,
                 CorruptStoreError, 'manifest'),
    ('manifest: wrong item_shape for the shards', _m_set(item_shape=[3, 2]), lambda r: OPEN(r)[0], CorruptStoreError, 'manifest expects'),
]

@pytest.fixture
def bad_root(stores, tmp_path):
    "A directory holding copies of the template stores and a plain (no metadata) store"
    shutil.copytree(stores['fixed'][0], tmp_path/'fixed.fmm')
    shutil.copytree(stores['ragged'][0], tmp_path/'ragged.fmm')
    write_memmap(tmp_path/'plain.fmm', np.zeros((5, 2, 3), np.float32), shard_size=60, progress=False)
    return tmp_path

@pytest.mark.parametrize('case,setup,action,err,msg', [c if hasattr(c, 'values') else pytest.param(*c, id=c[0]) for c in BAD])
def test_bad_input(bad_root, case, setup, action, err, msg):
    "A bad input raises its own error class with a message naming the problem, and every file stays byte-for-byte as it was"
    if setup is not None: setup(bad_root)
    before = _tree(bad_root)
    with pytest.raises(err, match=msg) as ei: action(bad_root)
    if err is not ValueError: assert isinstance(ei.value, StoreError)
    assert _tree(bad_root) == before, f"{case}: the failed call changed files"
    if case.startswith('manifest') and action is OPEN:   # a damaged manifest: a writer is refused too, and changes nothing
        with pytest.raises(StoreError): W(bad_root/'fixed.fmm', F32(2, 2, 3), meta=META2, mode='a')
        assert _tree(bad_root) == before, f"{case}: a refused append changed files"
    COUNTS['bad inputs'] += 1

def _truncate_shard_file(root):
    p = root/'fixed.fmm'
    f = p/json.loads((p/MANIFEST).read_text())['shards'][0]['data']['file']
    f.write_bytes(f.read_bytes()[:-1])

@pytest.mark.parametrize('damage', [_delete_shard_file, _truncate_shard_file, _replace_file_by_dir, _symlink_out],
                         ids=['missing', 'truncated', 'directory', 'symlink out'])
def test_bug_append_to_damaged_store_commits(bad_root, damage):
    damage(bad_root)
    before = _tree(bad_root)
    with pytest.raises(CorruptStoreError): W(bad_root/'fixed.fmm', F32(2, 2, 3), meta=META2, mode='a')
    assert _tree(bad_root) == before, "the refused append committed anyway"

def test_bad_input_table_size():
    assert len(BAD) >= 30

def test_bug_item_shape_unbounded(tmp_path):
    p = tmp_path/'e.fmm'; p.mkdir()
    (p/MANIFEST).write_text(json.dumps(dict(format='fastai_memmap', version=1, dtype='<f4', item_ndim=1, item_shape=[10**30],
                                            length=0, meta=[], shards=[])))
    with pytest.raises(StoreError):
        s = MemmapStore(p)
        s.verify(progress=False)
        s[:]

# --- 4. property-based fuzz of the manifest reader

@pytest.fixture(scope='module')
def fuzz_stores(stores, tmp_path_factory):
    "Base stores for the fuzz: ragged with metadata, fixed with metadata, fixed without, and an empty one"
    tmp = tmp_path_factory.mktemp('fuzz')
    out = []
    for name in ('ragged', 'fixed'):
        shutil.copytree(stores[name][0], tmp/f'{name}.fmm')
        out.append((tmp/f'{name}.fmm', stores[name][1]))
    items = make_items(8, 5, False, 'int16')
    write_memmap(tmp/'plain.fmm', items, shard_size=20, progress=False)
    out.append((tmp/'plain.fmm', _state(items, {})))
    (tmp/'empty.fmm').mkdir()
    m = dict(format='fastai_memmap', version=1, dtype='<f4', item_ndim=2, item_shape=[2, 3], length=0, meta=[['y', '<i8']], shards=[])
    (tmp/'empty.fmm'/MANIFEST).write_text(json.dumps(m))
    out.append((tmp/'empty.fmm', _state([], {'y': np.zeros(0, np.int64)})))
    res = []
    for p, exp in out:
        m = json.loads((p/MANIFEST).read_text())
        # what each shard holds, by its data file, so an accepted manifest's contents can be predicted
        per, i = {}, 0
        for s in m['shards']:
            n = s['length']
            per[s['data']['file']] = (exp[0][i:i + n], {c: v[i:i + n] for c, v in exp[1].items()}, n)
            i += n
        res.append((p, m, per))
    return res

LEAVES = st.one_of(
    st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([-1, 0, 1, 2, 33, 2**31, 2**47, 2**48 + 1, 2**63, 2**64, -2**63, 10**30, 2**1000]),
    st.text(max_size=12),
    st.sampled_from(['<f4', '<i8', '|O', '<U3', 'V8', 'M8[ns]', ',f4', 'f4,i4', '(2)f4', '<U999999999', 'float32',
                     '../data-abc-00000.npy', '/etc/passwd', 'data-abc-00000.npy', 'data-1-1.npy', 'fastai_memmap', '',
                     'manifest.json', '.lock', 'index-zz-00001.npy']))
JSON = st.recursive(LEAVES, lambda ch: st.lists(ch, max_size=4) | st.dictionaries(st.text(max_size=8), ch, max_size=4), max_leaves=10)

def _paths(x, pre=()):
    "Every (path, value) in the JSON tree `x`"
    yield pre, x
    if isinstance(x, dict):
        for k, v in x.items(): yield from _paths(v, pre + (k,))
    elif isinstance(x, list):
        for i, v in enumerate(x): yield from _paths(v, pre + (i,))

def _get(x, path):
    for k in path: x = x[k]
    return x

def _mutate(data, m):
    "One random edit of manifest `m`, in place: replace a value, tweak an int, delete or duplicate an entry, add a key"
    paths = [p for p, _ in _paths(m)]
    path = data.draw(st.sampled_from(paths), label='path')
    op = data.draw(st.sampled_from(['replace', 'int', 'delete', 'dup', 'add']), label='op')
    if not path: return
    parent, key = _get(m, path[:-1]), path[-1]
    val = parent[key]
    if op == 'int' and type(val) is int:
        parent[key] = data.draw(st.sampled_from([val + 1, val - 1, -val, -1, val * 2**40, val + 2**47, 2**63, 0]), label='int')
    elif op == 'delete':
        del parent[key]
    elif op == 'dup' and isinstance(parent, list):
        parent.append(json.loads(json.dumps(val)))
    elif op == 'add' and isinstance(val, dict):
        val[data.draw(st.text(max_size=8), label='key')] = data.draw(JSON, label='value')
    else:
        parent[key] = data.draw(JSON, label='value')

def _expected(m, per):
    "What a store whose (accepted) manifest is `m` must hold: its shards' original items, in its order"
    items, metas = [], []
    for s in m['shards']:
        it, me, n = per[s['data']['file']]
        items += it; metas.append(me)
    cols = [c for c, _ in m['meta']]
    return items, {c: np.concatenate([me[c] for me in metas]) if metas else np.zeros(0) for c in cols}

def _huge_item(m) -> bool:
    "The manifest has an item_shape no array can have (the signature of the item_shape bug)"
    try: return m['item_shape'] is not None and int(np.prod([float(v) for v in m['item_shape']])) * 8 > 2**48
    except Exception: return False

@settings(max_examples=300, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_fuzz_manifest(fuzz_stores, data):
    """Random edits of a valid manifest (keys dropped, types changed, huge or negative ints, random strings):
    validate_manifest and MemmapStore accept it or raise a StoreError, never another exception, never a big allocation;
    an accepted manifest opens a store that verifies and holds exactly what its shards hold."""
    path, base, per = data.draw(st.sampled_from(fuzz_stores), label='store')
    m = json.loads(json.dumps(base))
    for _ in range(data.draw(st.integers(1, 3), label='edits')): _mutate(data, m)
    COUNTS['manifest fuzz examples'] += 1
    tracemalloc.start()
    try:
        try: validate_manifest(json.loads(json.dumps(m)), 'fuzz'); valid = True
        except StoreError: valid = False
        except SyntaxError:
            if not BUG_DTYPE_SYNTAX: raise
            return
        (path/MANIFEST).write_text(json.dumps(m))
        try:
            s = MemmapStore(path)
            s.verify(progress=False)
            got = (list(s), {c: s.column(c) for c in s.meta_columns})
            if not s.ragged: s[:]
            s.shapes, s.meta, len(s), repr(s)
        except StoreError: return
        except (ValueError, OverflowError, MemoryError):
            if BUG_ITEM_SHAPE and _huge_item(m): return
            raise
        except SyntaxError:
            if BUG_DTYPE_SYNTAX: return
            raise
        assert valid, "MemmapStore opened a manifest that validate_manifest refuses"
        exp = _expected(m, per)
        assert len(got[0]) == len(exp[0]) == len(s)
        for a, b in zip(got[0], exp[0]): assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)
        for c, v in exp[1].items(): assert np.array_equal(got[1][c], v), c
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        (path/MANIFEST).write_text(json.dumps(base))
        assert peak < 64 << 20, f"reading a fuzzed manifest allocated {peak / 2**20:.0f} MiB"

@settings(max_examples=100, deadline=None, derandomize=True, database=None)
@given(m=JSON)
def test_fuzz_arbitrary_json(m):
    "Any JSON value at all is refused with a StoreError (it is not a manifest)"
    try: validate_manifest(m, 'fuzz')
    except StoreError: return
    raise AssertionError(f"accepted {m!r}")

# --- 5. disk full: RLIMIT_FSIZE makes a write fail midway with EFBIG

FSIZE = GEN_SRC + r'''
import json, resource, sys
from fastai_memmap.write import write_memmap
res = []
for job in json.loads(sys.argv[1]):
    items = make_items(job['seed'], job['n'], job['ragged'])
    resource.setrlimit(resource.RLIMIT_FSIZE, (job['limit'], resource.RLIM_INFINITY))
    try:
        write_memmap(job['path'], items, meta=make_meta(job['seed'], job['start'], job['n']), mode=job['mode'],
                     ragged=job['ragged'], shard_size=job['shard_size'], progress=False)
        res.append(None)
    except OSError as e: res.append([e.errno, str(e)])
    finally: resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
print(json.dumps(res))
'''

def test_disk_full(tmp_path):
    "A write that runs out of room (EFBIG) in a shard or in the manifest leaves the last commit intact; the next write cleans up"
    st0 = _state(make_items(3, 6, False), make_meta(3, 0, 6))
    stores = {}
    for name in ('a_shard', 'a_manifest', 'w_shard', 'w_manifest'):
        write_memmap(tmp_path/f'{name}.fmm', st0[0], meta=st0[1], shard_size=60, progress=False)
        stores[name] = tmp_path/f'{name}.fmm'
    big = 8192   # a shard file of ~8 KiB against a 4 KiB limit; or ~40 small shards, whose manifest outgrows 4 KiB
    jobs = [dict(path=str(stores['a_shard']), mode='a', seed=4, start=6, n=400, ragged=False, shard_size=big, limit=4096),
            dict(path=str(stores['a_manifest']), mode='a', seed=5, start=6, n=80, ragged=False, shard_size=48, limit=4096),
            dict(path=str(stores['w_shard']), mode='w', seed=6, start=0, n=400, ragged=True, shard_size=big, limit=4096),
            dict(path=str(stores['w_manifest']), mode='w', seed=7, start=0, n=80, ragged=False, shard_size=48, limit=4096),
            dict(path=str(tmp_path/'x_shard.fmm'), mode='x', seed=8, start=0, n=400, ragged=False, shard_size=big, limit=4096)]
    r = subprocess.run([PY, '-c', FSIZE, json.dumps(jobs)], capture_output=True, text=True, env=_env(), timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    for job, out in zip(jobs, res):
        assert out is not None and out[0] == errno.EFBIG, (job, out)
    for name, p in stores.items():
        s = MemmapStore(p)
        s.verify(progress=False)
        assert not _diff(s, st0), (name, _diff(s, st0))
        more = _state(make_items(9, 2, False), make_meta(9, 6, 2))
        s = write_memmap(p, more[0], meta=more[1], mode='a', progress=False)
        assert not _diff(s, _state(st0[0] + more[0], _concat_meta(st0[1], more[1])))
        _assert_clean(p)
    assert not (tmp_path/'x_shard.fmm').exists() or not any(f.endswith('.npy') for f in os.listdir(tmp_path/'x_shard.fmm'))
    with pytest.raises(StoreNotFoundError): MemmapStore(tmp_path/'x_shard.fmm')
    COUNTS['disk-full failures'] += len(jobs)

# --- 6. a read-only store

def _store_fds(path) -> list:
    "(fd target, open flags) of this process's open files inside `path`, and the permissions of its mappings of them"
    root = os.path.realpath(path)
    fds, maps = [], []
    for fd in os.listdir('/proc/self/fd'):
        try: target = os.readlink(f'/proc/self/fd/{fd}')
        except OSError: continue
        if target.startswith(root + os.sep):
            flags = int(next(l for l in Path(f'/proc/self/fdinfo/{fd}').read_text().splitlines() if l.startswith('flags:')).split()[1], 8)
            fds.append((target, flags))
    for line in Path('/proc/self/maps').read_text().splitlines():
        parts = line.split(None, 5)
        if len(parts) == 6 and parts[5].startswith(root + os.sep): maps.append((parts[5], parts[1]))
    return fds, maps

@pytest.mark.skipif(not Path('/proc/self/maps').exists(), reason='needs /proc')
def test_read_only_store(stores, tmp_path):
    """Files 0o444 in a 0o555 directory: opening, reading, verifying and the CLI all work, create nothing (no .lock),
    change nothing, and every file and mapping of the store this process holds is read-only"""
    path, exp = _copy(stores, 'ragged', tmp_path/'ro.fmm')
    (path/'.lock').unlink()
    for f in path.iterdir(): f.chmod(0o444)
    path.chmod(0o555)
    try:
        before = {f.name: (f.stat().st_mtime_ns, f.stat().st_size) for f in path.iterdir()}
        tree = _tree(path)
        s = MemmapStore(path)
        s.verify(progress=False)
        assert not _diff(s, exp)
        s.take_padded(np.arange(len(s)))
        fds, maps = _store_fds(path)
        assert maps, "the store's shards should be memory-mapped while open"
        assert all('w' not in perm for _, perm in maps), maps
        assert all(flags & 0o3 == os.O_RDONLY for _, flags in fds), fds
        r = _cli('verify', path); assert r.returncode == 0, r.stderr
        r = _cli('info', path); assert r.returncode == 0, r.stderr
        assert sorted(os.listdir(path)) == sorted(before), "reading created files"
        assert {f.name: (f.stat().st_mtime_ns, f.stat().st_size) for f in path.iterdir()} == before
        assert _tree(path) == tree
        if os.geteuid() != 0:   # the permissions really bind: a writer is refused and the store is unchanged
            with pytest.raises(OSError): W(path, make_items(1, 1, True), meta=make_meta(1, 0, 1), mode='a')
            assert _tree(path) == tree
        del s
    finally:
        path.chmod(0o755)
        for f in path.iterdir(): f.chmod(0o644)

# --- 7. one writer, many readers

HOLDER = GEN_SRC + r'''
import json, sys, time
from fastai_memmap.write import MemmapWriter
job = json.loads(sys.argv[1])
w = MemmapWriter(job['path'], 'a', shard_size=60)
meta = make_meta(job['seed'], job['start'], job['n'])
for i, x in enumerate(make_items(job['seed'], job['n'], False)): w.add(x, y=meta['y'][i], s=meta['s'][i])
print('locked', flush=True)
if sys.stdin.readline().strip() == 'commit':
    w.commit(); print('committed', flush=True)
'''

@pytest.mark.parametrize('end', ['kill', 'commit'])
def test_second_writer_locked_out(stores, tmp_path, end):
    """While a live process holds the writer lock (with shards written, not committed), other writers get
    StoreLockedError and touch nothing, readers see the last commit; when the holder is killed -9 its lock
    is reclaimed and its files are cleaned up, and when it commits its items are all there."""
    path, exp = _copy(stores, 'fixed', tmp_path/'s.fmm')
    n = 20
    job = dict(path=str(path), seed=11, start=9, n=n)
    p = subprocess.Popen([PY, '-c', HOLDER, json.dumps(job)], stdin=PIPE, stdout=PIPE, stderr=PIPE, text=True, env=_env())
    try:
        assert p.stdout.readline().strip() == 'locked', p.stderr.read()
        tree = _tree(path)
        assert set(tree) - _clean_names(path)[1], "the holder should have written (uncommitted) shard files"
        for mode in ('a', 'w'):
            with pytest.raises(StoreLockedError, match='being written by another process'):
                W(path, make_items(12, 2, False), meta=make_meta(12, 9, 2), mode=mode)
        with pytest.raises(StoreLockedError): MemmapWriter(path, 'a')
        assert _tree(path) == tree, "a writer that was locked out changed files (it must not touch a live writer's shards)"
        s = MemmapStore(path)
        assert not _diff(s, exp)
        if end == 'kill':
            p.kill(); p.wait(timeout=30)
            assert p.returncode == -signal.SIGKILL
            assert not _diff(MemmapStore(path).verify(progress=False), exp)
            more = _state(make_items(13, 2, False), make_meta(13, 9, 2))
            s2 = W(path, more[0], meta=more[1], mode='a')
            assert not _diff(s2, _state(exp[0] + more[0], _concat_meta(exp[1], more[1])))
        else:
            p.stdin.write('commit\n'); p.stdin.flush()
            assert p.stdout.readline().strip() == 'committed', p.stderr.read()
            p.wait(timeout=30)
            new = _state(make_items(11, n, False), make_meta(11, 9, n))
            s2 = MemmapStore(path).verify(progress=False)
            assert not _diff(s2, _state(exp[0] + new[0], _concat_meta(exp[1], new[1])))
        _assert_clean(path)
        assert not _diff(s, exp), "a reader opened before the commit changed its view"
    finally:
        if p.poll() is None: p.kill(); p.wait()

APPEND = GEN_SRC + r'''
import json, sys
from fastai_memmap.write import write_memmap
job = json.loads(sys.argv[1])
write_memmap(job['path'], make_items(job['seed'], job['n'], False), meta=make_meta(job['seed'], job['start'], job['n']),
             mode='a', shard_size=60, progress=False)
'''

def test_reader_keeps_its_view_across_an_append(stores, tmp_path):
    "A reader opened before another process appends keeps the old commit, whole; a reader opened after sees the new one"
    path, exp = _copy(stores, 'fixed', tmp_path/'s.fmm')
    r1, r2 = MemmapStore(path), MemmapStore(path)
    r1[0]   # one shard mapped before the append, the rest after it
    r = subprocess.run([PY, '-c', APPEND, json.dumps(dict(path=str(path), seed=21, start=9, n=7))], capture_output=True,
                       text=True, env=_env(), timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    for old in (r1, r2):
        assert len(old) == 9 and not _diff(old, exp)
        old.verify(progress=False)
    new = MemmapStore(path)
    assert not _diff(new, _state(exp[0] + make_items(21, 7, False), _concat_meta(exp[1], make_meta(21, 9, 7))))

READER = r'''
import json, sys, time
import numpy as np
from fastai_memmap.store import MemmapStore
path, lengths = sys.argv[1], json.loads(sys.argv[2])
print('ready', flush=True)
seen, opens, t0 = set(), 0, time.monotonic()
while time.monotonic() - t0 < 60:
    s = MemmapStore(path)
    n = len(s)
    assert n in lengths, n
    x = s[:]
    assert x.shape == (n, 3) and (x == np.arange(n)[:, None] * 10 + np.arange(3)).all()
    assert (s.column('y') == np.arange(n)).all()
    s.verify(progress=False)
    seen.add(n); opens += 1
    if n == lengths[-1]: break
print(json.dumps(dict(seen=sorted(seen), opens=opens)))
'''

def test_readers_during_appends(tmp_path):
    "Readers in another process, opening the store again and again while it is appended to, only ever see whole commits"
    path = tmp_path/'s.fmm'
    rows = lambda a, b: np.arange(a, b)[:, None] * 10 + np.arange(3)
    write_memmap(path, rows(0, 5), meta={'y': np.arange(5)}, shard_size=48, progress=False)
    steps = [5 + 7 * k for k in range(13)]
    readers = [subprocess.Popen([PY, '-c', READER, str(path), json.dumps(steps)], stdout=PIPE, stderr=PIPE, text=True, env=_env())
               for _ in range(2)]
    try:
        for r in readers: assert r.stdout.readline().strip() == 'ready', r.stderr.read()
        for a, b in zip(steps[:-1], steps[1:]):
            write_memmap(path, rows(a, b), meta={'y': np.arange(a, b)}, mode='a', shard_size=48, progress=False)
            time.sleep(0.01)
        for r in readers:
            out, err = r.communicate(timeout=90)
            assert r.returncode == 0, err[-3000:]
            res = json.loads(out.strip().splitlines()[-1])
            assert res['seen'][-1] == steps[-1] and res['opens'] >= 1, res
    finally:
        for r in readers:
            if r.poll() is None: r.kill(); r.wait()
    _assert_clean(path)

# --- 8. the CLI

def _cli(*args):
    exe = Path(PY).with_name('fastai-memmap')
    cmd = [str(exe)] if exe.exists() else [PY, '-m', 'fastai_memmap.cli']
    return subprocess.run(cmd + [str(a) for a in args], capture_output=True, text=True, env=_env(), timeout=120)

def test_cli_verify_and_info(stores, tmp_path):
    "`fastai-memmap verify` exits 0 on a sound store and non-zero naming the damage otherwise; `info` exits 0"
    path, exp = _copy(stores, 'ragged', tmp_path/'s.fmm')
    r = _cli('verify', path)
    assert r.returncode == 0 and 'ok' in r.stdout and '9 items' in r.stdout, (r.stdout, r.stderr)
    r = _cli('info', path)
    assert r.returncode == 0 and '9 items' in r.stdout and 'ragged' in r.stdout, (r.stdout, r.stderr)
    f = _target(path, 'data')
    orig = f.read_bytes()
    b = bytearray(orig); b[-1] ^= 0x10; f.write_bytes(b)          # payload: checksum
    r = _cli('verify', path)
    assert r.returncode == 1 and f.name in r.stderr and 'checksum' in r.stderr and 'Traceback' not in r.stderr, r.stderr
    f.write_bytes(orig[:-1])                                       # truncated
    r = _cli('verify', path)
    assert r.returncode == 1 and f.name in r.stderr and 'truncated' in r.stderr, r.stderr
    r = _cli('info', path)
    assert r.returncode == 1 and f.name in r.stderr, r.stderr
    f.write_bytes(orig)
    (path/MANIFEST).write_text((path/MANIFEST).read_text()[:-5])  # manifest
    r = _cli('verify', path)
    assert r.returncode == 1 and 'manifest.json' in r.stderr and 'not valid JSON' in r.stderr, r.stderr
    r = _cli('verify', tmp_path/'missing.fmm')
    assert r.returncode == 2 and 'no fastai_memmap store' in r.stderr, r.stderr

# --- counts

def test_zz_counts(request):
    "Report what was tried (visible in the warnings summary); a full run of this file tries at least 50 kill points"
    kills = sum(v for k, v in COUNTS.items() if k.startswith('kill points ('))
    msg = ', '.join(f'{k}: {v}' for k, v in sorted(COUNTS.items())) + f'; kill points in all: {kills}'
    warnings.warn(f"durability counts: {msg}")
    ran = {i.name for i in request.session.items}
    if any(n.startswith('test_kill_') and 'kills' in n for n in ran) and not request.config.getoption('-k'):
        slow = any(n.startswith('test_kill_') and '20kills' in n for n in ran)
        assert kills >= (50 if slow else 12), msg
