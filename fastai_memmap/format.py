"""The on-disk layout of a fastai_memmap store, specified here and implemented below: manifest, shards, validation.

## Specification (format version 1)

A **store** is a directory, by convention named `*.fmm`. Everything in it can be read with numpy alone: parse
`manifest.json`, then `np.load(file, mmap_mode='r')` the shard files it names. The sections below are the whole
format (they are also this module's docstring); the code after them implements and checks it.

### Layout

- `manifest.json`: the manifest, the **commit point** (next section);
- the **shard files**, standard `.npy` files named `(data|index|meta)-<token>-<n>.npy`: each shard has a `data`
  file, an `index` file if the store is ragged, and a `meta` file if the store has metadata columns;
- `manifest.json.tmp`: a manifest being committed (one left by a crash is removed by the next writer);
- `.lock`: the writers' lock file (`fcntl.flock`; a lock dies with its process). Readers take no lock.

Any other file in the directory is not part of the store: readers ignore it and writers never remove it (see
*File names*).

### The manifest

`manifest.json` is a UTF-8 JSON object with the keys:

- `format`: the string `"fastai_memmap"`; `version`: the integer format version, `1` for this document (a reader
  refuses any other version with a `FormatVersionError`);
- `dtype`: the numpy dtype string of the items (`"<f4"`, `"|u1"`, `"|b1"`, ...; see *Dtypes*);
- `item_ndim`: the number of dimensions of every item;
- `item_shape`: the list of extents shared by every item, or `null` for a **ragged** store (every item has
  `item_ndim` dimensions, of any extents);
- `length`: the number of items, which equals the sum of the shards' lengths;
- `meta`: the metadata columns, a list of `[name, dtype]` pairs in column order (names distinct);
- `shards`: the shard records, in item order. A record has exactly the keys `length` (its number of items) and
  one file entry per file of the shard: `data`, `index` (ragged stores only) and `meta` (stores with metadata
  columns only). A file entry is `{"file": name, "bytes": size of the file, "crc32": CRC-32 of the file's
  bytes after its .npy header}`, and no file is named twice;
- `retired` (optional): a list of `{"file": name, "until": unix time}`, files that an earlier commit used and this
  one does not (a compaction replaced them). They stay on disk until `until`, so that readers that opened an
  earlier commit can still map them; the first write after that time removes them. No shard record names a
  retired file. Readers ignore this key.

### Shard files

Every shard file is a standard `.npy` file (format version 1.0 or 2.0, C order, never an object dtype), so
`np.load(file, mmap_mode='r')` opens it with no code of ours. For a shard of `length` items:

- `data`: for a fixed-shape store, an array of shape `(length, *item_shape)` of the store's `dtype`; for a ragged
  store, a 1-D array of the store's `dtype` holding every item's elements, each flattened in C order,
  concatenated in item order;
- `index` (ragged only): an `int64` array of shape `(length, 1 + item_ndim)`: per item, the offset of its first
  element in the data file, then its shape;
- `meta`: a structured array of shape `(length,)` with one field per metadata column, named and ordered as the
  manifest's `meta` lists them (each field's dtype: see *Dtypes*).

A file's size is exactly its header plus its array's bytes: its entry's `bytes`. Writers write version 1.0
headers and little-endian arrays; a shard is streamed before its length is known, so its header is reserved
(padded with spaces to a multiple of 64 bytes) and rewritten, to the same size, when the shard is closed.

**File names** are plain names inside the store directory (no separators, no `..`) of the form
`(data|index|meta)-<token>-<n>.npy`: the kind of file; a token of 1 to 32 characters `[0-9a-z]`, unique to the
write that created the file; and a number `n` of 5 to 9 decimal digits (the shard's number within that write).
A manifest that names any other file is refused. Writers make tokens of 12 to 32 hexadecimal digits, and remove
only files named so that no manifest needs: a `data-train.npy` of yours in the directory is never touched.

### Dtypes

**Items** may have any numeric or bool dtype: numpy kinds `b`, `i`, `u`, `f` and `c` (bool, signed and unsigned
integers, floats, complex), with no fields or sub-arrays. Strings, bytes, datetimes, Python objects, structured
and void dtypes are refused: they would need pickles or lose meaning. Writers store items little-endian (what
torch needs), converting big-endian input.

**Metadata columns** may also hold unicode strings (kind `U`), datetimes (`M`) and timedeltas (`m`), never Python
objects, bytes or structured values. Column names are non-empty printable strings of Latin-1 characters (a
`meta` file keeps them in its `.npy` header, which is Latin-1). A column keeps one kind of value for the life of
the store: integers (signed and unsigned alike), bools, floats, complex numbers, strings, datetimes or
timedeltas.

A field of a shard's `meta` file may have a narrower dtype than its column in the manifest (the shard came from a
write whose values were smaller, whose strings were shorter, whose dates were in days), but it is native-endian
and casts safely to the column's dtype (`np.can_cast(field, column, 'safe')`), so that concatenating the shards'
fields gives the column, value for value.

**Merges are exact.** When a write brings a column's values in another dtype (an append, `combine_stores`, items
read in different dtypes), the column's new dtype holds every value, committed and new, exactly: numpy's
promotion when it does, else the committed dtype, one of the new values' dtypes or (for integers) `int64` or
`uint64`, checked value by value.
`int64` with `uint64` is never promoted to `float64` (which rounds values above 2**53), and datetime units are
never assumed to widen (`datetime64[ns]` holds only the years 1678 to 2262). Committed files never change, so
their fields must cast safely to the new dtype; the write's own files are rewritten in it when needed. When no
dtype holds every value, nothing is committed (`MetadataError`).

### Limits

A manifest outside these limits is refused as damaged (`CorruptStoreError`) before anything is allocated:

- `item_ndim` is at most 32 (numpy's own limit is 64);
- `length`, each shard's `length`, and an item's size in bytes (the product of `item_shape` and the dtype's item
  size) are at most 2**48;
- `bytes` and `crc32` are integers from 0 to 2**63 - 1;
- `manifest.json` is at most 256 MiB (about 750,000 shard records), holds at most one JSON object or list per
  16 bytes (plus 64), and is nested less deeply than Python's recursion limit.

The header of a `.npy` shard file is at most 65,535 bytes of text when written (the limit of the 1.0 format:
a write whose metadata columns need more is refused), and readers parse headers of up to 65,536 bytes. A `meta`
file of several hundred columns has a header longer than numpy's default limit of 10,000 bytes: pass
`max_header_size=65536` to `np.load` to open it.

### Commits

A writer takes the lock, writes and fsyncs new shard files under fresh names, then writes the new manifest to
`manifest.json.tmp`, fsyncs it, renames it over `manifest.json` and fsyncs the directory. Readers only ever follow
the manifest, so they see the old commit or the new one, never a mix. Once the new manifest has been renamed into
place, nothing deletes a file it names. Appending adds shards and never changes an existing file; a compaction
writes merged shards and lists the files they replace under `retired`. Files that no manifest names or retains
(left by a crashed or replaced write) are removed by the next writer. Nothing in a store is ever unpickled.

### Sparse stores

A sparse store is a directory that holds two ragged stores (as specified above) and a small JSON file:

- `sparse.json`, the commit point: a UTF-8 JSON object of at most 1 MiB with exactly the keys `format`
  (`"fastai_memmap.sparse"`), `version` (`1`), `item_shape` (the dense shape of an item: 1 to 32 positive
  extents), `dtype` (of the values, or of dense reads of a binary store), `index_dtype` (`"<i4"`, or `"<i8"`
  when an item has more than 2**31 positions), `length` (the number of items), `nnz` (the number of non-zeros in
  all), `indices` and `values` (the sub-store directory names; `values` is `null` for binary items);
- `indices-<token>/`: a ragged store of 1-D `index_dtype` items. Item `i` is the sorted, distinct flat positions
  (C order in `item_shape`) of item `i`'s non-zeros, and the store's metadata columns are the sparse store's.
  Its data shards are the concatenated column indices of CSR, and its index's `(offset, length)` per item is
  CSR's row pointer;
- `values-<token>/` (absent for binary items, whose every stored position reads as 1): a ragged store of 1-D
  `dtype` items with the same lengths and the same shard boundaries: the values at those positions.

Sub-store names are `indices-` or `values-` and a token of 1 to 32 hexadecimal digits (writers make 12, and
remove only such names that `sparse.json` does not name). `sparse.json` is committed as a manifest is
(temporary file, fsync, rename, directory fsync), only after both sub-stores are committed; a replace writes new
sub-stores under a fresh token, so readers see the old sparse store or the new one, never a mix.

Docs: https://fastai-memmap.github.io/fastai_memmap/format.html.md"""

