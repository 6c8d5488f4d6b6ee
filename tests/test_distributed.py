from pipeline.distributed import expand_nodelist, from_env


def test_expand_slurm_nodelist():
    assert expand_nodelist("gpu[001-003,007],login1") == ["gpu001", "gpu002", "gpu003", "gpu007", "login1"]
    assert expand_nodelist("node7") == ["node7"]
    assert expand_nodelist("a[8-10]") == ["a8", "a9", "a10"]


def test_rank_from_torchrun_env():
    info = from_env({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4",
                     "MASTER_ADDR": "n1", "MASTER_PORT": "1234"})
    assert (info.rank, info.world_size, info.local_rank, info.master_addr, info.master_port) == (3, 8, 1, "n1", 1234)


def test_rank_from_slurm_env():
    env = {"SLURM_PROCID": "9", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1", "SLURM_JOB_NUM_NODES": "2",
           "SLURM_JOB_NODELIST": "gpu[017-018]", "SLURM_JOB_ID": "4242"}
    info = from_env(env)
    assert (info.rank, info.world_size, info.local_rank, info.local_world_size) == (9, 16, 1, 8)
    assert info.master_addr == "gpu017" and info.master_port == 20000 + 4242


def test_single_process_default():
    info = from_env({})
    assert (info.rank, info.world_size, info.is_main) == (0, 1, True)
