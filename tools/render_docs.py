"""Build the docs site offline, from nbdev's processed notebooks: `python tools/render_docs.py --out DIR [NOTEBOOK ...]`.

`nbdev-docs` renders nbdev's processed notebooks with Quarto, which cannot be installed everywhere (its installer
downloads it). This builds the same site without Quarto, in four steps, each done by the tool that owns it:

1. **Execute** every notebook of `nbs/` (a staged copy of the project, so nothing is written into the work tree) with
   nbclient, each in its own Jupyter kernel started in the notebook's folder. The kernels use the notebook's own inline
   matplotlib backend: `MPLBACKEND` is removed from their environment (Agg draws nothing into a notebook).
   `#| eval: false` cells are shown but not run. A cell that raises fails the build.
2. **Process** the executed notebooks with nbdev's own docs processing, `nbdev.serve.proc_nbs` (the function that
   `nbdev-proc-nbs` and `nbdev-docs` run): frontmatter from the title cell, `show_doc` API sections for every exported
   name, backticked names linked to their API sections, exported and hidden cells removed. The result is what Quarto
   would render.
3. **Render** each processed notebook to one HTML page with nbconvert and the template in `tools/docs_template/`,
   which extends nbconvert's `lab` template (JupyterLab's own styles for cells and every output type, pygments
   highlighting, pictures embedded as PNG data URIs) with the page frame only: a sidebar that follows
   `nbs/sidebar.yml` (the file Quarto's sidebar reads), the title block from nbdev's frontmatter, and a table of
   contents. The Quarto cell options nbdev writes (`echo`, `output`, `include`, `code-fold`) and Pandoc link
   attributes are applied as Quarto would apply them.
4. **Link**: nbdev links names to the hosted site (`doc_host` + `doc_baseurl`) and pages to notebooks; those links
   become relative links between the pages, headings get Pandoc's identifiers (the anchors nbdev's links point at),
   and relative pictures are copied, so the folder is self-contained and works from `file://` (BeautifulSoup).

Why nbconvert: it is Jupyter's own converter, a dev dependency already, and renders notebook outputs exactly as
JupyterLab shows them, so the only page code kept here is the template's frame. Static-site tools that render
notebooks (jupyter-book/Sphinx, mkdocs-jupyter) would be a second documentation system with their own
configuration and their own notebook processing, not nbdev's.

`tools/check_site.py` checks the result. Options: `--jobs N` (notebooks executed at once; default: CPU count),
`--keep DIR` (keep the staged project: executed notebooks in DIR/nbs, nbdev's processed ones in DIR/_proc).
"""
import argparse, os, re, shutil, sys, tempfile, time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit
import multiprocessing as mp

root = Path(__file__).resolve().parent.parent
TEMPLATE = 'docs_template'   # tools/docs_template: extends nbconvert's 'lab' template

# Fixes that the notebooks' owners are making, applied to the staged copies only (never to nbs/) so that the site
# builds and is checked in full meanwhile. Each entry fails the build once its notebook no longer has the text it
# changes: then the fix has landed (or the cell changed) and the entry must be deleted.
# (notebook, cell id, operation, argument, why). Operations: 'split' moves the first `argument` lines of the cell
# into a new cell just before it; 'replace' replaces argument[0] with argument[1]; 'markdown_after' inserts a
# markdown cell with text `argument` after the cell.
def _directives(src:str) -> dict:
    "The Quarto/nbdev cell options (`#| key: value`) at the top of a cell's source"
    opts = {}
    for line in src.splitlines():
        m = re.match(r'\s*#\|\s*([\w-]+)\s*:?\s*(.*)$', line)
        if not m: break
        opts[m[1]] = m[2].strip()
    return opts

