"""An ``s3`` file system over a local folder, for the object-store test (no network).

fsspec's DirFileSystem rooted at a folder: ``s3://bucket/key`` reads ``ROOT/bucket/key``. It is
registered under the ``s3`` protocol by the test; Ray's workers import this module by name (the
test puts tests/ on their PYTHONPATH), so the instance travels to them like any fsspec file system.
"""
from __future__ import annotations

import os

from fsspec.implementations.dirfs import DirFileSystem
from fsspec.implementations.local import LocalFileSystem

ROOT_ENV = "CXR_TEST_S3_ROOT"


class LocalBucketFS(DirFileSystem):
    protocol = "s3"

    def __init__(self, root: str | None = None, **kwargs):
        super().__init__(path=root or os.environ[ROOT_ENV], fs=LocalFileSystem())

    def __reduce__(self):
        return (type(self), (self.path,))
