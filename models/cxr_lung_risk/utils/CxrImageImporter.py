"""
MHub module: import PNG/JPEG chest radiographs (one instance per image file).

mhubio has no PNG/JPEG importer nor file type, so each image found (recursively, sorted) under
``source_dir`` becomes an instance whose ``sid`` is its path relative to ``source_dir`` with the
extension dropped and ``/`` replaced by ``__``; the file is copied (same name) into the instance folder and
typed ``any`` with meta ``mod=cr`` and ``format=png|jpeg`` (query: ``any:format=png|jpeg``).
"""

import os
import re
import shutil

from mhubio.core import IO, Instance, InstanceData, DataType, FileType, Meta, Module

EXTENSIONS = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg"}


@IO.Config("source_dir", str, "input_data", the="input folder (relative to general.data_base_dir) searched for PNG/JPEG files")
@IO.Config("import_dir", str, "imported_instances", the="folder (relative to general.data_base_dir) where instances are created")
@IO.Config("meta", dict, {"mod": "cr"}, the="meta data attached to every imported image")
class CxrImageImporter(Module):

    source_dir: str
    import_dir: str
    meta: dict

    def task(self) -> None:
        source = os.path.join(self.config.data.abspath, self.source_dir)
        target = os.path.join(self.config.data.abspath, self.import_dir)
        found = []
        for root, dirs, files in os.walk(source):
            dirs.sort()
            for name in sorted(files):
                fmt = EXTENSIONS.get(os.path.splitext(name)[1].lower())
                if fmt:
                    found.append((os.path.join(root, name), fmt))
        if not found:
            self.log(f"no PNG/JPEG file found under {source}", level="WARNING")

        for path, fmt in found:
            rel = os.path.relpath(path, source)
            sid = re.sub(r"[^A-Za-z0-9._-]", "_", os.path.splitext(rel)[0].replace(os.sep, "__"))
            instance = Instance(os.path.join(target, sid))
            instance.attr["sid"] = sid
            instance.attr["source"] = rel.replace(os.sep, "/")  # the user's name of the file (runner, error file)
            self.config.data.addInstance(instance)
            meta = dict(self.meta)
            meta["format"] = fmt
            name = re.sub(r"[^A-Za-z0-9._-]", "_", os.path.basename(path))
            data = InstanceData(name, DataType(FileType.NONE, Meta(**meta)), instance)
            data.dc.makedirs()
            shutil.copyfile(path, data.abspath)
            data.confirm()
            self.log(f"imported {rel} as instance {sid}", level="NOTICE")
