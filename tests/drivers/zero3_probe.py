"""Test driver: tests/drivers/multi_run.py, plus a report of how ZeRO-3 partitioned the weights.

Usage (under tests.launching.start_ranks):
    python tests/drivers/zero3_probe.py SPEC.json          (SPEC as for multi_run.py)

After each engine is built every rank prints
    [zero3 probe] rank R: P/N parameters partitioned
where a parameter counts as partitioned when this rank holds only a shard of it (ZeRO-3's
`ds_tensor` smaller than the full `ds_numel`), so a test can check that the run really
exercised the all-gathers rather than ZeRO-3 keeping every (small) parameter whole.

BEIT_TEST_RANK0_ONLY_IMAGES=1 reproduces the trainer's old behaviour (log_images on rank 0
only, by skipping the call on ranks without a writer): with partitioned weights that run must
fail or hang. It exists to check that the test catches the bug; the suite never sets it.
"""
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def _install_probe():
    from beit_scale.train import trainer

    build = trainer.Trainer._build

    def _build(self):
        build(self)
        params = list(self.engine.module.parameters())
        shards = sum(1 for p in params if hasattr(p, "ds_tensor") and p.ds_tensor.numel() < p.ds_numel)
        print(f"[zero3 probe] rank {self.rank}: {shards}/{len(params)} parameters partitioned", flush=True)
        if os.environ.get("BEIT_TEST_RANK0_ONLY_IMAGES") == "1":
            log_images = self.task.log_images

            def rank0_only(writer, engine, batch, step, _f=log_images):
                if writer is not None:
                    _f(writer, engine, batch, step)
            self.task.log_images = rank0_only

    trainer.Trainer._build = _build


if __name__ == "__main__":
    _install_probe()
    import multi_run
    multi_run.main()
