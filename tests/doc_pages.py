"""The README and docs/*.md as tests/test_docs.py reads them: pages, their fenced blocks and
doc-test markers, and the command lines and inline code in them, each with its page and line."""

import dataclasses
import pathlib
import re
import shlex

REPO = pathlib.Path(__file__).resolve().parent.parent
PAGES = [REPO / 'README.md', *sorted((REPO / 'docs').glob('*.md'))]
MARKER = re.compile(r'^<!--\s*doc-test:\s*(\w+)\s*(?::\s*(.*?))?\s*-->\s*$')
MARKER_KINDS = ('bash', 'output', 'skip')
FENCE = re.compile(r'^\s*```\s*(\w*)')
LAUNCHERS = ('launch/run.sh', 'launch/pipeline.sh', 'launch/demo.sh')


@dataclasses.dataclass
class Block:
    """A fenced code block: its page, the line of its opening fence, language and marker."""
    page: pathlib.Path
    line: int
    lang: str
    text: str
    marker: tuple[str, str] | None  # (kind, reason) of the `<!-- doc-test: ... -->` just above

    def where(self) -> str:
        return f'{self.page.relative_to(REPO)}:{self.line}'


@dataclasses.dataclass
class Snippet:
    """A command line: one logical line of a fenced block, or an inline code span."""
    page: pathlib.Path
    line: int
    text: str
    fenced: bool
    marker: str = ''  # the doc-test marker of its fenced block

    def where(self) -> str:
        return f'{self.page.relative_to(REPO)}:{self.line} `{self.text}`'


@dataclasses.dataclass
class Page:
    path: pathlib.Path
    blocks: list[Block]
    prose: str  # the page with every fenced block's lines blanked (line numbers kept)
    markers: list[tuple[int, str, str, bool]]  # (line, kind, reason, followed by a fenced block)

    def spans(self) -> list[Snippet]:
        """The inline code spans, `\\|` (a pipe in a table cell) unescaped."""
        out = []
        for m in re.finditer(r'`([^`]+)`', self.prose):
            text = ' '.join(m.group(1).replace('\\|', '|').split())
            out.append(Snippet(self.path, self.prose.count('\n', 0, m.start()) + 1, text, fenced=False))
        return out


def read_page(path: pathlib.Path) -> Page:
    lines = path.read_text().split('\n')
    blocks, prose, markers = [], [], []
    i = 0
    while i < len(lines):
        fence = FENCE.match(lines[i])
        if not fence:
            prose.append(lines[i])
            m = MARKER.match(lines[i].strip())
            if m:
                nxt = lines[i + 1] if i + 1 < len(lines) else ''
                markers.append((i + 1, m.group(1), m.group(2) or '', bool(FENCE.match(nxt))))
            i += 1
            continue
        start = i
        i += 1
        while i < len(lines) and not FENCE.match(lines[i]):
            i += 1
        above = MARKER.match(lines[start - 1].strip()) if start else None
        marker = (above.group(1), above.group(2) or '') if above else None
        blocks.append(Block(path, start + 1, fence.group(1), '\n'.join(lines[start + 1:i]), marker))
        prose.extend([''] * (i - start + 1))
        i += 1
    return Page(path, blocks, '\n'.join(prose), markers)


DOCS = {path: read_page(path) for path in PAGES}


def command_lines(block: Block) -> list[Snippet]:
    """The logical lines of a shell block: `\\`-continued lines joined."""
    out, pending, first = [], '', 0
    for n, line in enumerate(block.text.split('\n')):
        if not pending:
            first = block.line + 1 + n
        if line.rstrip().endswith('\\'):
            pending += line.rstrip()[:-1] + ' '
            continue
        text = (pending + line).strip()
        pending = ''
        if text:
            out.append(Snippet(block.page, first, text, fenced=True, marker=(block.marker or ('',))[0]))
    return out


def snippets() -> list[Snippet]:
    """Every command-like text: fenced shell lines (output blocks left out) and inline spans."""
    out = []
    for page in DOCS.values():
        for block in page.blocks:
            if block.lang in ('', 'sh', 'bash', 'shell') and (block.marker or ('',))[0] != 'output':
                out += command_lines(block)
        out += page.spans()
    return out


SNIPPETS = snippets()


def words(text: str) -> list[str]:
    """Shell words, without a trailing comment and without leading VAR=value assignments."""
    try:
        tokens = shlex.split(text)
    except ValueError:
        tokens = text.split()
    for n, token in enumerate(tokens):
        if token.startswith('#'):
            tokens = tokens[:n]
            break
    while tokens and re.match(r'^[A-Za-z_]\w*=', tokens[0]):
        tokens = tokens[1:]
    return tokens
