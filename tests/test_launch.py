"""init_from_mpi's launch checks (no mpirun needed to see them fail clearly)."""

import pytest

from comm_hooks.launch import init_from_mpi

OMPI = ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK")


def test_without_a_launcher_the_error_says_how_to_launch(monkeypatch):
    for name in OMPI:
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(RuntimeError, match=r"not started by Open MPI's mpirun; launch it as `mpirun -n 4"):
        init_from_mpi()


@pytest.mark.parametrize(
    "env, words",
    [
        ({"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "2"}, "OMPI_COMM_WORLD_LOCAL_RANK missing"),
        (
            {"OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_RANK": "0"},
            "rank 2, size 2",
        ),
        (
            {"OMPI_COMM_WORLD_RANK": "x", "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_RANK": "0"},
            "not an integer",
        ),
    ],
)
def test_inconsistent_launch_variables_are_rejected(monkeypatch, env, words):
    for name in OMPI:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(RuntimeError, match=words):
        init_from_mpi()


def test_engine_entry_points_are_importable_from_comm_hooks():
    import comm_hooks
    import comm_hooks.horovod
    import comm_hooks.launch
    import comm_hooks.mpi

    assert comm_hooks.init_from_mpi is comm_hooks.launch.init_from_mpi
    assert comm_hooks.find_mpirun is comm_hooks.launch.find_mpirun
    assert comm_hooks.mpi_allreduce is comm_hooks.mpi.allreduce and comm_hooks.MPIState is comm_hooks.mpi.MPIState
    assert comm_hooks.HorovodDistributedOptimizer is comm_hooks.horovod.DistributedOptimizer
    assert set(comm_hooks.__all__) >= {"register", "init_from_mpi", "mpi_allreduce", "HorovodDistributedOptimizer"}
    with pytest.raises(AttributeError, match="no attribute 'nonexistent'"):
        comm_hooks.nonexistent  # noqa: B018