# AUTOGENERATED! DO NOT EDIT! File to edit: ../nbs/01_format.ipynb.

# %% auto #0
__all__ = ['FORMAT_NAME', 'FORMAT_VERSION', 'MANIFEST', 'check_dtype', 'check_meta_dtype', 'npy_header', 'read_npy_header',
           'shard_name', 'crc32_file', 'fsync_dir', 'local_path', 'validate_manifest', 'parse_json', 'read_manifest',
           'write_new', 'commit_file', 'write_manifest', 'manifest_files', 'retired_files']

# %% ../nbs/01_format.ipynb #bb2f522c
import io, json, math, os, re, stat, struct, threading, time, tokenize, zlib
from urllib.parse import urlparse, unquote
from pathlib import Path
import numpy as np
from .errors import *

# %% ../nbs/01_format.ipynb #c66f92de
FORMAT_NAME = 'fastai_memmap'
FORMAT_VERSION = 1
MANIFEST = 'manifest.json'

# %% ../nbs/01_format.ipynb #60546d40
_MAX_ITEMS = 2**48      # a bound no real store reaches: manifests claiming more are rejected
_MAX_NDIM = 32          # numpy's own limit is 64; 32 leaves room and catches nonsense
_MAX_MANIFEST = 256 << 20   # bytes: ~750k shard records, far beyond any store (compact one that nears it)
_BYTES_PER_NODE = 16        # each object or list of a manifest takes at least this many bytes of its JSON

