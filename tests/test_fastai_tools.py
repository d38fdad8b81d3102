"""fastai's everyday tools on MemmapBlock DataBlocks, each with a real Learner: `DataBlock.summary`, interpretation
(`ClassificationInterpretation`, `Interpretation.plot_top_losses` for regression), `predict` on every kind of item
(in the training process and after `load_learner` in a fresh one), `show_batch`/`show_results` with fastai's
`max_n`/`nrows`/`ncols`/`figsize` and title conventions for 1-D, 2-D, 3-D, ragged items and array targets, `tta`,
and `get_preds(with_input=True, with_decoded=True)`.

Set FMM_PICTURES=DIR to keep every figure drawn here as a PNG (to look at them)."""
import contextlib, io, json, os, subprocess, sys, textwrap, warnings
from pathlib import Path

os.environ.setdefault('MPLBACKEND', 'Agg')
import matplotlib
matplotlib.use('Agg', force=True)
import matplotlib.pyplot as plt
import numpy as np, pytest, torch
from torch import nn

from fastai.data.all import DataBlock, CategoryBlock, RegressionBlock, ColReader, RandomSplitter
from fastai.learner import Learner, load_learner
from fastai.losses import MSELossFlat
from fastai.interpret import ClassificationInterpretation, Interpretation
from fastai_memmap.all import write_memmap, memmap_items, MemmapBlock, TensorMemmap, MemmapStore

ROOT = Path(__file__).resolve().parent.parent
CLASSES = np.array(['a', 'b', 'c'])

def keep(name):
    "Save the current figure under $FMM_PICTURES (if set), then close it"
    d = os.environ.get('FMM_PICTURES')
    if d: Path(d).mkdir(parents=True, exist_ok=True); plt.gcf().savefig(Path(d)/f'{name}.png', dpi=80)
    plt.close('all')

def quiet(learn):
    learn.remove_cbs([c for c in learn.cbs if type(c).__name__ == 'ProgressCallback'])
    learn.logger = lambda *a, **k: None
    return learn

def classed_store(path, shape=(2, 16), n=240, seed=0):
    "Items whose class is the offset of a noisy array, with a label and a float target"
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    X = (rng.normal(size=(n, *shape)) + 2 * y.reshape(-1, *[1] * len(shape))).astype(np.float32)
    write_memmap(path, X, meta={'label': CLASSES[y], 'value': y.astype(np.float32) + 0.5}, progress=False)
    return X, y

def cat_learner(path, n_in, bs=32, epochs=2):
    dls = DataBlock(blocks=(MemmapBlock, CategoryBlock), get_items=memmap_items, get_y=ColReader('label'),
                    splitter=RandomSplitter(seed=0)).dataloaders(path, bs=bs)
    torch.manual_seed(0)
    learn = quiet(Learner(dls, nn.Sequential(nn.Flatten(), nn.BatchNorm1d(n_in), nn.Linear(n_in, 3))))
    learn.fit(epochs, 0.05)
    return learn

@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    d = tmp_path_factory.mktemp('tools')
    X, y = classed_store(d/'s.fmm')
    learn = cat_learner(d/'s.fmm', 32, epochs=4)
    p, t = learn.get_preds()
    assert (p.argmax(1) == t).float().mean() > 0.8   # it learned: predictions below mean something
    return d, X, y, learn

# -------------------------------------------------------------------------------- DataBlock.summary
def test_datablock_summary(tmp_path):
    classed_store(tmp_path/'s.fmm')
    db = DataBlock(blocks=(MemmapBlock, CategoryBlock), get_items=memmap_items, get_y=ColReader('label'), splitter=RandomSplitter(seed=0))
    out = io.StringIO()
    with contextlib.redirect_stdout(out): db.summary(tmp_path/'s.fmm', bs=4)
    text = out.getvalue()
    assert 'Final sample' in text and 'Collating items in a batch' in text, text[-2000:]
    assert 'Error' not in text and 'failed' not in text, text[-2000:]
    assert 'TensorMemmap of size 2x16' in text and text.rstrip().endswith('No batch_tfms to apply'), text[-1500:]

