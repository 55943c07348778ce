"""The scheduler is plain Python: tested with no model and no torch."""
import pytest

from atv_core.engine.request import Request, SamplingParams, Status
from atv_core.engine.scheduler import QueueFull, Scheduler, SchedulerConfig


def _req(i, n=4):
    return Request(f"r{i}", list(range(1, n + 1)), SamplingParams())


def test_prefill_first_then_decode_and_new_requests_join_next_step():
    s = Scheduler(SchedulerConfig(max_running=3, max_prefill_tokens=100))
    a, b = _req(0), _req(1)
    s.add(a)
    batch = s.schedule()
    assert batch.phase == "prefill" and batch.requests == (a,) and a.status is Status.RUNNING
    assert s.schedule().phase == "decode"
    s.add(b)
    assert s.schedule().requests == (b,)            # joins at the very next step
    assert s.schedule().requests == (a, b)


def test_admission_limits_running_and_prefill_tokens():
    s = Scheduler(SchedulerConfig(max_running=2, max_prefill_tokens=10))
    reqs = [_req(i, n=4) for i in range(4)]
    for r in reqs:
        s.add(r)
    assert s.schedule().requests == tuple(reqs[:2])   # 2 x 4 = 8 <= 10 padded tokens; 3 would be 12
    assert s.schedule().phase == "decode"             # running is full: the others wait
    s.finish(reqs[0])
    assert s.schedule().requests == (reqs[2],)


def test_a_long_prompt_is_admitted_alone():
    s = Scheduler(SchedulerConfig(max_running=4, max_prefill_tokens=8))
    long, short = _req(0, n=20), _req(1, n=2)
    s.add(long)
    s.add(short)
    assert s.schedule().requests == (long,)
    assert s.schedule().requests == (short,)


def test_waiting_queue_is_bounded():
    s = Scheduler(SchedulerConfig(max_running=1, max_waiting=2))
    s.add(_req(0))
    s.add(_req(1))
    with pytest.raises(QueueFull):
        s.add(_req(2))


def test_finish_and_find():
    s = Scheduler(SchedulerConfig())
    a, b = _req(0), _req(1)
    s.add(a)
    s.schedule()
    s.add(b)
    assert s.find("r1") is b and s.find("r0") is a and s.find("zz") is None
    s.finish(b)
    s.finish(a)
    assert not s.has_work() and s.schedule() is None


@pytest.mark.parametrize("kwargs,match", [
    ({"max_tokens": 0}, "max_tokens"), ({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p"),
    ({"top_k": 1.5}, "top_k"), ({"logprobs": 50}, "logprobs"), ({"stop": ("",)}, "stop"),
])
def test_sampling_params_refuse_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)
