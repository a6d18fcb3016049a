"""Interaction extraction: readers, the paper's §4.1 rules, bad-input accounting and the shipped sample data."""

from __future__ import annotations

import gzip
import json
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rayuid.data import (
    ExtractConfig,
    ExtractReport,
    Interaction,
    NoInteractionsError,
    conversation_filter,
    conversation_interactions,
    extract_interactions,
    load_interactions,
    normalise_conversation,
    run_extract,
)

U, A, S = "user", "assistant", "system"
MTBENCH = Path("/work/shared/data/external/mt_bench_101/mtbench101.jsonl")
SAMPLE = Path(__file__).resolve().parents[1] / "rayuid" / "data" / "sample_conversations.jsonl"


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def msgs(*flat: str) -> list[dict]:
    """msgs(U, "q", A, "a") -> [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]"""
    return [{"role": r, "content": c} for r, c in zip(flat[::2], flat[1::2], strict=True)]


def sharegpt(*flat: str) -> list[dict]:
    return [{"from": r, "value": c} for r, c in zip(flat[::2], flat[1::2], strict=True)]


def alternating(n: int) -> list[dict]:
    """u0 a1 u2 a3 ... with the index in the content, so truncation is easy to read off."""
    return [{"role": "user" if i % 2 == 0 else "assistant", "content": f"m{i}"} for i in range(n)]


LONG_USER, LONG_REPLY = msgs(U, "q" * 11, A, "a", U, "f"), msgs(U, "q", A, "a" * 11, U, "f")


def extract_records(tmp_path: Path, records: list, name: str = "in.jsonl", **config) -> tuple[list, ExtractReport]:
    return extract_interactions([str(write_jsonl(tmp_path / name, records))], ExtractConfig(**config))


def test_openai_messages_with_parts_and_system(tmp_path: Path) -> None:
    parts = [{"type": "text", "text": "Hi"}, {"type": "image_url", "image_url": {}}]
    more = [{"type": "text", "text": "Shorter."}, {"type": "text", "text": "Please."}]
    messages = msgs(S, "Be brief.", U, "", A, "Hello! How can I help?", U, "")
    messages[1]["content"], messages[3]["content"] = parts, more
    found, report = extract_records(tmp_path, [{"id": "oa", "messages": messages}])
    expected = Interaction(
        "oa:2", "oa", 2, msgs(S, "Be brief.", U, "Hi"), "Hello! How can I help?", "Shorter.\nPlease."
    )
    assert found == [expected] and report.examples == {"non_text_part": ["in.jsonl:1 (conversation oa)"]}
    assert report.rejected == {"non_text_part": 1}


def test_wildchat_record_language_and_hash(tmp_path: Path) -> None:
    conv = msgs(U, "q1", A, "a1", U, "q2", A, "a2", U, "q3")
    records = [
        {"conversation_hash": "h1", "language": "English", "conversation": conv},
        {"conversation_hash": "h2", "language": "French", "conversation": conv},
    ]
    found, report = extract_records(tmp_path, records, languages=["english", "en"])
    assert [(i.id, i.response, i.followup) for i in found] == [("h1:1", "a1", "q2"), ("h1:3", "a2", "q3")]
    assert found[1].context == msgs(U, "q1", A, "a1", U, "q2")
    assert report.examples == {"language_filtered": ["in.jsonl:2 (conversation h2)"]}


def test_sharegpt_roles(tmp_path: Path) -> None:
    record = {
        "id": "sg",
        "conversations": sharegpt("human", "q1", "gpt", "a1", "tool", "x", "human", "q2", "chatgpt", "a2")
        + sharegpt("user", "q3", "bard", "a3", "human", "q4"),
    }
    found, report = extract_records(tmp_path, [record])
    assert [(i.turn, i.response, i.followup) for i in found] == [(1, "a1", "q2"), (3, "a2", "q3"), (5, "a3", "q4")]
    assert report.rejected == {"unknown_role": 1}


def test_mtbench_history_record(tmp_path: Path) -> None:
    record = {"task": "SC", "id": 7, "history": [{"user": "2+2?", "bot": "5"}, {"user": "No, it is 4.", "bot": "4"}]}
    found, report = extract_records(tmp_path, [record])
    assert found == [Interaction("7:1", "7", 1, msgs(U, "2+2?"), "5", "No, it is 4.")] and not report.rejected