# -------------------------------------------------------------------------------- interpretation
def test_classification_interpretation(trained):
    d, X, y, learn = trained
    interp = ClassificationInterpretation.from_learner(learn)
    cm = interp.confusion_matrix()
    assert cm.shape == (3, 3) and cm.sum() == len(learn.dls.valid_ds)
    assert all(a != b and n > 0 for a, b, n in interp.most_confused())
    losses, idx = interp.top_losses(5)
    interp.plot_top_losses(5, nrows=1, figsize=(12, 3))
    fig = plt.gcf()
    axs = [a for a in fig.axes if a.get_visible() and a.get_title()]
    assert len(axs) == 5 and tuple(fig.get_size_inches()) == (12, 3)
    assert fig._suptitle.get_text() == 'Prediction/Actual/Loss/Probability'
    for a, l in zip(axs, losses):
        pred, actual, loss, prob = [t.strip() for t in a.get_title().split('/')]
        assert pred in CLASSES and actual in CLASSES and float(loss) == pytest.approx(l.item(), abs=0.006) and 0 < float(prob) <= 1
    keep('plot_top_losses_classification')

def test_regression_interpretation(tmp_path):
    X, y = classed_store(tmp_path/'s.fmm')
    dls = DataBlock(blocks=(MemmapBlock, RegressionBlock), get_items=memmap_items, get_y=ColReader('value'),
                    splitter=RandomSplitter(seed=0)).dataloaders(tmp_path/'s.fmm', bs=32)
    learn = quiet(Learner(dls, nn.Sequential(nn.Flatten(), nn.Linear(32, 1)), loss_func=MSELossFlat()))
    learn.fit(2, 0.01)
    interp = Interpretation.from_learner(learn)
    interp.plot_top_losses(4, figsize=(8, 2))
    axs = [a for a in plt.gcf().axes if a.get_title()]
    assert len(axs) == 4
    for a in axs:
        pred, actual, loss = [float(t) for t in a.get_title().split('/')]
        assert actual in (0.5, 1.5, 2.5) and loss >= 0
    keep('plot_top_losses_regression')

# -------------------------------------------------------------------------------- predict
PREDICT_SCRIPT = '''
import json, sys, numpy as np, torch
from fastai.learner import load_learner
from fastai_memmap.all import TensorMemmap, memmap_items
export, store, out = sys.argv[1:4]
learn = load_learner(export)
items = memmap_items(store)
res = {}
for i in (0, 7, 100):
    x = items.store[i]
    res[i] = [[str(d), p.tolist()] for d, _, p in (learn.predict(o) for o in (x, torch.from_numpy(np.array(x)), items.iloc[i], TensorMemmap(torch.from_numpy(np.array(x)))))]
json.dump(res, open(out, 'w'))
'''

