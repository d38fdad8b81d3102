"""Conversion scaling: write_memmap(sources, read_fn=f, n_jobs=k) with a CPU-bound read_fn, k = 1 and 2, same run.

Run: .venv/bin/python bench/convert.py [--items 96] [--work-ms 25]
"""
import argparse, os, shutil, tempfile, time
from pathlib import Path
import numpy as np
from fastai_memmap.all import write_memmap

WORK_MS = 25

def read_fn(i):
    "A stand-in for decoding a file: about WORK_MS of CPU, then a (3, 64, 64) float32 item"
    t, x = time.process_time(), np.random.default_rng(i).random((3, 64, 64), np.float32)
    while time.process_time() - t < WORK_MS / 1000: x = np.sqrt(x * x + 1e-3)
    return x, {'label': i % 10}

if __name__ == '__main__':
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--items', type=int, default=96); p.add_argument('--work-ms', type=float, default=25)
    a = p.parse_args()
    WORK_MS = a.work_ms
    tmp = Path(tempfile.mkdtemp())
    try:
        rows = []
        for k in (1, 2):
            t = time.perf_counter()
            s = write_memmap(tmp/f'c{k}.fmm', range(a.items), read_fn=read_fn, n_jobs=k, progress=False)
            rows.append((k, time.perf_counter() - t, len(s)))
        base = rows[0][1]
        print(f"{a.items} sources, ~{a.work_ms:g} ms of CPU each, {os.cpu_count()} cores\n| n_jobs | seconds | speed-up |\n|---:|---:|---:|")
        for k, sec, n in rows: print(f"| {k} | {sec:.2f} | {base / sec:.2f}x |")
    finally: shutil.rmtree(tmp, ignore_errors=True)
