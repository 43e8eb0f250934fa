"""Files of jobs (uploads, candidate weights, results) in a local folder or any fsspec URL.

A local directory serves one machine; an fsspec URL such as `s3://bucket/archtree` lets API,
workers and agents on several machines share the same files.
"""

from __future__ import annotations

import contextlib
import io
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import fsspec
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from search.errors import ArchtreeError

# What put_file holds in memory at once.
COPY_CHUNK_BYTES = 1 << 20


class ArtifactStoreError(ArchtreeError):
    """The artifact store cannot be read or written: the operator's to fix, not the user's.

    The message names the store's paths, for the operator's log; `for_client` says what
    failed without them, for an API client."""

    def __init__(self, message: str, for_client: str) -> None:
        super().__init__(message)
        self.for_client = for_client


class ArtifactStore:
    """Read and write files by relative path under one root URL."""

    def __init__(self, root: str) -> None:
        self.root = root.rstrip("/")
        try:
            self.fs, self._root_path = fsspec.core.url_to_fs(self.root)
            self.fs.makedirs(self._root_path, exist_ok=True)
        except ImportError as error:  # fsspec names the package its protocol needs
            raise ArchtreeError(
                f"the artifact store {root!r} needs a package that is not installed ({error})"
            ) from None
        except (OSError, ValueError) as error:
            raise ArchtreeError(
                f"cannot use {root!r} as the artifact store ({type(error).__name__}: {error}): "
                "set ARCHTREE_ARTIFACTS_URL to a folder or fsspec URL the service can write"
            ) from None

    def _path(self, name: str) -> str:
        clean = name.strip("/")
        if not clean or ".." in Path(clean).parts:
            raise ValueError(f"invalid artifact path {name!r}")
        return f"{self._root_path}/{clean}"

    def put_bytes(self, name: str, data: bytes) -> None:
        self._put(name, lambda handle: handle.write(data))

    def put_file(self, name: str, source: Path) -> None:
        """Copy a local file into the store a chunk at a time: an upload of hundreds of MB is
        never held whole in memory."""
        with source.open("rb") as file:
            self._put(name, lambda handle: shutil.copyfileobj(file, handle, COPY_CHUNK_BYTES))

    def _put(self, name: str, write: Callable[[BinaryIO], object]) -> None:
        """Write `name` whole or not at all: into a temporary file, moved to its name once
        written; a failed write removes the temporary file and leaves an earlier `name`."""
        path = self._path(name)
        temporary = path + ".partial"
        try:
            self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
            try:
                with self.fs.open(temporary, "wb") as handle:
                    write(handle)
                self.fs.mv(temporary, path)
            except BaseException:
                with contextlib.suppress(OSError):
                    self.fs.rm(temporary)
                raise
        except OSError as error:
            raise self._failure("write", name, error) from None

    def get_bytes(self, name: str) -> bytes:
        try:
            with self.fs.open(self._path(name), "rb") as handle:
                return handle.read()
        except FileNotFoundError:
            raise ArtifactStoreError(
                f"{name} is missing from the artifact store {self.root} (was the store, or this "
                "job's folder in it, removed while the job ran?); check ARCHTREE_ARTIFACTS_URL",
                for_client="a file the service stored is missing from its store",
            ) from None
        except OSError as error:
            raise self._failure("read", name, error) from None

    def _failure(self, doing: str, name: str, error: OSError) -> ArtifactStoreError:
        reason = error.strerror or type(error).__name__
        return ArtifactStoreError(
            f"cannot {doing} {name} in the artifact store {self.root} ({reason}): check that "
            "ARCHTREE_ARTIFACTS_URL is a folder or fsspec URL the service can write",
            for_client=f"the service cannot {doing} its files ({reason})",
        )

    def delete_folder(self, name: str) -> None:
        """Remove a folder and all it holds; nothing happens when it does not exist."""
        path = self._path(name)
        try:
            if self.fs.exists(path):
                self.fs.rm(path, recursive=True)
        except OSError as error:
            raise self._failure("delete", name, error) from error

    def names(self, folder: str) -> list[str]:
        """The names of the files in a folder; none when it does not exist."""
        path = self._path(folder)
        try:
            return [entry.rsplit("/", 1)[-1] for entry in self.fs.ls(path, detail=False)]
        except FileNotFoundError:
            return []
        except OSError as error:
            raise self._failure("list", folder, error) from None

    def exists(self, name: str) -> bool:
        return self.fs.exists(self._path(name))

    def delete(self, name: str) -> None:
        """Remove a file; nothing happens when it does not exist."""
        path = self._path(name)
        if self.fs.exists(path):
            self.fs.rm(path)

    def size(self, name: str) -> int:
        return int(self.fs.size(self._path(name)))

    def local_copy(self, name: str, cache_dir: Path) -> Path:
        """A path on this machine holding the artifact (the file itself when it is local)."""
        if self.fs.protocol in ("file", ("file", "local")) or "file" in self.fs.protocol:
            return Path(self._path(name))
        target = cache_dir / name.strip("/")
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(self.get_bytes(name))
        return target

    def open_stream(self, name: str) -> io.BufferedReader:
        return self.fs.open(self._path(name), "rb")


