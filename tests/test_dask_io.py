"""`write_dask` / `write_memmap` with Dask collections, on a real `dask.distributed.LocalCluster` of two worker
processes: contents, metadata and order against the source, one shard per partition written by the workers,
modes x/w/a, all-or-nothing failures, the writer lock, and `MemmapStore.to_dask()` round trips."""
import json, logging, re
from pathlib import Path
import numpy as np, pandas as pd, pytest
import dask, dask.array as da, dask.bag as db
from distributed import LocalCluster, Client, get_task_stream

from fastai_memmap.errors import *
from fastai_memmap.format import MANIFEST, manifest_files
from fastai_memmap.store import MemmapStore
from fastai_memmap.write import write_memmap, MemmapWriter
from fastai_memmap.dask_io import write_dask

NAME = re.compile(r'^(data|index|meta)-([0-9a-z]{1,32})-([0-9]{5})\.npy$')


@pytest.fixture(scope='module')
def client():
    with LocalCluster(n_workers=2, processes=True, threads_per_worker=1, dashboard_address=None,
                      silence_logs=logging.CRITICAL) as cluster, Client(cluster) as c:
        yield c


def ident(n, item_shape=(3, 4), chunks=100, dtype=np.float32):
    "A Dask array whose item i holds i*1000 + 0, 1, 2, ... (each item says which it is), and its numpy twin"
    k = int(np.prod(item_shape))
    X = (np.arange(n)[:, None] * 1000 + np.arange(k)).astype(dtype).reshape(n, *item_shape)
    return da.from_array(X, chunks=(chunks, *item_shape)), X


def files(path):
    return {p.name for p in Path(path).iterdir()}


def committed(store):
    return {e['file'] for e in manifest_files(store.manifest)} | {MANIFEST, '.lock'}


def meta_for(n):
    return dict(label=np.array(['a', 'bb', 'ccc'])[np.arange(n) % 3], num=np.arange(n) * 10, x=np.linspace(0, 1, n),
                flag=np.arange(n) % 2 == 0)


def test_array_contents_meta_order_and_shards(tmp_path, client):
    D, X = ident(1000, chunks=137)
    meta = meta_for(1000)
    with get_task_stream(client) as ts:
        s = write_memmap(tmp_path/'a.fmm', D, meta=meta, progress=False)
    np.testing.assert_array_equal(s[:], X)
    np.testing.assert_array_equal(s[[999, 0, 500]], X[[999, 0, 500]])
    for c, v in meta.items(): np.testing.assert_array_equal(s.column(c), v)
    assert s.meta_columns == list(meta)
    # one shard per chunk, in order, named {kind}-{token}-{number:05d}.npy under one token, numbered by partition
    assert [sh['length'] for sh in s.manifest['shards']] == list(D.chunks[0])
    names = [NAME.match(sh[k]['file']) for sh in s.manifest['shards'] for k in ('data', 'meta')]
    assert all(names) and len({m.group(2) for m in names}) == 1
    assert [int(NAME.match(sh['data']['file']).group(3)) for sh in s.manifest['shards']] == list(range(len(D.chunks[0])))
    assert files(s.path) == committed(s)
    s.verify(progress=False)
    # the shards were written by the tasks on the cluster's worker processes, each partition once
    writes = [t for t in ts.data if str(t['key']).startswith('fmm-write-')]
    assert len(writes) == len(D.chunks[0])
    assert {t['worker'] for t in writes} <= set(client.scheduler_info()['workers'])


def test_writes_run_in_parallel_on_both_workers(tmp_path, client):
    D = da.random.default_rng(1).random((16 * 2000, 64), chunks=(2000, 64))
    with get_task_stream(client) as ts:
        s = write_memmap(tmp_path/'p.fmm', D, progress=False)
    np.testing.assert_array_equal(s[:], D.compute())
    workers = {t['worker'] for t in ts.data if str(t['key']).startswith('fmm-write-')}
    assert len(workers) == 2, workers


