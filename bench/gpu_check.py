#!/usr/bin/env python
"""GPU check: batches to a CUDA device with and without pinned memory, and a one-rank NCCL `distrib_ctx` smoke run.

    python bench/gpu_check.py [--items 2000] [--out bench/gpu_results.md]      # on a machine with a CUDA GPU

1. Correctness: every batch that reached the GPU (pinned, copied with non_blocking=True while the next ones were
   being gathered) equals the store's own read of the same items.
2. Throughput: GB/s of 1 MiB items (256x1024 float32), bs 16, warm page cache, delivered to the GPU (synchronised at
   the end of the epoch), for pinned and pageable batches, with 0 loading threads and fastai's default number; and
   the host-to-device copy bandwidth of this machine (pinned and pageable) for reference.
3. NCCL: `torchrun --nproc_per_node 1` trains a small model for one epoch inside `learn.distrib_ctx()` on the GPU
   (NCCL backend), and the loss must be finite.

Exits 2 when no CUDA device is available (nothing is measured then).
"""
import argparse, os, subprocess, sys, tempfile, textwrap, time, warnings
from pathlib import Path
import numpy as np

NCCL_SCRIPT = '''
import sys, math, torch
from torch import nn
from fastai.data.all import DataBlock, CategoryBlock, ColReader, RandomSplitter
from fastai.learner import Learner
from fastai_memmap.all import memmap_items, MemmapBlock
import torch.distributed as dist
dls = DataBlock(blocks=(MemmapBlock, CategoryBlock), get_items=memmap_items, get_y=ColReader('label'),
                splitter=RandomSplitter(seed=0)).dataloaders(sys.argv[1], bs=16, device='cuda')
learn = Learner(dls, nn.Sequential(nn.AdaptiveAvgPool1d(8), nn.Flatten(), nn.Linear(256 * 8, 10)).cuda())
with learn.distrib_ctx(): learn.fit(1, 1e-3)
assert dist.get_backend() == 'nccl', dist.get_backend()
loss = learn.recorder.values[-1][0]
assert math.isfinite(loss), loss
print(f'NCCL OK backend={dist.get_backend()} world={dist.get_world_size()} train_loss={loss:.4f}')
'''

def h2d_gbs(pinned:bool, mib:int=256) -> float:
    import torch
    a = torch.empty(mib << 18, dtype=torch.float32, pin_memory=pinned)
    d = torch.empty_like(a, device='cuda')
    best = 1e9
    for _ in range(5):
        torch.cuda.synchronize(); t = time.perf_counter()
        d.copy_(a, non_blocking=pinned); torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return a.nbytes / best / 1e9

def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--items', type=int, default=2000)
    ap.add_argument('--out', default=None)
    a = ap.parse_args()
    warnings.filterwarnings('ignore')
    import torch
    if not torch.cuda.is_available(): print('no CUDA device: nothing measured'); sys.exit(2)
    from fastai.data.all import DataBlock, CategoryBlock, ColReader, RandomSplitter
    from fastai_memmap.all import write_memmap, memmap_items, MemmapBlock, MemmapStore
    tmp = Path(tempfile.mkdtemp(prefix='fmm_gpu_'))
    rng = np.random.default_rng(0)
    write_memmap(tmp/'l.fmm', rng.random((a.items, 256, 1024), dtype=np.float32), meta={'label': rng.integers(0, 10, a.items)}, progress=False)
    store = MemmapStore(tmp/'l.fmm')
    out = [f"# GPU check ({time.strftime('%Y-%m-%d %H:%M')})", '', f"GPU: {torch.cuda.get_device_name()}; torch {torch.__version__}; "
           f"{os.cpu_count()} CPUs", '']
    def log(s=''): print(s, flush=True); out.append(s)
    db = DataBlock(blocks=(MemmapBlock, CategoryBlock), get_items=memmap_items, get_y=ColReader('label'), splitter=RandomSplitter(seed=0))
    # 1. correctness of pinned, asynchronous batches
    dls = db.dataloaders(tmp/'l.fmm', bs=16, device='cuda')
    dl = dls.train
    import random
    dl.rng = random.Random(1); dl.randomize(); idxs = dl.get_idxs()   # the order the next epoch will have
    dl.rng = random.Random(1)
    n_ok = 0
    for j, (x, y) in enumerate(dl):
        want = torch.from_numpy(store.take(dl.items.store_idxs[idxs[j * 16:(j + 1) * 16]]))
        assert x.device.type == 'cuda' and torch.equal(x.cpu().as_subclass(torch.Tensor), want), j
        n_ok += 1
    log(f'correctness: {n_ok} pinned batches copied asynchronously to the GPU equal the store\'s reads')
    # 2. throughput
    log(); log('| batches | loading threads | GB/s to the GPU |'); log('|---|---:|---:|')
    for pin in (False, True):
        for nw in (0, None):
            kw = {} if nw is None else dict(num_workers=nw)
            d = db.dataloaders(tmp/'l.fmm', bs=16, device='cuda', pin_batches=pin, **kw).train
            for _ in d: pass   # warm
            best = 0
            for _ in range(3):
                torch.cuda.synchronize(); t = time.perf_counter(); n = 0
                for x, y in d: n += len(x)
                torch.cuda.synchronize(); best = max(best, n * 2**20 / (time.perf_counter() - t) / 1e9)
            log(f"| {'pinned' if pin else 'pageable'} | {d.fake_l.num_workers} | {best:.1f} |")
    log(); log(f'host-to-device copy of 256 MiB: pinned {h2d_gbs(True):.1f} GB/s, pageable {h2d_gbs(False):.1f} GB/s')
    # 3. NCCL smoke run
    f = tmp/'nccl.py'; f.write_text(NCCL_SCRIPT)
    r = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '1', str(f), str(tmp/'l.fmm')],
                       capture_output=True, text=True, timeout=600)
    ok = r.returncode == 0 and 'NCCL OK' in r.stdout
    log(); log(f"NCCL distrib_ctx, one rank: {'OK' if ok else 'FAILED'} {next((l for l in r.stdout.splitlines() if 'NCCL OK' in l), '')}")
    if not ok: log('```\n' + r.stderr[-3000:] + '\n```')
    if a.out: Path(a.out).write_text('\n'.join(out) + '\n')
    import shutil; shutil.rmtree(tmp, ignore_errors=True)
    sys.exit(0 if ok else 1)

if __name__ == '__main__': main()
