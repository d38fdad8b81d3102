"The notebooks' usage examples are tests: run each notebook (as nbdev-test does) in its own process."
import subprocess, sys
from pathlib import Path
import pytest

NBS = sorted(p for p in (Path(__file__).parent.parent/'nbs').glob('*.ipynb') if not p.name.startswith('_'))

def test_every_module_has_a_notebook():
    lib = Path(__file__).parent.parent/'fastai_memmap'
    mods = {p.stem for p in lib.glob('*.py')} - {'__init__', '_modidx', 'all'}
    exported = {n.stem.split('_', 1)[1] for n in NBS if n.stem[0].isdigit()}
    assert mods == exported, f"modules without a notebook or notebooks without a module: {mods ^ exported}"

@pytest.mark.parametrize('nb', NBS, ids=[p.stem for p in NBS])
def test_notebook(nb, tmp_path):
    nbdev_test = Path(sys.executable).parent/'nbdev-test'
    r = subprocess.run([str(nbdev_test), str(nb), '--flags', 'slow'], cwd=nb.parent.parent, capture_output=True, text=True,
                       env={'MPLBACKEND': 'Agg', **__import__('os').environ, 'TMPDIR': str(tmp_path)})   # its temporary files: pytest's, pruned
    assert r.returncode == 0 and 'Success' in r.stdout + r.stderr, r.stdout[-3000:] + r.stderr[-3000:]
