"""Check the offline docs site that `tools/render_docs.py` built: `python tools/check_site.py SITE_DIR`.

Exits 1, listing every problem, unless all of these hold:

- **sidebar**: `nbs/sidebar.yml` lists every notebook of `nbs/` exactly once and nothing else, the front page first,
  the other unnumbered pages (tutorial, guarantees) next, then the numbered notebooks in order;
- **pages**: every notebook has its page, and every page has the sidebar with every page in that order, itself marked;
- **front page**: `index.html` is `nbs/index.ipynb`: its title, description and every heading;
- **pictures**: every cell that draws has at least one picture (a PNG that decodes) in its output on the page.
  A cell draws when it calls, outside any `def`/`lambda`, `show`, `show_batch`, `show_results`, `show_array`,
  `plot_summary`, another name in `DRAWING_CALLS`, or any `plt.` function, and is shown (not hidden, exported, or
  `eval: false`);
- **no error or warning output**: no stderr stream or error output, no `Traceback`, no `...Warning:` text;
- **links**: every internal link, its `#fragment`, and every picture resolves inside the folder; pictures, scripts
  and styles are never fetched from elsewhere (the site works offline);
- **API reference**: every public name each module exports (its `__all__`) is defined by this package and has its
  API section on its notebook's page: for functions and classes nbdev's `show_doc` section (a heading with the name
  and the signature under it), for constants a heading with the name. `fastai_memmap.all` exports only names this
  package defines.

`KNOWN_GAPS` lists problems whose fixes belong to other notebooks' owners; they are reported, not failed, and an
entry fails once its problem is gone (delete it then).
"""
import ast, base64, importlib, re, sys
from pathlib import Path
from urllib.parse import urlsplit, unquote

root = Path(__file__).resolve().parent.parent
DRAWING_CALLS = {'show', 'show_batch', 'show_results', 'show_array', 'plot_summary', 'plot_top_losses', 'plot_loss',
                 'plot_lr_find', 'plot_metrics', 'show_image', 'show_images', 'imshow'}

# key -> the fix, in the notebook that owns it. Keys: 'api:MODULE.NAME' (no API section), 'export:NAME'
# (fastai_memmap.all exports a name defined elsewhere), 'stderr:PAGE:CELL_ID' (warning output), 'anchor:PAGE#ID'
# (links to an API section that does not exist).
KNOWN_GAPS = {}

def _directives(src:str) -> dict:
    opts = {}
    for line in src.splitlines():
        m = re.match(r'\s*#\|\s*([\w-]+)\s*:?\s*(.*)$', line)
        if not m: break
        opts[m[1]] = m[2].strip().strip('"\'').lower()
    return opts

def drawing_cells(nb) -> list:
    "Ids of the shown code cells of notebook `nb` that draw (see the module docstring)"
    res = []
    for c in nb.cells:
        if c.cell_type != 'code': continue
        d = _directives(c.source)
        if d.keys() & {'hide', 'export', 'exporti', 'exports', 'default_exp'} or 'false' in (d.get('eval'), d.get('include'), d.get('output')): continue
        src = '\n'.join(l for l in c.source.splitlines() if not l.lstrip().startswith(('%', '!')))
        try: tree = ast.parse(src)
        except SyntaxError: continue
        def calls(node):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)): return
            if isinstance(node, ast.Call):
                f = node.func
                name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else None
                if name in DRAWING_CALLS or (isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) and f.value.id == 'plt'): yield name
            for ch in ast.iter_child_nodes(node): yield from calls(ch)
        if any(True for _ in calls(tree)): res.append(c.get('id'))
    return res

def _png_ok(src:str) -> bool:
    if not src.startswith('data:image/png;base64,'): return False
    try: b = base64.b64decode(src.split(',', 1)[1])
    except Exception: return False
    return b[:8] == b'\x89PNG\r\n\x1a\n' and len(b) > 1000

class Site:
    def __init__(self, out:Path):
        from bs4 import BeautifulSoup
        self.out = out.resolve()
        self.pages = {p.name: BeautifulSoup(p.read_text(encoding='utf-8'), 'html.parser') for p in sorted(self.out.glob('*.html'))}
        self.source = {}   # notebook name -> page name
        for name, s in self.pages.items():
            m = s.find('meta', attrs={'name': 'source-notebook'})
            if m: self.source[m['content']] = name
    def ids(self, page:str) -> set:
        return {t['id'] for t in self.pages[page].find_all(id=True)} | {t['name'] for t in self.pages[page].find_all('a', attrs={'name': True})}

