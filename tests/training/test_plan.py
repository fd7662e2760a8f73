"""The memory planner (training/plan.py): its weight and adapter bytes equal what the sharded and the
unsharded models hold, its dictionary counts equal the built dictionaries', and its command line."""
import json
import os

import pytest
import torch

from training import plan

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIGS = os.path.join(ROOT, "training", "configs")
LAYERS = "frozen decoder-layer weights (2 models)"
REST = "embeddings, final norm, head (2 models, whole)"
DDP = "DDP gradient buckets (data-parallel replicas)"


def adapter_config(paths: dict, **over):
    from training.config import Config

    kw = dict(base_model=paths["base"], reference_model=paths["reference"], train_data=paths["train"],
              n_features=33, activation="jumprelu", dec_bias=True)  # 33 features: rows FSDP2 must pad
    kw.update(over)
    return Config(**kw).validate()


def held_bytes(adapted, reference) -> dict:
    """What the planner calls frozen layers, the rest and adapter parameters, as the models hold them."""
    from training.forward_utils import stack_of
    from training.sharding import local_bytes

    out = {LAYERS: 0, REST: 0, "adapter parameters": 0}
    for model in (adapted, reference):
        whole = local_bytes(model)
        layers = sum(local_bytes(layer)["frozen"] for layer in stack_of(model).layers)
        out[LAYERS] += layers
        out[REST] += whole["frozen"] - layers
        out["adapter parameters"] += whole["trainable"]
    return out


def planned(cfg, world: int) -> dict:
    opts = {"shape": {}, "feature_width": 64}
    return plan.plan_adapter(cfg, world, opts)["held"]


def _worker(rank: int, port: int, paths: dict, out: str) -> None:
    """One of 2 processes (gloo): shard both models as training/train.py does with fsdp and write this
    process's bytes (rank 0: the planner's too)."""
    import torch.distributed as dist

    from training import sharding
    from training.train import build_models

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        cfg = adapter_config(paths, fsdp=True, dtype="bfloat16")
        adapted, reference = build_models(cfg, torch.device("cpu"))
        mesh = sharding.device_mesh(torch.device("cpu"), 2)
        for model in (adapted, reference):
            sharding.shard_layers_(model, mesh, torch.bfloat16)
        result = {"held": held_bytes(adapted, reference), "planned": planned(cfg, 2)}
        with open(f"{out}.{rank}", "w") as f:
            json.dump(result, f)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def odd_pair(tmp_path_factory):
    """The micro pair with hidden size 34: key/value projections of 17 rows, which FSDP2 pads."""
    from tests.training.conftest import make_pair, write_data

    root = tmp_path_factory.mktemp("plan")
    paths = make_pair(str(root), hidden=34)
    paths["train"] = write_data(os.path.join(root, "train.jsonl"), 4)
    paths["root"] = str(root)
    return paths


def test_sharded_bytes_match_fsdp(odd_pair, tmp_path):
    # forked, so the processes start with torch and transformers already imported (seconds, not tens)
    import multiprocessing
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = str(tmp_path / "bytes")
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_worker, args=(rank, port, odd_pair, out)) for rank in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        if p.is_alive():
            p.kill()
    assert [p.exitcode for p in procs] == [0, 0]
    ranks = [json.loads(open(f"{out}.{rank}").read())["held"] for rank in range(2)]
    want = json.loads(open(f"{out}.0").read())["planned"]
    for key in (LAYERS, REST, "adapter parameters"):
        # the planner counts ceil(rows / world) rows per parameter: what every process allocates,
        # and exactly rank 0's local shard; the last rank's shard can be smaller
        assert ranks[0][key] == want[key], key
        assert all(r[key] <= want[key] for r in ranks), key
    assert all(r[REST] == want[REST] for r in ranks)  # whole on every process
    assert ranks[1][LAYERS] < ranks[0][LAYERS]  # the 17-row projections were padded
    # the shards add up to the whole models
    whole = held_bytes(*_build(odd_pair, dtype="bfloat16"))
    for key in (LAYERS, "adapter parameters"):
        assert sum(r[key] for r in ranks) == whole[key]


def _build(paths, **over):
    from training.train import build_models

    return build_models(adapter_config(paths, **over), torch.device("cpu"))


