"""`lm`: pre-training, next-token cross-entropy over the token cache of a text corpus; count: target tokens."""

from objectives import Objective, Setup, TrainedModel
from objectives.losses import token_count


def _setup(model: TrainedModel) -> Setup:
  del model
  return Setup(loss_fn=None, count_fn=token_count)


OBJECTIVE = Objective(name="lm", setup=_setup)