def test_to_dask_round_trip(tmp_path, client):
    D, X = ident(700, chunks=(250, 250, 200))
    s = write_dask(tmp_path/'a.fmm', D, meta={'i': np.arange(700)}, progress=False)
    Z = s.to_dask()
    assert Z.chunks == D.chunks
    np.testing.assert_array_equal(Z.compute(), X)
    # a store read back through dask (by the workers) and written again: same items, same shards, same metadata
    s2 = write_memmap(tmp_path/'b.fmm', Z, meta=s.meta, progress=False)
    np.testing.assert_array_equal(s2[:], X)
    assert [sh['length'] for sh in s2.manifest['shards']] == [250, 250, 200]
    pd.testing.assert_frame_equal(s2.meta, s.meta)
    # a computation on the store's dask view, written with conversion
    s3 = write_memmap(tmp_path/'c.fmm', Z[::2] + 1, dtype='float64', progress=False)
    assert s3.dtype == np.float64
    np.testing.assert_array_equal(s3[:], X[::2] + 1)
    np.testing.assert_array_equal(s3.to_dask(chunk_items=100).compute(), X[::2] + 1)


def test_array_chunked_in_other_axes_and_dask_meta_columns(tmp_path, client):
    D, X = ident(300, item_shape=(6, 8), chunks=80)
    D = D.rechunk((80, 3, 4))   # chunked along the item axes too: rechunked to whole items
    lab = da.from_array(np.arange(300) % 7, chunks=50)   # chunked differently from the data
    s = write_memmap(tmp_path/'a.fmm', D, meta={'lab': lab, 'sq': np.arange(300) ** 2}, progress=False)
    np.testing.assert_array_equal(s[:], X)
    np.testing.assert_array_equal(s.column('lab'), np.arange(300) % 7)
    np.testing.assert_array_equal(s.column('sq'), np.arange(300) ** 2)
    assert s.n_shards == 4


def test_bag_items_with_metadata_in_order(tmp_path, client):
    def load(i): return np.full((2, 3), i, np.int16), {'name': f'item{i:03d}', 'i': i, 'half': i / 2}
    b = db.from_sequence(range(203), npartitions=7).map(load)
    s = write_memmap(tmp_path/'b.fmm', b, progress=False)
    assert len(s) == 203 and s.n_shards == 7 and s.item_shape == (2, 3) and s.dtype == np.int16
    np.testing.assert_array_equal(s[:][:, 0, 0], np.arange(203))
    assert s.meta_columns == ['half', 'i', 'name']   # element columns are stored in sorted order
    assert s.meta['name'].tolist() == [f'item{i:03d}' for i in range(203)]
    np.testing.assert_array_equal(s.column('i'), np.arange(203))
    np.testing.assert_array_equal(s.column('half'), np.arange(203) / 2)


def test_ragged_bag_and_empty_partitions(tmp_path, client):
    items = [np.arange(i % 6 + 1, dtype=np.float64).reshape(1, -1) + i for i in range(40)]
    b = db.from_sequence(items, npartitions=5).filter(lambda a: not (8 <= a[0, 0] < 16))   # partition 1 left empty
    s = write_memmap(tmp_path/'r.fmm', b, ragged=True, progress=False)
    keep = [a for a in items if not (8 <= a[0, 0] < 16)]
    assert s.ragged and len(s) == len(keep) and s.n_shards == 4
    for i, a in enumerate(keep): np.testing.assert_array_equal(s[i], a)
    numbers = [int(NAME.match(sh['data']['file']).group(3)) for sh in s.manifest['shards']]
    assert numbers == [0, 2, 3, 4]   # shard numbers are partition numbers; the empty partition wrote nothing
    assert files(s.path) == committed(s)
    s.verify(progress=False)


