"The docs site's tools (tools/render_docs.py, tools/check_site.py): the rules they apply, on small inputs; CI builds and checks the whole site."
import sys
from pathlib import Path
import nbformat, pytest, yaml

root = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(root/'tools'))
import render_docs, check_site

@pytest.mark.parametrize('text,id_', [('write_memmap', 'write_memmap'), ('MemmapStore.take', 'memmapstore.take'),
                                      ('The two commands', 'the-two-commands'), ('1. Install it!', 'install-it'), ('¶', 'section')])
def test_pandoc_id(text, id_):
    "Headings get Pandoc's identifiers, which nbdev's links (`store.html#memmapstore.take`) point at"
    assert render_docs._pandoc_id(text) == id_

def test_pandoc_link_attributes():
    "nbdev's source links carry Pandoc attributes, which become HTML attributes"
    md = '[source](https://x.org/a.py#L3){target="_blank" style="float:right"} and [plain](b.html)'
    assert render_docs._pandoc_attrs(md) == ('<a href="https://x.org/a.py#L3" target="_blank" style="float:right">source</a>'
                                             ' and [plain](b.html)')

def test_quarto_options():
    "echo: false hides the source, include: false the cell, output: false the outputs; the options are not shown"
    nb = nbformat.v4.new_notebook()
    out = nbformat.v4.new_output('display_data', data={'text/markdown': '### f'})
    cells = [nbformat.v4.new_code_cell('#| echo: false\n#| output: asis\nshow_doc(f)', outputs=[out]),
             nbformat.v4.new_code_cell('#| include: false\nx = 1'),
             nbformat.v4.new_code_cell('#| output: false\ny = 2', outputs=[out]),
             nbformat.v4.new_code_cell('#| echo: false\nz = 3')]
    nb.cells = cells
    render_docs._quarto_options(nb)
    assert [c.source for c in nb.cells] == ['show_doc(f)', 'y = 2']
    assert nb.cells[0].metadata['transient'] == {'remove_source': True} and nb.cells[0].outputs
    assert nb.cells[1].outputs == [] and 'transient' not in nb.cells[1].metadata

def test_markdown_directives_are_not_text():
    "A markdown cell's directives (the exported format spec's `#| export`, which nbdev writes as `#| export: true`) are dropped, not rendered as a heading"
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_markdown_cell('#| export: true\n## Spec\n\nText.')]
    render_docs._quarto_options(nb)
    assert nb.cells[0].source == '## Spec\n\nText.'

def test_drawing_cells():
    "A shown cell that calls a drawing function outside a def or lambda must show a picture"
    nb = nbformat.v4.new_notebook()
    src = {'a': "dls.show_batch(max_n=4)", 'b': "store.plot_summary('label');", 'c': "fig = plt.figure()",
           'd': "test_fail(lambda: store.show(99))", 'e': "def f(): store.show(0)", 'f': "#| hide\nstore.show(0)",
           'g': "#| eval: false\nlearn.show_results()", 'h': "for i in range(2): show_array(x[i], axs[i])", 'i': "x = show_doc(f)"}
    nb.cells = [nbformat.v4.new_code_cell(s) for s in src.values()]
    for c, k in zip(nb.cells, src): c['id'] = k
    assert check_site.drawing_cells(nb) == ['a', 'b', 'c', 'h']

def test_nav_follows_sidebar():
    "The sidebar follows sidebar.yml: pages by their titles, sections with their contents"
    titles = {'index.ipynb': ('index.html', 'Home'), '05_data.ipynb': ('data.html', 'The block')}
    nav = render_docs._nav(['index.ipynb', {'section': 'API', 'contents': ['05_data.ipynb']}], titles)
    assert nav == [{'text': 'Home', 'href': 'index.html'}, {'text': 'API', 'contents': [{'text': 'The block', 'href': 'data.html'}]}]

def test_sidebar_lists_every_notebook():
    "nbs/sidebar.yml (custom_sidebar: Quarto's sidebar and the offline site's) lists each notebook once, in order"
    def flat(items):
        for it in items:
            if isinstance(it, str): yield it
            else: yield from flat(it['contents'])
    listed = list(flat(yaml.safe_load((root/'nbs'/'sidebar.yml').read_text())['website']['sidebar']['contents']))
    nbs = sorted(p.name for p in (root/'nbs').glob('*.ipynb') if not p.name.startswith('_'))
    assert sorted(listed) == nbs and len(set(listed)) == len(listed)
    assert listed[:3] == ['index.ipynb', 'tutorial.ipynb', 'guarantees.ipynb'] and listed[3:] == sorted(listed[3:])

def test_name_headings_keep_dunders():
    "show_doc's `### MemmapStore.__iter__` must not render `iter` in bold (and keeps the id nbdev links to)"
    md = render_docs._name_headings('### MemmapStore.__iter__\n\nsome __bold__ text\n## Two words')
    assert md == '### MemmapStore.\\_\\_iter\\_\\_\n\nsome __bold__ text\n## Two words'
    from nbconvert.filters.markdown import markdown2html
    from bs4 import BeautifulSoup
    h = BeautifulSoup(markdown2html(md), 'html.parser').find('h3')
    assert h.get_text().rstrip('¶') == 'MemmapStore.__iter__' and render_docs._pandoc_id(h.get_text().rstrip('¶')) == 'memmapstore.__iter__'
