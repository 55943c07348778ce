"""The scheduler and block accounting are plain Python: tested with no model and no torch."""
import pytest

from atv_core.engine.block_manager import BlockManager
from atv_core.engine.request import Request, SamplingParams, Status
from atv_core.engine.scheduler import QueueFull, Scheduler, SchedulerConfig


def _req(i, n=4):
    return Request(f"r{i}", list(range(1, n + 1)), SamplingParams())


def _config(**kw):
    return SchedulerConfig(**{"max_running": 4, "max_num_batched_tokens": 64, "block_size": 4, "num_blocks": 64,
                              "long_prompt_tokens": 16, "long_prefill_chunk": 4, **kw})


def _step(s):
    """One schedule(); every sampling chunk gets a token, as the engine would append one."""
    batch = s.schedule()
    for chunk in batch.chunks if batch else ():
        if chunk.samples:
            chunk.request.output_ids.append(7)
    return batch


def _shape(batch):
    return [(c.request.request_id, c.start, c.length) for c in batch.chunks]


def test_decodes_come_first_and_new_requests_join_the_same_step():
    s = Scheduler(_config())
    a, b = _req(0), _req(1)
    s.add(a)
    first = _step(s)
    assert _shape(first) == [("r0", 0, 4)] and first.phase == "prefill" and a.status is Status.RUNNING
    assert first.chunks[0].samples and a.num_computed_tokens == 4
    second = _step(s)
    assert _shape(second) == [("r0", 4, 1)] and second.phase == "decode"
    s.add(b)
    assert _shape(_step(s)) == [("r0", 5, 1), ("r1", 0, 4)]   # b joins beside a's decode at once


def test_a_prompt_alone_takes_the_whole_budget_and_is_split_across_steps():
    s = Scheduler(_config(max_num_batched_tokens=16))
    long = _req(0, n=40)
    s.add(long)
    shapes = [_shape(_step(s)) for _ in range(3)]
    assert shapes == [[("r0", 0, 16)], [("r0", 16, 16)], [("r0", 32, 8)]]
    assert long.output_ids == [7]    # logits only from the chunk that ends the prompt


def test_a_long_prompt_beside_decodes_advances_by_the_chunk_while_short_prompts_go_whole():
    s = Scheduler(_config())
    short, long, late = _req(0, n=3), _req(1, n=40), _req(2, n=10)
    s.add(short)
    _step(s)
    s.add(long)
    s.add(late)
    assert _shape(_step(s)) == [("r0", 3, 1), ("r1", 0, 4), ("r2", 0, 10)]
    assert _shape(_step(s)) == [("r0", 4, 1), ("r2", 10, 1), ("r1", 4, 4)]
    s.finish(short)
    s.finish(late)
    assert _shape(_step(s)) == [("r1", 8, 32)]    # alone again: the rest of it in one step


def test_long_prompts_share_one_chunk_per_step_beside_decodes():
    s = Scheduler(_config())
    s.add(decoding := _req(0, n=2))
    _step(s)
    first, second, short = _req(1, n=30), _req(2, n=30), _req(3, n=5)
    for r in (first, second, short):
        s.add(r)
    assert _shape(_step(s)) == [("r0", 2, 1), ("r1", 0, 4), ("r3", 0, 5)]
    # the long share is used up: second is not admitted to hold 8 blocks idle; the short one behind it goes
    assert second.status is Status.WAITING and not second.block_table and list(s.waiting) == [second]
    assert s.blocks.num_used == 1 + 8 + 2
    s.finish(decoding)
    s.finish(short)
    assert _shape(_step(s)) == [("r1", 4, 26), ("r2", 0, 30)]                   # no decodes: whole budget


def test_nothing_passes_a_preempted_long_prompt_so_vector_slots_never_run_out():
    """A preempted request keeps its vector slot while it waits: if a request behind it were admitted (a long
    prompt passed over for lack of long share), running + preempted could exceed max_running, the runner's slot
    count (found by a review: the engine thread died with 'no free vector slot')."""
    s = Scheduler(_config(max_running=3, num_blocks=21))
    decoding, long, preempted, short = _req(0, n=4), _req(1, n=60), _req(2, n=14), _req(3, n=4)
    s.add(decoding)
    for step in range(8):
        if step == 1:
            s.add(long)
            s.add(preempted)
        if step == 3:
            s.add(short)
        _step(s)
        holders = len(s.running) + sum(1 for r in s.waiting if r.num_preemptions)
        assert holders <= 3, (step, [r.request_id for r in s.running])
    assert preempted.num_preemptions and preempted.status is Status.WAITING   # the case this test is about
    assert list(s.waiting) == [preempted, short]                              # short waits behind it


def test_without_decodes_spare_budget_goes_to_the_prompts_nearest_their_end():
    s = Scheduler(_config(max_num_batched_tokens=40))
    a, b = _req(0, n=60), _req(1, n=20)
    s.add(a)
    s.add(b)
    # both are long (> 16): 4 tokens each, then the spare 32 go to b first (20 left in all), the rest to a
    assert _shape(_step(s)) == [("r0", 0, 20), ("r1", 0, 20)]