def test_paper_interaction_records(tmp_path: Path) -> None:
    prompt = sharegpt("human", "q1", "gpt", "a1", "human", "q2")
    paper = {"id": "x_3", "conversation_id": "c9", "turn_id": 3, "prompt": prompt, "completion": "a2"}
    records = [
        paper | {"user_response": "no"},
        {"id": "p2", "prompt": "plain prompt", "completion": "reply", "user_response": "thanks"},
        {"id": "p3", "prompt": "x", "completion": "   ", "user_response": "thanks"},
        {"id": "p4", "prompt": "x", "completion": 5, "user_response": "thanks"},
        {"id": "p5", "prompt": "x", "completion": "y"},
    ]
    found, report = extract_records(tmp_path, records)
    assert found == [
        Interaction("c9:3", "c9", 3, msgs(U, "q1", A, "a1", U, "q2"), "a2", "no"),
        Interaction("p2:1", "p2", 1, msgs(U, "plain prompt"), "reply", "thanks"),
    ]
    assert report.rejected == {"empty_message": 1, "wrong_type": 1, "missing_field": 1}


def test_own_output_reads_back_unchanged(tmp_path: Path) -> None:
    conv = [{"role": "system", "content": "sys"}] + alternating(13)
    src, out = str(write_jsonl(tmp_path / "in.jsonl", [{"id": "c", "messages": conv}])), str(tmp_path / "out.jsonl")
    run_extract([src], out)
    first, again = extract_interactions([src])[0], extract_interactions([out])
    assert again[0] == first == load_interactions(out) and len(first) == 6 and not again[1].rejected
    assert [Interaction.from_json(i.to_json()) for i in first] == first


def test_context_truncated_to_last_five(tmp_path: Path) -> None:
    found, report = extract_records(tmp_path, [{"id": "c", "messages": alternating(11)}])
    assert [i.turn for i in found] == [1, 3, 5, 7, 9]
    assert [m["content"] for m in found[-1].context] == ["m4", "m5", "m6", "m7", "m8"]
    assert (found[-1].response, found[-1].followup) == ("m9", "m10")
    found4, _ = extract_records(tmp_path, [{"id": "c", "messages": alternating(11)}], max_context_messages=4)
    # last 4 of m0..m8 is m5 m6 m7 m8; the leading assistant m5 is dropped
    assert [m["content"] for m in found4[-1].context] == ["m6", "m7", "m8"]
    assert not report.rejected


def test_leading_assistant_dropped_and_empty_context_skipped(tmp_path: Path) -> None:
    conv = msgs(A, "greeting", U, "q1", A, "a1", U, "q2")
    found, report = extract_records(tmp_path, [{"id": "c", "messages": conv}])
    assert [(i.turn, i.context) for i in found] == [(2, msgs(U, "q1"))]
    assert report.rejected == {"context_not_ending_with_user": 1}  # turn 0 has no history at all


def test_same_role_runs_collapse(tmp_path: Path) -> None:
    conv = msgs(U, "u0", U, "u1", A, "a2", U, "u3", U, "u4", A, "a5")
    conv += msgs(U, "u6", A, "a7", A, "a8", U, "u9")
    found, report = extract_records(tmp_path, [{"id": "c", "messages": conv}])
    first = msgs(U, "u0\n\nu1")
    assert [(i.turn, i.context) for i in found] == [(2, first), (5, first + msgs(A, "a2", U, "u3\n\nu4"))]
    assert report.rejected == {"context_not_ending_with_user": 1}  # a8 -> u9: the history ends with a7


def test_system_only_first_and_ids_stable(tmp_path: Path) -> None:
    conv = msgs(S, "s", U, "q", S, "late", A, "a", U, "f")
    path = write_jsonl(tmp_path / "conv.jsonl", [{"messages": conv}, {"messages": conv}])
    runs = [extract_interactions([str(path)]) for _ in range(2)]
    assert [i.id for i in runs[0][0]] == [i.id for i in runs[1][0]] == ["conv.jsonl:1:2", "conv.jsonl:2:2"]
    assert runs[0][0][0].context == msgs(S, "s", U, "q")
    assert runs[0][1].rejected == {"system_not_first": 2}


