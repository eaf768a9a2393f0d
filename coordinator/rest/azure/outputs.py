"""Output files on the Azure API: `outputFiles` read from a task body and shown on a task.

Azure's shape: `{filePattern, destination: {container: {containerUrl, path}},
uploadOptions: {uploadCondition}}`. `uploadHeaders` and `identityReference` of a container are
refused: the agent sends no headers beyond Azure's own and holds no managed identity.
"""

from __future__ import annotations

from typing import Any

from coordinator.common import models as m

from .body import Body
from .conv import invalid

_WHY = "TVM Batch uploads with the container URL's SAS query only"


def read_output_files(b: Body) -> list[m.OutputFile]:
    out = []
    for f in b.objs("outputFiles"):
        dest = f.obj("destination")
        if dest is None:
            raise invalid(
                f._p("destination"), None, f"the property {f._p('destination')} is required"
            )
        c = dest.obj("container")
        if c is None:
            raise invalid(
                dest._p("container"),
                None,
                f"{dest._p('container')} is required (the only destination)",
            )
        c.refuse(("uploadHeaders", "identityReference"), _WHY)
        opts = f.obj("uploadOptions")
        cond = opts.text("uploadCondition") if opts is not None else None
        out.append(
            m.OutputFile(
                file_pattern=f.req_text("filePattern"),
                destination=m.OutputFileDestination(
                    container=m.OutputFileContainer(
                        container_url=c.req_text("containerUrl"), path=c.text("path")
                    )
                ),
                # Any casing (the SDKs send taskSuccess or tasksuccess); the core checks the value.
                upload_options=m.OutputFileUploadOptions(
                    upload_condition=(cond or "taskcompletion").lower()
                ),
            )
        )
    return out


def output_files_view(files: list[m.OutputFile] | None) -> list[dict[str, Any]] | None:
    if not files:
        return None
    out = []
    for f in files:
        c = f.destination.container
        if c is None:
            dest: dict[str, Any] = {}
        else:
            dest = {"container": {"containerUrl": c.container_url}}
            if c.path:
                dest["container"]["path"] = c.path
        out.append(
            {
                "filePattern": f.file_pattern,
                "destination": dest,
                "uploadOptions": {"uploadCondition": f.upload_options.upload_condition},
            }
        )
    return out
