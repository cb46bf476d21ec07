"""``TruncatedModel``: the one kind of thing ``featx.truncate`` returns, whatever ``keep_glue`` says.

Both cuts are instances of it: the plain cut (``featx.truncation.TruncatedSequential``, an
``nn.Sequential``) and the cut that keeps the root's glue (``featx.glue.KeepGlue``). It lives apart from
both so that each can subclass it without importing the other.
"""

from __future__ import annotations

from torch import nn


class TruncatedModel(nn.Module):
    """The truncated model: what ``featx.truncate(model, upto, keep_glue=...)`` returns.

    One interface for both kinds of cut:

    - ``forward(x)`` gives the value at the cut: without ``keep_glue``, what the last kept module returns
      when the kept modules run in order (``nn.Sequential``); with ``keep_glue``, what the full model
      computes there, its glue included (for the last child, the model's output);
    - ``upto`` is the cut as resolved against the model (a child name, or a dotted path such as
      ``stages.2``: ``upto=-3`` on a ResNet is ``"layer3"``);
    - ``keep_glue`` says which kind of cut it is (``False``: ``featx.truncation.TruncatedSequential``,
      ``True``: ``featx.glue.KeepGlue``);
    - its modules are the model's own module objects under their own names, so ``state_dict()`` keys are
      the original model's (a subset of them).

    It comes back in the model's train/eval mode. ``featx.verify`` proves what it computes.
    """

    upto: str
    keep_glue: bool