def check(out:Path) -> tuple:
    "Problems and known gaps found in the site in `out`: (problems, gaps_seen)"
    import nbformat, yaml
    problems, gaps = [], set()
    def gap_or(key, msg):
        if key in KNOWN_GAPS: gaps.add(key)
        else: problems.append(msg)
    site = Site(out)
    nbs = sorted(p for p in (root/'nbs').glob('*.ipynb') if not p.name.startswith(('_', '.')))
    names = [p.name for p in nbs]

    # sidebar.yml
    def flat(items):
        for it in items or []:
            if isinstance(it, str): yield it
            elif 'contents' in it: yield from flat(it['contents'])
            elif 'href' in it: yield it['href']
    sb = yaml.safe_load((root/'nbs'/'sidebar.yml').read_text())
    listed = list(flat(sb['website']['sidebar']['contents']))
    if sorted(listed) != sorted(names) or len(set(listed)) != len(listed):
        problems.append(f'sidebar.yml lists {listed}; the notebooks are {names}')
    numbered = [n for n in listed if re.match(r'\d', n)]
    want = ['index.ipynb'] + [n for n in listed if n != 'index.ipynb' and not re.match(r'\d', n)] + sorted(numbered)
    if listed != want: problems.append(f'sidebar.yml order is {listed}; expected {want}')

    # pages and navigation
    for n in names:
        if n not in site.source: problems.append(f'{n} has no page in {out}')
    order = [site.source.get(n) for n in listed]
    for n, page in site.source.items():
        s = site.pages[page]
        nav = s.find('nav', class_='fmm-sidebar')
        if nav is None: problems.append(f'{page}: no sidebar'); continue
        links = [a['href'] for a in nav.select('li.fmm-nav-page > a')]
        if links != order: problems.append(f'{page}: sidebar links {links}, expected {order}')
        active = [a['href'] for a in nav.select('li.active > a')]
        if active != [page]: problems.append(f'{page}: sidebar marks {active} as the current page')
        for h in s.find_all(['h1', 'h2', 'h3', 'h4', 'h5', 'h6']):   # a cell directive (`#| export`) rendered as a heading
            if h.get_text().lstrip().startswith('|'): problems.append(f'{page}: the heading {h.get_text().strip()!r} is a cell directive shown as text')

    # front page
    if 'index.html' not in site.pages or site.source.get('index.ipynb') != 'index.html':
        problems.append('index.html is not the page of nbs/index.ipynb')
    else:
        s, nb = site.pages['index.html'], nbformat.read(root/'nbs'/'index.ipynb', as_version=4)
        heads = {h.get_text(' ', strip=True).rstrip('¶').strip() for h in s.find_all(re.compile('^h[1-6]$'))}
        text = ' '.join(s.get_text(' ').split())
        for c in nb.cells:
            if c.cell_type != 'markdown': continue
            for level, h in re.findall(r'(?m)^(#{1,6})\s+(.+?)\s*$', c.source):
                h = re.sub(r'[`*]|\[([^\]]*)\]\([^)]*\)', lambda m: m[1] or '', h).strip()
                if h not in heads: problems.append(f'index.html lacks the heading {h!r} of index.ipynb')
            for desc in re.findall(r'(?m)^>\s*(.+)$', c.source):
                desc = ' '.join(re.sub(r'[`*]', '', desc).split())
                if desc not in text: problems.append(f'index.html lacks the description {desc[:60]!r}...')

    # pictures, error and warning output
    for n in names:
        page = site.source.get(n)
        if page is None: continue
        s, nb = site.pages[page], nbformat.read(root/'nbs'/n, as_version=4)
        draws = drawing_cells(nb)
        for cid in draws:
            cell = s.find(id=f'cell-id={cid}')
            imgs = [i for i in cell.find_all('img') if _png_ok(i.get('src', ''))] if cell else []
            if not imgs: problems.append(f'{page}: cell {cid} of {n} draws but shows no picture')
        n_img = len([i for i in s.select('.jp-OutputArea img') if _png_ok(i.get('src', ''))])
        if n_img < len(draws): problems.append(f'{page}: {n_img} pictures for {len(draws)} drawing cells')
        for o in s.select('[data-mime-type="application/vnd.jupyter.stderr"]'):
            cell = o.find_parent(id=re.compile('^cell-id='))
            cid = cell['id'].split('=', 1)[1] if cell else '?'
            gap_or(f'stderr:{page}:{cid}', f'{page}: cell {cid} shows error/stderr output: {o.get_text(" ", strip=True)[:200]}')
        for o in s.select('.jp-OutputArea-output'):
            t = o.get_text(' ')
            if 'Traceback (most recent call last)' in t or re.search(r'\b\w*Warning:', t):
                if o.get('data-mime-type') == 'application/vnd.jupyter.stderr': continue   # reported above
                cell = o.find_parent(id=re.compile('^cell-id='))
                cid = cell['id'].split('=', 1)[1] if cell else '?'
                gap_or(f'stderr:{page}:{cid}', f'{page}: cell {cid} prints a traceback or warning: {t.strip()[:200]}')

    # links and pictures resolve, inside the folder
    for page, s in site.pages.items():
        for tag, attr in (('a', 'href'), ('img', 'src'), ('link', 'href'), ('script', 'src'), ('iframe', 'src'), ('source', 'src')):
            for t in s.find_all(tag, attrs={attr: True}):
                url = t[attr]; u = urlsplit(url)
                if u.scheme in ('http', 'https', 'mailto'):
                    if tag != 'a': problems.append(f'{page}: <{tag}> loads {url} from the network')
                    continue
                if u.scheme == 'data':
                    if tag != 'img' or not _png_ok(url) and not url.startswith(('data:image/svg', 'data:image/jpeg', 'data:image/gif')):
                        problems.append(f'{page}: <{tag}> with a bad data URI')
                    continue
                if u.scheme or u.netloc or url.startswith('/'):
                    problems.append(f'{page}: <{tag}> {url} is not a relative link'); continue
                target = page if not u.path else unquote(u.path)
                f = (site.out/target).resolve()
                if site.out not in f.parents or not f.is_file():
                    problems.append(f'{page}: <{tag}> {url}: no such file in the site'); continue
                if u.fragment and f.suffix == '.html':
                    if f.name not in site.pages or unquote(u.fragment) not in site.ids(f.name):
                        gap_or(f'anchor:{f.name}#{u.fragment}', f'{page}: link {url}: no #{u.fragment} in {f.name}')

    # API reference
    sys.path.insert(0, str(root))
    mods = sorted(p.stem for p in (root/'fastai_memmap').glob('*.py') if p.stem not in ('__init__', '_modidx', 'all'))
    for m in mods:
        mod = importlib.import_module(f'fastai_memmap.{m}')
        src = Path(mod.__file__).read_text()
        nbm = re.search(r'File to edit: \.\./nbs/(\S+\.ipynb)', src)
        page = site.source.get(nbm[1]) if nbm else None
        if page is None: problems.append(f'fastai_memmap.{m}: no page for its notebook'); continue
        assigned = {t.id for node in ast.parse(src).body if isinstance(node, (ast.Assign, ast.AnnAssign))
                    for t in (node.targets if isinstance(node, ast.Assign) else [node.target]) if isinstance(t, ast.Name)}
        s = site.pages[page]
        heads = {}
        for h in s.find_all(re.compile('^h[1-6]$')):
            heads.setdefault(h.get_text('', strip=True).rstrip('¶').strip(), []).append(h)
        for name in getattr(mod, '__all__', []):
            obj = getattr(mod, name, None)
            key = f'api:fastai_memmap.{m}.{name}'
            modname = getattr(obj, '__module__', None) if callable(obj) or isinstance(obj, type) else None
            if modname is not None and modname != mod.__name__:
                gap_or(key, f'fastai_memmap.{m} exports {name}, defined in {modname}: not an API of this package'); continue
            if modname is None and name not in assigned:
                problems.append(f'fastai_memmap.{m} exports {name}, which it does not define'); continue
            hs = heads.get(name, [])
            if modname is not None:   # nbdev's show_doc: the heading in a markdown output, the signature after it
                hs = [h for h in hs if h.find_parent(attrs={'data-mime-type': 'text/markdown'}) and h.find_next('pre')]
            if not hs: gap_or(key, f'{page}: no API section for {name} (fastai_memmap.{m})')
    import fastai_memmap.all as A
    for name in (n for n in dir(A) if not n.startswith('_')):
        obj = getattr(A, name)
        mn = getattr(obj, '__module__', None) if callable(obj) or isinstance(obj, type) else None
        if mn is not None and not mn.startswith('fastai_memmap'):
            gap_or(f'export:{name}', f'fastai_memmap.all exports {name} from {mn}')

    for k in sorted(set(KNOWN_GAPS) - gaps): problems.append(f'KNOWN_GAPS[{k!r}] is fixed: delete the entry')
    return problems, gaps

def main():
    if len(sys.argv) != 2: sys.exit(__doc__.splitlines()[0])
    out = Path(sys.argv[1])
    if not (out/'index.html').exists(): sys.exit(f'{out}: no site (run tools/render_docs.py --out {out})')
    problems, gaps = check(out)
    site = Site(out)
    for k in sorted(gaps): print(f'known gap (owner fix pending): {k}: {KNOWN_GAPS[k]}')
    for p in problems: print(f'PROBLEM: {p}')
    n_img = sum(len(s.select('.jp-OutputArea img')) for s in site.pages.values())
    print(f'{len(site.pages)} pages, {n_img} pictures, {len(gaps)} known gaps, {len(problems)} problems')
    sys.exit(1 if problems else 0)

if __name__ == '__main__': main()
