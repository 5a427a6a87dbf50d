"""Diagnostic: train (python -m skymoe_jax.train, same flags) with the image tokens reaching the
decoder column-major instead of row-major.

  python benchmarks/column_major.py --config=configs/demo.py:stage1 --workdir=DIR [...]

The image's rows and columns are swapped at the model's input, before the tower. The tower's
and the token table's 2-D sin-cos starts treat rows and columns alike, the synthetic scenes are
turned by a random multiple of 90 degrees and the box text is unchanged, so the one thing that
differs from the row-major run is which image axis the decoder's 1-D rotary positions step
through slowly (the row of the sequence, 8 tokens a step on the demo's 8x8 grid) and which
quickly. If that order decides which axis a box answer follows, the x/y asymmetry of
benchmarks/grounding_ceiling.py's `reading` swaps (docs/results.md, Grounding). The run's
evaluations go through the same model, so its answers and metrics are the column-major
model's; a workdir made here must be evaluated with this script's model too (no other reader
knows the swap).
"""
import jax.numpy as jnp

from skymoe_jax import cli, train
from skymoe_jax.evaluation import generate
from skymoe_jax.model import factory, skymoe


class ColumnMajor(skymoe.SkyMoE):
  """SkyMoE on the transposed image: image token i * grid + j is patch (row j, column i)."""

  def encode_images(self, images):
    return super().encode_images(jnp.swapaxes(images, 1, 2))


def use_column_major() -> None:
  """Every model the trainer and the evaluator build is ColumnMajor."""
  skymoe.SkyMoE = factory.SkyMoE = generate.SkyMoE = ColumnMajor


if __name__ == '__main__':
  use_column_major()
  cli.run(train.main, train.define_flags)
