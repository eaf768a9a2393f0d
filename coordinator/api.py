"""REST API (ASGI, served by hypercorn's Trio worker) and the agent websocket endpoint.

One private module per area registers its routes: `_api_pools`, `_api_jobs`, `_api_tasks`,
`_api_files`; `_api_base` holds dispatch, auth and error rendering.
"""

from __future__ import annotations

from ._api_autoscale import AutoscaleRoutes
from ._api_base import Response as Response
from ._api_certs import CertRoutes
from ._api_files import FileRoutes
from ._api_jobs import JobRoutes
from ._api_limits import DEFAULT_MAX_UPLOAD
from ._api_ops import OpsRoutes
from ._api_pools import PoolRoutes
from ._api_tasks import TaskRoutes
from .filestore import FileStore
from .service import CoordinatorService


class RestApp(PoolRoutes, JobRoutes, TaskRoutes, FileRoutes, CertRoutes, OpsRoutes, AutoscaleRoutes):
    def __init__(self, service: CoordinatorService, files: FileStore, *,
                 max_upload_size: int = DEFAULT_MAX_UPLOAD) -> None:
        self.svc = service
        self.max_upload_size = max_upload_size
        self.core = service.core
        self.files = files
        self.requests = 0
        self._routes = []
        self._register_pools()
        self._register_autoscale()
        self._register_jobs()
        self._register_tasks()
        self._register_files()
        self._register_certs()
        self._register_ops()
