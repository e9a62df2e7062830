"""List the model zoo: ``python -m beit_scale.models [--json]``.

params: classifier with 1000 classes; params_pretrain: MIM model (vocab 8192, shared rel-pos
bias); gflops_fwd: forward GFLOPs of the classifier per 224x224 image, counted with
torch.utils.flop_counter.FlopCounterMode on the meta device (multiply-add = 2 FLOPs).
"""
import argparse
import json

from .flops import count_forward_flops, count_params
from .zoo import get_config, list_models


def zoo_table() -> list[dict]:
    rows = []
    for name in list_models():
        cfg = get_config(name)
        rows.append(dict(
            name=name,
            params=count_params(cfg, "classify"),
            params_pretrain=count_params(cfg, "mim"),
            depth=cfg.depth, dim=cfg.embed_dim, heads=cfg.num_heads, mlp_dim=cfg.mlp_dim,
            patch_size=cfg.patch_size, img_size=cfg.img_size,
            layer_scale_init=cfg.layer_scale_init, drop_path_rate=cfg.drop_path_rate,
            gflops_fwd=round(count_forward_flops(cfg, "classify") / 1e9, 3),
        ))
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m beit_scale.models", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    args = ap.parse_args(argv)
    rows = zoo_table()
    if args.json:
        print(json.dumps(rows, indent=1))
        return
    head = f"{'name':<24} {'params':>15} {'params_pretrain':>16} {'depth':>5} {'dim':>5} {'heads':>5} {'patch':>5} {'GFLOPs/img':>10}"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['name']:<24} {r['params']:>15,} {r['params_pretrain']:>16,} {r['depth']:>5} {r['dim']:>5} "
              f"{r['heads']:>5} {r['patch_size']:>5} {r['gflops_fwd']:>10.2f}")
    print("\nparams: classifier, 1000 classes. params_pretrain: MIM model, vocab 8192, shared rel-pos bias.\n"
          "GFLOPs/img: classifier forward at 224x224, counted by FlopCounterMode on the meta device,\n"
          "a multiply-add = 2 FLOPs; elementwise ops not counted.")


if __name__ == "__main__":
    main()
