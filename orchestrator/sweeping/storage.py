"""Where a sweep's files persist: a local or shared folder, or object storage (``s3://bucket/prefix``).

Every process of a sweep works in a folder, ``SweepLayout.root``, and ``SweepLayout`` names its
files as before. With a folder as ``output_dir`` (a local disk, or NFS every node mounts) that
folder *is* the storage and every method below is a no-op. With ``s3://bucket/prefix`` the folder
is node-local scratch (``storage.scratch_dir``/bucket/prefix/<name>, the same path on every node):
a process writes a file there and pushes it at once; a reader pulls it first. Each file has one
writer at a time (the driver, a trial's rank 0 or its Tune driver, the pool's recorder on the
driver) and an S3 PUT replaces an object whole, so a reader never sees half a file.

Ray Tune's state and Ray Train's checkpoints go to the bucket through Ray's own storage layer
(``storage_path`` + ``storage_filesystem``, a ``pyarrow.fs.S3FileSystem``); the files here go
through the same pyarrow filesystem, so nothing beyond Ray's dependencies is needed. Endpoint and
region come from the sweep file's ``storage`` section, else $AWS_ENDPOINT_URL_S3 / $AWS_ENDPOINT_URL
and $AWS_DEFAULT_REGION / $AWS_REGION, resolved once by the driver (every node must reach the same
endpoint). Credentials come from each node's environment only (AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, an instance role): the sweep file is copied into sweep.json, into the bucket
and into MLflow, so a secret written there would leak.
"""
from __future__ import annotations

import functools
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional
from urllib.parse import urlsplit

SCHEME = "s3://"


def is_remote(output_dir: str) -> bool:
    return str(output_dir).startswith(SCHEME)


def default_scratch() -> Path:
    return Path(tempfile.gettempdir()) / "softdimo-scratch"