def test_modes(tmp_path, client):
    D, X = ident(400, chunks=100)
    p = tmp_path/'m.fmm'
    s = write_memmap(p, D, meta={'i': np.arange(400)}, progress=False)
    old = files(p)
    with pytest.raises(StoreExistsError): write_memmap(p, D, meta={'i': np.arange(400)}, progress=False)
    assert files(p) == old
    s = write_memmap(p, D[:150] + 0.5, meta={'i': np.arange(150) + 400}, mode='a', progress=False)
    assert len(s) == 550 and s.n_shards == 6
    np.testing.assert_array_equal(s[:], np.concatenate([X, X[:150] + 0.5]))
    np.testing.assert_array_equal(s.column('i'), np.arange(550))
    with pytest.raises(IncompatibleDataError, match='item shape'):
        write_memmap(p, da.zeros((10, 3, 5), chunks=5), meta={'i': np.arange(10)}, mode='a', progress=False)
    with pytest.raises(MetadataError, match='same columns'):
        write_memmap(p, D[:10], meta={'j': np.arange(10)}, mode='a', progress=False)
    assert len(MemmapStore(p)) == 550
    s = write_memmap(p, D[:50] * 2, mode='w', progress=False)   # replace: the old files go
    np.testing.assert_array_equal(s[:], X[:50] * 2)
    assert s.meta_columns == [] and files(p) == committed(s)
    # appending items of a bag to an array store converts them (same kind) to the store's dtype
    s = write_memmap(p, db.from_sequence([np.ones((3, 4), np.float16)] * 5, npartitions=2), mode='a', progress=False)
    assert s.dtype == np.float32 and len(s) == 55
    np.testing.assert_array_equal(s[50:], np.ones((5, 3, 4)))


def _boom(b):
    if b.reshape(len(b), -1)[0, 0] >= 300 * 1000: raise OSError('disk on fire')
    return b


@pytest.mark.parametrize('mode', ['w', 'a'])
def test_failing_partition_leaves_previous_commit(tmp_path, client, mode):
    D, X = ident(400, chunks=100)
    p = tmp_path/'f.fmm'
    s = write_memmap(p, D, meta={'i': np.arange(400)}, progress=False)
    before, manifest = files(p), (p/MANIFEST).read_bytes()
    with pytest.raises(OSError, match='disk on fire'):
        write_memmap(p, D.map_blocks(_boom), meta={'i': np.arange(400)}, mode=mode, progress=False)
    assert (p/MANIFEST).read_bytes() == manifest and files(p) == before   # the other partitions' files were removed
    np.testing.assert_array_equal(MemmapStore(p)[:], X)
    # a failure inside the write task itself (a bad metadata partition) too
    with pytest.raises(MetadataError, match='partition'):
        write_memmap(p, db.from_sequence([(np.zeros((3, 4), np.float32), {'i': 1})] * 4 + [(np.zeros((3, 4), np.float32), {'j': 1})],
                                         npartitions=5), mode=mode, progress=False)
    assert files(p) == before
    # and the lock was released: the next write goes through
    assert len(write_memmap(p, D[:10], meta={'i': np.arange(10)}, mode='a', progress=False)) == 410


def test_failing_new_store_leaves_nothing(tmp_path, client):
    D, _ = ident(400, chunks=100)
    with pytest.raises(OSError, match='disk on fire'): write_memmap(tmp_path/'n.fmm', D.map_blocks(_boom), progress=False)
    assert not (tmp_path/'n.fmm').exists()
    mixed = db.from_sequence([np.zeros(3, np.float32)] * 2 + [np.zeros(3, np.int64)] * 2, npartitions=2)
    with pytest.raises(IncompatibleDataError, match='pass dtype='): write_memmap(tmp_path/'n.fmm', mixed, progress=False)
    assert not (tmp_path/'n.fmm').exists()
    with pytest.raises(IncompatibleDataError, match='ragged=True'):
        write_memmap(tmp_path/'n.fmm', db.from_sequence([np.zeros(3)] * 2 + [np.zeros(4)] * 2, npartitions=2), progress=False)
    assert not (tmp_path/'n.fmm').exists()


