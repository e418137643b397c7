"""Fenced code is cut as code (blank-line blocks, never inside a string literal or open
brackets), prefix-stable, and the online tracker cuts the same token-exact steps."""

from __future__ import annotations

import pytest
import torch

from stepsal_lens import Trace, get_format
from stepsal_lens.lens.generation import prompt_ids  # noqa: F401  (the tracker's prompt)
from stepsal_lens.segments.code_steps import code_block_spans, fenced_regions, split_with_code
from stepsal_lens.segments.splitters import paper_splitter
from stepsal_lens.segments.tracker import SegmentTracker

CODE = "\n".join([
    'import sys',
    'from collections import deque',
    '',
    'def solve(n):',
    '    """Docstring with a blank line.',
    '',
    '    And a period. Then more text.',
    '    """',
    '    table = [',
    '        1, 2,',
    '',
    '        3, 4,',
    '    ]',
    '    s = "a string. with \'\'\' and # inside"',
    '',
    "    t = 'it\\'s escaped. ok'  # a comment: don't split. here",
    '    return sum(table) + n',
    '',
    'class Solution:',
    '    def twoSum(self, nums, target):',
    '        seen = {}',
    '',
    '        for i, x in enumerate(nums):',
    '            if target - x in seen:',
    '                return [seen[target - x], i]',
    '            seen[x] = i',
    '',
    'if __name__ == "__main__":',
    '    print(solve(int(input())))',
    '',
])


def _texts(text, spans):
    return [text[a:b] for a, b in spans]


def test_blank_line_blocks_never_inside_strings_or_brackets():
    blocks = _texts(CODE, code_block_spans(CODE))
    assert blocks[0] == "import sys\nfrom collections import deque"
    assert blocks[1].startswith("def solve(n):") and blocks[1].endswith("# inside\"")
    assert '"""Docstring with a blank line.\n\n    And a period.' in blocks[1]  # one block
    assert "1, 2,\n\n        3, 4," in blocks[1]  # a blank line inside brackets
    assert blocks[2].startswith("t = 'it\\'s escaped.") and blocks[2].endswith("+ n")
    assert blocks[3].startswith("class Solution:") and blocks[3].endswith("seen = {}")
    assert blocks[4].startswith("for i, x in") and blocks[5].startswith("if __name__")
    assert len(blocks) == 6
    assert "".join(CODE.split()) == "".join("".join(blocks).split())  # no character lost


def test_short_blocks_join_the_next_and_the_last_stands():
    code = "a = 1\n\nb = 2\n\nprint(a + b)\n\nx"
    assert _texts(code, code_block_spans(code)) == ["a = 1\n\nb = 2\n\nprint(a + b)", "x"]


def test_fences_split_prose_and_code():
    text = ("First I think it over. Then I write the code below:\n```python\n" + CODE + "```\n"
            "It reads the number n. Then it prints the sum.")
    regions = fenced_regions(text)
    assert [k for k, _ in regions] == ["prose", "code", "prose"]
    steps = _texts(text, paper_splitter(text, "thinking"))
    assert steps[0] == "First I think it over." and steps[1].endswith("```python")
    assert steps[2] == "import sys\nfrom collections import deque"
    assert steps[-3].endswith("print(solve(int(input())))\n```")
    assert steps[-2:] == ["It reads the number n.", "Then it prints the sum."]
    # the same prose without a fence is split exactly as before
    prose = "First I think. Then I write it. It reads n. Then it prints the sum."
    assert paper_splitter(prose, "thinking") == split_with_code(
        prose, "thinking", lambda t, s: paper_splitter(t, s))


def test_an_unclosed_fence_is_code_to_the_end():
    text = "Code:\n```python\nx = 1\n\ny = 2 + x\n"
    assert _texts(text, paper_splitter(text, "summary")) == [
        "Code:\n```python", "x = 1\n\ny = 2 + x"]


