"""Packaging for Golconde: queue-based data distribution for PostgreSQL over STOMP brokers."""
import os
import re

from setuptools import find_packages, setup

HERE = os.path.abspath(os.path.dirname(__file__))


def read_version():
    """``__version__`` from golconde/__init__.py, read as text (importing needs the dependencies)."""
    with open(os.path.join(HERE, "golconde", "__init__.py"), encoding="utf-8") as handle:
        match = re.search(r"^__version__\s*=\s*['\"]([^'\"]+)['\"]", handle.read(), re.MULTILINE)
    if not match:
        raise RuntimeError("no __version__ in golconde/__init__.py")
    return match.group(1)


setup(
    name="golconde",
    version=read_version(),
    description="Queue-based data distribution for PostgreSQL over STOMP message brokers",
    packages=find_packages(include=["golconde", "golconde.*"]),
    package_data={"golconde": ["triggers_sql/*.sql", "web/*", "web/vendor/*"]},
    python_requires=">=3.9",
    install_requires=[
        "stomp.py>=8.1",
        "psycopg2-binary>=2.9",
        "PyYAML>=6",
        "pydantic>=2",
        "simplejson>=3.17",
        "python-daemon>=3",
        "prometheus-client>=0.17",
        "nagiosplugin>=1.3",
        "tqdm>=4.60",
    ],
    extras_require={
        "test": ["pytest", "hypothesis", "selenium>=4.10", "pyflakes>=3"],
    },
    entry_points={
        "console_scripts": [
            "golconded = golconde.cli:daemon_main",
            "golconde = golconde.cli:admin_main",
            "check_golconde = golconde.nagios:main",
        ],
    },
    zip_safe=False,
)