@pytest.mark.parametrize("over", [dict(), dict(activation="relu", dec_bias=False, adapter_dtype="bfloat16")])
def test_unsharded_bytes_match(micro, over):
    cfg = adapter_config(micro, **over)
    got = held_bytes(*_build(micro, **over))
    want = planned(cfg, 1)
    assert {k: want[k] for k in got} == got
    assert "DDP gradient buckets" not in want and planned(cfg, 2)["DDP gradient buckets"] == got["adapter parameters"]


@pytest.mark.parametrize("arch", [dict(architecture="per_layer", activation="jumprelu", pre_bias=True),
                                  dict(architecture="crosslayer", activation="topk", k=4),
                                  dict(architecture="bilinear", bilinear_kind="transcoder"),
                                  dict(architecture="bilinear", bilinear_kind="mlp")])
def test_dictionary_counts_match(arch):
    from training.dictionaries import build_dictionary
    from training.transcoders import TranscoderRunConfig, transcoder_kwargs

    cfg = TranscoderRunConfig(model="m", train_data="t", n_features=40, **arch).validate()
    n, d = 3, 8
    built = build_dictionary(cfg.architecture, list(range(n)), d, d, cfg.n_features, transcoder_kwargs(cfg),
                             bilinear_kind=cfg.bilinear_kind)
    tensors = plan.dictionary_tensors(cfg, n, d)
    assert sum(torch.Size(s).numel() for s, _, _ in tensors) == sum(p.numel() for p in built.parameters())


def test_cli_tiny_and_7b_with_the_builtin_table(capsys):
    assert plan.main(["--config", os.path.join(CONFIGS, "tiny.yaml")]) == 0
    text = capsys.readouterr().out
    assert "total (held + step)" in text and "fits in 80 GiB: yes" in text and "config.json" in text
    argv = ["--config", os.path.join(CONFIGS, "r1_distil_7b.yaml"), "--world_size", "8", "--gpu_gib", "80"]
    assert plan.main(argv) == 0
    text = capsys.readouterr().out
    assert "built-in shape table" in text and "total (held + step)" in text and "fits in 80 GiB:" in text
    assert plan.main(argv + ["--fsdp", "--json"]) == 0
    p = json.loads(capsys.readouterr().out)
    assert p["total_bytes"] == sum(p["held"].values()) + sum(p["phases"]["step"].values())
    assert p["shapes"]["hidden_size"] == 3584 and p["held"][LAYERS] < 26e9 / 8 * 1.01  # sharded over 8


def test_cli_transcoder_config(capsys):
    assert plan.main(["--config", os.path.join(CONFIGS, "qwen25_32b_topk.yaml"), "--json"]) == 0
    p = json.loads(capsys.readouterr().out)
    assert p["loop"] == "python -m training.transcoders" and p["source"] == "the built-in shape table"
    assert p["held"]["model weights (whole, frozen)"] > 60 * 2**30  # 32.8B parameters in bfloat16
    assert p["largest_phase"] in p["phases"] and DDP not in p["held"]
    clt = ["--config", os.path.join(CONFIGS, "clt_topk_gpt2.yaml"), "--json", "--world_size", "4"]
    assert plan.main(clt) == 0
    whole = json.loads(capsys.readouterr().out)["held"]
    assert plan.main(clt + ["--feature_shards", "4"]) == 0
    sharded = json.loads(capsys.readouterr().out)["held"]
    assert DDP in whole and DDP not in sharded  # 4 feature shards: no data-parallel replica left
    assert sharded["dictionary parameters (float32)"] < whole["dictionary parameters (float32)"] / 4 * 1.01
    assert plan.main(clt + ["--feature_shards", "3"]) == 2
    assert "not a multiple of feature_shards" in capsys.readouterr().err


def test_bad_field_and_unknown_model(capsys):
    tiny = os.path.join(CONFIGS, "tiny.yaml")
    assert plan.main(["--config", tiny, "--n_featurs", "8"]) == 2
    assert "did you mean --n_features" in capsys.readouterr().err
    assert plan.main(["--config", tiny, "--reference_model", "nobody/no-such-model"]) == 2
    err = capsys.readouterr().err
    assert "pass a local model directory" in err and "--hidden_size" in err
    assert plan.main(["--config", tiny, "--world_size", "two"]) == 2
    assert "--world_size: expected int" in capsys.readouterr().err
