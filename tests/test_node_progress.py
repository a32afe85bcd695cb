"""A node's progress file (seqr/node/progress.py) and the board that follows it
(seqr/sim/status.py): what is written, what is refused, what a watcher sees."""

import json
import os

import pytest

from seqr.core.errors import FormatError
from seqr.node.progress import MAX_LOSS_POINTS, NodeProgress, progress_path, read_progress
from seqr.sim.status import STATUS_NAME, StatusBoard, client_outcomes


def test_progress_file_records_stages_steps_and_losses(tmp_path):
    progress = NodeProgress(tmp_path, "code")
    progress.stage("training")
    for step in range(1, 6):
        progress.step(step, 5, 3.0 - 0.1 * step)
    progress.stage("calibrating")
    state = read_progress(progress_path(tmp_path, "code"))
    assert (state["client"], state["stage"], state["step"], state["steps"]) == (
        "code",
        "calibrating",
        5,
        5,
    )
    assert state["losses"] == [[s, pytest.approx(3.0 - 0.1 * s)] for s in range(1, 6)]
    assert set(state["stage_times"]) == {"starting", "training", "calibrating"}
    # The verdict arrives in a later message: resume keeps the curve.
    NodeProgress.resume(tmp_path, "code").stage("rejected", "stats_implausible: too narrow")
    again = read_progress(progress_path(tmp_path, "code"))
    assert again["stage"] == "rejected" and len(again["losses"]) == 5
    assert again["reason"] == "stats_implausible: too narrow"


def test_long_training_keeps_a_bounded_loss_curve_with_first_and_last_step(tmp_path):
    progress = NodeProgress(tmp_path, "long")
    for step in range(1, 5001):
        progress.step(step, 5000, 1.0 / step)
    state = read_progress(progress_path(tmp_path, "long"))
    assert len(state["losses"]) <= MAX_LOSS_POINTS
    assert state["losses"][0][0] == 1 and state["losses"][-1][0] == 5000


def test_no_folder_writes_nothing(tmp_path):
    progress = NodeProgress(None, "x")
    progress.stage("training")
    progress.step(1, 1, 0.5)
    assert list(tmp_path.iterdir()) == []


def test_fifo_in_place_of_a_progress_file_is_refused_not_waited_on(tmp_path):
    os.mkfifo(tmp_path / "code.json")
    with pytest.raises(FormatError, match="not a regular file"):
        read_progress(tmp_path / "code.json")


def test_symlinked_progress_file_is_not_followed(tmp_path):
    NodeProgress(tmp_path / "elsewhere", "code").stage("training")
    (tmp_path / "code.json").symlink_to(tmp_path / "elsewhere" / "code.json")
    with pytest.raises(OSError):
        read_progress(tmp_path / "code.json")


@pytest.mark.parametrize(
    "change, message",
    [
        ({"stage": "pwned"}, "unknown stage"),
        ({"client": "../../etc/passwd"}, "client"),
        ({"step": -1}, "step"),
        ({"loss": 1e308}, "loss"),
        ({"losses": [[1, 2, 3]]}, "losses"),
        ({"stage_times": {"training": "soon"}}, "stage_times"),
    ],
)
def test_malformed_progress_fields_are_refused(tmp_path, change, message):
    NodeProgress(tmp_path, "code").stage("training")
    path = tmp_path / "code.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **change}))
    with pytest.raises(FormatError, match=message):
        read_progress(path)


def test_oversized_or_duplicate_key_progress_file_is_refused(tmp_path):
    (tmp_path / "big.json").write_bytes(b" " * 70_000 + b"{}")
    with pytest.raises(FormatError, match="over the limit"):
        read_progress(tmp_path / "big.json")
    (tmp_path / "dup.json").write_text('{"format": "seqr/progress/v1", "format": "x"}')
    with pytest.raises(FormatError, match="duplicate key"):
        read_progress(tmp_path / "dup.json")


@pytest.fixture
def unthrottled(monkeypatch):
    """Every step written at once (a node writes at most once a second while training)."""
    monkeypatch.setattr("seqr.node.progress.WRITE_INTERVAL_S", 0.0)


def test_board_prints_one_line_per_client_change_and_writes_status_json(tmp_path, unthrottled):
    lines: list[str] = []
    progress_dir = tmp_path / "progress"
    board = StatusBoard(tmp_path / "out", ["code", "poems"], progress_dir, echo=lines.append)
    board.begin("federation", "2 clients")
    code = NodeProgress(progress_dir, "code")
    code.stage("training")
    code.step(1, 10, 2.5)
    board.poll()
    board.poll()  # nothing changed: no new line
    code.step(5, 10, 2.0)
    code.step(10, 10, 1.5)
    code.stage("submitted")
    NodeProgress(progress_dir, "poems").stage(
        "failed", "DataError: the node's private data is unusable"
    )
    board.poll()
    client_lines = [
        line.split("; federation ETA")[0] for line in lines if line.startswith("[client")
    ]
    assert client_lines == [
        "[client 1/2] code: training step 1/10, loss 2.500 (0 s)",
        "[client 1/2] code: submitted (0 s)",
        "[client 2/2] poems: failed: DataError: the node's private data is unusable (0 s)",
    ]
    assert "; federation ETA" in lines[-1]  # once training has started, each poll's last line
    status = json.loads((tmp_path / "out" / STATUS_NAME).read_text())
    assert status["stage"] == "federation"
    assert status["counts"] == {"submitted": 1, "failed": 1}
    assert status["clients"]["code"]["step"] == 10
    board.begin("evaluation: route held-out text", total=100)
    board.advance(50)
    board.finish()
    status = json.loads((tmp_path / "out" / STATUS_NAME).read_text())
    assert status["stage"] == "done"
    assert [s["stage"] for s in status["stages"]] == [
        "federation",
        "evaluation: route held-out text",
    ]
    outcomes = {c["client"]: c for c in client_outcomes(board, not_admitted=["poems"])}
    assert outcomes["code"]["verdict"] == "admitted" and len(outcomes["code"]["losses"]) == 3
    assert outcomes["poems"]["verdict"] == "failed"
    assert outcomes["poems"]["reason"].startswith("DataError")


def test_board_eta_follows_the_training_rate(tmp_path, unthrottled):
    progress_dir = tmp_path / "progress"
    board = StatusBoard(tmp_path / "out", ["a", "b"], progress_dir, echo=lambda _: None)
    board.begin("federation")
    a = NodeProgress(progress_dir, "a")
    a.state["started"] -= 100  # started 100 s ago, half its 10 steps done
    a.stage("training")
    a.step(5, 10, 1.0)
    board.poll()
    eta = board.eta_s(a.state["updated"])
    assert eta == pytest.approx(300, rel=0.05)  # 15 of 20 steps left at 5 steps per 100 s