SAMPLES = [
    "Plan. Write it now please.\n```python\n" + CODE + "```\nDone. The end is here.",
    "```\nx = '''\n\n'''\n\ny = [\n\n]\n\nprint(x, y)\n```\n\nSummary paragraph here.\n\nMore.",
    "Two blocks.\n```py\na = 1\n\nb = 2 # c. d\n```\nThen\n```\nprint(3)\n\n\nprint(4)\n```",
    "An intro paragraph here.\n\n```python\nimport sys\n\nprint(sys.argv)\n```\n\nAfter it.",
]


@pytest.mark.parametrize("segment", ["thinking", "summary"])
@pytest.mark.parametrize("text", SAMPLES)
def test_prefix_stable(text, segment):
    """Splitting any prefix starts the same steps (what StepFlow's tracker needs)."""
    full = [a for a, _ in paper_splitter(text, segment)]
    for n in range(1, len(text) + 1):
        got = [a for a, _ in paper_splitter(text[:n], segment)]
        assert got == [a for a in full if a < n], (n, text[:n])


THINKING = ("Let me write the program. I read n and print its square.\n```python\n"
            "n = int(input())\n\nprint(n * n)  # squared. done\n```\nThat should work.")
SUMMARY = ("Here is the solution:\n```python\nimport sys\n\ndef main():\n    n = int("
           "sys.stdin.readline())\n\n    print(n * n)\n\nmain()\n```")


SUMMARY_BLANK = ("Read everything, keep the even values.\n\n```python\nimport sys\n\n"
                 "def main():\n    print(sum(map(int, sys.stdin.read().split())))\n\n"
                 "main()\n```")


@pytest.mark.parametrize("name", ["deepseek-r1", "think-tags", "qwen3"])
def test_a_fence_after_a_blank_line_joins_the_code_online_too(tokenizer, name):
    fmt = get_format(name)
    question = "Sum the numbers."
    text = fmt.render(question, THINKING, SUMMARY_BLANK)
    trace = Trace.from_text(text, tokenizer, format=fmt)
    texts = [s.text for s in trace.steps if s.segment == "summary"]
    assert texts == ["Read everything, keep the even values.", "```python\nimport sys",
                     "def main():\n    print(sum(map(int, sys.stdin.read().split())))",
                     "main()\n```"], texts
    ids = trace.token_ids.tolist()
    n_prompt = len(tokenizer(fmt.prompt(question), add_special_tokens=False)["input_ids"])
    tracker = SegmentTracker(tokenizer, fmt, "paper")
    tracker.reset(torch.tensor([ids[:n_prompt]]))
    for t in ids[n_prompt:]:
        tracker.extend(torch.tensor([[t]]))
    assert tracker.step[0].tolist() == trace.step_of_token.tolist()


@pytest.mark.parametrize("name", ["deepseek-r1", "think-tags", "qwen3"])
def test_online_steps_are_the_traces_and_token_exact(tokenizer, name):
    fmt = get_format(name)
    question = "Square a number read from stdin."
    text = fmt.render(question, THINKING, SUMMARY)
    trace = Trace.from_text(text, tokenizer, format=fmt)
    code_steps = [s for s in trace.steps if "n * n" in s.text or "main()" in s.text]
    assert code_steps, [s.text for s in trace.steps]
    for step in trace.steps:  # token-exact: the tokens of a step hold its characters
        a, b = step.char_span
        assert text[a:b] == step.text
    spans = [s.token_span for s in trace.steps]
    assert all(x[1] <= y[0] for x, y in zip(spans, spans[1:])), spans
    ids = trace.token_ids.tolist()
    n_prompt = len(tokenizer(fmt.prompt(question), add_special_tokens=False)["input_ids"])
    tracker = SegmentTracker(tokenizer, fmt, "paper")
    tracker.reset(torch.tensor([ids[:n_prompt]]))
    for t in ids[n_prompt:]:
        tracker.extend(torch.tensor([[t]]))
    starts = torch.nonzero(tracker.step_start[0]).flatten().tolist()
    assert starts == [s.token_span[0] for s in trace.steps]
    assert tracker.step[0].tolist() == trace.step_of_token.tolist()
    texts = [s.text for s in trace.steps if s.segment == "summary"]
    assert texts == ["Here is the solution:\n```python", "import sys",
                     "def main():\n    n = int(sys.stdin.readline())", "print(n * n)",
                     "main()\n```"], texts
