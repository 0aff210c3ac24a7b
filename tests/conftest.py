import pytest


@pytest.fixture(scope="session")
def pg():
    """One PostgreSQL 16 server for the session (tests.pg); each test takes a database of its own."""
    from tests.pg import PgServer

    server = PgServer()
    yield server
    server.close()


@pytest.fixture(params=["sqlite", "postgres"])
def database(request):
    """The gateway's `database` setting for a product test that runs against both stores: "" is the
    SQLite default, else a fresh PostgreSQL database's URL."""
    if request.param == "sqlite":
        return ""
    return request.getfixturevalue("pg").database()


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A real S3 server (SeaweedFS, tests.s3server) for a test module."""
    from tests.s3server import SeaweedS3

    server = SeaweedS3(tmp_path_factory.mktemp("weed"))
    server.start()
    yield server
    server.stop()