# ---- 1. execute
def _execute(path:str, timeout:int) -> tuple:
    "Run notebook `path` in place in a fresh kernel (cwd: its folder); returns (name, seconds, error or None)"
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError
    t, p = time.time(), Path(path)
    nb = nbformat.read(p, as_version=4)
    skip = [c for c in nb.cells if c.cell_type == 'code' and _directives(c.source).get('eval', '').lower() == 'false']
    for c in skip: c.metadata.setdefault('tags', []).append('skip-execution')
    err = None
    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as td:   # the kernel's temporary files: removed after it, whatever it left
        os.environ['TMPDIR'] = td
        try: NotebookClient(nb, timeout=timeout, kernel_name='python3', resources={'metadata': {'path': str(p.parent)}}).execute()
        except CellExecutionError as e: err = str(e)
        except Exception as e: err = f'{type(e).__name__}: {e}'
        finally: del os.environ['TMPDIR']
    for c in skip: c.metadata['tags'].remove('skip-execution'); c.metadata.pop('tags') if not c.metadata['tags'] else None
    nbformat.write(nb, p)
    return p.name, time.time() - t, err

# ---- 3. render
def _pandoc_id(text:str) -> str:
    "Pandoc's auto identifier for a heading's text (what Quarto gives headings, and what nbdev's links point at)"
    s = re.sub(r'[^\w\s.-]', '', text, flags=re.ASCII).strip().lower()
    s = re.sub(r'\s+', '-', s)
    s = re.sub(r'^[^a-z]+', '', s)
    return s or 'section'

_re_link_attrs = re.compile(r'\[([^\]]*)\]\(([^)\s]*)\)\{([^}]*)\}')
def _pandoc_attrs(md:str) -> str:
    "Pandoc link attributes `[text](url){key=\"v\" .class}` (nbdev writes them for source links) as HTML links"
    import html
    def sub(m):
        attrs = re.findall(r'([\w-]+)="([^"]*)"', m[3])
        classes = re.findall(r'(?:^|\s)\.([\w-]+)', m[3])
        a = ''.join(f' {k}="{html.escape(v)}"' for k, v in attrs) + (f' class="{" ".join(classes)}"' if classes else '')
        return f'<a href="{html.escape(m[2])}"{a}>{m[1]}</a>'
    return _re_link_attrs.sub(sub, md)

def _name_headings(md:str) -> str:
    "Headings that are Python names (show_doc's, e.g. `MemmapStore.__iter__`) with `_` escaped, so no dunder turns bold"
    return re.sub(r'(?m)^(#{1,6} +)([\w.]+)[ \t]*$', lambda m: m[1] + m[2].replace('_', '\\_'), md)

def _frontmatter(nb) -> dict:
    "nbdev's frontmatter (the raw `---` cell its FrontmatterProc writes), removed from `nb`"
    import yaml
    for i, c in enumerate(nb.cells):
        if c.cell_type == 'raw' and c.source.lstrip().startswith('---'):
            del nb.cells[i]
            return yaml.safe_load(c.source.strip().strip('-')) or {}
    return {}

def _quarto_options(nb):
    "Apply the Quarto cell options that nbdev writes, as Quarto does, and strip them from the shown source"
    cells = []
    for c in nb.cells:
        c.metadata.pop('execution', None)   # timings (execnb writes a number where the notebook schema wants a string)
        if c.cell_type == 'markdown':   # its cell directives (`#| export` on the format spec) are not text
            c.source = _pandoc_attrs('\n'.join(l for l in c.source.splitlines() if not l.lstrip().startswith('#|')).strip('\n'))
        if c.cell_type == 'code':
            opts = _directives(c.source)
            c.source = '\n'.join(l for l in c.source.splitlines() if not l.lstrip().startswith('#|')).strip('\n')
            val = lambda k: opts.get(k, '').strip('"\'').lower()
            if val('include') == 'false': continue
            if val('echo') == 'false' or not c.source: c.metadata['transient'] = {'remove_source': True}
            if val('output') == 'false': c.outputs = []
            if val('code-fold') in ('true', 'show'):
                c.metadata['code_fold'] = val('code-fold')
                c.metadata['code_summary'] = opts.get('code-summary', 'Code').strip('"\'')
            for o in c.get('outputs', []):
                md = o.get('data', {}).get('text/markdown')
                if md is not None: o['data']['text/markdown'] = _name_headings(_pandoc_attrs(''.join(md)))
            if c.metadata.get('transient', {}).get('remove_source') and not c.outputs: continue
        cells.append(c)
    nb.cells = cells

