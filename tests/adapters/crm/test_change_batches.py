"""A change-feed batch read message by message (`views.decode_cometd_each`)."""

from __future__ import annotations

import msgspec
import pytest

from adapters.crm import views as v
from tests.adapters.crm.test_views import HEADER, cometd


def test_one_unknown_change_type_spoils_no_other_message_of_its_batch() -> None:
    """Two UPDATEs decode; the third comes back with its bytes, error, replay id."""
    bad = cometd({**HEADER, "changeType": "GAP_SOMETHING_NEW"}, 3)
    body = b"[" + cometd(HEADER, 1) + b"," + cometd(HEADER, 2) + b"," + bad + b"]"

    first, second, third = v.decode_cometd_each(body)

    assert isinstance(first, v.ChangeEvent)
    assert isinstance(second, v.ChangeEvent)
    assert (first.replay_id, second.replay_id) == (1, 2)
    assert isinstance(third, v.UndecodableChange)
    assert (third.body, third.replay_id) == (bad, 3)
    assert "changeType" in third.error


def test_a_message_without_a_readable_replay_id_says_so() -> None:
    """Not even ``data.event.replayId``: the replay id is None."""
    (odd,) = v.decode_cometd_each(b'[{"channel": "/data/ChangeEvents", "data": 7}]')
    assert isinstance(odd, v.UndecodableChange)
    assert odd.replay_id is None
    assert odd.body == b'{"channel": "/data/ChangeEvents", "data": 7}'


def test_a_single_message_is_a_batch_of_one() -> None:
    """A body that is one message, not an array, is read alike."""
    (event,) = v.decode_cometd_each(cometd(HEADER, 9))
    assert isinstance(event, v.ChangeEvent)
    assert event.replay_id == 9


def test_a_body_that_is_not_json_is_refused_whole() -> None:
    """Nothing to move past: the caller keeps its replay id."""
    with pytest.raises(msgspec.DecodeError):
        v.decode_cometd_each(b'[{"data": ')
