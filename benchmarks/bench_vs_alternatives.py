"""Same model, same data, same steps: DeepSpeed ZeRO 0-3 vs DDP vs fairscale OSS+SDP vs FSDP.

    python benchmarks/bench_vs_alternatives.py [--model beit_debug] [--task mim] [--batch 8]
        [--steps 20] [--warmup 3] [--world 2] [--only ddp,zero2] [--json out.json]

One command: the script spawns ``--world`` CPU ranks (gloo) itself and runs every method in the
same process group, one after the other, each from the same seed-0 initialisation and on the same
synthetic batches (different per rank and step), fp32, AdamW(lr 1e-3, wd 0.05), no gradient
clipping anywhere (DDP has none), no gradient accumulation.

Columns:
  img/s          global training throughput over the timed steps (world x batch x steps / time)
  vs DDP         that throughput divided by DDP's
  states MiB     per-rank bytes of the tensors the wrapper and its optimizer hold after
                 ``optimizer.step()`` (before ``zero_grad``), found by walking Python-reachable
                 tensors from the wrapper and optimizer, distinct storages only, split into
                 params (the module's parameters as this rank stores them), grads, optim (the
                 inner optimizer's own params, grads and state: Adam moments, and DeepSpeed's
                 fp32 partition copies), other (flat/communication buffers). Mean over ranks.
  loss           mean loss of the last timed step (all methods should agree: same math)

DeepSpeed engines are built with ``beit_scale.train.engine.build_engine`` from the project's
``ds_configs/zero{0,1,2,3}.json`` with precision switched to fp32, clipping removed and the
communication buckets shrunk to 5e6 elements (the files' 2e8 would allocate 0.75 GiB fp32 per
bucket per rank on a 0.7 M-parameter model; DDP's default bucket is 25 MiB).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import socket
import sys
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

METHODS = ("ddp", "zero0", "zero1", "zero2", "zero3", "fairscale_oss_sdp", "fsdp_full_shard")
LR, WD = 1e-3, 0.05
BUCKET = 5_000_000


# ----------------------------------------------------------------------------------------------
# data and loss
# ----------------------------------------------------------------------------------------------
def make_batch(cfg, task, batch, rank, step):
    import torch
    g = torch.Generator().manual_seed(1000 * step + rank)
    img = torch.randn(batch, cfg.in_chans, cfg.img_size, cfg.img_size, generator=g)
    if task == "mim":
        n = cfg.num_patches
        k = round(n * 75 / 196)
        order = torch.rand(batch, n, generator=g).argsort(dim=1)
        mask = torch.zeros(batch, n, dtype=torch.bool)
        mask.scatter_(1, order[:, :k], True)
        labels = torch.randint(0, cfg.vocab_size, (batch * k,), generator=g)
        return (img, mask), labels
    return (img,), torch.randint(0, cfg.num_classes, (batch,), generator=g)


# ----------------------------------------------------------------------------------------------
# memory walk
# ----------------------------------------------------------------------------------------------
_WALK_PACKAGES = ("deepspeed", "fairscale", "torch", "beit_scale")


def _reachable_tensors(roots):
    """Every torch.Tensor reachable from ``roots`` through containers and the ``__dict__`` of
    objects defined in the training libraries (not through arbitrary objects: no loggers,
    no process-group handles, no modules' globals)."""
    import torch
    seen, out, stack = set(), [], list(roots)
    while stack:
        obj = stack.pop()
        if id(obj) in seen or obj is None:
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            out.append(obj)
            if obj.grad is not None:
                stack.append(obj.grad)
            stack.extend(v for v in getattr(obj, "__dict__", {}).values())  # e.g. ds_tensor
        elif isinstance(obj, dict):
            stack.extend(obj.keys())
            stack.extend(obj.values())
        elif isinstance(obj, (list, tuple, set, frozenset)):
            stack.extend(obj)
        elif isinstance(obj, (types.ModuleType, types.FunctionType, type)):
            continue
        elif hasattr(obj, "__dict__") and type(obj).__module__.split(".")[0] in _WALK_PACKAGES:
            stack.extend(vars(obj).values())
    return out


def _storage(t):
    t = getattr(t, "_local_tensor", t)  # DTensor (FSDP2): the shard this rank stores
    try:
        s = t.untyped_storage()
    except Exception:  # noqa: BLE001  (sparse/meta/odd tensors hold nothing we can size)
        return None, 0
    if t.device.type == "meta":
        return None, 0
    return s.data_ptr(), s.nbytes()


def held_storages(wrapper, module, inner_optimizer, extra_param_tensors=()):
    """{storage ptr: (bytes, category)} of what the wrapper and optimizer hold right now."""
    params = {(_storage(p)[0]) for p in list(module.parameters()) + list(extra_param_tensors)}
    grads = {_storage(p.grad)[0] for p in module.parameters() if p.grad is not None}
    optim = {_storage(t)[0] for t in _reachable_tensors(
        [inner_optimizer.param_groups, inner_optimizer.state])}
    out = {}
    for t in _reachable_tensors([wrapper, inner_optimizer]):
        ptr, n = _storage(t)
        if ptr and n:
            out[ptr] = (n, "params" if ptr in params else "grads" if ptr in grads
                        else "optim" if ptr in optim else "other")
    return out


def held_bytes(*snapshots):
    """Union of snapshots (after backward, after step) -> bytes per category."""
    union = {}
    for snap in snapshots:
        for ptr, (n, cat) in snap.items():
            if ptr not in union or union[ptr][0] < n:
                union[ptr] = (n, union.get(ptr, (0, cat))[1])
    out = {"params": 0, "grads": 0, "optim": 0, "other": 0}
    for n, cat in union.values():
        out[cat] += n
    return out


# ----------------------------------------------------------------------------------------------
# the wrappers
# ----------------------------------------------------------------------------------------------
def _ds_config(stage, batch):
    cfg = json.loads((ROOT / "ds_configs" / f"zero{stage}.json").read_text())
    cfg["fp16"] = {"enabled": False}
    cfg["bf16"] = {"enabled": False}
    cfg.pop("gradient_clipping", None)
    z = cfg.setdefault("zero_optimization", {"stage": stage})
    for key in ("reduce_bucket_size", "allgather_bucket_size"):
        if key in z or stage in (1, 2):
            z[key] = BUCKET
    if stage == 3:
        z["stage3_prefetch_bucket_size"] = BUCKET
    cfg["train_micro_batch_size_per_gpu"] = batch
    cfg["gradient_accumulation_steps"] = 1
    cfg["zero_allow_untested_optimizer"] = True
    cfg["steps_per_print"] = 10 ** 9
    return cfg


def build(method, model, batch):
    """-> (forward(inputs) -> output, backward(loss), step(), module, inner optimizer, param extras)."""
    import torch
    import torch.distributed as dist

    def adamw(params):
        return torch.optim.AdamW(params, lr=LR, weight_decay=WD)

    if method.startswith("zero"):
        from beit_scale.train.engine import build_engine
        stage = int(method[-1])
        engine = build_engine(model, adamw(model.parameters()), None, _ds_config(stage, batch))
        inner = engine.optimizer
        while hasattr(inner, "optimizer") and not isinstance(inner, torch.optim.Optimizer):
            inner = inner.optimizer
        if not isinstance(inner, torch.optim.Optimizer):
            inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
        extras = [p.ds_tensor for p in model.parameters() if hasattr(p, "ds_tensor")]
        return (engine, engine.backward, engine.step, engine.module, inner, extras,
                lambda: None, engine)
    if method == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP
        wrapped = DDP(model, gradient_as_bucket_view=True)
        opt = adamw(wrapped.parameters())
        return wrapped, lambda loss: loss.backward(), opt.step, model, opt, [], \
            lambda: opt.zero_grad(set_to_none=True), wrapped
    if method == "fairscale_oss_sdp":
        from fairscale.nn.data_parallel import ShardedDataParallel
        from fairscale.optim import OSS
        opt = OSS(model.parameters(), optim=torch.optim.AdamW, lr=LR, weight_decay=WD)
        wrapped = ShardedDataParallel(model, opt)
        return wrapped, lambda loss: loss.backward(), opt.step, model, opt.optim, [], \
            lambda: opt.zero_grad(set_to_none=True), wrapped
    if method == "fsdp_full_shard":
        # FSDP2 (fully_shard on a CPU device mesh): FSDP1 refuses to run without an accelerator.
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        for blk in model.blocks:
            fully_shard(blk, mesh=mesh)    # FULL_SHARD: reshard after forward (the default)
        fully_shard(model, mesh=mesh)
        opt = adamw(model.parameters())
        return model, lambda loss: loss.backward(), opt.step, model, opt, [], \
            lambda: opt.zero_grad(set_to_none=True), model
    raise ValueError(f"unknown method {method!r}; choose from {METHODS}")


def run_method(method, args, rank, world):
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from beit_scale.models.zoo import build_model, resolve_config, get_config

    cfg = resolve_config(get_config(args.model), args.task)
    torch.manual_seed(0)
    model = build_model(cfg, task=args.task)
    fwd, backward, step, module, inner, extras, zero_grad, wrapper = build(method, model, args.batch)
    batches = [make_batch(cfg, args.task, args.batch, rank, s)
               for s in range(args.warmup + args.steps + 1)]

    snaps = []

    def train_step(s, walk=False):
        inputs, labels = batches[s]
        loss = F.cross_entropy(fwd(*inputs), labels)
        backward(loss)
        if walk:   # every gradient exists now; optimizer state and master copies too (step >= 2)
            snaps.append(held_storages(wrapper, module, inner, extras))
        step()
        if walk:
            snaps.append(held_storages(wrapper, module, inner, extras))
        return loss

    for s in range(args.warmup):
        train_step(s)
        zero_grad()
    dist.barrier()
    t0 = time.perf_counter()
    losses = []
    for s in range(args.warmup, args.warmup + args.steps):
        loss = train_step(s)
        losses.append(loss.detach())
        zero_grad()
    dist.barrier()
    elapsed = time.perf_counter() - t0
    # The memory walk runs on one extra step, outside the timing.
    train_step(args.warmup + args.steps, walk=True)
    mem = held_bytes(*snaps)
    loss_t = torch.stack(losses)
    dist.all_reduce(loss_t)
    loss_t = loss_t / world
    result = {"method": method, "seconds": elapsed,
              "img_per_s": world * args.batch * args.steps / elapsed,
              "loss": float(loss_t[-1]), "losses": loss_t.tolist(), "mem": mem}
    del fwd, backward, step, module, inner, extras, zero_grad, wrapper, model, snaps
    gc.collect()
    return result


def worker(rank, world, port, args, out_path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world))
    import logging
    import warnings
    warnings.filterwarnings("ignore")
    import torch
    import torch.distributed as dist
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    logging.getLogger("DeepSpeed").setLevel(logging.ERROR)
    results = []
    for method in args.methods:
        try:
            r = run_method(method, args, rank, world)
        except Exception as e:  # noqa: BLE001  one broken library must not hide the others
            r = {"method": method, "error": f"{type(e).__name__}: {e}"}
        gathered = [None] * world
        dist.all_gather_object(gathered, r)
        results.append(gathered)
        dist.barrier()
    if rank == 0:
        Path(out_path).write_text(json.dumps(results))
    dist.destroy_process_group()


