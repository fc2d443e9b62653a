"""chat_history.py: which earlier turns the model reads when the steering changes (no model needed)."""

from __future__ import annotations

import json

from llm_steering import chat_history
from llm_steering.chat_history import chat_export, same_steering, steering_key, unsteered_chat, visible_chat
from llm_steering.config import ActiveFeature, SteeringSpec

import pytest

MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
NONE = SteeringSpec(MODEL, ())
PIRATE = SteeringSpec(MODEL, (ActiveFeature("pirate", 0.3, "clamp"),))
PIRATE_AND_CATS = SteeringSpec(MODEL, (ActiveFeature("pirate", 0.3, "clamp"), ActiveFeature("cats", 0.2, "add")))
CATS_AND_PIRATE = SteeringSpec(MODEL, (ActiveFeature("cats", 0.2, "add"), ActiveFeature("pirate", 0.3, "clamp")))


def turn(user, answer, spec, unsteered=None):
    return {"user": user, "answer": answer, "spec": spec, "unsteered": unsteered}


TURNS = [
    turn("q1", "arr1", PIRATE),
    turn("q2", "arr2", PIRATE, unsteered="plain2"),  # a compare turn
    turn("q3", "plain3", NONE),
    turn("q4", "mixed4", PIRATE_AND_CATS),
]


def texts(seen):
    return [(seen.messages[i]["content"], seen.messages[i + 1]["content"]) for i in range(0, len(seen.messages), 2)]


def test_same_reads_only_the_turns_answered_with_this_steering():
    seen = visible_chat(TURNS, PIRATE, "same")
    assert texts(seen) == [("q1", "arr1"), ("q2", "arr2")] and seen.used == [0, 1]
    assert seen.left_out == 2 and seen.other_steering == 0
    assert [m["role"] for m in seen.messages] == ["user", "assistant"] * 2


def test_unsteered_now_reads_plain_turns_and_compare_turns_unsteered_answers():
    seen = visible_chat(TURNS, NONE, "same")
    assert texts(seen) == [("q2", "plain2"), ("q3", "plain3")] and seen.left_out == 2
    assert texts(unsteered_chat(TURNS)) == texts(seen)
    assert texts(visible_chat(TURNS, None)) == texts(seen)  # None is no steering


def test_compare_unsteered_side_never_reads_steered_turns_whatever_the_mode():
    seen = unsteered_chat(TURNS)
    assert "arr1" not in str(seen.messages) and "mixed4" not in str(seen.messages)


def test_all_reads_every_turn_and_counts_the_other_steering():
    seen = visible_chat(TURNS, NONE, "all")
    assert texts(seen) == [("q1", "arr1"), ("q2", "plain2"), ("q3", "plain3"), ("q4", "mixed4")]
    assert seen.left_out == 0 and seen.other_steering == 2
    seen = visible_chat(TURNS, PIRATE, "all")
    assert texts(seen)[1] == ("q2", "arr2") and seen.other_steering == 2


def test_the_same_steering_is_the_same_in_any_order_and_as_a_dict():
    assert steering_key(PIRATE_AND_CATS) == steering_key(CATS_AND_PIRATE) == steering_key(CATS_AND_PIRATE.to_dict())
    assert texts(visible_chat(TURNS, CATS_AND_PIRATE.to_dict())) == [("q4", "mixed4")]
    # a change of strength, op, model or steer_prompt is other steering; steer_prompt means nothing unsteered
    assert steering_key(PIRATE) != steering_key(SteeringSpec(MODEL, (ActiveFeature("pirate", 0.31, "clamp"),)))
    assert steering_key(PIRATE) != steering_key(SteeringSpec(MODEL, (ActiveFeature("pirate", 0.3, "add"),)))
    assert not same_steering(PIRATE, SteeringSpec("other/model", PIRATE.features))
    assert same_steering(None, NONE) and same_steering({"features": []}, NONE) and not same_steering(None, PIRATE)
    assert steering_key(PIRATE) != steering_key(SteeringSpec(MODEL, PIRATE.features, steer_prompt=False))
    assert steering_key(NONE) == steering_key(SteeringSpec(MODEL, (), steer_prompt=False))


def test_bad_input_is_a_one_line_error():
    with pytest.raises(ValueError, match="unknown history mode 'some': use same or all"):
        visible_chat(TURNS, NONE, "some")
    with pytest.raises(ValueError, match="turn 0 needs 'user' and 'answer' texts"):
        visible_chat([{"user": "q", "spec": NONE}], NONE)
    assert visible_chat([], PIRATE).messages == []


def test_the_export_keeps_each_turns_steering_in_the_spec_format():
    data = json.loads(json.dumps(chat_export(TURNS, MODEL, "You are a helpful assistant.")))
    assert data["format"] == chat_history.CHAT_FORMAT and data["model_id"] == MODEL
    assert [t["steering"] for t in data["turns"]] == [s["spec"].to_dict() for s in TURNS]
    assert SteeringSpec.from_dict(data["turns"][3]["steering"]) == PIRATE_AND_CATS
    assert [t.get("unsteered") for t in data["turns"]] == [None, "plain2", None, None]
    assert [(t["user"], t["answer"]) for t in data["turns"]] == [(t["user"], t["answer"]) for t in TURNS]


def test_the_apps_turns_work_as_they_are():
    """The web app keeps a turn's steering under "steering" (a dict) and marks one still streaming."""
    turns = [{"user": "q1", "answer": "arr1", "steering": PIRATE.to_dict()},
             {"user": "q2", "answer": "plain2", "steering": NONE.to_dict(), "done": True},
             {"user": "q3", "answer": "arr", "steering": PIRATE.to_dict(), "done": False}]
    seen = visible_chat(turns, PIRATE)
    assert texts(seen) == [("q1", "arr1")] and seen.left_out == 1
    assert texts(unsteered_chat(turns)) == [("q2", "plain2")]
    assert chat_export(turns[:2], MODEL)["turns"][0]["steering"] == PIRATE.to_dict()
