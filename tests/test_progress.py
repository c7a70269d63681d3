"""Progress off a terminal: a line at intervals with count, rate, ETA and postfix."""

from saelab import progress


def test_periodic_lines_off_a_terminal(capsys, monkeypatch):  # capsys's stderr is not a terminal
    clock = iter(range(0, 1000, 10))  # each monotonic() call advances 10 s
    monkeypatch.setattr(progress.time, "monotonic", lambda: next(clock))
    monkeypatch.setenv("SAELAB_PROGRESS_SECONDS", "25")
    bar = progress.progress_bar(total=100, desc="training", unit="step")
    assert isinstance(bar, progress.LineProgress)
    bar.set_postfix(l0="31.5", fvu="0.100")
    for _ in range(6):
        bar.update(10)
    bar.close()
    lines = capsys.readouterr().err.splitlines()
    # started at t=0; updates at t=10..60: lines at t=30 (30 steps) and t=60 (60 steps), then close
    assert lines[0] == "training: 30/100 step (30%), 1 step/s, ETA 1m10s, elapsed 30s, l0=31.5, fvu=0.100"
    assert lines[1].startswith("training: 60/100 step (60%), 1 step/s, ETA 40s, elapsed 1m00s")
    assert len(lines) == 3 and lines[2].startswith("training: 60/100 step (60%)")


def test_quiet_for_short_jobs_and_when_disabled(capsys):
    assert list(progress.progress_bar(range(5), desc="scan")) == [0, 1, 2, 3, 4]
    with progress.progress_bar(total=3, desc="x", enabled=False) as bar:
        bar.update(3)
    assert capsys.readouterr().err == ""


def test_training_off_a_terminal_prints_step_loss_rate_and_eta(tmp_path, capsys, monkeypatch):
    """A GroupTrainer run under nohup/CI shows where it is: the line a log gets."""
    import torch

    from saelab.train import GroupTrainer, TrainConfig, TrainSpec

    monkeypatch.setenv("SAELAB_PROGRESS_SECONDS", "0")  # a line at every update
    batches = [torch.randn(64, 8, generator=torch.Generator().manual_seed(i)) for i in range(6)]
    GroupTrainer([TrainSpec(arch="relu", d_sae=16, coefficient=0.1)], 8, tmp_path,
                 TrainConfig(total_steps=6, log_every=2, checkpoint_every=6)).fit(batches)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("training: ")]
    assert lines[0].startswith("training: 1/6 step (17%), ") and "ETA " in lines[0]
    assert "tokens=384, sae=relu_16_c0.1, loss=" in lines[-1] and "l0=" in lines[-1]