# %% ../nbs/01_format.ipynb #ba707f54
def check_dtype(dtype, what='data') -> np.dtype:
    "Return `dtype` as a `np.dtype` if items can be stored with it, else raise `IncompatibleDataError`"
    dt = np.dtype(dtype)
    if dt.kind not in 'biufc' or dt.fields is not None or dt.subdtype is not None:
        raise IncompatibleDataError(
            f"{what} has dtype {dt!r}, which a memmap store cannot hold: use a numeric or bool dtype "
            f"(float16/32/64, int8..int64, uint8..uint64, complex, bool). Convert strings or objects to numbers first.")
    return dt

# %% ../nbs/01_format.ipynb #ac76f450
def check_meta_dtype(dtype, name) -> np.dtype:
    "Return `dtype` if metadata column `name` can be stored with it, else raise `MetadataError`"
    dt = np.dtype(dtype)
    if dt.kind not in 'biufcUMm' or dt.fields is not None or dt.subdtype is not None:
        raise MetadataError(f"metadata column {name!r} has dtype {dt!r}: columns must be numeric, bool, datetime or "
                            f"unicode strings (convert other objects to str or numbers first).")
    return dt

# %% ../nbs/01_format.ipynb #a73bc343
def npy_header(dtype, shape, size:int=None) -> bytes:
    "A .npy 1.0 header for a C-order array of `dtype` and `shape`, padded with spaces to `size` bytes if given"
    d = {'descr': np.lib.format.dtype_to_descr(np.dtype(dtype)), 'fortran_order': False, 'shape': tuple(int(s) for s in shape)}
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, d)
    h = buf.getvalue()
    if size is None or size == len(h): return h
    if size < len(h) or size > 65535 + 10: raise ValueError(f"a header of {len(h)} bytes cannot be padded to {size}")
    body = h[10:-1] + b' ' * (size - len(h)) + b'\n'
    return h[:8] + struct.pack('<H', len(body)) + body

