"""Build an Engine on a temporary data dir over a chosen Files layer (for unit tests)."""

from blockd.datadir import DataDir
from blockd.engine import Engine
from blockd.fileio import OsFiles

from faultfs import FaultFiles


class Rig:
    """A data dir, its Files layer and an engine; ``crash()`` simulates a power cut."""

    def __init__(self, path, kind="os", chunk_size=64 * 1024, seed=0):
        self.datadir = DataDir(str(path)).init()
        self.kind = kind
        self.seed = seed
        catalog = self.datadir.catalog()
        try:
            catalog.set_chunk_size(chunk_size)
        except Exception:
            pass
        catalog.close()
        self.files = self._files()
        self.engine = Engine(self.datadir, files=self.files)

    def _files(self):
        if self.kind == "fault":
            self.seed += 1
            return FaultFiles(self.datadir.volumes_path, seed=self.seed)
        return OsFiles()

    def create(self, name, size):
        return self.engine.catalog.create_volume(name, size)

    def open(self, name):
        return self.engine.open(name)

    def crash(self, tear=False, image=None):
        """Abandon the engine without flushing, cut power, start a new engine."""
        self._abandon()
        if self.kind == "fault":
            self.files.crash(tear=tear, image=image)
        self.files = self._files()
        self.engine = Engine(self.datadir, files=self.files)

    def restart(self):
        """Clean shutdown (flush), then a new engine."""
        self.engine.close()
        self.files = self._files()
        self.engine = Engine(self.datadir, files=self.files)

    def _abandon(self):
        import os

        for entry in list(self.engine._open.values()):
            if self.kind != "fault":
                entry.volume.store.close()  # drop descriptors, no flush: like kill -9
            os.close(entry.lock_fd)
        self.engine._open.clear()
        self.engine.catalog.close()

    def close(self):
        self.engine.close()