def test_admission_needs_free_blocks_for_the_whole_sequence_and_nobody_overtakes():
    s = Scheduler(_config(num_blocks=6))          # 24 token slots
    big, small = _req(0, n=20), _req(1, n=4)
    s.add(_req(9, n=8))                           # takes 2 blocks
    _step(s)
    s.add(big)                                    # needs 5 blocks: only 4 free
    s.add(small)
    assert _shape(_step(s)) == [("r9", 8, 1)]     # small waits behind big
    assert list(s.waiting) == [big, small]


def test_running_requests_are_bounded():
    s = Scheduler(_config(max_running=2))
    reqs = [_req(i) for i in range(3)]
    for r in reqs:
        s.add(r)
    assert [c.request for c in _step(s).chunks] == reqs[:2]
    s.finish(reqs[0])
    assert _shape(_step(s)) == [("r1", 4, 1), ("r2", 0, 4)]


def test_preemption_frees_the_newest_and_it_recomputes_its_whole_sequence_later():
    s = Scheduler(_config(num_blocks=3))          # 12 token slots
    old, new = _req(0, n=4), _req(1, n=4)
    s.add(old)
    s.add(new)
    _step(s)                                      # 1 block each; one block free
    _step(s)                                      # each decode needs a new block: old gets it ...
    assert old.block_table == [0, 2]
    assert s.num_preemptions == 1 and new.num_preemptions == 1
    assert new.status is Status.WAITING and s.waiting[0] is new and not new.block_table
    assert new.num_computed_tokens == 0 and new.output_ids == [7]   # ... new keeps what it produced
    assert s.blocks.num_used == len(old.block_table) == 2
    s.finish(old)
    batch = _step(s)
    assert _shape(batch) == [("r1", 0, 5)] and batch.chunks[0].samples and not batch.chunks[0].decode
    assert new.output_ids == [7, 7] and len(new.block_table) == 2


def test_the_newest_request_preempts_itself_when_it_cannot_grow():
    s = Scheduler(_config(num_blocks=2))
    old, new = _req(0, n=3), _req(1, n=4)
    s.add(old)
    s.add(new)
    _step(s)                                      # old has room for one more token in its block, new has none
    assert _shape(_step(s)) == [("r0", 3, 1)]
    assert new.status is Status.WAITING and new.num_preemptions == 1 and s.blocks.num_used == 1


def test_finish_frees_blocks_and_find():
    s = Scheduler(_config())
    a, b = _req(0), _req(1)
    s.add(a)
    _step(s)
    s.add(b)
    assert s.find("r1") is b and s.find("r0") is a and s.find("zz") is None
    s.finish(b)
    s.finish(a)
    assert not s.has_work() and s.schedule() is None and s.blocks.num_free == 64


def test_waiting_queue_is_bounded():
    s = Scheduler(_config(max_running=1, max_waiting=2))
    s.add(_req(0))
    s.add(_req(1))
    with pytest.raises(QueueFull):
        s.add(_req(2))


def test_preempted_requests_do_not_count_against_the_waiting_bound():
    """A request preempted back into the waiting queue was accepted already: with the bound counting it, a step
    that preempts could make the engine thread refuse a request submit() had accepted on the previous count."""
    s = Scheduler(_config(num_blocks=3, max_waiting=1))
    old, new = _req(0, n=4), _req(1, n=4)
    s.add(old)
    _step(s)
    s.add(new)
    _step(s)
    _step(s)                                      # new is preempted back into the waiting queue
    assert list(s.waiting) == [new] and new.num_preemptions == 1 and s.num_queued == 0
    s.add(_req(2))                                # the one new request the bound allows
    assert s.num_queued == 1 and len(s.waiting) == 2
    with pytest.raises(QueueFull):
        s.add(_req(3))


def test_limits_are_checked_with_a_fix():
    with pytest.raises(ValueError, match="max_num_batched_tokens .* must be at least max_running"):
        SchedulerConfig(max_running=64, max_num_batched_tokens=32)
    with pytest.raises(ValueError, match="positive"):
        SchedulerConfig(block_size=0)
    assert Scheduler(_config(num_blocks=4)).fits(16) and not Scheduler(_config(num_blocks=4)).fits(17)


def test_block_manager_reuses_lowest_ids_and_refuses_double_frees():
    blocks = BlockManager(8, 16)
    first = blocks.allocate(3)
    assert first == [0, 1, 2] and blocks.num_free == 5
    blocks.free([1])
    assert blocks.allocate(2) == [1, 3]
    with pytest.raises(RuntimeError, match="freed twice"):
        blocks.free([5])
    with pytest.raises(RuntimeError, match="can_allocate"):
        blocks.allocate(9)


@pytest.mark.parametrize("kwargs,match", [
    ({"max_tokens": 0}, "max_tokens"), ({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p"),
    ({"top_k": 1.5}, "top_k"), ({"logprobs": 50}, "logprobs"), ({"stop": ("",)}, "stop"),
])
def test_sampling_params_refuse_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)
