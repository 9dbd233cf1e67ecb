"""The README and docs/*.md run as written.

- Every `bam-jax COMMAND` in code (fenced or inline) is a real command, and its `--flags` are
  the command's own; a command line in a fenced block parses with the real parser (usage
  brackets `[--x]` count as written out, `a|b` as each alternative; `--gin.X=...` overrides are
  accepted when well formed). So do `python -m bam_jax.benchmarks ...` and `make TARGET`.
- Every `launch/run.sh`, `launch/pipeline.sh` and `launch/demo.sh` command runs with
  `--dry-run` (inserted when the docs leave it out) and exits 0; a block marked
  `<!-- doc-test: bash -->` runs whole, and the block marked `<!-- doc-test: output -->` after
  it is its output (`...` stands for lines or text left out).
- Every ```python block runs, in order with the page's other blocks and in one namespace, in a
  directory whose `runs/seed` (dense) and `runs/bam` (BAM) are tiny runs with random weights,
  saved at step 1000; a block that cannot run is marked `<!-- doc-test: skip: REASON -->`.
- Files the docs name exist (gin files, docs pages, bam_jax modules and their names, scripts),
  relative links resolve (anchors too), `launch/pipeline.sh`'s defaults are the ones in
  docs/pipeline.md, and the module table of docs/developers.md names real modules.

Each failure names the page, the line and the snippet.
"""

import argparse
import ast
import contextlib
import dataclasses
import io
import itertools
import os
import pathlib
import re
import subprocess
import sys
import textwrap

import pytest
from doc_pages import DOCS, LAUNCHERS, MARKER_KINDS, REPO, SNIPPETS, Block, Page, Snippet, read_page, words


def bam_jax_args(snippet: Snippet) -> list[str] | None:
    """The arguments of the `bam-jax` command a snippet runs (directly or through
    launch/run.sh), or None."""
    tokens = words(snippet.text)
    if not tokens:
        return None
    if tokens[0].endswith('bam-jax'):
        return tokens[1:]
    if tokens[0] == 'launch/run.sh':
        rest = tokens[1:]
        while rest and rest[0].startswith('--') and rest[0].split('=')[0] in (
                '--dry-run', '--local_processes', '--local_devices'):
            rest = rest[1:]
        if rest and rest[0] != 'pipeline':
            return rest
    return None


# ---------------------------------------------------------------------------------------
# bam-jax commands


@pytest.fixture(scope='module')
def commands():
    """{command: its argparse parser}, with experts' operations as 'experts remove' and so on."""
    from bam_jax import cli

    def subparsers(parser):
        return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices

    out = dict(subparsers(cli._parser()))
    for operation, sub in subparsers(out['experts']).items():
        out[f'experts {operation}'] = sub
    return out


def alternatives(tokens: list[str]) -> list[list[str]]:
    """A usage line's variants: `[x]` is x, and `a|b` (a word or a flag's value) each of a, b."""
    choices = []
    for token in tokens:
        token = token.strip('[]()')
        if '|' in token and not token.startswith('--gin.'):
            parts = token.split('|')
            prefix = parts[0].split('=', 1)[0] + '=' if parts[0].startswith('--') and '=' in parts[0] else ''
            choices.append([p if p.startswith('--') or not prefix or p == parts[0] else prefix + p for p in parts])
        elif token:
            choices.append([token])
    return [list(v) for v in itertools.islice(itertools.product(*choices), 32)]


def split_command(args: list[str], commands) -> tuple[str | None, list[str]]:
    name = args[0] if args else ''
    if name == 'experts' and len(args) > 1:
        name = f'experts {args[1]}'
        return (name if name in commands else None), args[2:]
    return (name if name in commands else None), args[1:]


