"""A training objective of your own: next-token cross-entropy with label smoothing.

Train with it by naming it on the command line (a path to this file, or `module:attribute` for a module on
PYTHONPATH):

  python train.py --config configs/tiny.py \
    --config.train.objective=examples/objectives/label_smoothing.py:OBJECTIVE

An objective is an `objectives.Objective`; this one reads the corpus's token cache (the default
`load_documents`) and returns a loss function in the contract every objective follows (objectives/__init__.py):
sums over the batch and the count they are divided by, so microbatches and shards combine exactly.
"""

import jax
import jax.numpy as jnp

from objectives import Objective, Setup, TrainedModel
from objectives.losses import as_sums, model_logits, token_count

SMOOTHING = 0.1  # the share of each target's probability spread evenly over the tokenizer's vocabulary


def smoothed_cross_entropy_sums(logits_BxLxV, targets_BxL, mask_BxL, smoothing: float, vocab: int):
  """(loss sum, nll sum) over weighted targets of (1 - s) * -log p(target) + s * mean over the vocab of -log p;
  columns past `vocab` (the embedding's padding) take no part."""
  logp_BxLxV = jax.nn.log_softmax(logits_BxLxV[..., :vocab].astype(jnp.float32), axis=-1)
  nll_BxL = -jnp.take_along_axis(logp_BxLxV, targets_BxL[..., None], axis=-1)[..., 0]
  uniform_BxL = -jnp.mean(logp_BxLxV, axis=-1)
  loss_BxL = (1.0 - smoothing) * nll_BxL + smoothing * uniform_BxL
  return jnp.sum(loss_BxL * mask_BxL), jnp.sum(nll_BxL * mask_BxL)


def _setup(model: TrainedModel) -> Setup:
  vocab = model.tokenizer_vocab

  def loss_fn(params, frozen, batch, dropout_key):
    del frozen  # this objective reads no frozen model
    logits, aux = model_logits(model.graphdef, params, batch, dropout_key)
    loss_sum, nll_sum = smoothed_cross_entropy_sums(logits, batch["targets"], batch["loss_mask"], SMOOTHING, vocab)
    z_sum = jnp.zeros((), jnp.float32)  # train.z_loss_weight does not apply to this objective
    return (loss_sum, z_sum, token_count(batch)), {**aux, **as_sums({"nll": nll_sum})}

  return Setup(loss_fn=loss_fn, count_fn=token_count)


OBJECTIVE = Objective(name="label_smoothing", setup=_setup)
