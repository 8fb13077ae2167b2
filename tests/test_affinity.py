"""Prefix affinity's index: the replica sent a prompt is the one a later, longer prompt prefers.

Oracle: the longest common prefix of two prompts, counted in whole chunks."""

from __future__ import annotations

import json

import pytest

from tinyserve.serving.affinity import CHUNK_CHARS, PrefixIndex, chunk_keys, routing_text

DOC_A = "".join(f"Paragraph {i} of the first long document. " for i in range(20))
DOC_B = "".join(f"Section {i} of a second, unrelated manual. " for i in range(20))


def test_a_longer_prompt_prefers_the_replica_that_holds_its_longest_prefix():
    index = PrefixIndex()
    index.record(DOC_A[:200] + " question one?", "r1")
    index.record(DOC_A + " question two?", "r2")
    index.record(DOC_B + " question three?", "r1")
    live = {"r1", "r2", "r3"}
    assert index.match(DOC_A + " another question", live) == ["r2"]  # r1 only has 3 chunks of A
    assert index.match(DOC_A[:150] + " short", live) == ["r1", "r2"]  # both hold its 2 chunks
    assert index.match(DOC_B + "?", live) == ["r1"]
    assert index.match("A prompt nobody has sent before, longer than a chunk is. " * 2, live) == []
    assert index.match(DOC_A, {"r3"}) == []  # a replica that died is not preferred


def test_chunks_chain_so_equal_text_after_different_starts_does_not_match():
    shared_tail = "x" * (4 * CHUNK_CHARS)
    index = PrefixIndex()
    index.record("a" * CHUNK_CHARS + shared_tail, "r1")
    assert index.match("b" * CHUNK_CHARS + shared_tail, {"r1"}) == []
    assert len(chunk_keys("y" * (3 * CHUNK_CHARS - 1))) == 2  # only full chunks have keys


def test_the_index_forgets_the_least_recently_used_chunks_first():
    index = PrefixIndex(max_chunks=4)
    index.record(DOC_A[: 4 * CHUNK_CHARS], "r1")
    index.record(DOC_B[: 2 * CHUNK_CHARS], "r2")  # pushes out the last 2 chunks of DOC_A
    assert len(index.holders) == 4
    assert index.match(DOC_B, {"r1", "r2"}) == ["r2"]
    assert index.match(DOC_A, {"r1", "r2"}) == ["r1"]  # its first 2 chunks remain
    index.record(DOC_A[:CHUNK_CHARS], "r2")
    assert index.match(DOC_A[:CHUNK_CHARS], {"r1", "r2"}) == ["r1", "r2"]
    with pytest.raises(ValueError, match="max_chunks"):
        PrefixIndex(max_chunks=0)


@pytest.mark.parametrize(
    "body,text",
    [
        ({"prompt": "Once upon"}, "Once upon"),
        ({"prompt": [5, 17, 3]}, "5 17 3"),
        (
            {
                "messages": [
                    {"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "hi"},
                ]
            },
            "system: Be brief.\nuser: hi\n",
        ),
        ({"model": "m"}, ""),
        ([1, 2], ""),
    ],
)
def test_routing_text_reads_the_prompt_of_both_endpoints(body, text):
    assert routing_text(json.dumps(body).encode()) == text


def test_routing_text_of_a_conversation_extends_its_earlier_turns():
    turn = [{"role": "user", "content": DOC_A}]
    later = turn + [{"role": "assistant", "content": "ok"}, {"role": "user", "content": "more"}]
    first = routing_text(json.dumps({"messages": turn}).encode())
    assert routing_text(json.dumps({"messages": later}).encode()).startswith(first)
    assert routing_text(b"{not json") == ""
