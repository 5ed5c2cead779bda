"""Symbolic run-time sizes: arithmetic folds constants, evaluates like Python ints, renders readably."""
from __future__ import annotations

import itertools

import pytest

from convdsl.ir import dims as D

H, W = D.Sym.var("H"), D.Sym.var("W")


def test_constants_fold_to_ints():
    assert D.add(2, 3) == 5
    assert D.floordiv(D.add(H, 0), 1) == H
    assert D.sub(D.add(H, 3), H) == 3
    assert D.mul(H, 0) == 0


@pytest.mark.parametrize("c,k", list(itertools.product(range(-7, 8), range(1, 5))))
def test_floor_division_matches_python(c, k):
    e = D.floordiv(D.add(H, c), k)
    nested = D.floordiv(D.add(e, 1), 2)
    for h in range(-12, 30):
        assert D.evaluate(e, {"H": h}) == (h + c) // k
        assert D.evaluate(nested, {"H": h}) == ((h + c) // k + 1) // 2


def test_pooling_twice_reads_as_a_quarter():
    half = D.add(D.floordiv(D.sub(H, 2), 2), 1)       # maxpool(2) output size
    assert D.to_text(half) == "H//2"
    assert D.to_text(D.add(D.floordiv(D.sub(half, 2), 2), 1)) == "H//4"


def test_products_distribute():
    e = D.add(D.mul(D.mul(3, H), W) * 4, D.mul(D.mul(32, H), W) * 56)
    assert D.to_text(e) == "1804*H*W"
    assert D.evaluate(e, {"H": 2, "W": 3}) == 1804 * 6
    assert D.evaluate(D.mul(D.add(H, 1), D.add(W, 2)), {"H": 2, "W": 3}) == 15


def test_floor_division_is_grouped_inside_products():
    e = D.mul(D.mul(D.floordiv(H, 2), D.floordiv(W, 2)), 3)
    assert D.to_text(e) == "3*(H//2)*(W//2)"
    assert D.evaluate(e, {"H": 5, "W": 7}) == 18


def test_variables_of_a_product_with_a_floor_division():
    assert D.variables(D.mul(D.floordiv(H, 2), W)) == {"H", "W"}


def test_equal_expressions_compare_equal():
    assert D.add(H, W) == D.add(W, H)
    assert hash(D.add(H, 1)) == hash(D.add(1, H))
