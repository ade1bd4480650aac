"""The layout keeps its promises (docs/architecture.md): imports go one way, from the scripts down to the
foundation, no library module imports a script, and no module outside the network's files grows past
400 lines. Read from the source with `ast`, deferred imports inside functions included."""
import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# lower layers never import higher ones; a package may import itself and anything below it
LAYERS = [
    ('utils',),                       # the parser and the one-line-error convention
    ('lib.files',),                   # file safety
    ('ops', 'bert', 'refer'),         # deformable attention, BERT, the data
    ('lib.model',),                   # the RMSIN network
    ('lib.training',),                # the machinery of a run
    ('lib.evaluation',),              # per-sentence records, bootstrap intervals, breakdowns
    ('lib.inference',),               # predict.py's machinery (uses training's checkpoint loading)
    ('lib.pipeline',),                # what reproduce.py runs
]
SCRIPTS = ('train', 'train_stu_base', 'train_stu_tea', 'test', 'predict', 'mask_train_only', 'reproduce')
MAX_LINES = 400  # a module of one concern; the network's own files (lib/model/) are exempt


def layer_of(module):
    for rank, names in enumerate(LAYERS):
        if any(module == n or module.startswith(n + '.') for n in names):
            return rank
    return None


def library_modules():
    """(dotted name, path) of every module below the scripts: utils, lib/, ops/, bert/, refer/."""
    yield 'utils', REPO / 'utils.py'
    for top in ('lib', 'ops', 'bert', 'refer'):
        for path in sorted((REPO / top).rglob('*.py')):
            parts = path.relative_to(REPO).with_suffix('').parts
            yield '.'.join(parts[:-1] if parts[-1] == '__init__' else parts), path


def imported_modules(name, path):
    """Project modules that `path` imports (absolute names; relative imports resolved)."""
    package = name if path.name == '__init__.py' else name.rpartition('.')[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ''
            if node.level:
                anchor = package.split('.')
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = '.'.join(anchor + ([base] if base else []))
            out.add(base)
            out.update(f'{base}.{alias.name}' for alias in node.names)  # `from lib import files`
    return {m for m in out if m.split('.')[0] in ('utils', 'lib', 'ops', 'bert', 'refer') + SCRIPTS}


LIBRARY = list(library_modules())


def test_every_library_module_has_a_layer():
    assert len(LIBRARY) > 40
    assert [name for name, _ in LIBRARY if layer_of(name) is None and name != 'lib'] == []


@pytest.mark.parametrize('name,path', LIBRARY, ids=[n for n, _ in LIBRARY])
def test_imports_go_one_way(name, path):
    own = layer_of(name)
    upward = []
    for module in sorted(imported_modules(name, path)):
        if module.split('.')[0] in SCRIPTS:
            upward.append(f'{module} (a script)')
            continue
        rank = layer_of(module)
        if rank is not None and own is not None and rank > own:
            upward.append(f'{module} (layer {LAYERS[rank][0]})')
    assert upward == [], f'{name} imports upward: {", ".join(upward)}'


def test_the_layer_check_sees_deferred_and_relative_imports(tmp_path):
    """The checker itself: an upward import inside a function and a relative one are both found."""
    pkg = tmp_path / 'lib' / 'model'
    pkg.mkdir(parents=True)
    source = pkg / 'probe.py'
    source.write_text('from ..training import engine\n\ndef f():\n    from lib.pipeline import plan\n    import train\n')
    found = imported_modules('lib.model.probe', source)
    assert {'lib.training.engine', 'lib.pipeline.plan', 'train'} <= found


def test_modules_hold_one_concern():
    """No module outside the network's files is longer than MAX_LINES lines."""
    long = {}
    for name, path in LIBRARY:
        if name.startswith('lib.model'):
            continue
        lines = len(path.read_text().splitlines())
        if lines > MAX_LINES:
            long[name] = lines
    assert long == {}


def test_scripts_stay_thin():
    """The entry points wire (parse -> validate -> build -> run); their machinery lives in lib/ and refer/."""
    lengths = {s: len((REPO / f'{s}.py').read_text().splitlines()) for s in SCRIPTS}
    assert {s: n for s, n in lengths.items() if n > 200} == {}
