"""PrefEval stated preferences as personas and prompt sources (reads ../shared; skipped where it is absent)."""

from __future__ import annotations

import json

import pytest

from rayuid.data.prompts import load_prompts
from rayuid.feedback import judges, prefeval
from rayuid.feedback.users import make_persona, make_simulator


def test_a_stated_preference_is_an_llm_persona_with_its_topic_questions(shared_data):
    records = json.loads((shared_data / "prefeval_explicit" / "travel_restaurant.json").read_text())
    persona = make_persona("prefeval:travel_restaurant/0")
    assert records[0]["preference"] in persona.description and persona.rule is None
    assert judges.verify("prefeval:travel_restaurant/0", "any reply") is None   # no rule: the LLM judge decides
    prompts = load_prompts(["prefeval:travel_restaurant"])
    assert len(prompts) == len(records) and prompts[3].messages == [{"role": "user", "content": records[3]["question"]}]
    seen = []
    user = make_simulator("llm", "prefeval:travel_restaurant/0", lambda convs, *_: seen.extend(convs) or ["Gluten!"])
    assert user.respond(["Where to eat in Rome?"], ["Try the pasta at Roscioli."]) == ["Gluten!"]
    assert records[0]["preference"] in seen[0][0]["content"]                    # the profile is the system prompt


def test_bad_prefeval_names_say_what_exists(shared_data):
    with pytest.raises(ValueError, match="travel_restaurant"):
        make_persona("prefeval:no_such_topic/0")
    with pytest.raises(ValueError, match="0 <= i <"):
        make_persona("prefeval:travel_restaurant/9999")
    assert prefeval.data_dir().is_dir()
