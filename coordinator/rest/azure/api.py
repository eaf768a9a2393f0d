"""The Azure Batch route groups, added to the dispatcher by `app.make_app`."""

from __future__ import annotations

from coordinator.rest.dispatch import Dispatcher

from .catalog import CatalogApi
from .certs import CertificateApi
from .files import FileApi
from .jobprep import JobPrepApi
from .jobs import JobApi
from .nodes import NodeApi
from .nodeusers import NodeUserApi
from .pools import PoolApi
from .router import AzureApi
from .schedules import ScheduleApi
from .tasks import TaskApi

GROUPS = (
    PoolApi,
    NodeApi,
    JobApi,
    JobPrepApi,
    TaskApi,
    FileApi,
    ScheduleApi,
    NodeUserApi,
    CatalogApi,
    CertificateApi,
)


def install(app: Dispatcher) -> AzureApi:
    api = AzureApi(app)
    for group in GROUPS:
        group(app).register(api)
    app.azure = api
    return api
