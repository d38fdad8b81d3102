"""Render the docs site offline: execute every notebook in nbs/ with nbconvert and write HTML pages to _docs/.

`nbdev-docs` needs Quarto, which is not installable everywhere; this renders the same notebooks with nbconvert and
fails (exit 1) if any cell raises. Cells marked `#| hide` run but are not shown; `#| eval: false` cells are shown
but not run; nbdev directives are stripped. Usage: python tools/render_docs.py [--out _docs] [NOTEBOOK ...]
"""
import argparse, html, sys, time
from pathlib import Path
import nbformat
from nbconvert import HTMLExporter
from nbconvert.preprocessors import ExecutePreprocessor, CellExecutionError

root = Path(__file__).resolve().parent.parent

def _directives(src): return {l.strip()[2:].strip() for l in src.splitlines() if l.lstrip().startswith('#|')}

def render(nb_path:Path, out:Path, timeout=600) -> Path:
    nb = nbformat.read(nb_path, as_version=4)
    skipped = []
    for c in nb.cells:
        if c.cell_type == 'code' and any(d.replace(' ', '') == 'eval:false' for d in _directives(c.source)):
            c.cell_type, c.pop('outputs', None), c.pop('execution_count', None)
            skipped.append(c)
            c['cell_type'] = 'raw'
    ExecutePreprocessor(timeout=timeout, kernel_name='python3').preprocess(nb, {'metadata': {'path': str(nb_path.parent)}})
    for c in skipped: c.cell_type, c['outputs'], c['execution_count'] = 'code', [], None
    cells = []
    for c in nb.cells:
        d = _directives(c.source)
        if 'hide' in d or 'default_exp' in ' '.join(d): continue
        c.source = '\n'.join(l for l in c.source.splitlines() if not l.lstrip().startswith('#|')).strip('\n')
        if c.source or c.get('outputs'): cells.append(c)
    nb.cells = cells
    body, _ = HTMLExporter(template_name='lab', exclude_input_prompt=True, exclude_output_prompt=True).from_notebook_node(nb)
    dst = out/(nb_path.stem + '.html')
    dst.write_text(body)
    return dst

def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--out', default=str(root/'_docs'))
    p.add_argument('notebooks', nargs='*')
    a = p.parse_args()
    out = Path(a.out); out.mkdir(parents=True, exist_ok=True)
    nbs = [Path(n) for n in a.notebooks] or sorted((root/'nbs').glob('*.ipynb'))
    pages, failed = [], []
    for nb in nbs:
        t = time.time()
        try: pages.append(render(nb, out)); print(f'rendered {nb.name} in {time.time() - t:.1f}s')
        except CellExecutionError as e: failed.append(nb.name); print(f'FAILED {nb.name}:\n{str(e)[-2000:]}', file=sys.stderr)
    links = ''.join(f'<li><a href="{html.escape(p.name)}">{html.escape(p.stem)}</a></li>' for p in pages)
    (out/'index.html').write_text(f'<!doctype html><title>fastai_memmap docs</title><h1>fastai_memmap</h1><ul>{links}</ul>')
    if failed: sys.exit(f'{len(failed)} notebook(s) failed to render: {failed}')
    print(f'{len(pages)} pages in {out}')

if __name__ == '__main__': main()
