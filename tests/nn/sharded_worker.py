"""One rank of the feature-sharding tests: runs every case of a file on a gloo group and saves
what it saw (activations, outputs, gradients of its slice, gathered modules, error messages) for
tests/nn/test_sharded.py to compare with the unsharded modules."""
from __future__ import annotations

import datetime
import os
import traceback

import torch
import torch.distributed as dist

from tckernels.nn.sharded import FeatureShardedCrossLayerTranscoder, FeatureShardedTranscoder


def _grads(module):
    return {n: (p.grad.detach().clone() if p.grad is not None else None) for n, p in module.named_parameters()}


def _objective(y, dy, values):
    # the values term sends a gradient through the gathered activations as well as through y
    return (y * dy).sum() + 0.5 * sum(v.pow(2).sum() for v in values)


def run_transcoder(case, group=None, mesh_dim=None, dp_group=None, dp_rank=0):
    m = FeatureShardedTranscoder.from_transcoder(case["module"], group, mesh_dim=mesh_dim)
    x = case["x"][dp_rank] if dp_group is not None else case["x"]
    x = x.clone().requires_grad_()
    acts = m.encode(x, case.get("mask"))
    y = m(x)
    _objective(y, case["dy"], [acts.values]).backward()
    if dp_group is not None:
        for p in m.parameters():
            dist.all_reduce(p.grad, group=dp_group)
            p.grad /= dist.get_world_size(dp_group)
    return {
        "start": m.start, "stop": m.stop, "values": acts.values.detach(), "indices": acts.indices,
        "y": y.detach(), "dx": x.grad, "grads": _grads(m.shard), "full": m.to_transcoder().state_dict(),
    }


def run_crosslayer(case):
    m = FeatureShardedCrossLayerTranscoder.from_crosslayer(case["module"])
    xs = case["x"].clone().requires_grad_()
    acts = m.encode(xs)
    y = m(xs)
    _objective(y, case["dy"], [a.values for a in acts]).backward()
    return {
        "start": m.start, "stop": m.stop, "values": [a.values.detach() for a in acts],
        "indices": [a.indices for a in acts], "y": y.detach(), "dx": xs.grad,
        "grads": [_grads(layer.shard) for layer in m.layers],
        "b_dec": m.b_dec.grad, "W_skip": m.W_skip.grad, "full": m.to_crosslayer().state_dict(),
    }


def _aux_result(m, out, x):
    return {
        "losses": {k: v.detach() for k, v in out.losses.items()},
        "metrics": {k: v.detach() for k, v in out.metrics.items()},
        "dx": x.grad,
    }


def run_aux(case):
    """forward_with_aux and the backward of its loss (the aux cases: losses, AuxK, metrics)."""
    m = FeatureShardedTranscoder.from_transcoder(case["module"])
    x = case["x"].clone().requires_grad_()
    out = m.forward_with_aux(x, case["target"], case.get("mask"))
    out.losses["loss"].backward()
    res = _aux_result(m, out, x)
    res.update(start=m.start, stop=m.stop, y=out.output.detach(), values=out.acts.values.detach(),
               indices=out.acts.indices, grads=_grads(m.shard), full=m.to_transcoder().state_dict())
    return res


def run_crosslayer_aux(case):
    m = FeatureShardedCrossLayerTranscoder.from_crosslayer(case["module"])
    xs = case["x"].clone().requires_grad_()
    out = m.forward_with_aux(xs, case["target"], case.get("mask"))
    out.losses["loss"].backward()
    res = _aux_result(m, out, xs)
    res.update(start=m.start, stop=m.stop, y=torch.stack(out.outputs).detach(),
               values=[a.values.detach() for a in out.acts], indices=[a.indices for a in out.acts],
               grads=[_grads(layer.shard) for layer in m.layers], b_dec=m.b_dec.grad, W_skip=m.W_skip.grad,
               full=m.to_crosslayer().state_dict())
    return res


def run_mesh(case, world):
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("dp", "tp"))
    out = run_transcoder(case, mesh, "tp", mesh.get_group("dp"), mesh.get_local_rank("dp"))
    out["dp"], out["tp"] = mesh.get_local_rank("dp"), mesh.get_local_rank("tp")
    try:
        FeatureShardedTranscoder.from_transcoder(case["module"], mesh)
    except Exception as e:  # the 2-D mesh without the name of its tensor-parallel dim
        out["no_dim"] = (type(e).__name__, str(e))
    return out


def _error(fn):
    try:
        fn()
    except Exception as e:
        return type(e).__name__, str(e)
    return None


def run_errors(case, rank, world):
    tc, few = case["module"], case["few_features"]
    out = {"few_features": _error(lambda: FeatureShardedTranscoder.from_transcoder(few))}
    other = case["module_per_rank"][rank]  # a different module on every rank
    out["not_replicated"] = _error(lambda: FeatureShardedTranscoder.from_transcoder(other))
    first_only = dist.new_group([0])  # every rank takes part in making it
    out["not_member"] = _error(lambda: FeatureShardedTranscoder.from_transcoder(tc, first_only)) if rank else None
    m = FeatureShardedTranscoder.from_transcoder(tc)
    states = [None] * world
    dist.all_gather_object(states, m.state_dict())
    out["other_rank_state"] = _error(lambda: m.load_state_dict(states[(rank + 1) % world]))
    out["own_state"] = _error(lambda: m.load_state_dict(states[rank]))
    out["wrong_dtype"] = _error(lambda: m(case["x"].double()))
    return out


def run(rank, world, init_file, case_path, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method="file://" + init_file, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    try:
        cases = torch.load(case_path, weights_only=False)
        results = {}
        for name, case in cases.items():
            try:
                kind = case["kind"]
                if kind == "transcoder":
                    results[name] = run_transcoder(case)
                elif kind == "crosslayer":
                    results[name] = run_crosslayer(case)
                elif kind == "aux":
                    results[name] = run_aux(case)
                elif kind == "crosslayer_aux":
                    results[name] = run_crosslayer_aux(case)
                elif kind == "mesh":
                    results[name] = run_mesh(case, world)
                else:
                    results[name] = run_errors(case, rank, world)
            except Exception:
                # the other ranks may now wait in a collective: fail the whole run
                raise RuntimeError(f"case {name!r} on rank {rank}:\n{traceback.format_exc()}")
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