@pytest.mark.parametrize(
    ("conv", "config", "reason"),
    [
        (alternating(2), {}, "too_few_messages"),
        (msgs(S, "s", U, "q", A, "a"), {}, "too_few_messages"),
        (LONG_USER, {"max_conversation_chars": 12}, "conversation_too_long"),
        (LONG_REPLY, {"max_assistant_chars": 10}, "assistant_message_too_long"),
        (LONG_USER, {"max_user_chars": 10}, "user_message_too_long"),
        (alternating(3), {"languages": ["en"]}, "language_filtered"),  # no language field at all
        (msgs(U, "q", U, "q", A, "a"), {}, "no_followup"),
    ],
)
def test_conversation_filters(tmp_path: Path, conv: list, config: dict, reason: str) -> None:
    good = {"id": "good", "messages": alternating(3), "language": "en"}
    records = [good, {"id": "bad", "messages": conv}]
    found, report = extract_records(tmp_path, records, **config)
    assert [i.id for i in found] == ["good:1"] and report.rejected == {reason: 1}
    assert report.examples == {reason: ["in.jsonl:2 (conversation bad)"]}
    disabled = {k: None for k in config if k in ("max_assistant_chars", "max_user_chars", "languages")}
    if disabled:  # None switches the filter off
        assert len(extract_records(tmp_path, records, **disabled)[0]) == 2


def line(record_id: str, messages: list) -> bytes:
    return json.dumps({"id": record_id, "messages": messages}).encode()


MALFORMED = [  # line numbers are 1-based
    b"\xef\xbb\xbf" + line("g1", alternating(3)),  # 1 good, with a UTF-8 byte order mark
    b'{"messages": [',  # 2 invalid_json
    b'{"id": "u", "messages": "\xff\xfe"}',  # 3 invalid_utf8
    b"[1, 2, 3]",  # 4 wrong_type: not an object
    b'"just a string"',  # 5 wrong_type
    line("notlist", "hello"),  # 6 wrong_type: conversation is not a list
    line("role", msgs(U, "q", "tool", "x", A, "a", U, "f")),  # 7 unknown_role, still one interaction
    line("empty", msgs(U, "q", U, " \n\t", A, "a", A, "", U, "f")),  # 8 two empty_message, one interaction
    b'{"foo": 1}',  # 9 missing_field: no known format
    line("nocontent", [{"role": "user"}, *alternating(3)]),  # 10 missing_field, one interaction
    b"   ",  # 11 blank: not a record, not counted
    b'{"id": "giant", "messages": [{"role": "user", "content": "' + b"x" * 5000 + b'"}]}',  # 12 line_too_large
    line("types", [{"role": "user", "content": 3}, 7, {"role": None, "content": "q"}]),  # 13 3x wrong_type, too few
    b"[" * 1_900,  # 14 invalid_json (too deeply nested for the json module)
    line("g2", alternating(5)),  # 15 good, no trailing newline
]


def test_malformed_file_counts_every_problem(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b"\n".join(MALFORMED))
    found, report = extract_interactions([str(path)], ExtractConfig(max_line_bytes=2000))
    assert [i.id for i in found] == ["g1:1", "role:1", "empty:1", "nocontent:1", "g2:1", "g2:3"]
    assert report.conversations_read == 14
    counts = {"invalid_json": 2, "invalid_utf8": 1, "wrong_type": 6, "unknown_role": 1, "empty_message": 2}
    assert report.rejected == counts | {"missing_field": 2, "line_too_large": 1, "too_few_messages": 1}
    ex, types = report.examples, "bad.jsonl:13 (conversation types)"
    assert (ex["invalid_json"], ex["invalid_utf8"]) == (["bad.jsonl:2", "bad.jsonl:14"], ["bad.jsonl:3"])
    assert ex["line_too_large"] == ["bad.jsonl:12"]
    assert ex["unknown_role"] == ["bad.jsonl:7 (conversation role)"]
    assert ex["empty_message"] == ["bad.jsonl:8 (conversation empty)"] * 2
    assert ex["missing_field"] == ["bad.jsonl:9 (conversation bad.jsonl:9)", "bad.jsonl:10 (conversation nocontent)"]
    # only the first 5 of the 6 wrong_type locations are kept
    assert ex["wrong_type"] == ["bad.jsonl:4", "bad.jsonl:5", "bad.jsonl:6 (conversation notlist)", types, types]
    assert ex["too_few_messages"] == [types]