def test_every_bam_jax_command_is_a_real_command(commands):
    """Every `bam-jax X` in code names a real command, and every --flag after it is the
    command's own (inline code may be a fragment: only the names are checked here)."""
    failures = []
    for snippet in SNIPPETS:
        for m in re.finditer(r'(?:^|[\s(/])bam-jax\s+([a-z][\w|-]*)((?:\s+[a-z][\w|-]*)?)', snippet.text):
            for name in m.group(1).split('|'):
                if name not in commands:
                    failures.append(f'{snippet.where()}: `bam-jax {name}` is no command ({", ".join(commands)})')
                elif name == 'experts':
                    operations = m.group(2).split()
                    for operation in (operations[0].split('|') if operations else []):
                        if f'experts {operation}' not in commands:
                            failures.append(f'{snippet.where()}: `bam-jax experts {operation}` is no operation')
        args = bam_jax_args(snippet)
        if not args:
            continue
        for variant in alternatives(args):
            name, rest = split_command(variant, commands)
            if name is None:
                continue  # reported above
            known = commands[name]._option_string_actions
            for token in rest:
                flag = token.split('=', 1)[0]
                if flag.startswith('--') and not flag.startswith('--gin.') and flag not in known:
                    failures.append(f'{snippet.where()}: `bam-jax {name}` has no flag {flag}')
    assert not failures, '\n'.join(sorted(set(failures)))


def test_every_fenced_bam_jax_command_parses(commands):
    """A fenced command line parses with the real parser, as the CLI parses it."""
    from bam_jax import cli
    from bam_jax.errors import BamJaxError

    failures = []
    for snippet in SNIPPETS:
        args = bam_jax_args(snippet) if snippet.fenced else None
        if not args:
            continue
        for variant in alternatives(args):
            err = io.StringIO()
            try:
                rest, _ = cli._split_gin_overrides(variant)
                with contextlib.redirect_stderr(err):
                    cli._parser().parse_args(rest)
            except BamJaxError as e:
                failures.append(f'{snippet.where()}: {e}')
            except SystemExit:
                failures.append(f'{snippet.where()}: {err.getvalue().strip().splitlines()[-1]} '
                                f'(as parsed: bam-jax {" ".join(variant)})')
    assert not failures, '\n'.join(failures)


def test_every_benchmarks_command_parses():
    """`python -m bam_jax.benchmarks ...` in the docs parses with the benchmarks' own parser."""
    from bam_jax.benchmarks.__main__ import _args

    failures, seen = [], 0
    for snippet in SNIPPETS:
        tokens = words(snippet.text)
        if len(tokens) < 3 or not tokens[0].endswith('python') or tokens[1:3] != ['-m', 'bam_jax.benchmarks']:
            continue
        seen += 1
        err = io.StringIO()
        argv = sys.argv
        try:
            sys.argv = ['bam_jax.benchmarks', *tokens[3:]]
            with contextlib.redirect_stderr(err):
                _args()
        except SystemExit:
            failures.append(f'{snippet.where()}: {err.getvalue().strip().splitlines()[-1]}')
        finally:
            sys.argv = argv
    assert seen, 'no `python -m bam_jax.benchmarks` command found in the docs'
    assert not failures, '\n'.join(failures)


def test_every_make_target_exists():
    """`make X` names a Makefile target, and nothing after it but targets (make takes no
    flags of a target's program)."""
    targets = set(re.findall(r'^([\w-]+):', (REPO / 'Makefile').read_text(), re.M))
    failures = []
    for snippet in SNIPPETS:
        tokens = words(snippet.text)
        if len(tokens) < 2 or tokens[0] != 'make':
            continue
        for token in tokens[1:]:
            if token not in targets and not re.match(r'^[A-Z_]+=', token):
                failures.append(f'{snippet.where()}: {token!r} is not a make target ({", ".join(sorted(targets))})')
    assert not failures, '\n'.join(failures)


# ---------------------------------------------------------------------------------------
# launch/ dry runs


def launcher_env() -> dict:
    """This environment without what would send a launcher elsewhere (a pod, another OUT)."""
    drop = ('TPU_NAME', 'TPU_ZONE', 'TPU_PROJECT', 'REMOTE_DIR', 'OUT', 'MODEL', 'DOMAINS', 'MIXES', 'RERUNS',
            'EXTRA', 'BRANCH_TPUS', 'LOCAL_PROCESSES', 'HF_SEED', 'HF_EXPERTS', 'TASKS', 'TASK_LIMIT')
    return {k: v for k, v in os.environ.items() if k not in drop}


def run_bash(script: str) -> subprocess.CompletedProcess:
    return subprocess.run(['bash', '-c', script], cwd=REPO, env=launcher_env(), capture_output=True, text=True,
                          timeout=60)


