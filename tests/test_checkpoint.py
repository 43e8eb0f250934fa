"""A search saved after each depth goes on from there when run again (search.checkpoint)."""

from __future__ import annotations

import os
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from search.budget import parse_budget
from search.checkpoint import SearchCheckpoint, file_identity
from search.engine import live_nodes, run_search
from search.interfaces import ListEventSink
from search.report import answer_notes
from tests.cost_model_device import BlockedConvDevice
from tests.test_engine import make_context

SETTINGS = {"width": 2, "branching": 2, "ft_steps": 5, "select_steps": 5, "max_probes": 4}
BUDGET = parse_budget("35%")


class StopsAtDepth(ListEventSink):
    """Interrupts the search (as Ctrl-C does) when the given depth starts, or at the first
    event of the given kind."""

    def __init__(self, depth: int | None = None, kind: str | None = None) -> None:
        super().__init__()
        self.depth, self.kind = depth, kind

    def emit(self, kind: str, **data) -> None:
        super().emit(kind, **data)
        if kind == self.kind or (kind == "depth_started" and data["depth"] == self.depth):
            raise KeyboardInterrupt


def tree(outcome) -> list[tuple]:
    return [
        (node.id, node.parent, node.spec.hash, round(node.score, 6), node.latency_ms)
        for node in outcome.state.nodes.values()
    ]


def searched(checkpoint: SearchCheckpoint | None = None, sink=None):
    context = make_context(oracle=BlockedConvDevice(1), **SETTINGS)
    if sink is not None:
        context = replace(context, sink=sink)
    if checkpoint is not None:
        context = replace(context, store=checkpoint.nodes)
    return context, run_search(context, BUDGET, checkpoint=checkpoint)


def interrupted(tmp_path, sink: StopsAtDepth) -> SearchCheckpoint:
    """The checkpoint of a search stopped by `sink`, released as a process that ended."""
    checkpoint = SearchCheckpoint(tmp_path, {"model": "builtin:vgg"})
    assert checkpoint.acquire()
    with pytest.raises(KeyboardInterrupt):
        searched(checkpoint, sink=sink)
    checkpoint.release()
    return checkpoint


def test_an_interrupted_search_goes_on_from_its_last_depth_to_the_same_answer(tmp_path):
    _, whole = searched()
    assert whole.state.depth >= 3

    first = interrupted(tmp_path, StopsAtDepth(3))
    state, elapsed_s = first.saved()
    assert state.depth == 2 and not state.done and elapsed_s > 0
    # Only the weights the search may still use are kept: the others were deleted.
    live = live_nodes(state)
    assert {path.stem for path in first.nodes.folder.glob("*.pt")} == live
    assert len(live) < len(state.nodes)
    kept = {node_id: first.nodes.get(node_id) for node_id in live}

    again = SearchCheckpoint(tmp_path, {"model": "builtin:vgg"})  # as a new process reads it
    assert again.folder == first.folder and again.acquire()
    context, resumed = searched(again)
    kinds = [event["kind"] for event in context.sink.events]
    assert "baseline" not in kinds and kinds[0] == "resumed"
    assert context.sink.events[0]["depth"] == 2
    assert [e["depth"] for e in context.sink.events if e["kind"] == "depth_started"] == list(
        range(3, whole.state.depth + 1)
    )
    # The live nodes of the first two depths are those saved, read back from the folder, and the
    # search ends where the uninterrupted one did.
    for node_id, weights in kept.items():
        read = again.nodes.get(node_id)
        assert all(torch.equal(read[name], value) for name, value in weights.items())
    assert tree(resumed) == tree(whole)
    assert resumed.answer.spec.hash == whole.answer.spec.hash
    assert resumed.final_accuracy == pytest.approx(whole.final_accuracy)
    assert resumed.wall_s >= elapsed_s
    # Said in the report too, which is all that --quiet shows besides the summary.
    assert whole.resumed is None
    assert resumed.resumed == {
        "after_depth": 2, "tree_search_finished": False, "saved_s": round(elapsed_s, 1)
    }  # fmt: skip
    notes = answer_notes(context, resumed)
    assert notes[-1] == (
        "this search went on from the one an earlier run of the same command saved after "
        "depth 2: the unpruned model's timing and the tree up to there come from that run"
    )
    assert not any("went on from" in note for note in answer_notes(context, whole))


