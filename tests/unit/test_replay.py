"""`python -m ds_dynrank replay-moves RUN_DIR`: a finished run's move sizes per event, the list the random control
replays (`random.moves`); a directory without a history is refused naming the file."""

from __future__ import annotations

import json

import pytest

from ds_dynrank.errors import UserInputError
from ds_dynrank.rundir import HISTORY
from ds_dynrank.tools import cli
from ds_dynrank.tools.replay import moves_from_history, replay_moves


def _history(*changed):
    return [{"step": 15 * i, "ranks": {}, "slots_changed": c} for i, c in enumerate((0, *changed))]


def test_each_event_replays_the_slots_it_pruned_and_the_start_record_is_skipped():
    # a rank budget: pruned == grown, so half exactly; a parameter budget: 9 = 4 pruned + 5 grown or 5 + 4
    assert moves_from_history(_history(0, 2, 9, 61)) == [0, 1, 5, 31]


def test_the_command_prints_the_list_as_json(tmp_path, capsys):
    (tmp_path / HISTORY).write_text(json.dumps(_history(4, 6)))
    assert cli.main(["replay-moves", str(tmp_path)]) == 0
    assert json.loads(capsys.readouterr().out) == [2, 3]


@pytest.mark.parametrize(
    ("content", "words"),
    [(None, "no allocation history"), ([{"step": 0, "slots_changed": 0}], "at least one event"),
     ([{"step": 0}, {"step": 15}], "slots_changed")],
)  # fmt: skip
def test_a_run_without_events_is_refused_naming_the_file(tmp_path, capsys, content, words):
    if content is not None:
        (tmp_path / HISTORY).write_text(json.dumps(content))
    with pytest.raises(UserInputError, match=words):
        replay_moves(tmp_path)
    assert cli.main(["replay-moves", str(tmp_path)]) == 2
    assert str(tmp_path / HISTORY) in capsys.readouterr().err
