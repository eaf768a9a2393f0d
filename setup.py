"""The one compiled piece: the agent's clone3 task launcher (tvmagent/launch/_clone3.c).

Optional: where no C compiler (or no Python headers) exists, the install goes on without it and
the agent launches tasks through its exec-time wrapper chain instead (slower, equally confined).
Everything else about the package is in pyproject.toml.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "tvmagent.launch._clone3",
            sources=["tvmagent/launch/_clone3.c"],
            optional=True,
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter"],
        )
    ]
)