# %% ../nbs/01_format.ipynb #5a1e0c12
_ast_lock = threading.Lock()   # held around every `ast` parse of a .npy header in this package

# %% ../nbs/01_format.ipynb #0f801787
def read_npy_header(f) -> tuple:
    "Read the header of an open .npy file: `(shape, dtype, header_size)`. Refuses Fortran order and object dtypes."
    version = np.lib.format.read_magic(f)
    if version not in ((1, 0), (2, 0)): raise ValueError(f"unsupported .npy version {version}")
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    try:
        with _ast_lock: shape, fortran, dtype = read(f, max_header_size=65536)
    except (SyntaxError, tokenize.TokenError, TypeError) as e: raise ValueError(f"unreadable .npy header ({type(e).__name__}: {e})") from None
    if fortran: raise ValueError("the array is stored in Fortran order")
    if dtype.hasobject: raise ValueError("the array holds Python objects")
    return shape, dtype, f.tell()

# %% ../nbs/01_format.ipynb #2b403f4f
_NAME_RE = re.compile(r'^(data|index|meta)-[0-9a-z]{1,32}-[0-9]{5,9}\.npy$')

def shard_name(kind:str, token:str, n:int) -> str:
    "The file name of shard `n`'s `kind` file (`data`, `index` or `meta`) written by the write `token`"
    return f'{kind}-{token}-{n:05d}.npy'

# %% ../nbs/01_format.ipynb #2b183b4b
def crc32_file(path, offset:int=0, bufsize:int=1<<22) -> int:
    "CRC-32 of the bytes of `path` from `offset` on"
    crc = 0
    with open(path, 'rb', buffering=0) as f:
        f.seek(offset)
        buf = bytearray(bufsize); mv = memoryview(buf)
        while n := f.readinto(buf): crc = zlib.crc32(mv[:n], crc)
    return crc

# %% ../nbs/01_format.ipynb #1c85e662
def fsync_dir(path):
    "fsync the directory `path`, so that renames and new files in it are durable"
    fd = os.open(path, os.O_RDONLY)
    try: os.fsync(fd)
    finally: os.close(fd)

# %% ../nbs/01_format.ipynb #5d0e3b71
def local_path(path) -> Path:
    "`path` as a local `Path`; a `file://` URL gives its path, any other URL raises `StoreNotFoundError`"
    if isinstance(path, str) and '://' in path:
        u = urlparse(path)
        if u.scheme != 'file':
            raise StoreNotFoundError(f"{path} is a URL: `import fastai_memmap.remote` (or fastai_memmap.all) to use remote stores")
        if u.netloc not in ('', 'localhost'):
            raise StoreNotFoundError(f"{path} names a file on host {u.netloc!r}: mount it and give a local path")
        return Path(unquote(u.path))
    return Path(path)

# %% ../nbs/01_format.ipynb #b3f47a4a
def _bad(path, msg): return CorruptStoreError(f"{path}: {msg}. The store's manifest is damaged; restore it from a copy "
                                             f"or rewrite the store.")

