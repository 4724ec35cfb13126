from setuptools import setup

setup(
    name="im58d",
    version="0.1.0",
    description="A self-hostable mobile instant-messaging server on Twisted",
    long_description=open("README.rst", encoding="utf-8").read(),
    long_description_content_type="text/x-rst",
    license="MIT",
    python_requires=">=3.11",
    packages=[
        "im58d",
        "im58d.access",
        "im58d.bench",
        "im58d.client",
        "im58d.logic",
        "im58d.routing",
        "im58d.store",
        "im58d.web",
        "im58d.wire",
        "twisted.plugins",
    ],
    package_data={
        "im58d.store": ["schema/*.sql"],
        "twisted": ["plugins/im58d_plugin.py"],
    },
    install_requires=[
        "twisted[tls]>=24.7",
        "service-identity>=24.1",
        "pyopenssl>=24.2",
        "txredisapi>=1.4.10",
        "sqlite-utils>=3.36",
        "msgpack>=1.0",
        "treq>=24.9",
        "prometheus-client>=0.20",
    ],
    extras_require={
        "test": [
            "hypothesis>=6.100",
            "mypy>=1.11",
            "mypy-zope>=1.0.5",
            "ruff>=0.6",
        ],
    },
    entry_points={
        "console_scripts": [
            "im58d-admin = im58d.admin:main",
            "im58d-client = im58d.client.cli:main",
            "im58d-bench = im58d.bench:main",
        ],
    },
    classifiers=[
        "Framework :: Twisted",
        "Programming Language :: Python :: 3",
        "Topic :: Communications :: Chat",
    ],
)
