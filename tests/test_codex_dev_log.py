"""codex_dev.log parses by seed 000 section 5 (agents read it): a malformed block fails this test."""
import datetime
import os
import re
from typing import Dict, List

import pytest

from conftest import ROOT

HEADER = re.compile(r'^## \[(?P<timestamp>[^\]]+)\](?P<summary> SUMMARY)?\s*$')
FIELD = re.compile(r'^### (?P<name>File|Action|Description|Code):\s?(?P<value>.*)$')
SUMMARY_SECTIONS = ('Implemented files', 'Modified files', 'Left for later')


class LogFormatError(ValueError):
    pass


def parse_codex_log(text: str) -> List[Dict]:
    """Blocks start at `## [TIMESTAMP]` (or `... SUMMARY`); a field runs to the next `###` or `---`;
    `### Code:` is followed by a fenced block read to its closing fence; every block ends with `---`."""
    blocks, current, field, lines = [], None, None, text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        header = HEADER.match(line)
        if header:
            if current is not None and not current['closed']:
                raise LogFormatError(f'line {i + 1}: block before it does not end with ---')
            stamp = header['timestamp']
            try:
                when = datetime.datetime.strptime(stamp, '%Y-%m-%dT%H:%M:%SZ')
            except ValueError:
                raise LogFormatError(f'line {i + 1}: timestamp {stamp!r} is not ISO 8601 (YYYY-MM-DDTHH:MM:SSZ)')
            current = {'line': i + 1, 'time': when, 'summary': bool(header['summary']), 'fields': {}, 'closed': False}
            blocks.append(current)
            field = None
        elif line.strip() == '---':
            if current is None or current['closed']:
                raise LogFormatError(f'line {i + 1}: --- outside a block')
            current['closed'], field = True, None
        elif line.startswith('###'):
            match = FIELD.match(line)
            if match is None or current is None or current['closed']:
                raise LogFormatError(f'line {i + 1}: unknown field or field outside a block: {line!r}')
            field = match['name']
            if field in current['fields']:
                raise LogFormatError(f'line {i + 1}: {field} twice in one block')
            if field == 'Code':
                if i + 1 >= len(lines) or not lines[i + 1].startswith('```'):
                    raise LogFormatError(f'line {i + 1}: ### Code: is not followed by a ``` fence')
                end = next((j for j in range(i + 2, len(lines)) if lines[j].strip() == '```'), None)
                if end is None:
                    raise LogFormatError(f'line {i + 1}: code fence never closed')
                current['fields']['Code'] = '\n'.join(lines[i + 2:end])
                i, field = end, None
            else:
                current['fields'][field] = match['value']
        elif field is not None:
            current['fields'][field] += '\n' + line
        elif line.strip() and current is not None and not current['closed']:
            raise LogFormatError(f'line {i + 1}: text outside any field: {line!r}')
        elif line.strip() and (current is None or current['closed']):
            raise LogFormatError(f'line {i + 1}: text between blocks: {line!r}')
        i += 1
    if current is not None and not current['closed']:
        raise LogFormatError('the last block does not end with ---')
    for block in blocks:
        check_block(block)
    for before, after in zip(blocks, blocks[1:]):
        if after['time'] < before['time']:
            raise LogFormatError(f'line {after["line"]}: timestamp goes back in time (the log is append-only)')
    return blocks


def check_block(block: Dict) -> None:
    fields, where = {k: v.strip() for k, v in block['fields'].items()}, f'block at line {block["line"]}'
    if not fields.get('Description'):
        raise LogFormatError(f'{where}: no ### Description')
    if block['summary']:
        missing = [s for s in SUMMARY_SECTIONS if s not in fields['Description']]
        if missing:
            raise LogFormatError(f'{where}: SUMMARY lacks {missing}')
        return
    path = fields.get('File', '').strip('`')
    if not path or path.startswith('/') or '..' in path.split('/'):
        raise LogFormatError(f'{where}: ### File must be a relative path, got {fields.get("File")!r}')
    if fields.get('Action', '').strip('`') not in ('Create', 'Modify'):
        raise LogFormatError(f'{where}: ### Action must be Create or Modify, got {fields.get("Action")!r}')


GOOD = '''## [2026-01-01T00:00:00Z]
### File: `a.py`
### Action: Create
### Description: one
two
### Code:
```python
x = 1
---
```
---

## [2026-01-01T00:00:01Z] SUMMARY
### Description: Implemented files: a.py. Modified files: none. Left for later: b.
---
'''


class TestParseCodexLog:
    """Edge cases: multi-line description, `---` inside a code fence, SUMMARY block; each malformation below fails."""

    def test_good(self):
        blocks = parse_codex_log(GOOD)
        assert len(blocks) == 2 and blocks[0]['fields']['Code'] == 'x = 1\n---'
        assert blocks[0]['fields']['Description'].strip() == 'one\ntwo'

    @pytest.mark.parametrize('broken', [
        GOOD.replace('### Action: Create', '### Action: Delete'),
        GOOD.replace('### File: `a.py`', '### File: `/abs/a.py`'),
        GOOD.replace('2026-01-01T00:00:00Z', 'yesterday'),
        GOOD.replace('2026-01-01T00:00:01Z', '2025-01-01T00:00:01Z'),
        GOOD.replace('```\n---\n\n##', '```\n\n##'),
        GOOD.replace('x = 1\n---\n```', 'x = 1\n---'),
        GOOD.replace('Left for later: b.', ''),
        GOOD.replace('### Action: Create', '### Actions: Create'),
    ])
    def test_malformed(self, broken):
        with pytest.raises(LogFormatError):
            parse_codex_log(broken)


class TestCodexDevLog:
    """The repository's codex_dev.log itself."""

    def test_parses(self):
        blocks = parse_codex_log(open(os.path.join(ROOT, 'codex_dev.log'), encoding='utf-8').read())
        assert len(blocks) > 1 and any(b['summary'] for b in blocks), 'each issue closes with a SUMMARY block'