def test_duplicates_counted_and_max_conversations(tmp_path: Path) -> None:
    path = str(write_jsonl(tmp_path / "a.jsonl", [{"id": str(k), "messages": alternating(5)} for k in range(3)]))
    found, report = extract_interactions([path, path])
    assert len(found) == 6 and report.conversations_read == 6 and report.rejected == {"duplicate_id": 6}
    found, report = extract_interactions([path], ExtractConfig(max_conversations=2))
    assert len(found) == 4 and report.conversations_read == 2


def test_no_interactions_error_names_top_reason(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "short.jsonl", [{"messages": alternating(2)}] * 3 + [{"foo": 1}])
    with pytest.raises(NoInteractionsError) as err:
        run_extract([str(path)], str(tmp_path / "out.jsonl"), str(tmp_path / "report.json"))
    message = str(err.value)
    assert "short.jsonl" in message and "too_few_messages: 3" in message and "min_messages" in message
    assert message.index("too_few_messages") < message.index("missing_field")
    assert not (tmp_path / "out.jsonl").exists()
    written = json.loads((tmp_path / "report.json").read_text())
    assert written["interactions"] == 0 and written["rejected"] == {"too_few_messages": 3, "missing_field": 1}


def test_empty_input_and_missing_path(tmp_path: Path) -> None:
    (tmp_path / "empty.jsonl").write_bytes(b"\n\n")
    with pytest.raises(NoInteractionsError, match="no records were read"):
        extract_interactions([str(tmp_path / "empty.jsonl")])
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        extract_interactions([str(tmp_path / "nope.jsonl")])


def test_run_extract_writes_exact_keys(tmp_path: Path) -> None:
    conv = msgs(U, "Crème brûlée?", A, "Oui.", U, "Merci")
    write_jsonl(tmp_path / "in.jsonl", [{"id": "fr", "messages": conv}])
    report = run_extract([str(tmp_path / "in.jsonl")], str(tmp_path / "o" / "out.jsonl"), str(tmp_path / "r.json"))
    lines = (tmp_path / "o" / "out.jsonl").read_bytes().splitlines()
    assert len(lines) == report.interactions == 1
    assert "Crème brûlée?".encode() in lines[0]  # ensure_ascii=False
    assert set(json.loads(lines[0])) == {"id", "conversation_id", "turn", "context", "response", "followup"}
    written = json.loads((tmp_path / "r.json").read_text())
    assert (
        set(written) == {"conversations_read", "interactions", "rejected", "examples"} and written == report.to_json()
    )
    assert "extracted 1 interactions" in report.summary()


def test_json_gz_and_parquet_readers(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    records = [{"id": "a", "messages": alternating(3)}, {"id": "b", "messages": alternating(5)}]
    (tmp_path / "list.json").write_text(json.dumps(records))
    (tmp_path / "wrapped.json").write_text(json.dumps({"data": records}))
    one = {"id": "s", "conversations": sharegpt("human", "q", "gpt", "a", "human", "f")}
    (tmp_path / "one.json").write_text(json.dumps(one))
    (tmp_path / "broken.json").write_text("{")
    with gzip.open(tmp_path / "z.jsonl.gz", "wt") as f:
        f.write("\n".join(json.dumps(r) for r in records))
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "t.parquet")
    for name, n in [("list.json", 3), ("wrapped.json", 3), ("one.json", 1), ("z.jsonl.gz", 3), ("t.parquet", 3)]:
        found, report = extract_interactions([str(tmp_path / name)])
        assert len(found) == n and not report.rejected, name
    found, report = extract_interactions([str(tmp_path / "list.json"), str(tmp_path / "broken.json")])
    assert report.examples == {"invalid_json": ["broken.json"]} and found[0].context == msgs(U, "m0")


@pytest.fixture
def hf_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf" / "datasets")
    return tmp_path


def test_hf_dataset_dirs(hf_home: Path) -> None:
    import datasets

    records = [{"id": "a", "messages": alternating(3)}, {"id": "b", "messages": alternating(5)}]
    datasets.Dataset.from_list(records).save_to_disk(str(hf_home / "saved"))
    other = [{"id": "d", "conversation": alternating(3)}]
    datasets.DatasetDict({"test": datasets.Dataset.from_list(other)}).save_to_disk(str(hf_home / "dd"))
    (hf_home / "files").mkdir()
    write_jsonl(hf_home / "files" / "train.jsonl", records)
    found, report = extract_interactions([str(hf_home / "saved"), str(hf_home / "dd") + ":test"])
    assert [i.id for i in found] == ["a:1", "b:1", "b:3", "d:1"] and not report.rejected
    found, report = extract_interactions([str(hf_home / "files")])
    assert [i.id for i in found] == ["a:1", "b:1", "b:3"] and report.conversations_read == 2


