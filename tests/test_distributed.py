from pipeline.distributed import expand_nodelist, from_env


def test_expand_slurm_nodelist():
    assert expand_nodelist("gpu[001-003,007],login1") == ["gpu001", "gpu002", "gpu003", "gpu007", "login1"]
    assert expand_nodelist("node7") == ["node7"]
    assert expand_nodelist("a[8-10]") == ["a8", "a9", "a10"]
    assert expand_nodelist("node[1-2]-ib,x") == ["node1-ib", "node2-ib", "x"]
    assert expand_nodelist("r[1-2]n[01-02]") == ["r1n01", "r1n02", "r2n01", "r2n02"]
    assert expand_nodelist("gpu-a100-[0099-0101],cpu[3]") == ["gpu-a100-0099", "gpu-a100-0100", "gpu-a100-0101",
                                                              "cpu3"]


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
    assert from_env({**env, "SLURM_TASKS_PER_NODE": "4(x4)"}).local_world_size == 4


def test_single_process_default():
    info = from_env({})
    assert (info.rank, info.world_size, info.is_main) == (0, 1, True)
