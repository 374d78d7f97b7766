"""Run by torchrun in test_ddp.py: train, then write this rank's weights digest."""

import hashlib
import json
import sys

import torch

from services.trainer.run import train
from services.trainer.settings import load_settings


def main() -> None:
    import os

    cfg = json.loads(sys.argv[1])
    result_dir = cfg.pop("result_dir")
    rank = int(os.environ["RANK"])
    captured = {}

    def on_step(step, metrics):
        captured["loss"] = metrics["loss"]

    from services.trainer import run as run_mod

    orig = run_mod.Trainer.close

    def close_and_digest(self):
        h = hashlib.sha256()
        for name, p in sorted(self.model.named_parameters()):
            h.update(name.encode())
            h.update(p.detach().cpu().numpy().tobytes())
        with open(f"{result_dir}/rank{rank}.json", "w") as f:
            json.dump({"digest": h.hexdigest(), "loss": captured.get("loss")}, f)
        orig(self)

    run_mod.Trainer.close = close_and_digest
    train(load_settings(None, [], **cfg), on_step=on_step)


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
