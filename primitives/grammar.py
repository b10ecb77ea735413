"""The formula text language: a whitelist tokenizer and a recursive-descent parser. Nothing in the
text is ever evaluated; only names from the operator and terminal tables are accepted.

  expr    := term (('+' | '-') term)*
  term    := unary (('*' | '/') unary)*
  unary   := '-' unary | power
  power   := primary ('^' '-'? NUMBER)?          x^c means |x|^c
  primary := NUMBER | TERMINAL | OP '(' expr (',' expr)* ')' | '(' expr ')'

Binary operators are left-associative; every operator of the table except pow may also be written as
a call, e.g. ``add(W, X)``. The GP's power primitives read as their powers (``pow1_3(W)`` is
``W^0.3333333333333333``), so DEAP's own printing of a tree parses to the same formula.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from primitives.ops import OPS, POWER_PRIMITIVES
from primitives.terminals import TERMINALS
from primitives.tree import Call, Const, Expr, Term, depth
from pruning_core.errors import UsageError

MAX_BYTES = 4096
MAX_NESTING = 64  # parentheses, calls and unary minus inside one another
MAX_DEPTH = 128  # levels of the parsed tree (long chains like a + b + c + ... count too)
_NUMBER = re.compile(r"([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_NUMBER_START = set("0123456789.")
_PUNCTUATION = set("+-*/^(),")
_HINT = "write e.g. 'abs(W) * sqrt(X)'"


@dataclass(frozen=True)
class Token:
    kind: str  # "num", "name", "punct", "end"
    text: str
    pos: int


def _fail(pos: int, problem: str, hint: str = _HINT) -> UsageError:
    return UsageError(f"formula error at character {pos}: {problem}; {hint}")


def _bad_character(char: str, pos: int) -> UsageError:
    if char == ".":
        return _fail(pos, "attribute access ('.') is not allowed")
    if char in "'\"":
        return _fail(pos, "strings are not allowed")
    if char in "[]{}":
        return _fail(pos, f"{char!r} is not allowed (no indexing or containers)")
    return _fail(pos, f"unexpected character {char!r}")


def tokenize(text: str) -> list[Token]:
    tokens, pos = [], 0
    while pos < len(text):
        char = text[pos]
        if char in " \t\r\n":
            pos += 1
        elif char in _PUNCTUATION:
            tokens.append(Token("punct", char, pos))
            pos += 1
        elif char in _NUMBER_START and (match := _NUMBER.match(text, pos)):
            tokens.append(Token("num", match.group(), pos))
            pos = match.end()
        elif match := _NAME.match(text, pos):
            tokens.append(Token("name", _known_name(match.group(), pos), pos))
            pos = match.end()
        else:
            raise _bad_character(char, pos)
    tokens.append(Token("end", "", len(text)))
    return tokens


class _Parser:
    def __init__(self, tokens: list[Token]):
        self.tokens = tokens
        self.index = 0
        self.nesting = 0

    @property
    def current(self) -> Token:
        return self.tokens[self.index]

    def take(self) -> Token:
        token = self.current
        self.index += 1
        return token

    def expect(self, text: str) -> None:
        if self.current.text != text or self.current.kind != "punct":
            found = repr(self.current.text) if self.current.kind != "end" else "the end of the text"
            raise _fail(self.current.pos, f"expected {text!r}, found {found}")
        self.index += 1

    def at(self, text: str) -> bool:
        return self.current.kind == "punct" and self.current.text == text

    def nest(self, pos: int) -> None:
        self.nesting += 1
        if self.nesting > MAX_NESTING:
            raise _fail(pos, f"the formula nests deeper than {MAX_NESTING} levels")

    def expr(self) -> Expr:
        node = self.term()
        while self.at("+") or self.at("-"):
            op = "add" if self.take().text == "+" else "sub"
            node = Call(op, (node, self.term()))
        return node

    def term(self) -> Expr:
        node = self.unary()
        while self.at("*") or self.at("/"):
            op = "mul" if self.take().text == "*" else "div"
            node = Call(op, (node, self.unary()))
        return node

    def unary(self) -> Expr:
        if self.at("-"):
            self.nest(self.take().pos)
            node = Call("neg", (self.unary(),))
            self.nesting -= 1
            return node
        return self.power()

    def power(self) -> Expr:
        base = self.primary()
        if not self.at("^"):
            return base
        self.take()
        sign = 1.0
        if self.at("-"):
            self.take()
            sign = -1.0
        if self.current.kind != "num":
            raise _fail(self.current.pos, "'^' must be followed by a number (x^c means |x|^c)")
        return Call("pow", (base, Const(sign * self.number(self.take()))))

    @staticmethod
    def number(token: Token) -> float:
        value = float(token.text)
        if not math.isfinite(value):
            raise _fail(token.pos, f"the number {token.text} is not finite in float64")
        return value

    def primary(self) -> Expr:
        token = self.take()
        if token.kind == "num":
            return Const(self.number(token))
        if token.kind == "name":
            return self.named(token)
        if token.kind == "punct" and token.text == "(":
            self.nest(token.pos)
            node = self.expr()
            self.expect(")")
            self.nesting -= 1
            return node
        found = repr(token.text) if token.kind != "end" else "the end of the text"
        raise _fail(token.pos, f"expected a number, a name or '(', found {found}")

    def named(self, token: Token) -> Expr:
        name = token.text
        if name in TERMINALS:
            if self.at("("):
                raise _fail(token.pos, f"{name} is a statistic, not a function", "write it without '('")
            return Term(name)
        if not self.at("("):
            raise _fail(token.pos, f"{name} is a function", f"write {name}(...)")
        self.nest(token.pos)
        self.take()
        args = [self.expr()]
        while self.at(","):
            self.take()
            args.append(self.expr())
        self.expect(")")
        self.nesting -= 1
        arity = 1 if name in POWER_PRIMITIVES else OPS[name].arity
        if len(args) != arity:
            raise _fail(token.pos, f"{name} takes {arity} argument(s), got {len(args)}", "fix the call")
        if name in POWER_PRIMITIVES:
            return Call("pow", (args[0], Const(float(POWER_PRIMITIVES[name]))))
        return Call(name, tuple(args))


def _callable() -> list[str]:
    return [name for name in OPS if name != "pow"] + list(POWER_PRIMITIVES)


def _known_name(name: str, pos: int) -> str:
    """Names are checked as they are read, so the first offending name is the one reported."""
    if name.startswith("__"):
        raise _fail(pos, f"dunder names like {name!r} are not allowed")
    if name not in TERMINALS and name not in _callable():
        hint = "use x^c" if name == "pow" else f"known: {', '.join([*TERMINALS, *_callable()])}"
        raise _fail(pos, f"unknown name {name!r} ({hint})")
    return name


def parse_formula(text: str) -> Expr:
    """Parse formula text into a tree; raises UsageError (one line) on anything outside the grammar."""
    if not isinstance(text, str):
        raise UsageError(f"a formula must be text, got {type(text).__name__}; {_HINT}")
    size = len(text.encode("utf-8", errors="replace"))
    if size > MAX_BYTES:
        raise UsageError(f"formula text is {size} bytes, more than the {MAX_BYTES}-byte limit; shorten it")
    if not text.strip():
        raise UsageError(f"the formula is empty; {_HINT}")
    parser = _Parser(tokenize(text))
    tree = parser.expr()
    if parser.current.kind != "end":
        raise _fail(parser.current.pos, f"unexpected {parser.current.text!r} after a complete formula")
    if depth(tree) > MAX_DEPTH:
        raise UsageError(f"the formula is {depth(tree)} levels deep, more than {MAX_DEPTH}; simplify it")
    return tree
