"""Reading a JSON body's ``model`` without building the object must answer exactly as json.loads did:
the same model, or the same 400 with the same words, for every body; and the prompt-prefix key read from
the raw body must be the key of the object json.loads builds."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vllm_model_router.errors import BadRequest
from vllm_model_router.http.affinity import body_prefix_key, prefix_key
from vllm_model_router.http.request_body import json_model, json_payload, parse_json


def answer(f: Any, raw: bytes) -> object:
    try:
        return f(raw)
    except BadRequest as e:
        return ("400", e.message, e.param)


def reference(raw: bytes) -> object:
    return answer(lambda b: parse_json(b)[1], raw)


# bodies where msgspec alone and json.loads disagree, or could: each must get json.loads's answer
TRICKY = [
    b'{"model":"a","model":"b"}',  # duplicate keys: the last one wins, for the engine too
    b'{"mod\\u0065l":"x"}',
    b'{"model":"a","x":NaN}', b'{"model":"a","x":-Infinity}',  # json.loads accepts these
    b'{"model":"a","x":"\\ud800"}', b'{"model":"\\ud834\\u0041"}',  # lone surrogates: accepted by json.loads
    b'{"model":"a","x":"\xff"}', b'{"model":"a","\xc0\xaf":1}',  # invalid UTF-8 in what msgspec only skips
    b'{"model":"a","x":"\xf4\x90\x80\x80"}', b'{"model":"a","x":"\xed\xa0\x80"}',  # an encoded surrogate: allowed
    b'\xef\xbb\xbf{"model":"a"}', '{"model":"a"}'.encode("utf-16"), '{"model":"a"}'.encode("utf-32"),
    b'{"model":"a","x":1e999}', b'{"model":"a","x":123456789012345678901234567890}',
    b'[{"model":"a"}]', b'"model"', b'', b' ', b'null', b'{"model":"a"} x', b'{"model":"a",}',
    b'{"model":1}', b'{"model":null}', b'{"x":1}', b'{"model":["a"]}', b'{"model":""}',
    b'{"model":"a","x":' + b"[" * 900 + b"]" * 900 + b"}",  # deep, within the limit (about 990 here)
    b'{"model":"a","x":' + b"[" * 1100 + b"]" * 1100 + b"}",  # beyond it: "nested too deeply"
    b'{"model":"a","x":' + b"[" * 100000 + b"}",
    '{"model":"été","x":"東京"}'.encode(),
]


@pytest.mark.parametrize("raw", TRICKY)
def test_model_is_read_as_json_loads_reads_it(raw: bytes) -> None:
    assert answer(json_model, raw) == reference(raw)


@pytest.mark.parametrize("raw", [b'{"model":"a","x":NaN,"m":[1,2.5,{"k":null}]}', b'{"model":"a","x":"\\ud800"}',
                                 '{"model":"a","messages":[{"role":"user","content":"été"}]}'.encode()])
def test_payload_is_json_loads_payload(raw: bytes) -> None:
    assert json.dumps(json_payload(raw)) == json.dumps(json.loads(raw))


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text() | st.integers(2**63, 2**80),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=20,
)


@given(st.dictionaries(st.sampled_from(["model", "messages", "x", "mod\u00e9l"]), json_values, max_size=4),
       st.binary(max_size=3), st.integers(min_value=0, max_value=60))
def test_any_body_and_any_damage_get_the_same_answer(obj: dict[str, Any], noise: bytes, cut: int) -> None:
    raw = json.dumps(obj, ensure_ascii=cut % 2 == 0).encode("utf-8", "surrogatepass")
    assert answer(json_model, raw) == reference(raw)
    damaged = raw[: len(raw) - cut % (len(raw) + 1)] + noise  # truncated, with junk after it
    assert answer(json_model, damaged) == reference(damaged)
    if isinstance(obj.get("model"), str):  # what an alias rewrite re-serialises: the same object
        assert json.dumps(json_payload(raw)) == json.dumps(json.loads(raw))


# --------------------------------------------------------------------------- the prompt-prefix key
parts = st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": st.text(max_size=300)})
                 | st.fixed_dictionaries({"type": st.just("image_url")}), max_size=3)
message = st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant"]),
                                 "content": st.text(max_size=400) | parts | st.none()}) | json_values
prompts = st.text(max_size=700) | st.lists(st.integers(0, 50000), max_size=200) | st.lists(st.text(), max_size=3)


@given(st.fixed_dictionaries({"model": st.just("m")}, optional={
    "messages": st.lists(message, max_size=8) | json_values, "prompt": prompts, "input": prompts}))
def test_the_prefix_key_of_a_body_is_the_key_of_its_object(body: dict[str, Any]) -> None:
    raw = json.dumps(body).encode()
    assert body_prefix_key(raw) == prefix_key(json.loads(raw))


@pytest.mark.parametrize("raw", [
    b'{"model":"m","messages":[{"role":"user","content":"\\ud800 hi"}]}',  # a lone surrogate: json.loads only
    b'{"model":"m","messages":[{"role":"user","content":"hi"}],"x":NaN}',
    b'{"model":"m","messages":"not a list","prompt":"p"}', b'{"model":"m","messages":null,"input":["a","b"]}',
    b'{"model":"m","messages":[{"role":"user","content":"a"}],"messages":[{"role":"user","content":"b"}]}',
    '{"model":"m","messages":[{"role":"user","content":"été"}]}'.encode("utf-16"),
])
def test_the_prefix_key_of_unusual_bodies(raw: bytes) -> None:
    assert body_prefix_key(raw) == prefix_key(json.loads(raw))
