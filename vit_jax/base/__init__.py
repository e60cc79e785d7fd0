"""Foundations every layer may import: standard library and numpy only.

`files`: atomic writes and strict JSON. `errors`: the wording shared by every
error message ("did you mean", listings of mismatches).
"""