def test_mtbench101() -> None:
    if not MTBENCH.exists():
        pytest.skip("MT-Bench-101 not present under /work/shared")
    dialogues = [json.loads(line) for line in MTBENCH.read_text(encoding="utf-8").splitlines()]
    expected = 0
    for d in dialogues:
        texts = [text for turn in d["history"] for text in (turn["user"], turn["bot"])]
        ok = len(texts) >= 3 and sum(map(len, texts)) <= 100_000 and all(t.strip() and len(t) <= 4096 for t in texts)
        expected += len(d["history"]) - 1 if ok else 0
    found, report = extract_interactions([str(MTBENCH)])
    assert len(found) == expected == 2820 and report.conversations_read == 1388
    first = found[0]
    assert first.id == "1:1" and first.context == [{"role": "user", "content": dialogues[0]["history"][0]["user"]}]
    assert first.response == "Based on the given information, A is the tallest among the three people."
    assert first.followup.startswith("Now there are two more people, D and E.")
    longest = max(found, key=lambda i: i.turn)
    assert longest.turn == 11 and len(longest.context) == 5 and longest.context[0]["role"] == "user"


def test_sample_conversations() -> None:
    found, report = extract_interactions([str(SAMPLE)], ExtractConfig(languages=["en"]))
    assert len(found) >= 80 and not report.rejected
    records = [json.loads(line) for line in SAMPLE.read_text(encoding="utf-8").splitlines()]
    assert 55 <= len(records) <= 70 and len({r["id"] for r in records}) == len(records)
    words = [len(m["content"].split()) for r in records for m in r["messages"] if m["role"] == "assistant"]
    assert max(words) <= 120


# user/assistant are weighted up so most examples contain several interactions
ROLE_NAMES = ["user", "assistant"] * 6 + ["system", "human", "gpt", "tool", "narrator"]
CANON = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant", "system": "system"}
content_st = st.one_of(
    st.text("ab \n", min_size=1, max_size=6), st.text(min_size=1, max_size=8), st.sampled_from(["", " ", "\n\t"])
)
message_st = st.fixed_dictionaries({"role": st.sampled_from(ROLE_NAMES), "content": content_st})
# clean user->assistant exchanges mixed with random messages, so most examples yield interactions
exchange_st = st.tuples(st.text("uv", min_size=1, max_size=3), st.text("xy", min_size=1, max_size=3)).map(
    lambda t: [{"role": "user", "content": t[0]}, {"role": "assistant", "content": t[1]}]
)
conversation_st = st.lists(st.one_of(exchange_st, message_st.map(lambda m: [m])), max_size=10).map(
    lambda blocks: [m for block in blocks for m in block]
)


def oracle_normalise(messages: list[dict]) -> list[dict]:
    out: list[dict] = []
    for m in messages:
        role = CANON.get(m["role"])
        if role is None or not m["content"].strip() or (role == "system" and out):
            continue
        out.append({"role": role, "content": m["content"]})
    return out


LOOSE = ExtractConfig(min_messages=0, max_assistant_chars=None, max_user_chars=None)


@settings(max_examples=300, deadline=None)
@given(conversation_st, st.integers(1, 6))
def test_property_interactions(messages: list[dict], max_context: int) -> None:
    norm, problems = normalise_conversation(messages)
    assert norm == oracle_normalise(messages) and len(norm) + len(problems) == len(messages)
    assert conversation_filter(norm, None, LOOSE) is None
    found, skipped = conversation_interactions("c", norm, max_context)
    pairs = [i for i in range(len(norm) - 1) if (norm[i]["role"], norm[i + 1]["role"]) == ("assistant", "user")]
    dialogue_before = [[m for m in norm[:i] if m["role"] != "system"] for i in range(len(norm))]
    valid = [i for i in pairs if dialogue_before[i] and dialogue_before[i][-1]["role"] == "user"]
    assert [x.turn for x in found] == valid and len(found) + skipped == len(pairs)
    for x in found:
        roles = [m["role"] for m in x.context]
        body = roles[1:] if roles[0] == "system" else roles
        assert body and body[0] == "user" and body[-1] == "user" and "system" not in body
        assert all(a != b for a, b in zip(body, body[1:], strict=False))
        assert len(body) <= max_context and len(x.context) <= max_context + 1
        assert x.id == f"c:{x.turn}" and x.response == norm[x.turn]["content"]
        assert norm[x.turn]["role"] == "assistant" and norm[x.turn + 1] == {"role": "user", "content": x.followup}
        assert x.context[-1]["content"].endswith(norm[x.turn - 1]["content"])


