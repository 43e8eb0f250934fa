"""The demo's training and `measure`'s timing say how far they are, every few seconds."""

from __future__ import annotations

from archtree_cli.training_progress import TrainingProgress


def test_training_says_its_step_loss_and_time_left_every_few_seconds():
    said: list[str] = []
    now = [100.0]
    progress = TrainingProgress(said.append, every_s=10.0, clock=lambda: now[0])
    for step in range(1, 201):
        now[0] += 0.5  # half a second a step: 100 s for 200 steps
        progress(step, 200, 2.0 / step)

    assert len(said) == 9  # after 10 s, 20 s, ... 90 s; not at the end, which its caller says
    assert said[0] == "training: step 20 of 200 (10%), loss 0.100, about 90 s left"
    assert said[-1] == "training: step 180 of 200 (90%), loss 0.011, about 10 s left"


def test_a_long_training_gives_the_time_left_in_minutes():
    said: list[str] = []
    now = [0.0]
    progress = TrainingProgress(said.append, every_s=10.0, clock=lambda: now[0])
    now[0] = 12.0
    progress(1, 100, 1.5)
    assert said == ["training: step 1 of 100 (1%), loss 1.500, about 20 min left"]


def test_a_timing_says_its_runs_of_those_planned_and_the_time_left():
    from archtree_cli.timing_progress import TimingProgress

    said: list[str] = []
    progress = TimingProgress(said.append, every_s=10.0)
    progress(5, 35, 10.0)  # 2 s a run: 30 runs, a minute, to go
    progress(35, 35, 80.0)
    progress(40, 35, 90.0)
    assert said == [
        "timed 5 of at least 35 runs (2 s a run), about 60 s left",
        "timed 35 runs (2.29 s a run), at least 35 planned: more while their times vary",
        "timed 40 runs (2.25 s a run), at least 35 planned: more while their times vary",
    ]