def _nav(items, titles:dict) -> list:
    "Quarto sidebar `contents` (paths, {href, text}, {section, contents}) as [{'text', 'href'} or {'text', 'contents'}]"
    res = []
    for it in items or []:
        if isinstance(it, str): it = {'href': it}
        if 'contents' in it: res.append({'text': it.get('section') or it.get('text', ''), 'contents': _nav(it['contents'], titles)})
        else:
            href = it.get('href', '')
            page = titles.get(Path(href).name)
            res.append({'text': it.get('text') or (page[1] if page else Path(href).stem),
                        'href': page[0] if page else re.sub(r'\.(ipynb|qmd|md)$', '.html', href)})
    return res

def _postprocess(html:str, page:str, site_prefixes:list, nb_pages:dict, src_dir:Path, out:Path) -> str:
    "Pandoc heading ids, relative links, copied pictures and the table of contents, for page `page`"
    from bs4 import BeautifulSoup
    soup = BeautifulSoup(html, 'html.parser')
    main = soup.find('main')
    seen, renamed = {}, {}
    for h in main.find_all(re.compile('^h[1-6]$')):
        anchor = h.find('a', class_='anchor-link')
        text = ''.join(s for s in h.find_all(string=True) if not (anchor and s.parent is anchor)).strip()
        hid = _pandoc_id(text)
        if hid in seen: seen[hid] += 1; hid = f'{hid}-{seen[hid]}'
        else: seen[hid] = 0
        if h.get('id'): renamed['#' + h['id']] = '#' + hid
        h['id'] = hid
        if anchor: anchor['href'] = '#' + hid
    for a in soup.find_all('a', href=True):
        href = a['href']
        if href in renamed: a['href'] = renamed[href]; continue
        for pre in site_prefixes:
            if pre and href.startswith(pre):
                href = href[len(pre):].lstrip('/') or 'index.html'; break
        u = urlsplit(href)
        if not u.scheme and not u.netloc and u.path.endswith('.ipynb'):
            tgt = nb_pages.get(Path(u.path).name)
            if tgt: href = tgt + (f'#{u.fragment}' if u.fragment else '')
        a['href'] = href
    for img in soup.find_all('img', src=True):
        u = urlsplit(img['src'])
        if u.scheme or u.netloc or not u.path: continue
        src = (src_dir/u.path).resolve()
        if src.is_file() and src_dir.resolve() in src.parents:
            dst = out/src.relative_to(src_dir.resolve()); dst.parent.mkdir(parents=True, exist_ok=True); shutil.copy2(src, dst)
    toc = soup.find(id='TOC')
    if toc is not None:
        heads = [h for h in main.find_all(['h2', 'h3']) if not h.find_parent(class_='fmm-title-block')]
        if heads:
            ul = soup.new_tag('ul')
            for h in heads:
                li = soup.new_tag('li', attrs={'class': f'toc-{h.name}'})
                a = soup.new_tag('a', href='#' + h['id'])
                anchor = h.find('a', class_='anchor-link')
                a.string = ''.join(s for s in h.find_all(string=True) if not (anchor and s.parent is anchor)).strip()
                li.append(a); ul.append(li)
            toc.append(ul)
        else: toc.decompose()
    return str(soup)