def test_a_saved_state_checked_before_resuming_is_read_once(tmp_path, monkeypatch):
    interrupted(tmp_path, StopsAtDepth(3))
    reads = []
    read_text = Path.read_text

    def counted(path: Path, *args, **kwargs) -> str:
        reads.append(path.name)
        return read_text(path, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", counted)
    again = SearchCheckpoint(tmp_path, {"model": "builtin:vgg"})  # as a new run checks it
    assert again.unreadable() is None
    state, _ = again.saved()
    assert state.depth == 2 and reads.count("state.json") == 1
    # Cleared (--restart) after the check: nothing saved is given back.
    assert again.unreadable() is None
    again.clear()
    assert again.saved() is None


def test_a_search_interrupted_while_its_best_are_retuned_retunes_them_from_the_tree_again(
    tmp_path,
):
    _, whole = searched()
    interrupted(tmp_path, StopsAtDepth(kind="retuned"))
    again = SearchCheckpoint(tmp_path, {"model": "builtin:vgg"})
    assert again.acquire()
    context, resumed = searched(again)
    assert context.sink.events[0]["kind"] == "resumed" and context.sink.events[0]["done"]
    assert "depth_started" not in [event["kind"] for event in context.sink.events]
    # Tuned once, not twice: the saved weights are those the tree search left.
    assert tree(resumed) == tree(whole)
    assert resumed.final_accuracy == pytest.approx(whole.final_accuracy)


def test_a_search_described_otherwise_or_saved_by_another_run_is_not_taken_up(tmp_path):
    first = SearchCheckpoint(tmp_path, {"model": "builtin:vgg", "budget": "35%"})
    assert first.acquire()
    with pytest.raises(KeyboardInterrupt):
        searched(first, sink=StopsAtDepth(2))
    assert first.saved() is not None
    other = SearchCheckpoint(tmp_path, {"model": "builtin:vgg", "budget": "40%"})
    assert other.folder != first.folder and other.saved() is None
    # The same search while the first run still holds it: a second run does not write it.
    assert not SearchCheckpoint(tmp_path, {"model": "builtin:vgg", "budget": "35%"}).acquire()
    first.remove()
    assert not first.folder.exists()


def test_a_search_knows_its_files_by_their_content(tmp_path):
    def folder(weights: Path) -> Path:
        return SearchCheckpoint(tmp_path, {"weights": file_identity(str(weights))}).folder

    weights = tmp_path / "model.safetensors"
    weights.write_bytes(bytes(range(256)) * 4)
    first = folder(weights)
    # The same weights, touched or copied elsewhere: the same search.
    os.utime(weights, ns=(1, 1))
    copy = tmp_path / "copy" / "model.safetensors"
    copy.parent.mkdir()
    shutil.copy(weights, copy)
    assert folder(weights) == first and folder(copy) == first
    # Retrained weights of the same name, size and modification time: another search.
    times = weights.stat()
    weights.write_bytes(bytes(reversed(range(256))) * 4)
    os.utime(weights, ns=(times.st_atime_ns, times.st_mtime_ns))
    assert folder(weights) != first
    # What is not a file is described as it is.
    assert file_identity("builtin:mnist") == "builtin:mnist" and file_identity(None) is None


def test_prune_removes_its_saved_search_once_it_ends_with_a_result_or_an_error(tmp_path):
    from archtree_cli.commands import prune
    from search.errors import ArchtreeError
    from search.settings import SearchSettings

    def pruned(budget: str, checkpoint: SearchCheckpoint):
        assert checkpoint.acquire()
        return prune(
            model="builtin:vgg",
            data="builtin:digits",
            budget=budget,
            out=str(tmp_path / "out"),
            settings=SearchSettings(**SETTINGS).effective(),
            oracle=BlockedConvDevice(1),
            quiet=True,
            checkpoint=checkpoint,
        )

    checkpoint = SearchCheckpoint(tmp_path / "searches", {"budget": "35%"})
    report, folder = pruned("35%", checkpoint)
    assert (folder / "model.safetensors").exists() and report["search"]["depths"] >= 2
    assert not checkpoint.folder.exists()
    # A search that cannot end otherwise (its budget is out of reach) is not kept either.
    checkpoint = SearchCheckpoint(tmp_path / "searches", {"budget": "0.0001ms"})
    with pytest.raises(ArchtreeError, match="cannot be met"):
        pruned("0.0001ms", checkpoint)
    assert not checkpoint.folder.exists()


def test_a_search_that_cannot_be_written_goes_on_unsaved_and_says_so(tmp_path):
    checkpoint = SearchCheckpoint(tmp_path, {"model": "builtin:vgg"})
    assert checkpoint.acquire()
    nodes = checkpoint.nodes.folder
    nodes.rmdir()
    nodes.write_text("")  # a file where the weights go: each write fails, as on a full disk
    context, outcome = searched(checkpoint)
    notes = [e["message"] for e in context.sink.events if e["kind"] == "note"]
    assert any(
        "the search can no longer be saved" in note and "it goes on unsaved" in note
        for note in notes
    ), notes
    assert outcome.state.depth >= 2 and not checkpoint.folder.exists()


class KeepsEveryNode:
    """A node store that never drops weights."""

    def __init__(self) -> None:
        self.weights: dict[str, dict] = {}

    def put(self, node_id: str, state_dict: dict) -> None:
        self.weights[node_id] = {k: v.detach().clone() for k, v in state_dict.items()}

    def get(self, node_id: str) -> dict:
        return self.weights[node_id]

    def keep_only(self, node_ids: set[str]) -> None:
        pass


def test_a_search_drops_the_weights_it_can_no_longer_use_and_ends_the_same():
    context, whole = searched()
    kept = set(context.store.weights) & set(whole.state.nodes)  # not the retuned copies
    assert len(kept) < len(whole.state.nodes)
    assert live_nodes(whole.state) <= kept
    every = make_context(oracle=BlockedConvDevice(1), **SETTINGS)
    every = replace(every, store=KeepsEveryNode())
    assert tree(run_search(every, BUDGET)) == tree(whole)


@pytest.mark.parametrize("damage", [b"not weights", b"", None])  # b"": a crash before the write
def test_a_saved_search_missing_weights_is_said_and_started_afresh(tmp_path, damage):
    from search.errors import ArchtreeError

    first = interrupted(tmp_path, StopsAtDepth(2))
    state, _ = first.saved()
    node = state.frontier[0]
    weights = first.nodes.folder / f"{node}.pt"
    if damage is None:
        weights.unlink()
    else:
        weights.write_bytes(damage)
    # Checked before the search is taken up: said, and the search starts afresh.
    again = SearchCheckpoint(tmp_path, {"model": "builtin:vgg"})
    assert again.acquire()
    said = again.unreadable()
    reason = "No such file or directory" if damage is None else "the file is damaged"
    assert said == f"the weights of its node {node}: {reason}"
    again.clear()
    assert again.saved() is None
    again.release()
    # Found missing during a search (a file deleted meanwhile): the error says the same
    # command starts afresh, as prune removes a search that ended in an error.
    first = interrupted(tmp_path / "mid", StopsAtDepth(2))
    (first.nodes.folder / f"{node}.pt").unlink()
    during = SearchCheckpoint(tmp_path / "mid", {"model": "builtin:vgg"})
    assert during.acquire()
    with pytest.raises(ArchtreeError) as failed:
        searched(during)
    assert f"cannot give back the weights of its node {node} (" in str(failed.value)
    assert str(failed.value).endswith(
        "and is removed: the same command again starts the search afresh"
    )


class ChecksEverySave(SearchCheckpoint):
    """Records, at each save, the nodes of the state saved before whose weights are gone:
    what a crash at that moment would leave the next run without."""

    missing: list[set[str]]

    def save(self, state, elapsed_s):
        before = self.saved()
        if before is not None:
            files = {path.stem for path in self.nodes.folder.glob("*.pt")}
            self.missing.append(live_nodes(before[0]) - files)
        return super().save(state, elapsed_s)


def test_a_crash_at_any_save_leaves_the_weights_of_the_state_saved_before(tmp_path):
    checkpoint = ChecksEverySave(tmp_path, {"model": "builtin:vgg"})
    checkpoint.missing = []
    assert checkpoint.acquire()
    _, outcome = searched(checkpoint)
    assert outcome.state.depth >= 3 and len(checkpoint.missing) >= 3
    assert checkpoint.missing == [set()] * len(checkpoint.missing)


def test_a_saved_state_that_cannot_be_read_says_why_and_the_search_starts_afresh(tmp_path):
    first = interrupted(tmp_path, StopsAtDepth(2))
    assert first.unreadable() is None  # it reads
    state_file = first.folder / "state.json"
    state_file.write_text(state_file.read_text()[:100])  # cut short, as by a crash mid-write
    again = SearchCheckpoint(tmp_path, {"model": "builtin:vgg"})
    assert again.acquire()
    assert again.saved() is None
    assert again.unreadable() == "the file is damaged"
    outcome = searched(again)[1]
    assert outcome.state.depth >= 2  # searched from the start, not from depth 2
    assert SearchCheckpoint(tmp_path / "other", {"model": "builtin:vgg"}).unreadable() is None


def test_a_model_whose_code_cannot_be_read_gets_no_saved_search(tmp_path, monkeypatch, capsys):
    """Its code cannot tell an edit (a module imported from a zip archive): a search saved
    for it could be resumed with other code, so none is saved, and the run says so."""
    import uuid
    import zipfile

    from archtree_cli.commands import _saved_search
    from archtree_cli.main import build_parser, settings_from

    name = f"zipped_{uuid.uuid4().hex[:8]}"
    archive = tmp_path / "models.zip"
    with zipfile.ZipFile(archive, "w") as packed:
        packed.writestr(f"{name}.py", "def net():\n    return None\n")
    monkeypatch.syspath_prepend(str(archive))
    monkeypatch.setenv("ARCHTREE_HOME", str(tmp_path / "home"))
    args = build_parser().parse_args(
        [
            "prune",
            "--model",
            f"module:{name}:net",
            "--data",
            "builtin:digits",
            "--budget",
            "50%",
            "--out",
            str(tmp_path / "out"),
        ]
    )

    assert _saved_search(args, settings_from(args)) is None
    said = capsys.readouterr().err
    assert f"the code of module:{name}:net cannot be read to tell an edit of it" in said
    assert not (tmp_path / "home" / "searches").exists()
    args.model = "builtin:vgg"  # code read from its file: saved
    checkpoint = _saved_search(args, settings_from(args))
    assert checkpoint is not None and checkpoint.folder.is_dir()
    checkpoint.release()


def test_a_saved_state_that_cannot_be_removed_leaves_the_search_unsaved(
    tmp_path, monkeypatch, capsys
):
    """--restart, or a saved search that cannot be taken up, clears the state; where it
    cannot be removed (a folder made read-only), the run goes on unsaved and says what to do,
    rather than take up that state again or fail."""
    from archtree_cli.commands import _saved_search
    from archtree_cli.main import build_parser, settings_from

    monkeypatch.setenv("ARCHTREE_HOME", str(tmp_path / "home"))
    command = ["prune", "--model", "builtin:vgg", "--data", "builtin:digits", "--budget", "50%",
               "--out", str(tmp_path / "out")]  # fmt: skip
    args = build_parser().parse_args(command)
    checkpoint = _saved_search(args, settings_from(args))
    (checkpoint.folder / "state.json").write_text("{}")
    checkpoint.release()
    restarted = build_parser().parse_args([*command, "--restart"])
    again = _saved_search(restarted, settings_from(restarted))
    assert "--restart: the search an earlier run of this command saved in" in (
        capsys.readouterr().err
    )
    assert again is not None and not (again.folder / "state.json").exists()
    again.release()

    (again.folder / "state.json").mkdir()  # what cannot be removed, as in a read-only folder
    (again.folder / "state.json" / "x").write_text("")
    assert _saved_search(restarted, settings_from(restarted)) is None
    said = capsys.readouterr().err
    assert (
        f"this search is not saved in {again.folder} (the state an earlier run saved there " in said
    )
    assert "cannot be removed: " in said and "make the folder writable, or delete it" in said
    assert "so it cannot go on from where it stopped if interrupted" in said


def test_the_training_device_is_part_of_what_a_saved_search_is_for(tmp_path, monkeypatch):
    """Fine-tuned on another device, its depths would score otherwise: not taken up."""
    from archtree_cli.commands import _saved_search
    from archtree_cli.main import build_parser, settings_from

    monkeypatch.setenv("ARCHTREE_HOME", str(tmp_path / "home"))
    command = ["prune", "--model", "builtin:vgg", "--data", "builtin:digits", "--budget", "50%",
               "--out", str(tmp_path / "out")]  # fmt: skip
    folders = []
    for device in ("cpu", "auto"):
        args = build_parser().parse_args([*command, "--train-device", device])
        checkpoint = _saved_search(args, settings_from(args))
        folders.append(checkpoint.folder)
        checkpoint.release()
    assert folders[0] != folders[1]


def test_an_interruption_does_not_offer_a_search_that_could_no_longer_be_saved(tmp_path):
    """A search whose saving failed (a full disk, a read-only folder) goes on unsaved: what an
    earlier run left in its folder is not what Ctrl-C then says the same command goes on from."""
    import argparse

    from archtree_cli.main import interrupted_note

    checkpoint = interrupted(tmp_path, StopsAtDepth(3))
    args = argparse.Namespace(command="prune", out="out", saved_search=checkpoint, restart=False)
    assert "the search is saved after depth 2" in interrupted_note(args)
    checkpoint.disabled = True
    assert "the search is saved" not in interrupted_note(args)