def test_lock_and_bad_input(tmp_path, client):
    D, _ = ident(100, chunks=50)
    p = tmp_path/'l.fmm'
    write_memmap(p, D, progress=False)
    with MemmapWriter(p, 'a') as w:   # another writer holds the store
        with pytest.raises(StoreLockedError): write_memmap(p, D, mode='a', progress=False)
        w.add(np.zeros((3, 4), np.float32))
    assert len(MemmapStore(p)) == 101
    with pytest.raises(MetadataError, match='100 items'): write_memmap(tmp_path/'x.fmm', D, meta={'a': [1, 2]})
    with pytest.raises(IncompatibleDataError, match='numeric or bool'): write_memmap(tmp_path/'x.fmm', da.from_array(np.array(['a', 'b'])))
    with pytest.raises(IncompatibleDataError, match='without loss'): write_memmap(tmp_path/'x.fmm', D, dtype='int8')
    with pytest.raises(MetadataError, match="bag's metadata"): write_memmap(tmp_path/'x.fmm', db.from_sequence([np.zeros(2)]), meta={'a': [1]})
    with pytest.raises(MetadataError, match='unknown'): write_memmap(tmp_path/'x.fmm', D[D[:, 0, 0] > 5], meta={'a': np.arange(94)})
    with pytest.raises(ValueError, match='one shard per partition'): write_memmap(tmp_path/'x.fmm', D, shard_size=10)
    with pytest.raises(ValueError, match='bag.map'): write_memmap(tmp_path/'x.fmm', db.from_sequence([1]), read_fn=np.zeros)
    with pytest.raises(IncompatibleDataError, match='Dask array or bag'): write_dask(tmp_path/'x.fmm', dask.delayed(np.zeros)(3))
    assert not (tmp_path/'x.fmm').exists()
    # unknown chunk sizes are fine without in-memory metadata
    s = write_memmap(tmp_path/'u.fmm', D[D[:, 0, 0] >= 5000], progress=False)
    np.testing.assert_array_equal(s[:, 0, 0], np.arange(5, 100) * 1000)


def test_dask_dataframe_metadata(tmp_path, client):
    dd = pytest.importorskip('dask.dataframe')
    D, X = ident(300, chunks=100)
    df = pd.DataFrame({'label': np.array(['a', 'b', 'c'])[np.arange(300) % 3], 'y': np.arange(300) % 3})
    ddf = dd.from_pandas(df, npartitions=1).repartition(divisions=[0, 100, 200, 299])
    s = write_memmap(tmp_path/'d.fmm', D, meta=ddf, progress=False)
    assert s.meta['label'].tolist() == df['label'].tolist() and s.column('y').tolist() == df['y'].tolist()
    s = write_memmap(tmp_path/'e.fmm', D, meta=ddf['y'], progress=False)
    assert s.meta_columns == ['y']
    with pytest.raises(MetadataError, match='partitions'): write_memmap(tmp_path/'f.fmm', D, meta=dd.from_pandas(df, npartitions=2))
    with pytest.raises(MetadataError, match='partition the metadata'):
        write_memmap(tmp_path/'f.fmm', D, meta=dd.from_pandas(df, npartitions=1).repartition(divisions=[0, 150, 200, 299]), progress=False)
    assert not (tmp_path/'f.fmm').exists()
    b = db.from_sequence(list(X), npartitions=3)   # a bag with a DataFrame partitioned like it
    s = write_memmap(tmp_path/'g.fmm', b, meta=ddf, progress=False)
    np.testing.assert_array_equal(s[:], X)
    assert s.meta['label'].tolist() == df['label'].tolist()


def test_without_distributed_client(tmp_path, client):
    D, X = ident(250, chunks=100)
    with get_task_stream(client) as ts:
        s = write_dask(tmp_path/'a.fmm', D, meta={'i': np.arange(250)}, client=False, progress=False)
    assert not ts.data   # written here, partition by partition, not on the cluster
    np.testing.assert_array_equal(s[:], X)
    assert s.n_shards == 3


def test_task_retry_and_unshared_filesystem(tmp_path):
    "A retried task overwrites what its dead attempt left; a worker that cannot see the store fails clearly"
    from fastai_memmap.dask_io import _write_partition
    spec = dict(array=True, dtype='<f4', item_shape=(2,), item_ndim=1, ragged=False, meta_names=['i'])
    p = tmp_path/'t.fmm'
    with MemmapWriter(p, 'x') as w:
        (p/f'data-{w.token}-00003.npy').write_bytes(b'half a file from an attempt that died')
        r = _write_partition(np.ones((5, 2), np.float32), {'i': np.arange(5)}, str(p), w.token, 3, spec)
        assert r['rec']['length'] == 5 and r['rec']['data']['file'] == f'data-{w.token}-00003.npy'
        w.add(np.zeros(2, np.float32), i=0)
    with pytest.raises(StoreNotFoundError, match='shared'):
        _write_partition(np.ones((5, 2), np.float32), None, str(tmp_path/'elsewhere'), 'abc', 0, spec)
