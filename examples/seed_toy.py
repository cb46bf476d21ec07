"""The toy from the first seed thread: the `+5` in ResN's own forward is glue a children cut loses.

On ``torch.ones(5, 5)`` the full model gives 8 everywhere (1 + 5 + 2) and
``nn.Sequential(*list(model.children()))`` gives 3 (1 + 2).
"""

import torch


class BasicBlock(torch.nn.Module):
    def __init__(self):
        super().__init__()

    def _functional_API(self, x):
        return x + 2

    def forward(self, x):
        x = self._functional_API(x)
        return x


class ResN(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.blk = BasicBlock()

    def _functional_API(self, x):
        return x + 5

    def forward(self, x):
        x = self._functional_API(x)
        return self.blk(x)