def build(out:Path, notebooks:list=None, jobs:int=None, keep:Path=None, timeout:int=900, reuse:bool=False) -> dict:
    "Build the site into `out`; returns {'pages': [...], 'failed': {...}, 'times': {...}}"
    import nbformat, yaml
    from nbconvert import HTMLExporter
    times, t0 = {}, time.time()
    jobs = jobs or os.cpu_count() or 1
    stage = Path(keep) if keep else Path(tempfile.mkdtemp(prefix='fmm_docs_'))
    if reuse:   # render again from the processed notebooks that an earlier run kept (while working on the template)
        cache = stage/'_proc'
        names = sorted(p.name for p in cache.glob('*.ipynb'))
        all_nbs, times['execute'], times['nbdev'] = names, 0, 0
    else:
        cache, names, all_nbs = _execute_and_process(stage, notebooks, jobs, timeout, times)
        if isinstance(cache, dict): return {'pages': [], 'failed': cache, 'times': times}
    return _render(out, stage, cache, names, all_nbs, keep, times, t0)

def _execute_and_process(stage:Path, notebooks, jobs:int, timeout:int, times:dict):
    "Steps 1 and 2 in `stage`: (folder of processed notebooks, names, all notebook names), or ({name: error}, ...)"
    t0 = time.time()
    if stage.exists(): shutil.rmtree(stage)
    (stage/'nbs').mkdir(parents=True)
    shutil.copy2(root/'pyproject.toml', stage/'pyproject.toml')
    (stage/(root/'fastai_memmap').name).symlink_to(root/'fastai_memmap')
    shutil.copytree(root/'nbs', stage/'nbs', dirs_exist_ok=True, ignore=shutil.ignore_patterns('.ipynb_checkpoints', '*.fmm'))
    all_nbs = sorted(p.name for p in (stage/'nbs').glob('*.ipynb') if not p.name.startswith(('_', '.')))
    names = sorted({Path(n).name for n in notebooks}) if notebooks else all_nbs
    unknown = set(names) - set(all_nbs)
    if unknown: sys.exit(f'no such notebooks in nbs/: {sorted(unknown)}')

    # 1. execute, `jobs` kernels at a time, with the inline backend
    os.environ.pop('MPLBACKEND', None)
    os.environ['PYTHONPATH'] = os.pathsep.join([str(root)] + [p for p in os.environ.get('PYTHONPATH', '').split(os.pathsep) if p])
    failed = {}
    with ProcessPoolExecutor(jobs, mp_context=mp.get_context('spawn')) as ex:
        for name, secs, err in ex.map(_execute, [str(stage/'nbs'/n) for n in names], [timeout] * len(names)):
            print(f'executed {name} in {secs:.1f}s' + (' FAILED' if err else ''), flush=True)
            if err: failed[name] = err
    times['execute'] = time.time() - t0
    if failed:
        for n, e in failed.items(): print(f'\n===== {n} failed:\n{e[-3000:]}', file=sys.stderr)
        return failed, names, all_nbs

    # 2. nbdev's docs processing (nbdev-proc-nbs) of the executed notebooks
    t = time.time()
    cwd = os.getcwd()
    os.chdir(stage)   # nbdev's processors read the project's config from the working directory, as nbdev-proc-nbs sets it
    try:
        from nbdev.serve import proc_nbs
        file_re = None if names == all_nbs else '^(' + '|'.join(re.escape(n) for n in names) + ')$'
        cache = proc_nbs(str(stage/'nbs'), n_workers=min(jobs, len(names)), force=True, **({'file_re': file_re} if file_re else {}))
    except Exception as e:
        os.chdir(cwd)
        print(f'nbdev processing failed: {e}', file=sys.stderr)
        return {'nbdev-proc-nbs': str(e)}, names, all_nbs
    os.chdir(cwd)
    times['nbdev'] = time.time() - t
    return Path(cache), names, all_nbs

