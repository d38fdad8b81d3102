"""The defects of issue "Trust, round two", each with the test that found it (named after its number there), and
the guarantees they break: reads from threads, descriptors, commits, user files, exact metadata.

Real files, real threads and real processes; nothing is mocked."""
import os, subprocess, sys, textwrap
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
    for i in range(1, 600): write_memmap(p, np.full((1, 3), i, np.int32), meta={'k': [i]}, mode='a', progress=False)
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
