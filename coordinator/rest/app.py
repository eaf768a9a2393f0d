"""The REST application: the dispatcher with every route group added.

One module per area holds its routes (`routes_pools`, `routes_jobs`, `routes_tasks`, `routes_files`,
`routes_certs`, `routes_ops`, `routes_autoscale`); `dispatch` holds authentication, body limits,
the route table and error rendering.
"""

from __future__ import annotations

from coordinator.runtime.filestore import FileStore
from coordinator.runtime.service import CoordinatorService

from .azure.api import install as install_azure
from .dispatch import Dispatcher
from .dispatch import Response as Response
from .limits import DEFAULT_MAX_UPLOAD
from .routes_autoscale import AutoscaleRoutes
from .routes_certs import CertRoutes
from .routes_files import FileRoutes
from .routes_jobprep import JobPrepRoutes
from .routes_jobs import JobRoutes
from .routes_ops import OpsRoutes
from .routes_pools import PoolRoutes
from .routes_tasks import TaskRoutes
from .ui import UiApp

ROUTE_GROUPS = (
    PoolRoutes,
    AutoscaleRoutes,
    JobRoutes,
    JobPrepRoutes,
    TaskRoutes,
    FileRoutes,
    CertRoutes,
    OpsRoutes,
)


def make_app(
    service: CoordinatorService, files: FileStore, *, max_upload_size: int = DEFAULT_MAX_UPLOAD
) -> Dispatcher:
    app = Dispatcher(service, files, max_upload_size=max_upload_size)
    for group in ROUTE_GROUPS:
        group(app).register(app.route)
    install_azure(app)  # requests carrying an Azure api-version
    app.ui = UiApp(app)
    return app