@dataclass(frozen=True)
class Storage:
    """A sweep's ``output_dir``: ``uri`` is ``s3://bucket/prefix`` (None for a folder) and ``local``
    the folder this node works in (the output_dir itself for a folder). Pickled to every trial."""
    local: Path
    uri: Optional[str] = None
    endpoint_url: Optional[str] = None
    region: Optional[str] = None

    @classmethod
    def of(cls, output_dir: str, endpoint_url: str | None = None, region: str | None = None,
           scratch_dir: str | None = None) -> "Storage":
        if not is_remote(output_dir):
            return cls(local=Path(output_dir))
        bucket_prefix = output_dir[len(SCHEME):].strip("/")
        env = os.environ.get
        return cls(local=Path(scratch_dir or default_scratch()).expanduser().resolve() / bucket_prefix,
                   uri=SCHEME + bucket_prefix,
                   endpoint_url=endpoint_url or env("AWS_ENDPOINT_URL_S3") or env("AWS_ENDPOINT_URL"),
                   region=region or env("AWS_DEFAULT_REGION") or env("AWS_REGION"))

    @property
    def remote(self) -> bool:
        return self.uri is not None

    def filesystem(self):
        """The pyarrow filesystem Ray and this module write through (None: a folder, Ray's default)."""
        return _s3(self.endpoint_url, self.region) if self.remote else None

    def key(self, path: Path) -> str:
        """``bucket/prefix/...`` of a path under ``local`` (pyarrow's and Ray's spelling)."""
        rel = Path(path).relative_to(self.local).as_posix()
        base = self.uri[len(SCHEME):]
        return base if rel == "." else f"{base}/{rel}"

    def ray_path(self, path: Path) -> str:
        """A ``storage_path`` for Ray (with ``filesystem()`` as its ``storage_filesystem``)."""
        return self.key(path) if self.remote else str(path)

    def location(self, path: Path) -> str:
        """Where a file lives, for people and MLflow tags: ``s3://...`` or the local path."""
        return SCHEME + self.key(path) if self.remote else str(path)

    def env(self) -> dict:
        """What an S3 client in another process (the MLflow server's boto3) needs besides credentials."""
        out = {}
        if self.endpoint_url:
            out["MLFLOW_S3_ENDPOINT_URL"] = self.endpoint_url
        if self.region:
            out["AWS_DEFAULT_REGION"] = self.region
        return out

    # --- files ------------------------------------------------------------------------------------

    def push(self, path: Path) -> None:
        """Copy a file or folder from the working folder to storage (replacing what is there)."""
        if not self.remote:
            return
        from pyarrow import fs as pafs

        path = Path(path)
        if path.is_dir():
            pafs.copy_files(str(path), self.key(path), source_filesystem=pafs.LocalFileSystem(),
                            destination_filesystem=self.filesystem())
        else:
            with self.filesystem().open_output_stream(self.key(path)) as out:
                out.write(path.read_bytes())

    def pull(self, path: Path) -> bool:
        """Copy a file or folder from storage into the working folder; False when storage has none
        (the local copy, if any, is left alone). A folder already present locally is not fetched again."""
        path = Path(path)
        if not self.remote:
            return path.exists()
        from pyarrow import fs as pafs

        info = self.filesystem().get_file_info(self.key(path))
        if info.type == pafs.FileType.NotFound:
            return False
        path.parent.mkdir(parents=True, exist_ok=True)
        if info.type == pafs.FileType.Directory:
            if not path.is_dir():
                tmp = path.with_name(f".tmp_{path.name}")
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir()
                pafs.copy_files(self.key(path), str(tmp), source_filesystem=self.filesystem(),
                                destination_filesystem=pafs.LocalFileSystem())
                os.replace(tmp, path)
            return True
        tmp = path.with_name(f".tmp_{path.name}")
        with self.filesystem().open_input_stream(self.key(path)) as src:
            tmp.write_bytes(src.read())
        os.replace(tmp, path)             # a reader of the local copy never sees half a file
        return True

    def pull_files(self, folder: Path) -> None:
        """The files directly in ``folder`` (not its subfolders: snapshots stay in storage)."""
        if not self.remote:
            return
        for name, is_dir in self.entries(folder):
            if not is_dir:
                self.pull(Path(folder) / name)

    def entries(self, folder: Path) -> list[tuple[str, bool]]:
        """(name, is a folder) of what ``folder`` holds in storage, sorted; [] when it is missing."""
        folder = Path(folder)
        if not self.remote:
            return sorted((p.name, p.is_dir()) for p in folder.iterdir()) if folder.is_dir() else []
        from pyarrow import fs as pafs

        infos = self.filesystem().get_file_info(pafs.FileSelector(self.key(folder), allow_not_found=True))
        return sorted((i.base_name, i.type == pafs.FileType.Directory) for i in infos)

    def exists(self, path: Path) -> bool:
        if not self.remote:
            return Path(path).exists() or Path(path).is_symlink()
        from pyarrow import fs as pafs

        return self.filesystem().get_file_info(self.key(path)).type != pafs.FileType.NotFound

    def delete(self, path: Path) -> None:
        """Remove a folder or file from storage (the caller removes the working copy)."""
        if not self.remote:
            return
        from pyarrow import fs as pafs

        fs, key = self.filesystem(), self.key(path)
        kind = fs.get_file_info(key).type
        if kind == pafs.FileType.Directory:
            fs.delete_dir(key)
        elif kind == pafs.FileType.File:
            fs.delete_file(key)


@functools.lru_cache(maxsize=None)
def _s3(endpoint_url: str | None, region: str | None):
    """One S3 filesystem per process and endpoint; credentials from this node's environment."""
    from pyarrow import fs as pafs

    options = {}
    if endpoint_url:
        parts = urlsplit(endpoint_url)
        options["endpoint_override"] = parts.netloc or endpoint_url
        if parts.scheme:
            options["scheme"] = parts.scheme
    if region:
        options["region"] = region
    return pafs.S3FileSystem(**options)