def dry_runs() -> list[Snippet]:
    """Launcher commands outside `bash` blocks (those run whole); `...` (text left out) is not
    run, nor is a bare mention of a script."""
    out = {}
    for snippet in SNIPPETS:
        tokens = words(snippet.text)
        if not tokens or tokens[0] not in LAUNCHERS or '...' in snippet.text:
            continue
        if not snippet.fenced and len(tokens) == 1:
            continue
        if snippet.marker == 'bash':
            continue
        out.setdefault(snippet.text, snippet)
    return list(out.values())


def test_launch_commands_dry_run():
    snippets_run = dry_runs()
    assert len(snippets_run) >= 5, [s.where() for s in snippets_run]
    failures = []
    for snippet in snippets_run:
        script = re.sub(r'(launch/(?:run|pipeline|demo)\.sh)(?!\s+--dry-run)', r'\1 --dry-run', snippet.text, count=1)
        proc = run_bash(script)
        if proc.returncode != 0 or not proc.stdout.strip():
            failures.append(f'{snippet.where()}: `{script}` exited {proc.returncode}: {proc.stderr.strip()[-500:]}')
    assert not failures, '\n'.join(failures)


def bash_blocks() -> list[tuple[Block, Block | None]]:
    """(each `bash` block, the `output` block that follows it, if any)."""
    out = []
    for page in DOCS.values():
        for n, block in enumerate(page.blocks):
            if (block.marker or ('',))[0] == 'bash':
                after = page.blocks[n + 1] if n + 1 < len(page.blocks) else None
                out.append((block, after if after and (after.marker or ('',))[0] == 'output' else None))
    return out


def matches_output(expected: str, actual: str) -> str | None:
    """None if the output is the expected text, where `...` stands for text (in a line) or
    lines left out; else what did not match."""
    lines = [line.rstrip() for line in actual.splitlines()]
    pos, skip = 0, True  # the first expected line may come after other lines
    for want in expected.splitlines():
        if want.strip() == '...':
            skip = True
            continue
        pattern = re.compile('.*?'.join(re.escape(part) for part in want.rstrip().split('...')) + r'\Z')
        found = next((i for i in range(pos, len(lines) if skip else min(pos + 1, len(lines)))
                      if pattern.match(lines[i])), None)
        if found is None:
            near = lines[pos] if pos < len(lines) else '(end of output)'
            return f'expected line\n  {want}\nnext output line\n  {near}'
        pos, skip = found + 1, False
    return None


@pytest.mark.parametrize('block,output', bash_blocks(), ids=lambda b: b.where() if b else 'no output')
def test_bash_blocks_run_and_print_their_documented_output(block, output):
    proc = run_bash(block.text)
    assert proc.returncode == 0, f'{block.where()}:\n{block.text}\nexited {proc.returncode}:\n{proc.stderr[-2000:]}'
    if output is not None:
        problem = matches_output(output.text, proc.stdout)
        assert problem is None, f'{output.where()}: the output of {block.where()} is not as documented:\n{problem}'


# ---------------------------------------------------------------------------------------
# Python blocks


def python_pages() -> list[pathlib.Path]:
    return [path for path, page in DOCS.items() if any(b.lang == 'python' for b in page.blocks)]


def test_markers_are_known_and_python_blocks_run_or_say_why_not():
    failures = []
    for page in DOCS.values():
        for line, kind, reason, before_block in page.markers:
            where = f'{page.path.relative_to(REPO)}:{line}'
            if kind not in MARKER_KINDS:
                failures.append(f'{where}: unknown doc-test marker {kind!r} (known: {", ".join(MARKER_KINDS)})')
            if not before_block:
                failures.append(f'{where}: a doc-test marker must stand right above a fenced block')
            if kind == 'skip' and not reason:
                failures.append(f'{where}: `doc-test: skip` needs a reason: <!-- doc-test: skip: WHY -->')
        for block in page.blocks:
            if block.lang not in ('', 'python', 'sh', 'bash', 'shell', 'text', 'json', 'gin'):
                failures.append(f'{block.where()}: a ```{block.lang} block the doc test does not know')
            if (block.marker or ('',))[0] == 'output' and not any(
                    b.marker and b.marker[0] == 'bash' and b.line < block.line for b in page.blocks):
                failures.append(f'{block.where()}: an output block with no bash block above it')
    assert not failures, '\n'.join(failures)