class ArtifactNodeStore:
    """Candidate weights of one job in the artifact store, shared by all workers.

    A child evaluated twice (its task redelivered) writes each run's weights under an
    `attempt` name; `commit` then makes the run whose result was kept the node's weights.
    """

    def __init__(self, artifacts: ArtifactStore, job_id: str) -> None:
        self.artifacts = artifacts
        self.prefix = f"jobs/{job_id}/nodes"

    def _name(self, node_id: str, attempt: str | None = None) -> str:
        name = self.attempt_id(node_id, attempt) if attempt else node_id
        return f"{self.prefix}/{name}.safetensors"

    def put(self, node_id: str, state_dict: dict, attempt: str | None = None) -> None:
        tensors = {k: v.detach().contiguous().clone() for k, v in state_dict.items()}
        self.artifacts.put_bytes(self._name(node_id, attempt), save_safetensors(tensors))

    def get(self, node_id: str) -> dict:
        return load_safetensors(self.artifacts.get_bytes(self._name(node_id)))

    def commit(self, node_id: str, attempt: str) -> None:
        """Make an attempt's weights the node's; later calls for the node change nothing,
        even once its weights, no longer needed, are removed: a task delivered again after its
        depth ended (Redis away past the visibility timeout) failed its job, saying that a
        file of the store was missing."""
        if not self.artifacts.exists(self._name(node_id, attempt)):
            return  # committed (or discarded) by an earlier run of the same task
        if not self.artifacts.exists(self._name(node_id)):
            self.artifacts.put_bytes(
                self._name(node_id), self.artifacts.get_bytes(self._name(node_id, attempt))
            )
        self.artifacts.delete(self._name(node_id, attempt))

    def discard(self, node_id: str, attempt: str) -> None:
        self.artifacts.delete(self._name(node_id, attempt))

    def keep_only(self, node_ids: set[str]) -> None:
        """Remove the weights of every node but those named (search.engine.live_nodes). An
        attempt's weights stay: the run that wrote them commits or discards them."""
        suffix = ".safetensors"
        for name in self.artifacts.names(self.prefix):
            node_id = name.removesuffix(suffix)
            if name.endswith(suffix) and "." not in node_id and node_id not in node_ids:
                self.artifacts.delete(f"{self.prefix}/{name}")

    def clear(self) -> None:
        """Remove every candidate's weights: once the job has ended, only its results count."""
        self.artifacts.delete_folder(self.prefix)

    @staticmethod
    def attempt_id(node_id: str, attempt: str) -> str:
        """The id under which `put` and `get` reach an attempt's weights of a node."""
        return f"{node_id}.{attempt}"


class AttemptNodeStore:
    """One evaluation attempt's view: `node_id`'s weights go to the attempt's own file."""

    def __init__(self, nodes: ArtifactNodeStore, node_id: str, attempt: str) -> None:
        self.nodes = nodes
        self.node_id = node_id
        self.attempt = attempt

    def put(self, node_id: str, state_dict: dict) -> None:
        self.nodes.put(node_id, state_dict, self.attempt if node_id == self.node_id else None)

    def get(self, node_id: str) -> dict:
        return self.nodes.get(node_id)

    def keep_only(self, node_ids: set[str]) -> None:
        self.nodes.keep_only(node_ids)
