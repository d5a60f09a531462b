"""The background prefetcher: the same batches in the same order, exact resume state, errors surfaced."""
import pytest
import torch

import dpo_tutorial.prefetch as prefetch

from dpo_tutorial.data import PairStream, PairTransform, load_pickapic
from dpo_tutorial.prefetch import Prefetcher


def _batches(iterator, n):
    return [next(iterator) for _ in range(n)]


@pytest.mark.parametrize("depth", [0, 1, 3])
def test_prefetched_batches_equal_the_direct_stream_and_resume_exactly(pairs_parquet, depth):
    ds = load_pickapic(str(pairs_parquet))

    def stream():
        return PairStream(ds, PairTransform(32, random_crop=True), batch_size=3, seed=5)

    direct = _batches(iter(stream()), 9)  # three epochs' worth, crossing epoch boundaries
    fetched = Prefetcher(stream(), depth)
    got = _batches(fetched, 4)
    state = fetched.state_dict()
    got += _batches(fetched, 5)
    fetched.close()
    for a, b in zip(direct, got):
        torch.testing.assert_close(a["pixel_values"], b["pixel_values"], rtol=0, atol=0)
        assert a["captions"] == b["captions"]
    resumed = stream()
    resumed.load_state_dict(state)  # the state after the 4th batch *taken*, not after those queued
    for a, b in zip(direct[4:], _batches(iter(resumed), 5)):
        torch.testing.assert_close(a["pixel_values"], b["pixel_values"], rtol=0, atol=0)


class _Clocked:
    """A stream whose batches each take ``cost`` seconds of a fake clock to make; batch 3 raises."""

    def __init__(self, clock, cost):
        self.clock, self.cost, self.n = clock, cost, 0

    def __iter__(self):
        while True:
            self.clock[0] += self.cost
            self.n += 1
            if self.n == 3:
                raise RuntimeError("bad batch 3")
            yield {"i": self.n}

    def state_dict(self):
        return {"n": self.n}


@pytest.mark.parametrize("depth", [0, 2])
def test_wait_is_measured_and_errors_reach_the_trainer(depth, monkeypatch):
    """In the loop (depth 0) the trainer waits exactly as long as a batch takes to make (a fake clock: no timing of
    the machine); with a thread, the error of batch 3 is raised at the third batch, after two good ones."""
    clock = [0.0]
    monkeypatch.setattr(prefetch.time, "perf_counter", lambda: clock[0])
    fetched = Prefetcher(_Clocked(clock, 0.25), depth=depth)
    assert next(fetched) == {"i": 1} and next(fetched) == {"i": 2} and fetched.state_dict() == {"n": 2}
    if depth == 0:
        assert fetched.last_wait == 0.25 and fetched.total_wait == 0.5
    with pytest.raises(RuntimeError, match="bad batch 3"):
        next(fetched)
    fetched.close()


def test_a_reader_thread_runs_only_where_it_cannot_take_the_computes_cores():
    """On a CPU-only run the compute uses every core; a reader thread beside it made the toy's step 0.32 s instead
    of 0.19 s (issue 17), so by default it runs only on an accelerator reading images; a set value is obeyed."""
    import torch

    from dpo_tutorial.config import get_preset
    from dpo_tutorial.train import prefetch_depth

    toy = get_preset("toy")
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert toy.prefetch is None
    assert (prefetch_depth(toy, cpu, False), prefetch_depth(toy, cpu, True)) == (0, 0)
    assert (prefetch_depth(toy, gpu, False), prefetch_depth(toy, gpu, True)) == (2, 0)
    assert prefetch_depth(toy.replace(prefetch=3), cpu, True) == 3
