import pytest

from tests.helpers import InProcessMesh


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    m = InProcessMesh(tmp_path_factory.mktemp("mesh"))
    yield m
    m.stop()


@pytest.fixture(scope="module")
def keys(mesh):
    return {"alice": mesh.tenants.add("alice", "pro"), "bob": mesh.tenants.add("bob", "free")}