def save_random_run(workdir: pathlib.Path, config, step: int) -> None:
    """A run directory as `bam-jax upcycle` leaves one: checkpoints/STEP and model.gin, with
    random weights."""
    import numpy as np

    from bam_jax import workdir as ckpt
    from bam_jax.models import abstract_model, flatten, split_params
    from bam_jax.models.params import unflatten
    from bam_jax.upcycle.gin_file import model_gin

    rng = np.random.default_rng(step)
    shapes = {k: v.shape for k, v in flatten(split_params(abstract_model(config))[1]).items()}
    params = {k: (rng.standard_normal(s) * 0.1).astype(np.float32) for k, s in shapes.items()}
    with ckpt.RunCheckpoints(workdir, keep=1) as checkpoints:
        checkpoints.save(step, unflatten(params), {'count': np.zeros((), np.int32)},
                         {'step': step, 'data_position': step, 'seed': 0}, config)
    (workdir / 'model.gin').write_text(model_gin(config, workdir / 'checkpoints' / str(step), 'tests/test_docs.py',
                                                 routing=True))


@pytest.fixture(scope='module')
def tiny_runs(tmp_path_factory):
    """A directory holding runs/seed (dense) and runs/bam (BAM expert-KV), tiny, step 1000."""
    from bam_jax.models import ModelConfig
    from bam_jax.models.config import MoAConfig, MoEConfig

    root = tmp_path_factory.mktemp('doc_runs')
    dense = ModelConfig(vocab_size=384, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, d_ff=64,
                        dtype='float32')
    bam = dataclasses.replace(dense, moe=MoEConfig(num_experts=2, routing='top_k', top_k=1, gate='softmax'),
                              moa=MoAConfig(num_experts=2, shared_kv=False))
    save_random_run(root / 'runs' / 'seed', dense, 1000)
    save_random_run(root / 'runs' / 'bam', bam, 1000)
    return root


@pytest.mark.parametrize('path', python_pages(), ids=lambda p: str(p.relative_to(REPO)))
def test_python_blocks_run(path, tiny_runs, monkeypatch):
    monkeypatch.chdir(tiny_runs)
    namespace = {'__name__': '__doc_test__'}
    ran = 0
    for block in DOCS[path].blocks:
        if block.lang != 'python' or (block.marker or ('',))[0] == 'skip':
            continue
        try:
            exec(compile(block.text, block.where(), 'exec'), namespace)
        except Exception as e:  # noqa: BLE001 - any error is the doc's
            pytest.fail(f'{block.where()}: the python block raised {type(e).__name__}: {e}\n'
                        f'{textwrap.indent(block.text, "    ")}')
        ran += 1
    assert ran, f'{path.relative_to(REPO)}: every python block is skipped'


# ---------------------------------------------------------------------------------------
# Names, files and links


def code_text(page: Page) -> list[Snippet]:
    out = page.spans()
    for block in page.blocks:
        if (block.marker or ('',))[0] != 'output':
            out += [Snippet(page.path, block.line + 1 + n, line, fenced=True)
                    for n, line in enumerate(block.text.split('\n'))]
    return out


def expand_braces(path: str) -> list[str]:
    m = re.search(r'\{([^}]*)\}', path)
    if not m:
        return [path]
    return [q for alt in m.group(1).split(',') for q in expand_braces(path[:m.start()] + alt + path[m.end():])]


def is_placeholder(path: str) -> bool:
    """gin/models/M.gin, gin/mix_<method>.gin: a name the reader fills in."""
    return '<' in path or any(re.fullmatch(r'[A-Z]', part.split('.')[0]) for part in path.split('/'))


def test_named_files_exist():
    """gin files, docs pages, scripts, tests and bam_jax source files named anywhere in the docs."""
    failures = []
    pattern = re.compile(r'(?<![\w/.-])((?:gin|docs|launch|tests|bam_jax)/[\w./{},<>-]*[\w}>])')
    for page in DOCS.values():
        text = page.path.read_text()
        for m in pattern.finditer(text):
            line = text.count('\n', 0, m.start()) + 1
            for path in expand_braces(m.group(1)):
                if not is_placeholder(path) and not (REPO / path).exists():
                    failures.append(f'{page.path.relative_to(REPO)}:{line}: {path} does not exist')
    assert not failures, '\n'.join(failures)


