"""K processes per node loading a 4-bit base at a time (BEAMLORA_DS_4BIT_LOAD=turns:K, loading/staggered.py): the
setting's parsing and refusals, and which turn each local rank loads in. The launched form (turns:2 with 2
processes) runs in benchmarks/startup_scale.py."""
import pytest
import torch

from beamlora_ds.loading import four_bit_load, four_bit_request, staggered


@pytest.mark.parametrize("value, expected", [("turns", 1), ("turns:1", 1), ("turns:2", 2), (" turns:8 ", 8),
                                             ("together", None)])
def test_the_setting_says_how_many_processes_per_node_load_at_once(monkeypatch, value, expected):
    monkeypatch.setenv(four_bit_load.LOAD_MODE_VARIABLE, value)
    assert four_bit_load.loaders_per_node() == expected


def test_one_at_a_time_is_the_default(monkeypatch):
    monkeypatch.delenv(four_bit_load.LOAD_MODE_VARIABLE, raising=False)
    assert four_bit_load.loaders_per_node() == 1


@pytest.mark.parametrize("value", ["turns:0", "turns:-1", "turns:two", "turns:", "turns:1.5", "turn:2", "2"])
def test_a_bad_count_is_refused_naming_the_forms(monkeypatch, value):
    monkeypatch.setenv(four_bit_load.LOAD_MODE_VARIABLE, value)
    with pytest.raises(four_bit_request.QuantizationError, match=r"turns:K.*whole number >= 1.*together"):
        four_bit_load.loaders_per_node()
    zero3 = four_bit_request.check_4bit_request({"zero_optimization": {"stage": 3}, "bf16": {"enabled": True}})
    with pytest.raises(four_bit_request.QuantizationError, match="BEAMLORA_DS_4BIT_LOAD="):
        four_bit_load.loads_in_turns(zero3)  # refused before anything loads


@pytest.mark.parametrize("local_size, at_once, turns", [(8, 1, 8), (8, 2, 4), (8, 3, 3), (8, 8, 1), (8, 9, 1),
                                                        (1, 1, 1), (2, 2, 1), (7, 2, 4)])
def test_turns_are_the_node_size_over_the_loaders_rounded_up(local_size, at_once, turns):
    assert staggered.turns_for(local_size, at_once) == turns


def test_local_rank_0_loads_in_the_last_turn_and_each_turn_holds_at_most_k():
    for local_size in range(1, 10):
        for at_once in range(1, 10):
            turns = staggered.turns_for(local_size, at_once)
            taken = [staggered.turn_of(rank, turns, at_once) for rank in range(local_size)]
            assert taken[0] == turns - 1  # global rank 0's copy is the one kept: it loads last
            assert sorted(set(taken)) == list(range(turns))  # no empty turn
            assert max(taken.count(t) for t in range(turns)) <= at_once
            assert taken == sorted(taken, reverse=True)  # higher local ranks first, as with one at a time
    assert [staggered.turn_of(rank, 4, 2) for rank in range(8)] == [3, 3, 2, 2, 1, 1, 0, 0]
    assert [staggered.turn_of(rank, 8, 1) for rank in range(8)] == [7, 6, 5, 4, 3, 2, 1, 0]


def test_a_node_smaller_than_the_largest_starts_later():
    """Every process enters the largest node's number of turns: a node of 3 among nodes of 8, 2 at a time, loads
    in turns 3 and 4 of 4 (local rank 0 still last)."""
    assert [staggered.turn_of(rank, 4, 2) for rank in range(3)] == [3, 3, 2]


def test_at_least_one_loader():
    with pytest.raises(ValueError, match="at_once=0"):
        staggered.turns_for(8, 0)


def test_one_process_with_k_loads_once():
    assert staggered.load_in_turns(lambda: "model", at_once=4) == "model"
    turn = staggered.turns_taken()[-1]
    assert (turn.turn, turn.turns) == (0, 1)


@pytest.mark.parametrize("variable, in_turns, mapped", [("turns", None, True), ("turns:2", None, True),
                                                        ("together", None, False), ("turns", False, False),
                                                        ("together", True, True)])
def test_a_load_alone_maps_large_blocks_unless_the_old_way_is_asked_for(monkeypatch, variable, in_turns, mapped):
    """One process loads outside load_in_turns; its 16-bit copies must still go back to the system when freed (a
    process's peak about the 4-bit model instead of 1.1-3.1 times it: docs/qlora.md)."""
    import contextlib

    entered = []

    @contextlib.contextmanager
    def recording():
        entered.append(True)
        yield

    monkeypatch.setenv(four_bit_load.LOAD_MODE_VARIABLE, variable)
    monkeypatch.setattr(staggered, "large_blocks_mapped", recording)
    model = torch.nn.Linear(2, 2)
    monkeypatch.setattr(four_bit_load, "_load_whole", lambda *args: model)
    monkeypatch.setattr(four_bit_load, "prepare_4bit_model", lambda model, gradient_checkpointing: model)
    monkeypatch.setattr(four_bit_load, "_linear4bit", lambda: type(None))
    assert four_bit_load.load_4bit_model("some/model", None, in_turns=in_turns) is model
    assert entered == ([True] if mapped else [])