def _render(out:Path, stage:Path, cache:Path, names:list, all_nbs:list, keep, times:dict, t0:float) -> dict:
    "Steps 3 and 4: the processed notebooks `names` in `cache` to pages in `out`"
    import nbformat, yaml
    from nbconvert import HTMLExporter
    t = time.time()
    from fastai_memmap._modidx import d as modidx
    s = modidx['settings']
    site_prefixes = [(s.get('doc_host') or '') + (s.get('doc_baseurl') or '/').rstrip('/') + '/']
    if not s.get('doc_host'): site_prefixes = ['/']
    procd = {n: nbformat.read(Path(cache)/n, as_version=4) for n in names}
    fms = {n: _frontmatter(nb) for n, nb in procd.items()}
    from nbdev.config import nbpath2html
    pages = {n: (fms[n].get('output-file') or nbpath2html(n).name, fms[n].get('title') or Path(n).stem) for n in all_nbs if n in fms}
    for n in all_nbs:   # pages of notebooks not rendered this time still get their names in the sidebar
        pages.setdefault(n, (nbpath2html(n).name, Path(n).stem))
    sidebar = yaml.safe_load((root/'nbs'/'sidebar.yml').read_text())
    nav = _nav(((sidebar.get('website') or {}).get('sidebar') or {}).get('contents'), pages)
    title = yaml.safe_load((root/'nbs'/'nbdev.yml').read_text()).get('website', {}).get('title', 'fastai_memmap')
    if out.exists():
        if any(out.iterdir()) and not (out/'.render_docs').exists(): sys.exit(f'{out} is not empty and not a site this tool built: not touching it')
        shutil.rmtree(out)
    out.mkdir(parents=True)
    (out/'.render_docs').write_text('built by tools/render_docs.py\n')
    exporter = HTMLExporter(template_name=TEMPLATE, extra_template_basedirs=[str(root/'tools')],
                            exclude_input_prompt=True, exclude_output_prompt=True)
    written = []
    for n in names:
        nb, fm = procd[n], fms[n]
        page = pages[n][0]
        _quarto_options(nb)
        nb.metadata['title'] = f"{fm.get('title', Path(n).stem)} – {title}"
        res = {'site': {'title': title, 'nav': nav, 'current': page},
               'page': {'title': fm.get('title', ''), 'description': fm.get('description', ''), 'source': n}}
        html, _ = exporter.from_notebook_node(nb, resources=res)
        html = _postprocess(html, page, site_prefixes, {k: v[0] for k, v in pages.items()}, stage/'nbs', out)
        (out/page).write_text(html, encoding='utf-8')
        written.append(page)
    times['render'] = time.time() - t
    if not keep: shutil.rmtree(stage, ignore_errors=True)
    times['total'] = time.time() - t0
    return {'pages': written, 'failed': {}, 'times': times}

def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--out', default=str(root/'_docs'), help='output folder (default: _docs)')
    p.add_argument('--jobs', type=int, default=None, help='notebooks executed at once (default: CPU count)')
    p.add_argument('--keep', default=None, help='keep the staged project (executed and processed notebooks) here')
    p.add_argument('--timeout', type=int, default=900, help='seconds one cell may run')
    p.add_argument('--reuse', action='store_true', help='only render again, from the processed notebooks kept in --keep')
    p.add_argument('notebooks', nargs='*', help='only these notebooks (default: all of nbs/)')
    a = p.parse_args()
    if a.reuse and not a.keep: p.error('--reuse needs --keep DIR')
    r = build(Path(a.out).resolve(), a.notebooks, a.jobs, Path(a.keep).resolve() if a.keep else None, a.timeout, a.reuse)
    if r['failed']: sys.exit(f"docs build failed: {sorted(r['failed'])}")
    t = r['times']
    print(f"{len(r['pages'])} pages in {a.out}: executed in {t['execute']:.0f}s, nbdev processing {t['nbdev']:.0f}s, "
          f"rendered in {t['render']:.0f}s, {t['total']:.0f}s in all")

if __name__ == '__main__': main()
