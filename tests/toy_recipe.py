"""A minimal recipe for testing the shared loop without any model library: linear scores on
synthetic pairs, DPO against a frozen copy. Exercises accumulation, reduction, NaN handling, resume."""
from dataclasses import dataclass

import torch

from mmalign.losses import LOSSES
from mmalign.train.loop import StepOutput, example_generator
from mmalign.train.recipe import RecipeBase


@dataclass
class ToyBatch:
    xw: torch.Tensor
    xl: torch.Tensor
    index: torch.Tensor

    def to(self, device):
        self.xw, self.xl, self.index = self.xw.to(device), self.xl.to(device), self.index.to(device)
        return self

    def __len__(self):
        return len(self.index)


class ToyData(torch.utils.data.Dataset):
    def __init__(self, n=64, d=6, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.xw = torch.randn(n, d, generator=g)
        self.xl = torch.randn(n, d, generator=g)

    def __len__(self):
        return len(self.xw)

    def __getitem__(self, i):
        return i

    def collate(self, idx):
        idx = torch.tensor(idx)
        return ToyBatch(self.xw[idx], self.xl[idx], idx)


class ToyRecipe(RecipeBase):
    def __init__(self, d=6, seed=0, nan_rows=(), noise=True):
        torch.manual_seed(seed)
        self.policy = self.model = torch.nn.Sequential(torch.nn.Linear(d, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
        self.ref = [p.detach().clone() for p in self.model.parameters()]
        self.ref_model = torch.nn.Sequential(torch.nn.Linear(d, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
        self.ref_model.load_state_dict(self.model.state_dict())
        self.train_data = ToyData(d=d)
        self.nan_rows = set(nan_rows)
        self.noise = noise
        self.seed = seed

    def describe(self):
        return "toy"

    def compute(self, batch, step=0, split="train"):
        xw, xl = batch.xw, batch.xl
        if self.noise:  # per-example noise keyed by (seed, step, row): tests determinism across resume
            eps = torch.stack([torch.randn(xw.shape[1], generator=example_generator(self.seed, step, int(r)))
                               for r in batch.index])
            xw, xl = xw + 0.1 * eps, xl + 0.1 * eps
        x = torch.cat([xw, xl])
        s = self.model(x).squeeze(-1)
        with torch.no_grad():
            r = self.ref_model(x).squeeze(-1)
        pc, pr = s.chunk(2)
        rc, rr = r.chunk(2)
        loss, m = LOSSES["dpo"](pc, pr, rc, rr, beta=1.0)
        bad = torch.tensor([int(i) in self.nan_rows for i in batch.index])
        if bad.any():
            loss = torch.where(bad, torch.full_like(loss, float("nan")), loss)
        return StepOutput(loss, m)
