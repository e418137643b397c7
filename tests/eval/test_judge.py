"""Judging equals LiveCodeBench's documented rules (lcb_runner/evaluation/testing_util.py):
cases written from its behaviour, then the verdicts on real sandboxed programs."""

from __future__ import annotations

import pytest

from stepsal_lens.errors import StepSalError
from stepsal_lens.eval.code.judge import (VERDICTS, CodeTest, compare_functional,
                                          compare_stdout, judge_code)
from stepsal_lens.eval.code.sandbox import Limits

FAST = Limits(timeout=2, memory_mb=512, output_mb=4, nproc=32, work_mb=16)

# (program output, expected output, equal under LiveCodeBench's stdin rule)
STDIN_CASES = [
    ("3\n", "3", True),  # trailing newline
    ("  3  \n\n\n", "3", True),  # surrounding whitespace, trailing blank lines
    ("1 2 3\n4\n", "1 2 3\n4\n", True),
    ("1  2   3", "1 2 3", True),  # numbers compare element-wise after split()
    ("a  b", "a b", False),  # words must match as lines after strip()
    ("1\r\n2\r\n", "1\n2", True),  # \r at line ends is whitespace
    ("1\n\n2", "1\n2", False),  # an inner blank line is a line
    ("1\n2", "1 2", False),  # line counts differ
    ("1.0", "1", True),  # Decimal equality: 1.0 == 1
    ("1.50", "1.5", True),
    ("1e3", "1000", True),
    ("0.333", "0.3333", False),  # no tolerance
    ("0.30000000000000004", "0.3", False),
    ("-0", "0", True),
    ("Yes", "yes", False),  # case matters
    ("YES", "YES", True),
    ("", "", True),
    ("", "0", False),
    ("1 2 x", "1 2 x", True),  # equal strings: case 1
    ("1 2 x", "1.0 2 x", False),  # a word on the line: no number rule
    ("50000000000000000", "50000000000000001", False),  # exact, unlike np.isclose
    ("nan", "nan", True),  # equal strings
]


@pytest.mark.parametrize("output,expected,equal", STDIN_CASES)
def test_stdin_rule(output, expected, equal):
    got, why = compare_stdout(output, expected)
    assert got is equal, (output, expected, why)
    assert bool(why) is (not equal)


# (the judge's JSON of the returned value, expected output JSON, equal)
FUNCTIONAL_CASES = [
    ('{"value": [1, 2, 3]}', "[1, 2, 3]", True),
    ('{"value": [1, 2, 3]}', "[1, 2]", False),
    ('{"value": "abc"}', '"abc"', True),
    ('{"value": "abc"}', '"abc "', False),
    ('{"value": true}', "true", True),
    ('{"value": false}', "true", False),
    ('{"value": true}', "1", True),  # Python: True == 1
    ('{"value": 2}', "2.0", True),  # 2 == 2.0
    ('{"value": 0.1}', "0.1", True),
    ('{"value": 0.30000000000000004}', "0.3", False),  # no float tolerance
    ('{"value": null}', "null", True),
    ('{"value": [[1, 2], [3]]}', "[[1, 2], [3]]", True),
    ('{"value": {"a": 1}}', '{"a": 1}', True),
    ('{"unequal": "set", "repr": "{1}"}', "[1]", False),
]


@pytest.mark.parametrize("result,expected,equal", FUNCTIONAL_CASES)
def test_functional_rule(result, expected, equal):
    got, why = compare_functional(result, expected)
    assert got is equal, (result, expected, why)


def test_functional_gold_must_be_json():
    with pytest.raises(StepSalError, match="expected output is not JSON"):
        compare_functional('{"value": 1}', "[1,")


def _fn(body: str) -> str:
    return f"class Solution:\n    def f(self, *args):\n        {body}\n"


@pytest.mark.parametrize("body,expected,verdict", [
    ("return list(args)", "[1, \"x\", [2, 3], true]", "passed"),  # JSON-decoded arguments
    ("return tuple(args)", "[1, \"x\", [2, 3], true]", "passed"),  # top-level tuple = list
    ("return [tuple(args[2])]", "[[2, 3]]", "wrong_answer"),  # nested tuple != list
    ("return set(args[2])", "[2, 3]", "wrong_answer"),  # a set equals no JSON value
    ("return args[3]", "true", "passed"),
    ("return 'True'", "true", "wrong_answer"),  # a string is not a boolean
    ("return args[1] + 'y'", '"xy"', "passed"),
    ("raise ValueError('boom')", "1", "runtime_error"),
])
def test_functional_programs(body, expected, verdict):
    test = CodeTest('1\n"x"\n[2, 3]\ntrue', expected, "functional")
    v = judge_code(_fn(body), [test], func_name="f", limits=FAST)
    assert v.verdict == verdict, v