@settings(max_examples=25, deadline=None)
@given(st.lists(conversation_st, min_size=1, max_size=5))
def test_property_file_path_matches_functions(conversations: list[list[dict]]) -> None:
    expected = []
    for k, conv in enumerate(conversations):
        norm = oracle_normalise(conv)
        if conversation_filter(norm, None, LOOSE) is None:
            expected += conversation_interactions(f"c{k}", norm, LOOSE.max_context_messages)[0]
    anchor = Interaction("anchor:1", "anchor", 1, msgs(U, "m0"), "m1", "m2")  # so extraction never comes up empty
    records = [{"id": f"c{k}", "messages": c} for k, c in enumerate(conversations)]
    records.append({"id": "anchor", "messages": alternating(3)})
    with tempfile.TemporaryDirectory() as tmp:
        found, report = extract_interactions([str(write_jsonl(Path(tmp) / "p.jsonl", records))], LOOSE)
    assert found == expected + [anchor]
    assert report.conversations_read == len(records) and report.interactions == len(found)


def test_data_specs_carry_config_split_and_revision(tmp_path):
    """A local dataset folder with two named configs (a README.md `configs:` block, as hub datasets declare them):
    NAME:CONFIG:SPLIT and the mapping form read the named config; NAME:SPLIT keeps working for one-config data."""
    from rayuid.config import DataSource
    from rayuid.data.readers import as_source, iter_records, label

    folder = tmp_path / "two_configs"
    for cfg, rows in {"short": ["a", "b"], "long": ["c", "d", "e"]}.items():
        (folder / cfg).mkdir(parents=True)
        (folder / cfg / "train.jsonl").write_text("".join(json.dumps({"prompt": r}) + "\n" for r in rows))
    (folder / "README.md").write_text("---\nconfigs:\n- config_name: short\n  data_files:\n  - split: train\n"
                                      "    path: short/train.jsonl\n- config_name: long\n  data_files:\n"
                                      "  - split: train\n    path: long/train.jsonl\n---\n")
    assert as_source("org/name:cfg:test") == DataSource(name="org/name", config="cfg", split="test")
    assert as_source("org/name:validation") == DataSource(name="org/name", split="validation")
    assert as_source("org/name") == DataSource(name="org/name", split="train")
    assert label(as_source("org/name:cfg:test")) == "org/name:cfg:test"
    long_ = [r.value["prompt"] for r in iter_records(f"{folder}:long:train")]
    assert long_ == ["c", "d", "e"]
    mapped = [r.value["prompt"] for r in iter_records(DataSource(name=str(folder), config="short"))]
    assert mapped == ["a", "b"]
    assert next(iter(iter_records(f"{folder}:long:train"))).location == "two_configs:long:train[0]"
    with pytest.raises(FileNotFoundError, match="NAME:CONFIG:SPLIT"):   # a hub name that cannot load (offline)
        list(iter_records("rayuid-test-org/no-such-dataset:cfg:train"))


def test_extract_reads_hub_inputs_at_the_revision_given(tmp_path):
    """`rayuid extract --revision R`: every hub input is read at R, local inputs as they are; an input that reads
    nothing is named in the error by its NAME:CONFIG:SPLIT."""
    from rayuid.cli import build_parser
    from rayuid.config import DataSource
    from rayuid.data.extract import ExtractReport, NoInteractionsError, _explain, extract_interactions
    from rayuid.data.readers import with_revision

    local = tmp_path / "chats.jsonl"
    local.write_text("")
    args = build_parser().parse_args(["extract", str(local), "org/ds:cfg:test", "--out", "o", "--revision", "v2"])
    got = [with_revision(s, args.revision) for s in args.inputs]
    assert got == [str(local), DataSource(name="org/ds", config="cfg", split="test", revision="v2")]
    assert with_revision("org/ds", None) == "org/ds"
    with pytest.raises(NoInteractionsError, match="from .*chats.jsonl: no records"):
        extract_interactions(got[:1])
    assert _explain(got, ExtractReport()).startswith(f"No interactions extracted from {local}, org/ds:cfg:test:")
