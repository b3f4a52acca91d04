"""The examples in the docstrings run and print what they show."""

from __future__ import annotations

import doctest

import fastadam


def test_the_package_docstring_example_runs_as_written():
    result = doctest.testmod(fastadam, verbose=False)
    assert result.attempted > 0 and result.failed == 0
