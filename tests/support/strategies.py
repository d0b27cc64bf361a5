"""Hypothesis strategies for bad input: nasty text, JSON (valid or not), durations, run ids.

Shared by the property tests with a database (``tests/properties``) and without
one (``tests/unit``).
"""

from __future__ import annotations

import json
from datetime import timedelta

from hypothesis import strategies as st

# Text that has broken SQL and drivers before: quotes, statement ends,
# backslashes, dollar quotes, placeholders, NUL, lone surrogates, unicode,
# blank, and just over each length limit.
NASTY = ["'", "''", '"', ";", "'; drop table pgflow.runs; --", "\\", "\\'", "$$", "$x$ $x$",
         "%s", "%(x)s", "{}", "\x00", "a\x00b", "\ud800", "é", "🦆", "\u202e", " ", "", "\t\n",
         "x" * 200, "x" * 201, "k" * 1024, "k" * 1025, "é" * 513]
nasty_text = st.one_of(
    st.sampled_from(NASTY),
    st.text(max_size=30),
    st.builds(lambda a, b: a + b, st.sampled_from(NASTY), st.text(max_size=10)))
# What an SQL caller can send at all: PostgreSQL text holds no NUL.
sql_text = nasty_text.filter(lambda t: "\x00" not in t and "\ud800" not in t)

json_scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(),
                         st.text(max_size=20))
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=12)
# JSON text as a caller might send it: valid, truncated, or not JSON at all.
json_texts = st.one_of(
    json_values.map(lambda v: json.dumps(v)),          # may hold NaN/Infinity: invalid JSON
    json_values.map(lambda v: json.dumps(v)[:-1]),     # truncated
    st.sampled_from(["", "{", "[", "[1,]", "{'a': 1}", '{"a" 1}', "nul", "[\"\\u0000\"]",
                     "[\"\\ud800\"]", "01", "1e999999", "[" * 50 + "]" * 49]),
    st.text(max_size=30).filter(lambda t: "\x00" not in t))
seconds = st.one_of(st.floats(), st.integers(min_value=-10**12, max_value=10**12),
                    st.just(1e300), st.just(-0.0))
durations = st.one_of(st.none(), seconds,
                      st.builds(timedelta, seconds=st.integers(-10**6, 10**6)),
                      st.sampled_from([timedelta.max, timedelta.min, timedelta(days=36526)]))
run_ids = st.one_of(st.uuids(), st.text(max_size=40), st.integers(), st.none(),
                    st.sampled_from(["00000000-0000-0000-0000-000000000000", "';--", "\x00"]))
