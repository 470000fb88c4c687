"""Subprocess driver for tests/test_faults.py: train a toy recipe with a checkpoint every step and
``train.resume=auto``, then write the final weights. Killed and relaunched by the test.

    python tests/fault_driver.py OUT_DIR MAX_STEPS
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from accelerate import Accelerator  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from mmalign.train.sections import TrainSection  # noqa: E402
from mmalign.train.loop import train  # noqa: E402
from tests.toy_recipe import ToyRecipe  # noqa: E402


class WideToyRecipe(ToyRecipe):
    """The toy recipe with a wide hidden layer, so a checkpoint write takes long enough to be hit."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        wide = lambda: torch.nn.Sequential(torch.nn.Linear(6, 1024), torch.nn.Tanh(), torch.nn.Linear(1024, 1024),  # noqa: E731
                                           torch.nn.Tanh(), torch.nn.Linear(1024, 1))
        self.policy, self.ref_model = wide(), wide()
        self.model = self.policy
        self.ref_model.load_state_dict(self.model.state_dict())


def main():
    out, steps = Path(sys.argv[1]), int(sys.argv[2])
    torch.set_num_threads(1)
    cfg = TrainSection(output_dir=str(out), max_steps=steps, batch_size=8, lr=0.05, optimizer="adamw", save_every=1,
                       keep_checkpoints=2, resume="auto", log_every=1, report_to=["jsonl"], progress=False)
    recipe = WideToyRecipe()

    def on_step(step, rec):  # the test times its random kills from the first step of each launch
        (out / "alive").write_text(str(step))

    train(recipe, cfg, Accelerator(cpu=True), on_step=on_step)
    save_file({k: v.contiguous() for k, v in recipe.trainable_state().items()}, str(out / "final.safetensors"))
    print("done", flush=True)


if __name__ == "__main__":
    main()