def module_has(module_file: pathlib.Path, name: str) -> bool:
    """Whether a module defines or imports `name` at its top level (read, not imported)."""
    tree = ast.parse(module_file.read_text())
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.name == name:
            return True
        if isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(isinstance(t, ast.Name) and t.id == name for t in targets):
                return True
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            if any((a.asname or a.name.split('.')[0]) == name for a in node.names):
                return True
    return False


def test_named_python_modules_and_names_exist():
    """`bam_jax.a.b` and `bam_jax.a.b.name` in code: the module exists and defines the name."""
    failures = []
    for page in DOCS.values():
        for snippet in code_text(page):
            for m in re.finditer(r'(?<![\w/.])bam_jax(?:\.\w+)+', snippet.text):
                parts = m.group(0).split('.')
                n = len(parts)
                while n > 1 and not ((REPO / pathlib.Path(*parts[:n])).with_suffix('.py').is_file()
                                     or (REPO / pathlib.Path(*parts[:n]) / '__init__.py').is_file()):
                    n -= 1
                if n == 1:
                    failures.append(f'{snippet.where()}: no module {m.group(0)}')
                    continue
                module = (REPO / pathlib.Path(*parts[:n])).with_suffix('.py')
                if not module.is_file():
                    module = REPO / pathlib.Path(*parts[:n]) / '__init__.py'
                if n < len(parts) and not module_has(module, parts[n]):
                    failures.append(f'{snippet.where()}: {".".join(parts[:n])} has no {parts[n]}')
    assert not failures, '\n'.join(failures)


def slug(heading: str) -> str:
    """GitHub's anchor of a heading."""
    text = heading.strip().lower().replace('`', '')
    return re.sub(r'[^\w\- ]', '', text).replace(' ', '-')


def anchors(page: Page) -> set[str]:
    return {slug(m.group(1)) for m in re.finditer(r'^#+\s+(.*)$', page.prose, re.M)}


def test_relative_links_resolve():
    failures = []
    for page in DOCS.values():
        for m in re.finditer(r'\[[^\]]*\]\(([^)\s]+)\)', page.prose):
            target = m.group(1)
            if re.match(r'^[a-z]+:', target):
                continue
            where = f'{page.path.relative_to(REPO)}:{page.prose.count(chr(10), 0, m.start()) + 1} ({target})'
            file, _, anchor = target.partition('#')
            path = (page.path.parent / file).resolve() if file else page.path
            if not path.exists():
                failures.append(f'{where}: {path.relative_to(REPO)} does not exist')
            elif anchor and path.suffix == '.md' and anchor not in anchors(DOCS.get(path) or read_page(path)):
                failures.append(f'{where}: {path.relative_to(REPO)} has no heading #{anchor}')
    assert not failures, '\n'.join(failures)


def test_pipeline_settings_are_the_scripts_defaults():
    """docs/pipeline.md's table of settings gives launch/pipeline.sh's defaults."""
    script = (REPO / 'launch' / 'pipeline.sh').read_text()
    defaults = dict(re.findall(r'\$\{(\w+):?-([^}]*)\}', script))
    rows = re.findall(r'^\| `([A-Z_]+)` \| [^|]* \| ([^|]*) \|$', DOCS[REPO / 'docs' / 'pipeline.md'].prose, re.M)
    checked = 0
    for name, default in rows:
        default = default.strip()
        value = default.strip('`')
        if re.fullmatch(r'`[^`]+`', default) or default.isdigit():  # not prose ("none", "all")
            checked += 1
            assert defaults.get(name) == value, \
                f'docs/pipeline.md: {name} defaults to {value!r} there, {defaults.get(name)!r} in launch/pipeline.sh'
    assert checked >= 8, f'docs/pipeline.md: only {checked} defaults found in its settings table'


def test_developers_module_table_names_real_modules():
    failures, package = [], None
    for row in re.findall(r'^\| (`\w+`|) \| (`[^|]*) \|', DOCS[REPO / 'docs' / 'developers.md'].prose, re.M):
        package = row[0].strip('`') or package
        for module in re.findall(r'`(\w+)`', row[1]):
            base = REPO / 'bam_jax' if package == 'bam_jax' else REPO / 'bam_jax' / package
            if not ((base / f'{module}.py').is_file() or (base / module / '__init__.py').is_file()):
                failures.append(f'docs/developers.md: bam_jax.{package}.{module} does not exist')
    assert not failures, '\n'.join(failures)