def test_functional_state_does_not_leak_between_tests_and_module_functions_work():
    code = ("seen = []\nclass Solution:\n    def f(self, x):\n        seen.append(x)\n"
            "        return len(seen)\n")
    tests = [CodeTest("5", "1", "functional"), CodeTest("6", "1", "functional")]
    assert judge_code(code, tests, func_name="f", limits=FAST).verdict == "passed"
    plain = "def g(a, b):\n    return a * b\n"
    assert judge_code(plain, [CodeTest("3\n4", "12", "functional")], func_name="g",
                      limits=FAST).verdict == "passed"


def test_every_verdict_with_its_failing_test_and_excerpt():
    ok = CodeTest("2\n", "4\n")
    tests = [ok, CodeTest("3\n", "9\n"), CodeTest("0\n", "0\n")]
    cases = {
        "passed": "n = int(input())\nprint(n * n)",
        "wrong_answer": "n = int(input())\nprint(n * 2)",
        "runtime_error": "n = int(input())\nprint(n * n if n != 3 else 1 // 0)",
        "time_limit": "import time\nn = int(input())\nif n == 3:\n    time.sleep(60)\nprint(n * n)",
        "memory_limit": "n = int(input())\nx = bytearray((n % 3 == 0 and n > 0) * 4 * 1024 ** 3)\nprint(n * n)",
        "compile_error": "n = int(input()\nprint(n)",
    }
    seen = {}
    for verdict, code in cases.items():
        v = judge_code(code, tests, limits=FAST)
        seen[verdict] = v
        assert v.verdict == verdict, (verdict, v)
    assert seen["passed"].failed_test is None and len(seen["passed"].tests) == 3
    assert seen["wrong_answer"].failed_test == 1
    assert "got '6', expected '9'" in seen["wrong_answer"].excerpt
    assert seen["runtime_error"].failed_test == 1
    assert "ZeroDivisionError" in seen["runtime_error"].excerpt
    assert seen["time_limit"].failed_test == 1 and seen["time_limit"].tests[-1]["index"] == 1
    assert seen["memory_limit"].failed_test == 1
    assert seen["compile_error"].failed_test is None
    assert "SyntaxError" in seen["compile_error"].excerpt
    no_code = judge_code(None, tests, limits=FAST)
    assert (no_code.verdict, no_code.excerpt) == ("no_code", "the answer holds no code block")
    assert set(VERDICTS) == set(seen) | {"no_code"}


def test_judging_stops_at_the_first_failure_and_main_guard_and_exit_work():
    code = ("import sys\ndef main():\n    n = int(sys.stdin.readline())\n    print(n)\n"
            "    exit()\n    print('never')\nif __name__ == '__main__':\n    main()\n")
    tests = [CodeTest("1", "1"), CodeTest("2", "3"), CodeTest("3", "3")]
    v = judge_code(code, tests, limits=FAST)
    assert (v.verdict, v.failed_test, len(v.tests)) == ("wrong_answer", 1, 2), v


def test_the_prelude_of_livecodebench_is_there():
    code = "print(sorted(Counter('abca').items()), gcd(12, 18), sys.getrecursionlimit())"
    v = judge_code(code, [CodeTest("", "[('a', 2), ('b', 1), ('c', 1)] 6 50000")], limits=FAST)
    assert v.verdict == "passed", v


def test_missing_method_and_bad_tests_are_named():
    v = judge_code("class Solution:\n    pass\n", [CodeTest("1", "1", "functional")],
                   func_name="twoSum", limits=FAST)
    assert v.verdict == "compile_error" and "twoSum" in v.excerpt, v
    with pytest.raises(StepSalError, match="mix testtypes"):
        judge_code("pass", [CodeTest("1", "1"), CodeTest("1", "1", "functional")])
    with pytest.raises(StepSalError, match="need func_name"):
        judge_code("pass", [CodeTest("1", "1", "functional")])
    with pytest.raises(StepSalError, match="at least one test"):
        judge_code("pass", [])