def test_predict_every_kind_of_item_here_and_after_load_learner(trained, tmp_path):
    d, X, y, learn = trained
    items = memmap_items(d/'s.fmm')
    want = {}
    for i in (0, 7, 100):
        got = [learn.predict(o) for o in (X[i], torch.from_numpy(X[i]), items.iloc[i], TensorMemmap(torch.from_numpy(X[i])))]
        for dec, code, p in got[1:]: assert dec == got[0][0] and torch.allclose(p, got[0][2], atol=1e-6)
        want[i] = [str(got[0][0]), got[0][2].tolist()]
    learn.export(tmp_path/'export.pkl')
    f = tmp_path/'predict.py'; f.write_text(PREDICT_SCRIPT)
    r = subprocess.run([sys.executable, str(f), str(tmp_path/'export.pkl'), str(d/'s.fmm'), str(tmp_path/'out.json')],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((tmp_path/'out.json').read_text())
    for i, w in want.items():
        for dec, p in res[str(i)]:
            assert dec == w[0] and np.allclose(p, w[1], atol=1e-6), (i, dec, w)

def test_predict_refuses_what_it_cannot_read(trained):
    d, X, y, learn = trained
    with pytest.raises(AssertionError, match='Expected an input of type'): learn.predict('not an item')

# -------------------------------------------------------------------------------- pictures
SHAPES = {'1d': (40,), '2d': (12, 12), '3d': (3, 10, 10)}

@pytest.mark.parametrize('kind', [*SHAPES, 'ragged'])
def test_show_batch_and_show_results_layout_and_titles(tmp_path, kind):
    if kind == 'ragged':
        rng = np.random.default_rng(0)
        y = rng.integers(0, 3, 90)
        items = [(rng.normal(size=(2, 8 + i % 17)) + 2 * y[i]).astype(np.float32) for i in range(90)]
        write_memmap(tmp_path/'s.fmm', items, meta={'label': CLASSES[y]}, progress=False)
        n_in = None
    else:
        classed_store(tmp_path/'s.fmm', SHAPES[kind], n=90)
        n_in = int(np.prod(SHAPES[kind]))
    dls = DataBlock(blocks=(MemmapBlock, CategoryBlock), get_items=memmap_items, get_y=ColReader('label'),
                    splitter=RandomSplitter(seed=0)).dataloaders(tmp_path/'s.fmm', bs=16)
    b = dls.valid.one_batch()
    for max_n, nrows, ncols, figsize in ((8, 2, None, (8, 4)), (6, None, 3, (9, 6)), (5, None, None, None)):
        dls.valid.show_batch(b, max_n=max_n, nrows=nrows, ncols=ncols, figsize=figsize)
        fig = plt.gcf()
        axs = [a for a in fig.axes if a.get_visible() and a.has_data()]
        assert len(axs) == max_n, (kind, max_n, len(axs))
        rows = len({round(a.get_position().y0, 3) for a in axs})
        cols = len({round(a.get_position().x0, 3) for a in axs})
        if nrows: assert rows == nrows, (rows, nrows)
        if ncols: assert cols == ncols, (cols, ncols)
        if figsize: assert tuple(fig.get_size_inches()) == figsize
        assert [a.get_title() for a in axs] == [dls.vocab[int(c)] for c in b[1][:max_n]]
        keep(f'show_batch_{kind}_{max_n}')
    if n_in is None: model = nn.Sequential(nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(2, 3))
    else: model = nn.Sequential(nn.Flatten(), nn.Linear(n_in, 3))
    learn = quiet(Learner(dls, model))
    learn.fit(3, 0.05)
    learn.show_results(max_n=6, nrows=2, figsize=(9, 5))
    axs = [a for a in plt.gcf().axes if a.get_visible() and a.has_data()]
    assert len(axs) == 6
    for a in axs:
        pred, actual = a.get_title().split('/')
        assert pred in CLASSES and actual in CLASSES
        assert a.title.get_color() == ('green' if pred == actual else 'red')
    keep(f'show_results_{kind}')

def test_array_targets_show_input_target_prediction(tmp_path):
    "blocks=(MemmapBlock, MemmapBlock): the target is an array from a second store, drawn beside its input"
    rng = np.random.default_rng(0)
    X = rng.normal(size=(60, 32)).astype(np.float32)
    write_memmap(tmp_path/'x.fmm', X, progress=False)
    write_memmap(tmp_path/'y.fmm', np.cumsum(X, axis=1) / 4, progress=False)
    ys = MemmapStore(tmp_path/'y.fmm')
    dls = DataBlock(blocks=(MemmapBlock, MemmapBlock), get_items=memmap_items, get_y=lambda o: ys[int(o.name)],
                    splitter=RandomSplitter(seed=0)).dataloaders(tmp_path/'x.fmm', bs=8, num_workers=0)
    xb, yb = dls.one_batch()
    assert type(yb) is TensorMemmap and yb.shape == (8, 32)
    dls.show_batch(max_n=3)
    axs = [a for a in plt.gcf().axes if a.get_visible() and a.has_data()]
    assert [a.get_title() for a in axs] == ['input', 'target'] * 3
    keep('show_batch_array_targets')
    learn = quiet(Learner(dls, nn.Linear(32, 32), loss_func=MSELossFlat()))
    learn.fit(1, 0.01)
    learn.show_results(max_n=2)
    axs = [a for a in plt.gcf().axes if a.get_visible() and a.has_data()]
    assert [a.get_title() for a in axs] == ['input', 'target', 'prediction'] * 2
    keep('show_results_array_targets')
    Interpretation.from_learner(learn).plot_top_losses(2)
    titles = [a.get_title() for a in plt.gcf().axes if a.get_visible() and a.has_data()]
    assert len(titles) == 6 and titles[0].startswith('input (') and titles[1:3] == ['target', 'prediction']
    keep('plot_top_losses_array_targets')

# -------------------------------------------------------------------------------- tta, get_preds
def test_tta_and_get_preds_with_input_and_decoded(trained):
    d, X, y, learn = trained
    vi = learn.dls.valid_ds.items.store_idxs
    inp, preds, targs, dec = learn.get_preds(with_input=True, with_decoded=True)
    assert type(inp) is TensorMemmap and torch.equal(inp.as_subclass(torch.Tensor), torch.from_numpy(X[vi]))
    assert torch.equal(dec, preds.argmax(1)) and (np.array(learn.dls.vocab)[targs] == CLASSES[y[vi]]).all()
    p_tta, t_tta = learn.tta(n=2)
    assert p_tta.shape == preds.shape and torch.equal(t_tta, targs)
    assert torch.allclose(p_tta.sum(1), torch.ones(len(vi)), atol=1e-5)
