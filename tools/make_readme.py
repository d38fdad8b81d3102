"""Render README.md from nbs/index.ipynb, offline (nbdev-readme needs Quarto, which is not installable here).

Cells marked `#| hide` are dropped, nbdev directives (`#| ...`) are stripped, outputs are kept as nbconvert renders them,
and links to other notebooks (`[tutorial](tutorial.ipynb)`, which the docs site turns into its pages) point into `nbs/`.
Usage: python tools/make_readme.py [--check]   (--check: fail if README.md is not what the notebook gives)
"""
import re, sys
from pathlib import Path
import nbformat
from nbconvert import MarkdownExporter

root = Path(__file__).resolve().parent.parent

def render() -> str:
    nb = nbformat.read(root/'nbs'/'index.ipynb', as_version=4)
    cells = []
    for c in nb.cells:
        lines = c.source.splitlines()
        if any(l.strip() in ('#| hide', '#|hide') for l in lines): continue
        c.source = '\n'.join(l for l in lines if not l.lstrip().startswith('#|')).strip('\n')
        if c.source or c.get('outputs'): cells.append(c)
    nb.cells = cells
    body, _ = MarkdownExporter().from_notebook_node(nb)
    body = re.sub(r'\]\((?![a-zA-Z][\w+.-]*:|/|#)([^)\s]+\.ipynb(?:#[^)\s]*)?)\)', r'](nbs/\1)', body)
    note = '<!-- generated from nbs/index.ipynb by tools/make_readme.py: edit the notebook, not this file -->\n\n'
    return note + body.strip() + '\n'

if __name__ == '__main__':
    txt, out = render(), root/'README.md'
    if '--check' in sys.argv:
        if not out.exists() or out.read_text() != txt:
            sys.exit('README.md is out of date: run python tools/make_readme.py and commit it')
        print('README.md is up to date')
    else:
        out.write_text(txt)
        print(f'wrote {out}')