def summarize(results, args):
    MiB = 2 ** 20
    rows, ddp, ddp_losses = [], None, None
    for per_rank in results:
        r0 = per_rank[0]
        if "error" in r0:
            rows.append((r0["method"], None, r0["error"]))
            continue
        mem = {k: sum(r["mem"][k] for r in per_rank) / len(per_rank) for k in r0["mem"]}
        rows.append((r0["method"], r0, mem))
        if r0["method"] == "ddp":
            ddp, ddp_losses = r0["img_per_s"], r0["losses"]
    lines = [f"{args.model} {args.task}, fp32, {args.world} CPU ranks (gloo), batch {args.batch}/rank, "
             f"{args.steps} timed steps after {args.warmup} warm-up", "",
             "| method | img/s | vs DDP | states MiB (params + grads + optim + other) | last loss "
             "| max abs loss diff vs DDP |",
             "|---|---|---|---|---|---|"]
    for name, r, mem in rows:
        if r is None:
            lines.append(f"| {name} | failed | | {mem} | | |")
            continue
        ratio = f"{r['img_per_s'] / ddp:.2f}x" if ddp else "n/a"
        total = sum(mem.values()) / MiB
        parts = " + ".join(f"{mem[k] / MiB:.2f}" for k in ("params", "grads", "optim", "other"))
        diff = (f"{max(abs(a - b) for a, b in zip(r['losses'], ddp_losses)):.1e}"
                if ddp_losses else "n/a")
        lines.append(f"| {name} | {r['img_per_s']:.1f} | {ratio} | {total:.2f} = {parts} | "
                     f"{r['loss']:.4f} | {diff} |")
    cmd = "python benchmarks/bench_vs_alternatives.py " + " ".join(sys.argv[1:])
    lines += ["", f"reproduce: {cmd.strip()}"]
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="beit_debug")
    ap.add_argument("--task", default="mim", choices=("mim", "classify"))
    ap.add_argument("--batch", type=int, default=8, help="micro batch per rank")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--only", default=",".join(METHODS), help="comma-separated subset of " + ",".join(METHODS))
    ap.add_argument("--json", default=None, help="also write raw results here")
    args = ap.parse_args(argv)
    args.methods = [m.strip() for m in args.only.split(",") if m.strip()]
    bad = sorted(set(args.methods) - set(METHODS))
    if bad:
        ap.error(f"unknown method(s) {bad}; choose from {', '.join(METHODS)}")

    import tempfile
    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "results.json"
        t0 = time.perf_counter()
        mp.spawn(worker, args=(args.world, port, args, str(out)), nprocs=args.world, join=True)
        results = json.loads(out.read_text())
    print(summarize(results, args))
    print(f"(whole run {time.perf_counter() - t0:.0f} s)")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": {k: v for k, v in vars(args).items()},
                                               "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
