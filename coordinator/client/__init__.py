from ._client import *  # noqa: F403
