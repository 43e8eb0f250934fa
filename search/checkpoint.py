"""A search saved after each depth, so that one interrupted (Ctrl-C, a crash, a reboot) goes on
from its last finished depth when the same command runs again.

A checkpoint is a folder named by a hash of everything the search's result depends on (its
model, weights, data, budget, settings and device, as the caller describes them):

    state.json        the search's state after its last finished depth (search.tree.SearchState)
    about.json        that description, and the seconds the search had run
    nodes/ID.pt       the weights of each node, written as it is made, and deleted once the
                      search can no longer use them (search.engine.live_nodes)

Only the tree search is saved: the re-ranking and confirmation that follow it run again in
full on resuming. A folder is locked while a search uses it, so that two runs of the same
command do not write it at once (the second runs without one).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import pickle
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import torch

from search.errors import ArchtreeError
from search.interfaces import MemoryNodeStore
from search.tree import SearchState

# What `SearchCheckpoint._checked` holds when nothing read is kept.
_NOT_READ = object()
# Saved searches not resumed for this long are removed when another search starts.
KEEP_DAYS = 14
WRITE_FAILED = "a node's weights could not be written: is its disk full?"


class SavedNodeStore(MemoryNodeStore):
    """Node weights kept in memory and written to a folder as they are put, until
    `stop_saving`; a node not in memory (a resumed search's) is read from the folder."""

    def __init__(self, folder: Path) -> None:
        super().__init__()
        self.folder = folder
        self.saving = True
        # Why writing failed (a full disk), after which nothing more is written.
        self.error: Exception | None = None

    def put(self, node_id: str, state_dict: dict[str, Any]) -> None:
        super().put(node_id, state_dict)
        if not self.saving:
            return
        path = self._path(node_id)
        temporary = path.with_name(f"{path.name}.{threading.get_ident()}.tmp")
        try:
            with open(temporary, "wb") as file:  # torch.save names no OSError of its own
                torch.save(self.weights[node_id], file)
            os.replace(temporary, path)
        except (OSError, RuntimeError) as error:  # torch's writer may wrap a full disk's
            self.saving, self.error = False, error
            with contextlib.suppress(OSError):
                temporary.unlink()

    def get(self, node_id: str) -> dict[str, Any]:
        problem = self.unreadable(node_id)
        if problem is not None:
            raise ArchtreeError(
                f"the saved search in {self.folder.parent} cannot give back the weights of "
                f"its node {node_id} ({problem}), and is removed: the same command again "
                "starts the search afresh"
            )
        return self.weights[node_id]

    def unreadable(self, node_id: str) -> str | None:
        """Why the node's weights cannot be had (read from the folder, where they are not
        in memory yet: then kept there); None once they are in memory."""
        if node_id not in self.weights:
            try:
                self.weights[node_id] = torch.load(
                    self._path(node_id), map_location="cpu", weights_only=True
                )
            # An empty file (a crash before it reached the disk) raises EOFError.
            except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as error:
                return _reason(error, "the file is damaged")
        return None

    def keep_only(self, node_ids: set[str]) -> None:
        super().keep_only(node_ids)
        if not self.saving:
            return
        for path in self.folder.glob("*.pt"):
            if path.stem not in node_ids:
                with contextlib.suppress(OSError):
                    path.unlink()

    def stop_saving(self) -> None:
        """Keep what is put from now on in memory only."""
        self.saving = False

    def _path(self, node_id: str) -> Path:
        return self.folder / f"{node_id}.pt"


class SearchCheckpoint:
    """The saved state of one search (by its description), and the store of its weights."""

    def __init__(self, root: Path, about: dict[str, Any]) -> None:
        text = json.dumps(about, sort_keys=True, default=str)
        self.about = json.loads(text)
        self.folder = Path(root) / hashlib.sha256(text.encode()).hexdigest()[:16]
        self.nodes = SavedNodeStore(self.folder / "nodes")
        self.disabled = False
        self._lock_file: Any = None
        # What `unreadable` read, until `saved` takes it.
        self._checked: object = _NOT_READ

    def acquire(self) -> bool:
        """Create and lock the folder; False when another run of the same search holds it.
        Also removes other saved searches not resumed for KEEP_DAYS."""
        _remove_stale(self.folder.parent, keep=self.folder)
        self.nodes.folder.mkdir(parents=True, exist_ok=True)
        lock_file = open(self.folder / "lock", "w")  # noqa: SIM115 - held until release
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock_file.close()
            return False
        self._lock_file = lock_file
        return True

    def release(self) -> None:
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None

    def saved(self) -> tuple[SearchState, float] | None:
        """The state saved after the last finished depth, and the seconds run until then;
        None when nothing was saved, or what was saved cannot be read (`unreadable` says
        why)."""
        if self._checked is not _NOT_READ:  # `unreadable` has just read it
            read, self._checked = self._checked, _NOT_READ
            return read  # type: ignore[return-value]
        try:
            return self._read()
        except UNREADABLE:
            return None

    def unreadable(self) -> str | None:
        """Why the search an earlier run saved cannot be taken up: its state cannot be read,
        or the weights of a node it goes on from (search.engine.live_nodes) are missing or
        damaged, as after a crash while they were written. None when it reads, or when
        nothing was saved. The weights read are kept in the store, for the search to use."""
        from search.engine import live_nodes

        if not (self.folder / "state.json").exists():
            return None
        try:
            self._checked = self._read()  # kept for `saved`: a large tree is read once
        except UNREADABLE as error:
            return _reason(error, "the file is damaged")
        if self._checked is None:
            return None
        for node_id in sorted(live_nodes(self._checked[0])):
            problem = self.nodes.unreadable(node_id)
            if problem is not None:
                self._checked = _NOT_READ
                return f"the weights of its node {node_id}: {problem}"
        return None

    def _read(self) -> tuple[SearchState, float] | None:
        state = json.loads((self.folder / "state.json").read_text())
        about = json.loads((self.folder / "about.json").read_text())
        if about.get("search") != self.about:
            return None
        return SearchState.from_dict(state), float(about["elapsed_s"])

    def save(self, state: SearchState, elapsed_s: float) -> str | None:
        """Save `state` (its nodes' weights are already in the store). When it or a node's
        weights could not be written (a full disk), the saved search is removed, nothing more
        is saved, and what happened is returned, to be said; the search itself goes on."""
        self._checked = _NOT_READ
        if self.disabled:
            return None
        error = self.nodes.error
        if error is None:
            try:
                _write_json(self.folder / "state.json", state.to_dict())
                _write_json(
                    self.folder / "about.json",
                    {"search": self.about, "elapsed_s": elapsed_s, "saved_at": time.time()},
                )
                return None
            except OSError as failed:
                error = failed
        self.disabled = True
        self.nodes.stop_saving()
        self.remove()
        return (
            f"the search can no longer be saved in {self.folder} "
            f"({_reason(error, WRITE_FAILED)}), "
            "so it cannot go on from where it stopped if interrupted; it goes on unsaved"
        )

    def clear(self) -> None:
        """Forget what was saved (to start afresh), keeping the folder and its lock; OSError
        when its state cannot be removed (a folder made read-only), which would be taken up
        again."""
        self._checked = _NOT_READ
        for path in (self.folder / "state.json", self.folder / "about.json"):
            path.unlink(missing_ok=True)
        self.nodes.keep_only(set())

    def remove(self) -> None:
        """Delete the saved search (it finished, or cannot finish)."""
        self.release()
        shutil.rmtree(self.folder, ignore_errors=True)

    def remove_if_unused(self) -> None:
        """Delete the folder when nothing was saved in it yet (its run was refused before the
        search started); a search saved by an earlier run is kept."""
        if not (self.folder / "state.json").exists():
            self.remove()


def file_identity(source: str | None) -> Any:
    """A file by its content's SHA-256, wherever it lies and whatever its modification time:
    retrained weights are often a file of the same name, size and, copied with their times,
    modification time; a source that is not a file (builtin:mnist), or cannot be read, as
    it is."""
    if not source or not os.path.isfile(source):
        return source
    try:
        with open(source, "rb") as file:
            return {"sha256": hashlib.file_digest(file, "sha256").hexdigest()}
    except OSError:  # loading it says why, in the command's own words
        return source


# What reading a saved state.json or about.json that is damaged or cut short raises.
UNREADABLE = (OSError, ValueError, KeyError, TypeError, AttributeError)


def _reason(error: Exception, otherwise: str) -> str:
    """An OSError's own words; for torch's errors, whose messages run to pages of advice on
    pickles, `otherwise`."""
    if isinstance(error, OSError):
        return error.strerror or str(error)
    return otherwise


def _write_json(path: Path, data: dict[str, Any]) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(data, default=float))
    os.replace(temporary, path)


def _remove_stale(root: Path, keep: Path) -> None:
    """Remove the saved searches under `root` untouched for KEEP_DAYS, but `keep`."""
    if not root.is_dir():
        return
    limit = time.time() - KEEP_DAYS * 86400
    for folder in root.iterdir():
        if folder == keep or not folder.is_dir():
            continue
        with contextlib.suppress(OSError):
            touched = max(p.stat().st_mtime for p in (folder, *folder.iterdir()))
            if touched < limit:
                shutil.rmtree(folder, ignore_errors=True)