def _check_file_entry(e, path, where):
    if not isinstance(e, dict) or set(e) != {'file', 'bytes', 'crc32'}: raise _bad(path, f"{where} must be an object with keys file, bytes, crc32")
    if not isinstance(e['file'], str) or not _NAME_RE.match(e['file']): raise _bad(path, f"{where} names the file {e['file']!r}, which is not a shard file name inside the store")
    for k in 'bytes', 'crc32':
        if type(e[k]) is not int or e[k] < 0 or e[k] >= 2**63: raise _bad(path, f"{where} has an invalid {k} {e[k]!r}")

# %% ../nbs/01_format.ipynb #ee77c2c9
def validate_manifest(m, path='manifest') -> dict:
    "Check manifest `m` (a parsed JSON object); return it or raise a specific `StoreError`"
    if not isinstance(m, dict) or m.get('format') != FORMAT_NAME: raise _bad(path, f"it is not a {FORMAT_NAME} manifest")
    v = m.get('version')
    if type(v) is not int: raise _bad(path, "its format version is missing")
    if v != FORMAT_VERSION:
        raise FormatVersionError(f"{path}: the store has format version {v}, this library reads version {FORMAT_VERSION}. "
                                 f"Upgrade fastai_memmap to read it.")
    need = {'format', 'version', 'dtype', 'item_ndim', 'item_shape', 'length', 'meta', 'shards'}
    if missing := need - set(m): raise _bad(path, f"it lacks the keys {sorted(missing)}")
    try: check_dtype(m['dtype'])
    except (TypeError, ValueError, SyntaxError) as e: raise _bad(path, f"its dtype {m['dtype']!r} is not valid ({e})") from None
    nd, shp, n = m['item_ndim'], m['item_shape'], m['length']
    if type(nd) is not int or not 0 <= nd <= _MAX_NDIM: raise _bad(path, f"item_ndim {nd!r} is not valid")
    if shp is not None:
        if not isinstance(shp, list) or len(shp) != nd or any(type(s) is not int or s < 0 for s in shp):
            raise _bad(path, f"item_shape {shp!r} does not match item_ndim {nd}")
        if math.prod(shp) * np.dtype(m['dtype']).itemsize > _MAX_ITEMS:
            raise _bad(path, f"item_shape {shp!r} makes items larger than any store holds")
    if type(n) is not int or not 0 <= n <= _MAX_ITEMS: raise _bad(path, f"length {n!r} is not valid")
    meta = m['meta']
    if not isinstance(meta, list) or not all(isinstance(c, list) and len(c) == 2 and all(isinstance(s, str) for s in c) for c in meta):
        raise _bad(path, "meta must be a list of [name, dtype] pairs")
    if len({c[0] for c in meta}) != len(meta): raise _bad(path, "meta names a column twice")
    for name, dt in meta:
        try: check_meta_dtype(dt, name)
        except (TypeError, ValueError, SyntaxError) as e: raise _bad(path, f"metadata column {name!r} has an invalid dtype ({e})") from None
    shards = m['shards']
    if not isinstance(shards, list): raise _bad(path, "shards must be a list")
    total, seen = 0, set()
    kinds = {'length', 'data'} | ({'index'} if shp is None else set()) | ({'meta'} if meta else set())
    for i, s in enumerate(shards):
        if not isinstance(s, dict) or set(s) != kinds: raise _bad(path, f"shard {i} must have exactly the keys {sorted(kinds)}")
        if type(s['length']) is not int or not 0 <= s['length'] <= _MAX_ITEMS: raise _bad(path, f"shard {i} has an invalid length")
        total += s['length']
        for k in kinds - {'length'}:
            _check_file_entry(s[k], path, f"shard {i}'s {k} entry")
            if s[k]['file'] in seen: raise _bad(path, f"the file {s[k]['file']} is used twice")
            seen.add(s[k]['file'])
    if total != n: raise _bad(path, f"its shards hold {total} items but its length is {n}")
    ret = m.get('retired', [])
    if not isinstance(ret, list) or not all(isinstance(r, dict) and set(r) == {'file', 'until'} and isinstance(r['file'], str)
                                            and _NAME_RE.match(r['file']) and r['file'] not in seen and type(r['until']) in (int, float)
                                            and math.isfinite(r['until']) for r in ret):
        raise _bad(path, "retired must be a list of {file, until} objects naming shard files the shards do not use")
    return m

