"""The formula text language: parse examples, printer / parser round trips, hostile text rejected."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from primitives import OPS, format_formula, parse_formula
from primitives.tree import Call, Const, Term
from pruning_core.errors import UsageError

W, X, G = Term("W"), Term("X"), Term("G")
UNARY = [name for name, op in OPS.items() if op.arity == 1]
BINARY = [name for name, op in OPS.items() if op.arity == 2 and name != "pow"]

finite_numbers = st.floats(min_value=0, max_value=1e300, allow_nan=False, allow_infinity=False)
leaves = st.one_of(st.sampled_from([Term(n) for n in "WXGHU"]), finite_numbers.map(Const))


def _extend(children):
    return st.one_of(
        st.tuples(st.sampled_from(UNARY), children).map(lambda t: Call(t[0], (t[1],))),
        st.tuples(st.sampled_from(BINARY), children, children).map(lambda t: Call(t[0], (t[1], t[2]))),
        st.tuples(children, st.floats(-1e6, 1e6, allow_nan=False)).map(
            lambda t: Call("pow", (t[0], Const(t[1] + 0.0)))
        ),
    )


trees = st.recursive(leaves, _extend, max_leaves=20)


@pytest.mark.parametrize(
    "text, tree",
    [
        ("abs(W) * sqrt(X)", Call("mul", (Call("abs", (W,)), Call("sqrt", (X,))))),
        ("W + X * G", Call("add", (W, Call("mul", (X, G))))),
        ("W - X - G", Call("sub", (Call("sub", (W, X)), G))),
        ("W / X / G", Call("div", (Call("div", (W, X)), G))),
        ("-W^2", Call("neg", (Call("pow", (W, Const(2.0))),))),
        ("(-W)^2", Call("pow", (Call("neg", (W,)), Const(2.0)))),
        ("W^-1.5", Call("pow", (W, Const(-1.5)))),
        ("-W * X", Call("mul", (Call("neg", (W,)), X))),
        ("2.5e-3 * W", Call("mul", (Const(0.0025), W))),
        (".5 + 1.", Call("add", (Const(0.5), Const(1.0)))),
        ("add(W, mul(X, G))", Call("add", (W, Call("mul", (X, G))))),
        ("  mms ( G )\n", Call("mms", (G,))),
        ("pow1_3(W)", Call("pow", (W, Const(1 / 3)))),  # the GP primitive's name, as DEAP prints it
        ("pow3(W + X)", Call("pow", (Call("add", (W, X)), Const(3.0)))),
    ],
)
def test_parse_examples(text, tree):
    assert parse_formula(text) == tree


@pytest.mark.parametrize(
    "tree, text",
    [
        (Call("sub", (W, Call("sub", (X, G)))), "W - (X - G)"),
        (Call("mul", (Call("add", (W, X)), G)), "(W + X) * G"),
        (Call("neg", (Call("neg", (W,)),)), "-(-W)"),
        (Call("pow", (Call("pow", (W, Const(2.0))), Const(0.5))), "(W^2)^0.5"),
        (Call("mul", (Const(1e-5), W)), "1e-05 * W"),
    ],
)
def test_printer_examples(tree, text):
    assert format_formula(tree) == text


@settings(max_examples=300, deadline=None)
@given(trees)
def test_tree_text_tree_round_trip(tree):
    text = format_formula(tree)
    assert parse_formula(text) == tree
    assert format_formula(parse_formula(text)) == text


def _noisy(tree, draw) -> str:
    """Another valid spelling: call syntax for binary operators, extra parentheses and spaces."""
    space = " " * draw(st.integers(0, 2))
    if isinstance(tree, Term):
        text = tree.name
    elif isinstance(tree, Const):
        text = repr(tree.value)
    elif tree.op == "pow":
        text = f"({_noisy(tree.args[0], draw)}){space}^{space}{tree.args[1].value!r}"
    else:
        text = f"{tree.op}{space}({space}{f',{space}'.join(_noisy(a, draw) for a in tree.args)})"
    return f"({space}{text}{space})" if draw(st.booleans()) else text


@settings(max_examples=200, deadline=None)
@given(trees, st.data())
def test_text_tree_text_tree_round_trip(tree, data):
    spelled = _noisy(tree, data.draw)
    parsed = parse_formula(spelled)
    assert parsed == tree
    assert parse_formula(format_formula(parsed)) == tree


HOSTILE = [
    "__import__('os').system('touch x')",
    "W.__class__",
    "W.T",
    "lambda: 1",
    "lambda x: x",
    '"a"',
    "'W'",
    "W[0]",
    "{W}",
    "foo(W)",
    "eval(W)",
    "exec",
    "os",
    "W(X)",
    "abs",
    "abs(W, X)",
    "add(W)",
    "pow(W, 2)",
    "pow1_3(W, X)",
    "pow1_3",
    "pow1_5(W)",
    "W ^ X",
    "W ** 2",
    "W +",
    "(W",
    "W)",
    "W X",
    "2W",
    "1e999 * W",
    "",
    "   ",
    "W; X",
    "W # comment",
    "W\x00",
    "W × X",
    "(" * 70 + "W" + ")" * 70,
    "-" * 100 + "W",
    " + ".join(["W"] * 200),
    "W" + " " * 5 * 1024,
]


@pytest.mark.parametrize("text", HOSTILE)
def test_hostile_or_malformed_text_is_one_line_usage_error(text):
    with pytest.raises(UsageError) as info:
        parse_formula(text)
    message = str(info.value)
    assert message and "\n" not in message and len(message) < 400


def test_error_names_the_problem():
    for text, fragment in [
        ("__import__('os')", "dunder"),
        ("W.__class__", "attribute"),
        ("'a'", "string"),
        ("lambda: 1", "unknown name 'lambda'"),
        ("W" * 5000, "4096"),
        ("foo(W)", "unknown name 'foo'"),
    ]:
        with pytest.raises(UsageError, match=fragment):
            parse_formula(text)


def test_size_limit_is_4_kib():
    assert parse_formula("W" + " " * 4095) == W
    with pytest.raises(UsageError):
        parse_formula("W" + " " * 4096)
    with pytest.raises(UsageError):
        parse_formula(b"W")


def test_hostile_text_runs_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for text in ["__import__('os').system('touch x')", 'exec(\'open("x", "w")\')', "open('x', 'w')"]:
        with pytest.raises(UsageError):
            parse_formula(text)
    assert list(tmp_path.iterdir()) == []
