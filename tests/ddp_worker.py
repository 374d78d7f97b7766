"""Run by torchrun in test_ddp.py: train, then write this rank's weights digest (before and after)."""

import hashlib
import json
import os
import sys

import torch

from services.trainer import load_settings, train
from services.trainer.state import TrainState


def digest(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters()):
        h.update(name.encode())
        h.update(p.detach().cpu().numpy().tobytes())
    return h.hexdigest()


def main() -> None:
    cfg = json.loads(sys.argv[1])
    result_dir = cfg.pop("result_dir")
    rank = int(os.environ["RANK"])
    seen: dict = {}
    update = TrainState.update

    def recording_update(self, loss, grad_clip, world=1):
        seen.setdefault("initial", digest(self.model))
        out = update(self, loss, grad_clip, world)
        seen["final"], seen["skipped"] = digest(self.model), out[0]
        return out

    TrainState.update = recording_update
    train(load_settings(None, [], **cfg), on_step=lambda step, m: seen.update(loss=m["loss"]))
    with open(f"{result_dir}/rank{rank}.json", "w") as f:
        json.dump(seen, f)


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