# %% ../nbs/01_format.ipynb #9634a842
_STRING_RE = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')

def parse_json(raw:bytes, where, limit:int=_MAX_MANIFEST, bad=None):
    "Parse the JSON document `raw` (the file `where`) within bounds: at most `limit` bytes, no more objects and lists than its size holds"
    bad = bad or _bad
    if len(raw) > limit: raise bad(where, f"it is {len(raw):,} bytes, more than any manifest needs ({limit:,})")
    s = _STRING_RE.sub(b'""', raw)   # brackets inside strings do not count
    if (nodes := s.count(b'{') + s.count(b'[')) > len(raw) // _BYTES_PER_NODE + 64:
        raise bad(where, f"it holds {nodes:,} JSON objects and lists in {len(raw):,} bytes, far more than a manifest of that size has")
    try: return json.loads(raw)
    except RecursionError: raise bad(where, "it is nested deeper than any manifest") from None
    except (ValueError, UnicodeDecodeError) as e: raise bad(where, f"it is not valid JSON ({e})") from None

# %% ../nbs/01_format.ipynb #037c5808
def read_manifest(path) -> dict:
    "Read and validate the manifest of the store at directory `path`"
    path = Path(path)
    f = path/MANIFEST
    try: st = f.stat()
    except FileNotFoundError:
        raise StoreNotFoundError(f"no fastai_memmap store at {path} (no {MANIFEST}): create one with write_memmap") from None
    except NotADirectoryError:
        raise StoreNotFoundError(f"{path} is a file, not a store directory") from None
    if not stat.S_ISREG(st.st_mode): raise _bad(f, "it is not a regular file")
    if st.st_size > _MAX_MANIFEST: raise _bad(f, f"it is {st.st_size:,} bytes, more than any manifest needs ({_MAX_MANIFEST:,})")
    return validate_manifest(parse_json(f.read_bytes(), f), f)

# %% ../nbs/01_format.ipynb #92b47147
def write_new(p, data:bytes, mode:int=0o644):
    "Write `data` to a new file at `p` and fsync it; whatever held the name is removed first, a symlink is never followed"
    p = Path(p)
    try: p.unlink()
    except FileNotFoundError: pass
    except IsADirectoryError: raise StoreError(f"{p} is a directory; a writer needs that name for a file: remove it") from None
    fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    with open(fd, 'wb') as f:
        f.write(data); f.flush(); os.fsync(f.fileno())

# %% ../nbs/01_format.ipynb #215699f8
def commit_file(path, name:str, data:bytes):
    "Atomically replace `path/name` by `data`: write `name.tmp`, fsync it, rename it over `name` (the commit), fsync the directory"
    path = Path(path)
    write_new(path/(name + '.tmp'), data)
    os.replace(path/(name + '.tmp'), path/name)
    fsync_dir(path)

def write_manifest(path, m:dict):
    "Commit manifest `m` to the store at `path`: write a temporary file, fsync it, rename it over the manifest, fsync the directory"
    validate_manifest(m, Path(path)/MANIFEST)
    commit_file(path, MANIFEST, json.dumps(m, indent=1).encode())

# %% ../nbs/01_format.ipynb #bd75c671
def manifest_files(m:dict) -> list:
    "Every file entry (`{'file','bytes','crc32'}`) that manifest `m` references"
    return [s[k] for s in m['shards'] for k in ('data', 'index', 'meta') if k in s]

def retired_files(m:dict, now:float=None) -> list:
    "Names of the files manifest `m` retired that must stay on disk at time `now` (default: now) for readers of older commits"
    now = time.time() if now is None else now
    return [r['file'] for r in m.get('retired', ()) if r['until'] > now]
